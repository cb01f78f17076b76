#!/usr/bin/env bash
# The whole test suite (and the lint) in .venv.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
