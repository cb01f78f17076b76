#!/usr/bin/env bash
# Make .venv with a CPU build of torch and bnfold installed (re-run only when pyproject.toml changes).
# Sourced by scripts/demo.sh and scripts/test.sh; BNFOLD_TORCH overrides the torch requirement.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
stamp=.venv/.bnfold-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bnfold: setting up .venv (first run only)..." >&2
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  # torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "${BNFOLD_TORCH:-torch==2.13.0}" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  .venv/bin/python -c 'import torch' || { echo "bnfold: torch failed to install" >&2; exit 1; }
  .venv/bin/python -m pip install -q -e ".[export,train,io,test]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  .venv/bin/python -c 'import bnfold, onnx, onnxruntime, pytest' || { echo "bnfold: install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
