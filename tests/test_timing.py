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
    assert times.as_dict() == {"build exports": [10.0, 1, 0], "build schemes": [30.0, 1, 0]}


def test_a_failing_stage_is_still_timed(clock):
    times = StageTimes()
    with pytest.raises(RuntimeError), times.measure("vLLM open"):
        clock.now += 2
        raise RuntimeError("engine died")
    assert times.as_dict() == {"vLLM open": [2.0, 1, 0]}


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
    assert merged.as_dict() == {"build drift": [40.0, 2, 0], "vLLM score": [20.0, 1, 0]}
    lines = merged.lines(process_seconds=100.0)
    assert lines[1].split()[:4] == ["build", "drift", "40.0", "2"] and lines[1].endswith("40.0%")
    assert lines[-1].startswith("(outside the stages above)") and lines[-1].endswith("40.0%")


class FakeMemory:
    """A device's peak-allocation counter: `allocated` now, `high` the peak since the last reset."""

    def __init__(self) -> None:
        self.allocated = self.high = 0

    def set(self, allocated: int) -> None:
        self.allocated = allocated
        self.high = max(self.high, allocated)

    def peak(self) -> int:
        return self.high

    def reset(self) -> None:
        self.high = self.allocated


def test_peak_memory_per_stage_includes_inner_stages(clock):
    """A drift build loads a model (10 GiB), inside it a scheme build peaks at 30 GiB and frees down to 12 GiB;
    the drift build then peaks at 20 GiB. Peaks: scheme 30, drift 30 (its inner stage included), and a later
    stage starting at 12 GiB allocated peaks at what it reached itself (15), not at the earlier 30."""
    memory = FakeMemory()
    times = StageTimes(memory)
    with times.measure("build drift"):
        memory.set(10)
        with times.measure("build schemes"):
            memory.set(30)
            memory.set(12)
        memory.set(20)
        memory.set(12)
    with times.measure("vLLM score"):
        memory.set(15)
    assert times.peak_bytes == {"build drift": 30, "build schemes": 30, "vLLM score": 15}
    merged = StageTimes(FakeMemory())
    merged.merge(times.as_dict())
    merged.merge({"vLLM score": [1.0, 1, 40], "old worker": [1.0, 1]})  # a table without peaks still merges
    assert merged.peak_bytes["vLLM score"] == 40 and merged.peak_bytes["old worker"] == 0
    assert merged.lines()[0].split()[-2:] == ["peak", "GiB"]


def test_cpu_runs_never_touch_cuda():
    """Without CUDA in use the probe reads 0 and the table has no memory column."""
    import torch

    from quantsuite.timing import CudaPeakMemory

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")
    assert CudaPeakMemory().peak() == 0
    times = StageTimes()
    with times.measure("build drift"):
        pass
    assert "peak" not in times.lines()[0]


def test_a_span_timed_by_the_caller_counts_once(clock):
    """`add` records a span known to be a stage only after it ended (a lock wait that turned out to be another
    worker's build), and takes it out of the enclosing stage's own time."""
    times = StageTimes()
    with times.measure("build drift"):
        clock.now += 5
        times.add("wait for another worker's exports", 3.0)
    assert times.as_dict() == {"build drift": [2.0, 1, 0], "wait for another worker's exports": [3.0, 1, 0]}


def test_scheme_times_sum_each_schemes_tests_in_run_order():
    """Each test's phases add up under its scheme; schemes in the order they first ran, tests of no scheme last, each
    scheme's slowest test named. Planted: a phase counted under another scheme, or a test counted twice, moves a sum."""
    from quantsuite.timing import SchemeTimes

    times = SchemeTimes()
    reports = [("top50", "t.py::test_drift[top50]", 1.0), (None, "t.py::test_lock", 0.25),
               ("top50", "t.py::test_drift[top50]", 2.0), ("bf16", "t.py::test_vllm[cpu-bf16]", 4.0),
               ("top50", "t.py::test_vllm[cpu-top50]", 0.5)]  # fmt: skip
    for scheme, test, seconds in reports:
        times.add(scheme, test, seconds)
    assert times.schemes() == ["top50", None, "bf16"]
    assert [times.seconds(scheme) for scheme in ("top50", "bf16", None)] == [3.5, 4.0, 0.25]
    lines = times.lines()
    assert [line.split()[0] for line in lines[1:]] == ["top50", "bf16", "(tests"]
    assert lines[1].split()[1:3] == ["3.5", "2"] and lines[1].endswith("test_drift[top50] 3.0 s")
