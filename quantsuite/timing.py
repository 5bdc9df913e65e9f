"""Where a run's time and GPU memory go: seconds per stage, each stage's own time only (a stage run inside another,
such as a scoring pass inside a scheme build, is counted once, under itself), and each stage's peak GPU memory
(the highest CUDA allocation while it ran, its inner stages included, summed over the process's GPUs). One table
per process; the root conftest merges the xdist workers' tables and prints it in the terminal summary
("quantsuite time per stage").

>>> times = StageTimes()
>>> with times.measure("build exports"):
...     with times.measure("build schemes"):
...         pass
>>> sorted(times.as_dict())
['build exports', 'build schemes']
>>> times.as_dict()["build schemes"][1]  # [seconds, count, peak bytes]
1
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class CudaPeakMemory:
    """Peak CUDA memory allocated by this process (summed over its GPUs) since the last reset; 0 while CUDA is not
    in use (torch not imported or not initialized), so CPU runs never touch CUDA."""

    @staticmethod
    def _cuda():
        torch = sys.modules.get("torch")
        return torch.cuda if torch is not None and torch.cuda.is_initialized() else None

    def peak(self) -> int:
        cuda = self._cuda()
        return sum(cuda.max_memory_allocated(index) for index in range(cuda.device_count())) if cuda else 0

    def reset(self) -> None:
        cuda = self._cuda()
        for index in range(cuda.device_count() if cuda else 0):
            cuda.reset_peak_memory_stats(index)


class StageTimes:
    """Seconds and counts per stage name, exclusive of the stages measured inside it; peak memory per stage,
    inclusive of them (the device's peak counter is reset when a stage starts, and an inner stage's peak is
    folded into the stage around it)."""

    def __init__(self, memory: CudaPeakMemory | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.peak_bytes: dict[str, int] = defaultdict(int)
        self.memory = memory or CudaPeakMemory()
        self._nested: list[float] = []  # per open measurement: seconds spent in stages measured inside it
        self._peaks: list[int] = []  # per open measurement: highest peak seen inside it before the last reset

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        if self._peaks:  # the enclosing stage keeps what it reached so far; the counter restarts for this one
            self._peaks[-1] = max(self._peaks[-1], self.memory.peak())
        self.memory.reset()
        started = time.perf_counter()
        self._nested.append(0.0)
        self._peaks.append(0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            inside = self._nested.pop()
            peak = max(self._peaks.pop(), self.memory.peak())
            self.memory.reset()
            self.seconds[stage] += elapsed - inside
            self.counts[stage] += 1
            self.peak_bytes[stage] = max(self.peak_bytes[stage], peak)
            if self._nested:
                self._nested[-1] += elapsed
                self._peaks[-1] = max(self._peaks[-1], peak)

    def add(self, stage: str, seconds: float) -> None:
        """Record `seconds` timed by the caller as one occurrence of `stage` (taken out of the enclosing stage's
        own time, as `measure` does): for a span known to be a stage only after it ended."""
        self.seconds[stage] += seconds
        self.counts[stage] += 1
        if self._nested:
            self._nested[-1] += seconds

    def as_dict(self) -> dict[str, list]:
        return {stage: [self.seconds[stage], self.counts[stage], self.peak_bytes[stage]] for stage in self.seconds}

    def merge(self, table: dict[str, list]) -> None:
        """Add another process's `as_dict()` (seconds and counts add up; the peak is the higher of the two)."""
        for stage, (seconds, count, *peak) in table.items():
            self.seconds[stage] += seconds
            self.counts[stage] += count
            self.peak_bytes[stage] = max(self.peak_bytes[stage], *peak, 0)

    def lines(self, process_seconds: float | None = None) -> list[str]:
        """The table, longest stage first; with `process_seconds` (summed over the processes) each stage's share
        and what no stage accounts for (tests' own work, imports, pytest). A peak GPU memory column when a stage
        used CUDA."""
        rows = sorted(self.seconds.items(), key=lambda item: -item[1])
        memory = any(self.peak_bytes.values())
        peak_header = f" {'peak GiB':>9}" if memory else ""
        lines = [f"{'stage':<44} {'seconds':>9} {'count':>6} {'share':>6}{peak_header}"]
        for stage, seconds in rows:
            share = f"{seconds / process_seconds:6.1%}" if process_seconds else ""
            peak = f" {self.peak_bytes[stage] / 2**30:9.2f}" if memory else ""
            lines.append(f"{stage:<44} {seconds:9.1f} {self.counts[stage]:6d} {share:>6}{peak}")
        if process_seconds:
            rest = process_seconds - sum(self.seconds.values())
            lines.append(f"{'(outside the stages above)':<44} {rest:9.1f} {'':>6} {rest / process_seconds:6.1%}")
        return lines


STAGE_TIMES = StageTimes()  # this process's table (a profiler's state: stages add to it, the conftest reads it)


class SchemeTimes:
    """Seconds of each scheme's tests (set-up, call and teardown summed), in the order the schemes first ran, and
    of the tests of no scheme: what one scheme costs a run, its first-in-the-process costs included.

    >>> times = SchemeTimes()
    >>> times.add("top50", "tests/test_drift.py::test_drift[top50]", 2.0)
    >>> times.add("top50", "tests/test_vllm_compat.py::test_vllm[cuda-top50]", 3.0)
    >>> times.add(None, "tests/test_cache.py::test_lock", 0.5)
    >>> [round(times.seconds(scheme), 1) for scheme in times.schemes()]
    [5.0, 0.5]
    """

    def __init__(self) -> None:
        self._tests: dict[str | None, dict[str, float]] = {}  # scheme -> test id -> seconds

    def add(self, scheme: str | None, test: str, seconds: float) -> None:
        tests = self._tests.setdefault(scheme, {})
        tests[test] = tests.get(test, 0.0) + seconds

    def schemes(self) -> list[str | None]:
        return list(self._tests)

    def seconds(self, scheme: str | None) -> float:
        return sum(self._tests.get(scheme, {}).values())

    def lines(self) -> list[str]:
        """The table in run order, tests of no scheme last; each scheme's slowest test named."""
        order = [scheme for scheme in self._tests if scheme is not None] + ([None] if None in self._tests else [])
        lines = [f"{'scheme':<36} {'seconds':>9} {'tests':>6}  slowest test"]
        for scheme in order:
            tests = self._tests[scheme]
            slowest = max(tests, key=tests.get)
            name = scheme if scheme is not None else "(tests of no scheme)"
            lines.append(f"{name:<36} {self.seconds(scheme):9.1f} {len(tests):6d}  "
                         f"{slowest.partition('::')[2]} {tests[slowest]:.1f} s")  # fmt: skip
        return lines
