"""The root conftest's sharing of CPU cores between pytest-xdist workers (torch's intra-op threads)."""

from __future__ import annotations

import pytest

from conftest import worker_threads


@pytest.mark.parametrize(("count", "override", "expected"), [
    ("2", None, 4), ("3", None, 2), ("16", None, None), (None, None, None), ("1", None, None), ("2", "3", 3),
])  # fmt: skip
def test_each_worker_gets_its_share_of_the_cores(monkeypatch, count, override, expected):
    """8 cores: 2 workers get 4 threads each, 3 get 2; 16 workers (fewer cores than workers) and no xdist (or one
    worker) keep torch's own default; QUANTSUITE_TORCH_THREADS wins."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)))
    for name, value in (("PYTEST_XDIST_WORKER_COUNT", count), ("QUANTSUITE_TORCH_THREADS", override)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert worker_threads() == expected
