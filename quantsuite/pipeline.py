"""The orchestrator: wires the stages of `quantsuite.stages` for one model, data configuration and catalog. It
holds no stage logic; each stage owns its inputs, cache key and reports/ JSON.

    >>> bench = Workbench(ModelSpec("tiny"), DataConfig(), load_catalog(), cache_root=Path(".quantsuite-cache"))
    >>> result = bench.schemes.result(bench.context.catalog.scheme("top50"))  # scores once, re-solve, calibrate
    >>> result.manifest["totals"]["coverage_by_weights"]                       # doctest: +SKIP
    0.5
    >>> bench.drift.measure(result.scheme)["export"]["kl_mean"]  # export, reload, compare  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from quantsuite import REPORTS_DIR
from quantsuite.catalog import Catalog
from quantsuite.data import DataConfig
from quantsuite.models import ModelSpec
from quantsuite.stages.benchmarks import Benchmarks
from quantsuite.stages.context import RunContext
from quantsuite.stages.drift import Drift
from quantsuite.stages.export import Exports
from quantsuite.stages.research import Research, ResearchSettings
from quantsuite.stages.scheme import Schemes
from quantsuite.stages.scores import Scores
from quantsuite.stages.vllm import VllmChecks


class Workbench:
    """One run's stages, left to right: scores -> schemes -> exports -> drift / vllm; research on scores + drift;
    benchmarks (what pytest-benchmark timed, as the report reads it). `drop_exports`: the research studies delete
    an export they built only to measure a scheme's drift (`plugin.session.catalog_readers_drop_exports`)."""

    def __init__(self, model_spec: ModelSpec, data_config: DataConfig, catalog: Catalog, cache_root: Path,
                 reports_dir: Path = REPORTS_DIR, live_models: int | None = None,
                 run_id: str = "adhoc", research: ResearchSettings | None = None,
                 vllm_engine_share: float = 0.3, drop_exports: bool = False) -> None:  # fmt: skip
        self.context = RunContext(model_spec, data_config, catalog, cache_root, reports_dir, run_id)
        self.scores = Scores(self.context)
        self.schemes = Schemes(self.context, self.scores, live_models)
        self.exports = Exports(self.context, self.schemes)
        self.drift = Drift(self.context, self.schemes, self.exports)
        self.vllm = VllmChecks(self.context, self.schemes, self.exports, vllm_engine_share)
        self.research = Research(self.context, self.scores, self.schemes, self.drift, research,
                                 keep_exports=not drop_exports)  # fmt: skip
        self.benchmarks = Benchmarks(self.context)
