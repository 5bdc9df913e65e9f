"""Benchmarks stage (quantsuite/stages/benchmarks.py): one part per benchmark kind, stamped with the run."""

from __future__ import annotations

import json


def test_a_timed_benchmark_is_published_as_a_part_of_its_scheme(workbench, tmp_path):
    from quantsuite.stages.benchmarks import Benchmarks
    from quantsuite.stages.context import RunContext

    context = workbench.context
    context = RunContext(context.model_spec, context.data_config, context.catalog, context.cache.root, tmp_path,
                         "benchmarks-test")  # fmt: skip  (not this run's reports: the report would join them)
    bench = Benchmarks(context)
    assert bench.record({"kind": "autoquant_scoring"}, 1.0) is None, "nothing the report reads: no scheme"
    bench.record({"scheme": "bf16", "kind": "fake_quant_prefill", "tokens": 64}, 0.5)
    path = bench.record({"scheme": "bf16", "kind": "fake_quant_decode", "tokens": 8}, 0.25)
    published = json.loads(path.read_text())
    assert published["run_id"] == "benchmarks-test"
    assert published["fake_quant_prefill"]["median_s"] == 0.5 and published["fake_quant_decode"]["tokens"] == 8
