#!/usr/bin/env bash
# Make .venv-zoo: torch 2.14 with the matching torchvision, timm and bnfold, for benchmarks/real_zoo.py.
# (torchvision and timm do not load beside the torch 2.13.0 CPU build of .venv.) Re-run only when this file changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
stamp=.venv-zoo/.bnfold-zoo-setup
want=$(cat pyproject.toml scripts/zoo_env.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bnfold: setting up .venv-zoo (the log is .venv-zoo/setup.log)..." >&2
  [ -x .venv-zoo/bin/python ] || "$python" -m venv .venv-zoo
  log=.venv-zoo/setup.log
  : > "$log"
  step() { "$@" >> "$log" 2>&1 || { tail -30 "$log" >&2; echo "bnfold: zoo set-up failed: $*" >&2; exit 1; }; }
  step .venv-zoo/bin/python -m pip install --upgrade pip
  # a matching pair from the registry (torchvision's C extension is built for one torch release)
  step .venv-zoo/bin/python -m pip install "${BNFOLD_ZOO_TORCH:-torch==2.14.1}" "${BNFOLD_ZOO_TORCHVISION:-torchvision==0.29.1}"
  step .venv-zoo/bin/python -m pip install timm -e ".[export,io]"
  step .venv-zoo/bin/python -c 'import torch, torchvision, timm, bnfold, onnx, onnxruntime, onnxscript, onnxsim'
  echo "$want" > "$stamp"
fi
