"""quantsuite.timing: time per stage, each stage's own time, merged across processes."""

from __future__ import annotations

import pytest

from quantsuite import timing
from quantsuite.timing import StageTimes


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_a_stage_inside_another_is_counted_once(clock):
    """An export build (10 s) that triggers a scheme build (30 s) inside it: 10 s export, 30 s scheme."""
    times = StageTimes()
    with times.measure("build exports"):
        clock.now += 4
        with times.measure("build schemes"):
            clock.now += 30
        clock.now += 6
    assert times.as_dict() == {"build exports": [10.0, 1], "build schemes": [30.0, 1]}


def test_a_failing_stage_is_still_timed(clock):
    times = StageTimes()
    with pytest.raises(RuntimeError), times.measure("vLLM open"):
        clock.now += 2
        raise RuntimeError("engine died")
    assert times.as_dict() == {"vLLM open": [2.0, 1]}


def test_workers_merge_and_the_table_accounts_for_every_second(clock):
    """Two workers' tables merge stage by stage; shares are of the summed worker time, and the rest is shown."""
    first, second = StageTimes(), StageTimes()
    for times, seconds in ((first, 30), (second, 10)):
        with times.measure("build drift"):
            clock.now += seconds
    with second.measure("vLLM score"):
        clock.now += 20
    merged = StageTimes()
    merged.merge(first.as_dict())
    merged.merge(second.as_dict())
    assert merged.as_dict() == {"build drift": [40.0, 2], "vLLM score": [20.0, 1]}
    lines = merged.lines(process_seconds=100.0)
    assert lines[1].split()[:4] == ["build", "drift", "40.0", "2"] and lines[1].endswith("40.0%")
    assert lines[-1].startswith("(outside the stages above)") and lines[-1].endswith("40.0%")
