"""Where a run's time goes: seconds per stage, each stage's own time only (a stage run inside another, such as a
scoring pass inside a scheme build, is counted once, under itself). One table per process; the root conftest
merges the xdist workers' tables and prints it in the terminal summary ("quantsuite time per stage").

>>> times = StageTimes()
>>> with times.measure("build exports"):
...     with times.measure("build schemes"):
...         pass
>>> sorted(times.as_dict())
['build exports', 'build schemes']
>>> times.as_dict()["build schemes"][1]  # [seconds, count]
1
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimes:
    """Seconds and counts per stage name, exclusive of the stages measured inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._nested: list[float] = []  # per open measurement: seconds spent in stages measured inside it

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            inside = self._nested.pop()
            self.seconds[stage] += elapsed - inside
            self.counts[stage] += 1
            if self._nested:
                self._nested[-1] += elapsed

    def as_dict(self) -> dict[str, list]:
        return {stage: [self.seconds[stage], self.counts[stage]] for stage in self.seconds}

    def merge(self, table: dict[str, list]) -> None:
        """Add another process's `as_dict()`."""
        for stage, (seconds, count) in table.items():
            self.seconds[stage] += seconds
            self.counts[stage] += count

    def lines(self, process_seconds: float | None = None) -> list[str]:
        """The table, longest stage first; with `process_seconds` (summed over the processes) each stage's share
        and what no stage accounts for (tests' own work, imports, pytest)."""
        rows = sorted(self.seconds.items(), key=lambda item: -item[1])
        lines = [f"{'stage':<44} {'seconds':>9} {'count':>6} {'share':>6}"]
        for stage, seconds in rows:
            share = f"{seconds / process_seconds:6.1%}" if process_seconds else ""
            lines.append(f"{stage:<44} {seconds:9.1f} {self.counts[stage]:6d} {share:>6}")
        if process_seconds:
            rest = process_seconds - sum(self.seconds.values())
            lines.append(f"{'(outside the stages above)':<44} {rest:9.1f} {'':>6} {rest / process_seconds:6.1%}")
        return lines


STAGE_TIMES = StageTimes()  # this process's table (a profiler's state: stages add to it, the conftest reads it)
