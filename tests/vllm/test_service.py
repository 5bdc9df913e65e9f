"""The vLLM server's process: what environment it starts with (no vLLM needed: the start is intercepted)."""

from __future__ import annotations

import subprocess

import pytest

import quantsuite
from quantsuite.vllm import service


@pytest.mark.parametrize(("cpu_build", "ours", "users", "expected"), [
    (True, None, None, "1"),  # one process: vLLM's one serving thread for its OpenMP kernels too
    (True, "2", None, "2"),  # an xdist worker's share of the cores
    (True, "6", "6", "6"),  # the user's
    (False, "8", None, None),  # CUDA build: a worker's CPU share is not passed on, vLLM picks its own
    (False, "8", "8", "8"),  # the user's
])  # fmt: skip
def test_the_server_starts_with_its_openmp_threads(monkeypatch, tmp_path, cpu_build, ours, users, expected):
    """On the CPU build vLLM serves with one torch thread, but its OpenMP kernels took every core: two engines (or
    an engine beside an xdist worker) on the 2-core box then waited on each other's threads at every barrier (a
    greedy decode 2.6 s against 0.11 s alone; reports/profile-cpu-2core/README.md)."""
    started = []
    monkeypatch.setattr(service, "is_cpu_build", lambda _python: cpu_build)
    monkeypatch.setattr(subprocess, "Popen", lambda *args, env, **kwargs: started.append(env))
    if ours is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", ours)
    monkeypatch.delitem(quantsuite.USER_ENVIRONMENT, "OMP_NUM_THREADS", raising=False)
    if users is not None:
        monkeypatch.setitem(quantsuite.USER_ENVIRONMENT, "OMP_NUM_THREADS", users)
    server = service.VllmService(tmp_path / "python", tmp_path / "logs")
    server._start()
    server.process = None  # nothing was started
    assert started[0].get("OMP_NUM_THREADS") == expected
