#!/usr/bin/env bash
# The whole test suite (what CI and `make test` run): the passes declared in quantsuite/steps.py (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m quantsuite.steps ci "$@"
