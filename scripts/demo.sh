#!/usr/bin/env bash
# The main job, end to end, on the built-in zoo: no arguments, no downloads.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/bnfold demo --checkpoint models/resnet-tiny.pt "$@"
