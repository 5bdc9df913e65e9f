"""Scores stage: one AutoQuant scoring pass per scoring plan (method, formats, samples), cached as a search state
that carries no code (tensors + JSON, read back weights-only).

    >>> state, key = Scores(context).state(Scores(context).plan(context.catalog.scheme("top50")))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from quantsuite import autoquant
from quantsuite.autoquant import ScoringPlan, load_search_state, run_scoring, save_search_state
from quantsuite.cache import code_hash
from quantsuite.catalog import CUDA_ONLY_PRESETS, LM_HEAD_PATTERN, VISION_PATTERN, SchemeError, SchemeSpec
from quantsuite.stages.context import RunContext, free_memory


class Scores:
    """Search states by plan: from memory, the disk cache (`scores/<key>`), or one scoring run."""

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.runs = 0  # how many times AutoQuant scoring actually ran in this process
        self._states: dict[str, dict] = {}

    def plan(self, scheme: SchemeSpec) -> ScoringPlan:
        """What scoring `scheme` depends on besides model and data; schemes with equal plans share one pass."""
        formats = [self.context.catalog.formats[name] for name in scheme.formats]
        if len({(spec.exclude_modules, spec.lm_head) for spec in formats}) > 1:
            raise SchemeError(f"schemes.yaml: {scheme.name}.formats: an autoquant scheme's formats must share "
                              "exclude_modules and lm_head (eligibility is one set of disabled layers)")  # fmt: skip
        if any(spec.kv_cache for spec in formats):
            raise SchemeError(f"schemes.yaml: {scheme.name}.formats: KV-cache formats work in plain schemes only")
        lm_head = formats[0].lm_head
        return ScoringPlan(
            method=scheme.method,
            presets=tuple(spec.preset for spec in formats),
            disabled_layers=(VISION_PATTERN, *(() if lm_head else (LM_HEAD_PATTERN,)), *formats[0].exclude_modules),
            cost_excluded=(VISION_PATTERN, *(() if lm_head else (LM_HEAD_PATTERN,))),
            score_samples=scheme.score_samples or self.context.data_config.scoring_samples,
            calibration=scheme.calibration,
            grouping=scheme.grouping,
        )

    def scores_key(self, plan: ScoringPlan) -> str:
        code = code_hash(autoquant, sys.modules[__name__])
        defaults = {("grouping", "fused"), ("draw", None)}  # keep the keys from before these fields
        inputs = {k: v for k, v in asdict(plan).items() if k != "calibration" and (k, v) not in defaults}
        return self.context.stage_key({"plan": inputs, "code": code}, plan.calibration)

    def state(self, plan: ScoringPlan) -> tuple[dict, str]:
        """(search state, its cache key) for `plan`."""
        key = self.scores_key(plan)
        if key not in self._states:

            def build(directory: Path) -> None:
                needs = next((CUDA_ONLY_PRESETS[p] for p in plan.presets if p in CUDA_ONLY_PRESETS), None)
                self.context.require_cuda(needs, f"AutoQuant scoring over {'+'.join(plan.presets)}")
                loaded = self.context.load()
                started = time.perf_counter()
                if plan.draw is None:
                    batches = self.context.calibration_batches("scoring", plan.score_samples, plan.calibration)
                else:
                    batches = self.context.drawn_batches(plan.score_samples, plan.draw)
                state = run_scoring(loaded.model, plan, batches, loaded.device)
                self.runs += 1
                save_search_state(state, directory / "search_state.pt")
                (directory / "plan.json").write_text(json.dumps(asdict(plan) | {"seconds": time.perf_counter()
                                                                                 - started}, indent=1))  # fmt: skip
                del loaded
                free_memory()

            label = f"({plan.method}, {'+'.join(plan.presets)})"
            path, _ = self.context.cache.get_or_build("scores", key, build, label)
            self._states[key] = load_search_state(path / "search_state.pt")
        return self._states[key], key
