"""Research stage: per-block sensitivity by scoring method, the drift-vs-bits Pareto sweep (re-solved from one
scoring pass) and the solver's optimality gap; published as reports/research/<model>/research.json.

    >>> Research(context, scores, drift).run()["sweep"][0]["kl_mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from quantsuite import analysis
from quantsuite.autoquant import apply_config, picked_effective_bits, resolve_config
from quantsuite.cache import code_hash
from quantsuite.catalog import SchemeSpec
from quantsuite.divergence import capture, compare
from quantsuite.stages.context import RunContext, free_memory
from quantsuite.stages.drift import Drift
from quantsuite.stages.scores import Scores

SWEEP_TARGETS = (15.0, 14.0, 13.0, 12.0, 11.0, 10.0, 9.0, 8.5)


class Research:
    """Cached under `research/<key>` (key: the scores' keys + evaluation data + targets + code)."""

    def __init__(self, context: RunContext, scores: Scores, drift: Drift) -> None:
        self.context = context
        self.scores = scores
        self.drift = drift

    def run(self) -> dict:
        context = self.context
        searches = [s for s in context.catalog.schemes if s.mode == "autoquant"]
        plans = {}
        for scheme in searches:
            plans.setdefault(scheme.method, (scheme, self.scores.plan(scheme)))
        if "gradient" not in plans:
            raise ValueError("research needs a gradient autoquant scheme in schemes.yaml")
        states = {method: self.scores.state(plan) for method, (_, plan) in plans.items()}
        base = plans["gradient"][0]
        key = context.cache.key({"scores": {m: k for m, (_, k) in states.items()}, "targets": SWEEP_TARGETS,
                                 "evaluation": context.splits.fingerprint, "stage": "research",
                                 "code": code_hash(analysis, sys.modules[__name__])})  # fmt: skip

        def factory(bits: float) -> SchemeSpec:
            return base.model_copy(update={"name": f"sweep_eb{bits:g}", "coverage": None, "effective_bits": bits,
                                           "coverage_mode": "auto"})  # fmt: skip

        def build(directory: Path) -> None:
            state = states["gradient"][0]
            sweep = []
            for bits in SWEEP_TARGETS:
                resolution = resolve_config(state, factory(bits))
                model = context.load().model
                apply_config(model, resolution.quant_config, context.batches("calibration"), context.device)
                evaluation = capture(model, context.batches("evaluation"), context.device)
                measured = compare(self.drift.reference(), evaluation, context.device)
                del model
                free_memory()
                lm_bits = picked_effective_bits(state, resolution.group_formats)
                sweep.append({"target_effective_bits": bits, "lm_effective_bits": lm_bits,
                              "kl_mean": measured["kl_mean"], "top1_agreement": measured["top1_agreement"],
                              "perplexity_delta": measured["perplexity_delta"]})  # fmt: skip
            result = {
                "sensitivity": analysis.block_sensitivities({m: s for m, (s, _) in states.items()}),
                "sweep": sweep,
                "optimality_gap": analysis.optimality_gap(state, factory, list(SWEEP_TARGETS)),
            }
            (directory / "research.json").write_text(json.dumps(result, indent=1))

        path, _ = context.cache.get_or_build("research", key, build, "research")
        result = json.loads((path / "research.json").read_text())
        context.publish("research", "research", result)
        return result
