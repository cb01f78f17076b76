#!/usr/bin/env bash
# The declared floors, tested: make .venv-min with exactly the lowest version pyproject.toml allows of each
# dependency (core, export, train, io; test tools at their newest) on the lowest Python it allows, then run the
# whole suite there. Run it before raising or lowering a floor. Not part of CI: torch from the registry is a CUDA
# build (about 7 GB installed, 3 min here); the suite then takes about 8 min on 2 cores.
#   bash scripts/min_versions.sh [pytest args...]
# PYTHON_MIN=... names the interpreter (default: python3.10 on PATH, else pyenv's 3.10).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON_MIN:-}
if [ -z "$python" ]; then  # python3.10 on PATH, else one pyenv installed
  for candidate in python3.10 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do
    if "$candidate" --version >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -n "$python" ] || { echo "bnfold: no Python 3.10 found: set PYTHON_MIN to one" >&2; exit 2; }
floors=$(python3 - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for requirement in project["dependencies"] + extras["export"] + extras["train"] + extras["io"]:
    name, low = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
    print(f"{name}=={low}")
PY
)
stamp=.venv-min/.bnfold-min-setup
want=$(cat pyproject.toml scripts/min_versions.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bnfold: setting up .venv-min with $(echo $floors) (the log is .venv-min/setup.log)..." >&2
  rm -rf .venv-min
  "$python" -m venv .venv-min
  log=.venv-min/setup.log
  step() { "$@" >> "$log" 2>&1 || { tail -30 "$log" >&2; echo "bnfold: set-up failed: $*" >&2; exit 1; }; }
  # shellcheck disable=SC2086  # one argument per requirement
  step .venv-min/bin/python -m pip install $floors pytest pytest-timeout hypothesis onnxoptimizer
  step .venv-min/bin/python -m pip install --no-deps -e .
  echo "$want" > "$stamp"
fi
.venv-min/bin/python -c 'import sys; from importlib.metadata import version as v; print("python", sys.version.split()[0], *(f"{n} {v(n)}" for n in ("torch", "onnx", "onnxruntime", "numpy", "click", "onnxscript", "onnxsim")))'
exec .venv-min/bin/python -m pytest -p no:cacheprovider "$@"
