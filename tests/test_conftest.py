"""The root conftest's sharing of CPU cores between pytest-xdist workers (torch threads, vLLM's OpenMP binding)."""

from __future__ import annotations

import pytest
import torch

from conftest import vllm_environment, worker_cores


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)))


@pytest.mark.parametrize(("worker", "count", "expected"), [
    ("gw0", "2", [0, 1, 2, 3]), ("gw1", "2", [4, 5, 6, 7]), ("gw2", "3", [4, 5]),
    (None, None, None), ("gw0", "1", None),
])  # fmt: skip
def test_each_worker_gets_its_own_slice_of_the_cores(monkeypatch, eight_cores, worker, count, expected):
    for name, value in (("PYTEST_XDIST_WORKER", worker), ("PYTEST_XDIST_WORKER_COUNT", count)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert worker_cores() == expected


def test_a_cpu_vllm_server_is_bound_to_its_worker_cores_and_a_gpu_one_to_its_gpu(monkeypatch, eight_cores):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert vllm_environment(torch.device("cpu")) == {"VLLM_CPU_OMP_THREADS_BIND": "4,5,6,7"}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert vllm_environment(torch.device("cuda", 1)) == {"CUDA_VISIBLE_DEVICES": "1"}
