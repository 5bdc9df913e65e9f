"""The run's settings at pytest_configure: what must happen before anything else in the process."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import quantsuite
from quantsuite.cache import TOOLCHAIN_CACHES, toolchain_root
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
    folders = toolchain_root(tmp_path, os.environ)  # toolchains/, or the forced kernel set's folder in it
    assert seen and all(path == str(folders / "cuda") for path in seen), seen
    assert config.stash[session.SETTINGS].model_spec.device == "auto"


@pytest.mark.parametrize(("users", "expected"), [(None, "4"), ("3", "3")])
def test_a_workers_share_of_the_cores_passes_to_the_processes_it_starts(monkeypatch, users, expected):
    """A pytest run of the machinery tests or the vLLM server started by one of two workers takes that worker's
    share (4 of 8 cores), not every core beside the other worker; OMP_NUM_THREADS set by the user wins."""
    threads = []
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.delenv("QUANTSUITE_TORCH_THREADS", raising=False)
    if users is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", users)
    session.share_cpu_threads()
    assert threads == [4] and os.environ["OMP_NUM_THREADS"] == expected


def test_the_loaded_heap_is_kept_out_of_the_garbage_collector(workbench):
    """Once the workbench is built, what was loaded then, the stages' lazy imports included, is frozen: a full
    collection no longer walks it."""
    import gc
    import sys

    assert gc.get_freeze_count() > 100_000
    assert {"modelopt.torch.quantization", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"} <= set(sys.modules)


@pytest.mark.parametrize(("drop_exports", "worker", "expected"),
                         [(True, None, True), (True, "gw1", False), (False, None, False)])  # fmt: skip
def test_catalog_readers_drop_exports_only_alone_in_their_run(monkeypatch, drop_exports, worker, expected):
    """A reader of the whole catalog (research, nested-scheme check) builds other schemes' exports for their drift;
    under --drop-exports it deletes them only where no xdist worker beside it may be reading one (each worker runs
    whole schemes; the nightly's machinery and research steps run in one process). Planted: deleting under xdist."""
    if worker is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    config = SimpleNamespace(getoption=lambda name: {"--drop-exports": drop_exports}[name])
    assert session.catalog_readers_drop_exports(config) is expected
