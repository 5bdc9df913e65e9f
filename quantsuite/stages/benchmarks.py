"""Benchmarks stage: what each timed benchmark measured, as the report reads it, published as
reports/benchmarks/<model>/<scheme>.json (one part per benchmark kind). pytest-benchmark times the closures and
keeps its own JSON (the nightly's regression gate compares those); the report reads these.

    >>> Benchmarks(context).record(benchmark.extra_info, benchmark.stats.stats.median)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from quantsuite.stages.context import RunContext


class Benchmarks:
    """One part per benchmark kind of a scheme: its median round (seconds) and what the test recorded beside it
    (tokens per round, paired ratios, device, versions, prefill shape)."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def record(self, extra_info: dict, median_s: float) -> Path | None:
        """Publish one timed benchmark (None where it names no scheme and kind: nothing the report reads)."""
        scheme, kind = extra_info.get("scheme"), extra_info.get("kind")
        if not scheme or not kind:
            return None
        return self.context.publish_part("benchmarks", scheme, kind, extra_info | {"median_s": median_s})
