"""quantsuite.plugin.summary: what a run tells at its end (the time per scheme table here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from quantsuite.catalog import load_catalog
from quantsuite.plugin import summary


@pytest.fixture
def timer() -> summary.SchemeTimer:
    return summary.SchemeTimer(load_catalog().names_by_key())


def test_each_tests_phases_count_under_the_first_scheme_its_id_names(timer):
    """Set-up, call and teardown of a test add up under the scheme its id names first (by name or alias, as the
    scheduler groups it: a nested pair under its first), a test of no scheme apart. Planted: only the call phase
    counted (a drift test builds its drift in set-up), or a pair counted under its second scheme, fails it."""
    phases = [("tests/test_drift.py::test_drift_within_bounds[top50]", "setup", 4.0),
              ("tests/test_drift.py::test_drift_within_bounds[top50]", "call", 0.5),
              ("tests/test_drift.py::test_drift_within_bounds[top50]", "teardown", 0.25),
              ("tests/test_drift.py::test_nested[top25-top50]", "call", 1.0),
              ("tests/test_cache.py::test_lock", "call", 0.125),
              ("tests/test_vllm_compat.py::test_vllm[cpu-bf16]", "call", 2.0)]  # fmt: skip
    for nodeid, when, seconds in phases:
        timer.pytest_runtest_logreport(SimpleNamespace(nodeid=nodeid, when=when, duration=seconds))
    times = timer.times
    assert times.schemes() == ["fp8_autoquant_top50", "fp8_autoquant_top25", None, "bf16"]
    assert [times.seconds(name) for name in times.schemes()] == [4.75, 1.0, 0.125, 2.0]


def test_only_the_controller_keeps_the_table(monkeypatch):
    """Under xdist the controller gets every worker's test reports, so a worker keeping a table too would be a
    second, partial one: only a process that is not a worker registers the timer."""
    registered = []
    monkeypatch.setattr(summary, "settings", lambda config: SimpleNamespace(catalog=load_catalog()))

    def session(workerinput: bool) -> SimpleNamespace:
        config = SimpleNamespace(stash={}, pluginmanager=SimpleNamespace(register=lambda *a: registered.append(a)))
        if workerinput:
            config.workerinput = {}
        return SimpleNamespace(config=config)

    summary.pytest_sessionstart(session(workerinput=True))
    assert registered == []
    summary.pytest_sessionstart(session(workerinput=False))
    assert [name for _, name in registered] == ["quantsuite-scheme-times"]
