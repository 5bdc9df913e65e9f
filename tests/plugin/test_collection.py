"""The pytest layer (quantsuite/plugin/): sharing CPU cores between pytest-xdist workers (torch's intra-op
threads), and the order in which a scheme's tests run."""

from __future__ import annotations

import pytest

from quantsuite.plugin.collection import scheme_major_order
from quantsuite.plugin.session import worker_threads


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


def test_a_scheme_runs_its_tests_together():
    """pytest's own order (by session-scoped parameters) put each scheme's cuda verdict after every other scheme's
    tests; with --drop-exports its export was then built again. Each scheme's tests run together now, and tests of
    no scheme keep their places, as does each scheme's first test (the xdist work units keep their order)."""
    pytest_order = ["export[bf16]", "vllm[model_free-bf16]", "export[top50]", "vllm[model_free-top50]",
                    "solver_test", "vllm[cuda-bf16]", "vllm[cuda-top50]", "noise_floor"]  # fmt: skip

    def scheme_of(test: str) -> str | None:
        return test.rstrip("]").split("-")[-1].split("[")[-1] if "[" in test else None

    ordered = scheme_major_order(pytest_order, scheme_of)
    assert ordered == ["export[bf16]", "vllm[model_free-bf16]", "vllm[cuda-bf16]", "export[top50]",
                       "vllm[model_free-top50]", "vllm[cuda-top50]", "solver_test", "noise_floor"]  # fmt: skip
