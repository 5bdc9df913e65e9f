"""The run's settings at pytest_configure: what must happen before anything else in the process."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

import quantsuite
from quantsuite.cache import TOOLCHAIN_CACHES
from quantsuite.plugin import session


def test_toolchain_caches_are_placed_before_anything_initializes_cuda(request, monkeypatch, tmp_path):
    """The CUDA driver reads CUDA_CACHE_PATH once, when CUDA initializes; `--device auto` asks torch whether CUDA
    is there, which initializes it. Placed after that, the driver's kernel cache stayed in ~/.nv on a fresh GPU
    machine."""
    seen = []
    for name in TOOLCHAIN_CACHES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delitem(quantsuite.USER_ENVIRONMENT, name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: seen.append(os.environ.get("CUDA_CACHE_PATH")) or False)
    options = {"--device": "auto", "--cache-dir": str(tmp_path)}
    config = SimpleNamespace(getoption=lambda name: options.get(name, request.config.getoption(name)),
                             option=SimpleNamespace(run_id="toolchains-first"), stash={})  # fmt: skip
    session.pytest_configure(config)
    assert seen and all(path == str(tmp_path.resolve() / "toolchains" / "cuda") for path in seen), seen
    assert config.stash[session.SETTINGS].model_spec.device == "auto"
