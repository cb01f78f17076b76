#!/usr/bin/env bash
# Make .venv with a CPU build of torch and bnfold installed (re-run only when pyproject.toml changes).
# Sourced by scripts/demo.sh and scripts/test.sh; BNFOLD_TORCH overrides the torch requirement.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
stamp=.venv/.bnfold-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bnfold: setting up .venv (first run only; the log is .venv/setup.log)..." >&2
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  log=.venv/setup.log
  : > "$log"
  step() { "$@" >> "$log" 2>&1 || { cat "$log" >&2; echo "bnfold: set-up failed: $*" >&2; exit 1; }; }
  step .venv/bin/python -m pip install --upgrade pip
  # torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
  step .venv/bin/python -m pip install "${BNFOLD_TORCH:-torch==2.13.0}"
  step .venv/bin/python -m pip install -e ".[export,train,io,test]"
  step .venv/bin/python -c 'import bnfold, onnx, onnxruntime, onnxscript, onnxsim, pytest, sklearn, safetensors'
  echo "$want" > "$stamp"
fi
