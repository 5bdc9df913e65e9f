"""The root conftest's sharing of CPU cores between pytest-xdist workers (torch's intra-op threads)."""

from __future__ import annotations

import pytest

from conftest import worker_cores


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
