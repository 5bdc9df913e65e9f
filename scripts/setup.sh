#!/usr/bin/env bash
# Create .venv with the pinned CPU stack: torch 2.13.0+cpu (the wheel on disk), nvidia-modelopt 0.47.0,
# transformers, the test tools. Pinned through constraints/cpu.txt so CI never pulls a CUDA torch.
# GPU users: `pip install -e ".[test,plots]"` into an environment that already has their CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# QUANTSUITE_TORCH_INDEX: an index that serves torch 2.13.0+cpu (e.g. https://download.pytorch.org/whl/cpu) on a
# machine without the wheel on disk; here pip finds the wheel on disk without it.
.venv/bin/python -m pip install -q -c constraints/cpu.txt ${QUANTSUITE_TORCH_INDEX:+--extra-index-url "$QUANTSUITE_TORCH_INDEX"} \
  "torch==2.13.0+cpu"
.venv/bin/python -m pip install -q -c constraints/cpu.txt -e ".[test,plots]"
.venv/bin/python - <<'PY'
import torch
assert torch.version.cuda is None, f"a CUDA build of torch was installed ({torch.__version__}); expected 2.13.0+cpu"
print(f"quantsuite CPU environment ready: torch {torch.__version__}")
PY
