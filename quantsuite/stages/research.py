"""Research stage: the studies behind the research report, each cached on its own (the proxy study is recomputed
from the cached sweep, picks and drift it reads) and switchable (`ResearchSettings.studies`, pytest's
`--research-studies`), published together as reports/research/<model>/research.json.

- `sensitivity`: per-block sensitivity by scoring method and their Spearman, with its range over scoring draws;
- `sweep`: drift against effective bits, targets re-solved from one scoring pass, each KL with its interval;
- `optimality_gap`: ModelOpt's LP pick against an exact solve of the same scores, with its range over draws;
- `score_size`: how many scoring samples make the layer ranking and the picks stable (sizes x draws);
- `grouping`: ModelOpt's fused groups (q/k/v, gate/up) against one decision per linear, at the same budgets;
- `proxy`: does AutoQuant's objective (summed scores of a pick) order the schemes as their KL does?

Intervals are 95% bootstrap intervals over the evaluation captions (`quantsuite.analysis`); where the scoring data
was varied, the range over its draws.

    >>> Research(context, scores, schemes, drift).run()["sweep"][0]["kl_mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from quantsuite import analysis, divergence
from quantsuite.autoquant import (
    ScoringPlan,
    apply_config,
    pick_objective,
    picked_effective_bits,
    resolve_config,
)
from quantsuite.cache import code_hash
from quantsuite.catalog import SchemeSpec
from quantsuite.divergence import capture, compare
from quantsuite.stages.context import CudaRequired, RunContext, free_memory
from quantsuite.stages.drift import Drift
from quantsuite.stages.scheme import Schemes
from quantsuite.stages.scores import Scores

SWEEP_TARGETS = (15.0, 14.0, 13.0, 12.0, 11.0, 10.0, 9.0, 8.5)
STUDIES = ("sensitivity", "sweep", "optimality_gap", "score_size", "grouping", "proxy")
# the studies that read catalog schemes' results (their manifests and drift); the others need only scoring passes and
# the BF16 model, so the nightly builds them on a runner of its own beside the shards (the `studies` step)
READS_THE_CATALOG = ("proxy",)


@dataclass(frozen=True)
class ResearchSettings:
    """Which studies run, the score-size study's grid (sizes x scoring draws) and budgets, and the catalog schemes
    the proxy study reads (empty: all; pytest's --scheme: those, so that a run of a few schemes measures the drift
    of those alone, not of every catalog scheme: ~30 s each on the 3B shape)."""

    studies: tuple[str, ...] = STUDIES
    score_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    draws: tuple[int, ...] = (0, 1, 2)  # seeds of the scoring captions drawn from the scoring + training splits
    budgets: tuple[float, ...] = (13.0, 11.0, 9.0)  # effective bits at which picks are compared
    schemes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.studies) - set(STUDIES))
        if unknown:
            raise ValueError(f"--research-studies: unknown {unknown}; accepted: {', '.join(STUDIES)}")
        if len(self.score_sizes) < 2 or len(self.draws) < 2:
            raise ValueError("the score-size study needs at least two sizes and two draws (--research-score-sizes, "
                             "--research-draws)")  # fmt: skip


class Research:
    """Each study under `research/<key>` (key: the scores' keys + evaluation data + the study's settings + code)."""

    def __init__(self, context: RunContext, scores: Scores, schemes: Schemes, drift: Drift,
                 settings: ResearchSettings | None = None, keep_exports: bool = True) -> None:  # fmt: skip
        self.context = context
        self.scores = scores
        self.schemes = schemes
        self.drift = drift
        self.settings = settings or ResearchSettings()
        self.keep_exports = keep_exports  # False: an export built only to measure a scheme's drift is deleted after

    # --- plumbing ---------------------------------------------------------------------------------------------
    def _base(self) -> SchemeSpec:
        searches = [s for s in self.context.catalog.schemes if s.mode == "autoquant" and s.method == "gradient"
                    and s.grouping == "fused" and s.calibration == "text" and s.kv_cache is None]  # fmt: skip
        if not searches:
            raise ValueError("research needs a gradient autoquant scheme (fused grouping, text calibration, no KV "
                             "cache) in schemes.yaml")  # fmt: skip
        return min(searches, key=lambda s: len(s.formats))  # the plainest: one format (FP8) where there is one

    def _plan(self, **changes) -> ScoringPlan:
        return replace(self.scores.plan(self._base()), **changes)

    def _scheme(self, bits: float, solver: str = "modelopt", name: str = "sweep") -> SchemeSpec:
        return self._base().model_copy(update={"name": f"{name}_eb{bits:g}", "coverage": None, "effective_bits": bits,
                                               "coverage_mode": "auto", "solver": solver})  # fmt: skip

    def _measure(self, state: dict, scheme: SchemeSpec) -> dict:
        """Apply `scheme`'s pick from `state` to a fresh model, calibrate, and measure its drift against BF16."""
        context = self.context
        resolution = resolve_config(state, scheme)
        model = context.load().model
        apply_config(model, resolution.quant_config, context.batches("calibration"), context.device)
        measured = compare(self.drift.reference(), capture(model, context.batches("evaluation"), context.device),
                           context.device)  # fmt: skip
        del model
        free_memory()
        picks = resolution.group_formats
        return {"lm_effective_bits": picked_effective_bits(state, picks),
                "objective": pick_objective(state, picks),
                "kl_mean": measured["kl_mean"], "kl_interval": analysis.kl_interval(measured),
                "top1_agreement": measured["top1_agreement"], "perplexity_delta": measured["perplexity_delta"],
                "kl_by_caption": measured["kl_by_caption"],
                "quantized_modules": analysis.quantized_modules(resolution.groups, picks)}  # fmt: skip

    def study_key(self, study: str, inputs: dict) -> str:
        """A study's cache key: its inputs (the scores' keys, which hold the model, data and AutoQuant code), the
        evaluation split, and the code of what computes it: the studies and their analysis, and the drift stage's
        capture and comparison (their KL, top-1 and perplexity rows), so a changed KL computation is never served
        from a study measured with the old one."""
        code = code_hash(analysis, divergence, sys.modules[Drift.__module__], sys.modules[__name__])
        return self.context.cache.key(inputs | {"evaluation": self.context.splits.fingerprint,
                                                "stage": f"research.{study}", "code": code})  # fmt: skip

    def _cached(self, study: str, inputs: dict, build) -> dict:
        def write(directory: Path) -> None:
            (directory / f"{study}.json").write_text(json.dumps(build(), indent=1))

        path, _ = self.context.cache.get_or_build("research", self.study_key(study, inputs), write, study)
        return json.loads((path / f"{study}.json").read_text())

    # --- the studies ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every enabled study (cached), published as one research.json; a disabled study is absent from it."""
        result = {"settings": asdict(self.settings)}
        for study in self.settings.studies:
            result[study] = getattr(self, study)()
        self.context.publish("research", "research", result)
        return result

    def sensitivity(self) -> dict:
        """Per-block sensitivity by method on the scoring split, and the methods' Spearman on each scoring draw."""
        methods = {"gradient": self._plan(), "kl_div": self._plan(method="kl_div")}
        keys = {m: self.scores.scores_key(p) for m, p in methods.items()}

        def build() -> dict:
            states = {m: self.scores.state(p)[0] for m, p in methods.items()}
            result = analysis.block_sensitivities(states)
            per_draw = []
            for draw in self.settings.draws:
                drawn = {m: self.scores.state(replace(p, draw=draw))[0] for m, p in methods.items()}
                per_draw.append(analysis.block_sensitivities(drawn)["spearman"])
            result["spearman_by_draw"] = per_draw
            result["spearman_range"] = [min(per_draw), max(per_draw)]
            return result

        return self._cached("sensitivity", {"scores": keys, "draws": self.settings.draws}, build)

    def sweep(self) -> list[dict]:
        """Targets re-solved from one scoring pass (ModelOpt's LP, as schemes apply it), each applied and measured."""
        plan = self._plan()

        def build() -> dict:
            state, _ = self.scores.state(plan)
            rows = []
            for bits in SWEEP_TARGETS:
                rows.append({"target_effective_bits": bits} | self._measure(state, self._scheme(bits)))
            return {"rows": rows}

        return self._cached("sweep", {"scores": self.scores.scores_key(plan), "targets": SWEEP_TARGETS}, build)["rows"]

    def optimality_gap(self) -> list[dict]:
        """Per target: ModelOpt's LP objective against the exact optimum, and the gap's range over scoring draws."""
        plan = self._plan()
        keys = [self.scores.scores_key(p) for p in (plan, *(replace(plan, draw=d) for d in self.settings.draws))]

        def build() -> dict:
            rows = analysis.optimality_gap(self.scores.state(plan)[0], self._scheme, list(SWEEP_TARGETS))
            drawn = [analysis.optimality_gap(self.scores.state(replace(plan, draw=draw))[0], self._scheme,
                                             list(SWEEP_TARGETS)) for draw in self.settings.draws]  # fmt: skip
            for index, row in enumerate(rows):
                gaps = [rows_of_draw[index]["relative_gap"] for rows_of_draw in drawn]
                row["relative_gap_range"] = [min(gaps), max(gaps)]
            return {"rows": rows}

        return self._cached("optimality_gap", {"scores": keys, "targets": SWEEP_TARGETS}, build)["rows"]

    def score_size(self) -> dict:
        """Layer ranking and picks with few scoring samples against the largest size (draw 0), over several draws;
        each run's pick at the middle budget applied and measured."""
        settings = self.settings
        plans = {(size, draw): self._plan(score_samples=size, draw=draw)
                 for size in settings.score_sizes for draw in settings.draws}  # fmt: skip
        keys = {f"{size}:{draw}": self.scores.scores_key(plan) for (size, draw), plan in plans.items()}
        middle = settings.budgets[len(settings.budgets) // 2]

        def build() -> dict:
            states = {run: self.scores.state(plan)[0] for run, plan in plans.items()}
            study = analysis.score_size_stability(states, settings.budgets)
            for row in study["runs"]:
                measured = self._measure(states[row["size"], row["draw"]], self._scheme(middle, "exact"))
                row["drift"] = {k: measured[k] for k in ("lm_effective_bits", "kl_mean", "kl_interval")}
            return study | {"measured_budget": middle}

        return self._cached("score_size", {"scores": keys, "budgets": settings.budgets}, build)

    def grouping(self) -> dict:
        """The same budgets picked (exactly) from ModelOpt's fused groups and from one decision per linear layer."""
        plans = {grouping: self._plan(grouping=grouping) for grouping in ("fused", "per_linear")}
        keys = {grouping: self.scores.scores_key(plan) for grouping, plan in plans.items()}

        def build() -> dict:
            rows = []
            for bits in self.settings.budgets:
                picks = {grouping: self._measure(self.scores.state(plan)[0], self._scheme(bits, "exact"))
                         for grouping, plan in plans.items()}  # fmt: skip
                fused, finer = picks["fused"], picks["per_linear"]
                rows.append({"target_effective_bits": bits,
                             "overlap": analysis.jaccard(fused["quantized_modules"], finer["quantized_modules"]),
                             "fused_cost": analysis.kl_difference(fused, finer)} | picks)  # fmt: skip
            return {"rows": rows}

        return self._cached("grouping", {"scores": keys, "budgets": self.settings.budgets}, build)

    def proxy(self) -> dict:
        """AutoQuant's objective (summed scores of the pick under the base scoring pass) against PyTorch KL, over
        every catalog scheme the scores describe (every layer's format scored) and the sweep's picks."""
        plan = self._plan()
        state, key = self.scores.state(plan)
        sweep = self.sweep()
        catalog = self.context.catalog
        presets = {name: spec.preset for name, spec in catalog.formats.items()}
        measurements, objectives, left_out = {}, {}, {}
        for scheme in catalog.select(list(self.settings.schemes)):
            unscored = sorted({presets[f] for f in scheme.formats} - set(plan.presets))
            kv_cache = catalog.kv_cache(scheme)
            if scheme.mode == "none" or unscored or kv_cache:
                if scheme.mode != "none":
                    left_out[scheme.name] = (f"KV cache {kv_cache}: the scores do not see it" if kv_cache else
                                             f"formats not scored by the pass: {unscored}")  # fmt: skip
                continue
            try:
                objective, reason = analysis.scheme_objective(state, self.schemes.result(scheme).manifest, presets)
                if objective is None:
                    left_out[scheme.name] = reason
                    continue
                measurements[scheme.name] = self.drift.measure(scheme, self.keep_exports)["fake_quant"]
                objectives[scheme.name] = objective
            except CudaRequired as error:
                left_out[scheme.name] = str(error)
        for row in sweep:
            name = f"sweep_eb{row['target_effective_bits']:g}"
            measurements[name], objectives[name] = row, row["objective"]
        result = analysis.rank_against_kl(objectives, measurements)
        return result | {"objective": objectives, "kl_mean": {n: m["kl_mean"] for n, m in measurements.items()},
                         "kl_interval": {n: analysis.kl_interval(m) for n, m in measurements.items()},
                         "left_out": left_out, "scores": key}  # fmt: skip
