"""LM-only AutoQuant: score once per (model, data, formats, method), then re-solve or rank per scheme.

- `ScoringPlan.for_scheme` turns a scheme into the ModelOpt arguments: formats by preset name, the vision
  tower (and lm_head unless a format makes it eligible) in `disabled_layers` *and* in the cost exclusion, so
  effective bits are counted over LM linear weights only.
- `run_scoring` calls `mtq.auto_quantize` once and returns its search state (calibration + sensitivity
  scores for every candidate format of every layer group; q/k/v and gate/up are one group each).
- `resolve_config` turns a stored search state into a `mtq.quantize` config for a scheme: `auto` re-solves
  ModelOpt's LP at the scheme's target (`mtq.get_auto_quantize_config`), `top_k_blocks` ranks decoder blocks
  by summed score cost (FP8 score - BF16 score) and quantizes the least sensitive K% of them. With `auto`,
  the scheme's `solver` says whose pick is applied: ModelOpt's LP (default) or `exact_pick`, a 0/1 solve of the
  same scores rescaled to order 1 (ModelOpt's PuLP/CBC run stops short of the optimum on scores of ~1e-7);
  both picks' objectives are recorded either way.
- `apply_config` quantizes a fresh model with that config and the calibration split; `calibrate_kv_cache` then
  adds a scheme's `kv_cache` preset the way ModelOpt's hf_ptq does after AutoQuant (whose recipes switch output
  quantizers off): K/V quantizers on, calibrated in a pass of their own with every other quantizer off.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from tqdm.auto import tqdm

from quantsuite.catalog import SchemeSpec, block_index, vision_tower_off
from quantsuite.data import model_inputs

NO_QUANT = "NONE"


def recipe_name(recipe: object) -> str:
    """`FP8_DEFAULT_CFG(effective-bits: 8.0)` -> `FP8_DEFAULT_CFG`; `NONE(...)` -> `NONE`."""
    return str(recipe).split("(", 1)[0]


@dataclass(frozen=True)
class ScoringPlan:
    """Everything a scoring pass depends on besides model and data; schemes with equal plans share one pass."""

    method: str
    presets: tuple[str, ...]
    disabled_layers: tuple[str, ...]
    cost_excluded: tuple[str, ...]
    score_samples: int
    calibration: str = "text"  # text | image_text: what the scoring batches are (SchemeSpec.calibration)
    grouping: str = "fused"  # fused | per_linear: ModelOpt's grouping rules, or none (SchemeSpec.grouping)
    draw: int | None = None  # None: the scoring split; a seed: score_samples drawn from scoring + training (studies)


@contextlib.contextmanager
def grouping_rules(grouping: str):
    """ModelOpt's AutoQuant grouping rules for `grouping`: its own (fused: q/k/v one decision, gate/up one), or none
    (per_linear: every linear layer is a group of its own, the searcher's default without rules)."""
    from modelopt.torch.quantization.algorithms import _AutoQuantizeBaseSearcher

    if grouping == "fused":
        yield
        return
    with mock.patch.object(_AutoQuantizeBaseSearcher, "quant_grouping_rules", []):
        yield


def run_scoring(
    model: torch.nn.Module, plan: ScoringPlan, batches: list[dict], device: torch.device, target_bits: float = 12.0
) -> dict:
    """Run `mtq.auto_quantize` once on `model` (which it quantizes in place) and return its search state.

    `batches` (the scoring split) serve both AutoQuant's internal calibration and the scores; the scheme's
    own calibration later uses the separate calibration split.
    """
    import modelopt.torch.quantization as mtq

    def forward_step(module: torch.nn.Module, batch: dict):
        output = module(**model_inputs(batch, device, labels=True))
        return output.logits if plan.method == "kl_div" else output

    with grouping_rules(plan.grouping):
        _, state = mtq.auto_quantize(
            model,
            constraints={
                "effective_bits": target_bits,
                "cost": {"excluded_module_name_patterns": list(plan.cost_excluded)},
            },
            quantization_formats=list(plan.presets),
            data_loader=batches,
            forward_step=forward_step,
            loss_func=(lambda output, batch: output.loss) if plan.method == "gradient" else None,
            disabled_layers=list(plan.disabled_layers),
            num_calib_steps=len(batches),
            num_score_steps=len(batches),
            method=plan.method,
            verbose=False,
        )
    if hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()  # the gradient method leaves it on
    model.eval()
    return {key: state[key] for key in state if key != "model"}


class UnsafeCacheEntry(RuntimeError):
    """A cached search state that is not plain data (tensors, builtins, ModelOpt's QuantRecipe): refused."""


def _plain(value: object) -> object:
    """defaultdicts (which torch's weights-only loader cannot rebuild) as plain dicts, recursively."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def save_search_state(state: dict, path: Path) -> None:
    """The AutoQuant search state as data torch's weights-only loader reads back (see load_search_state)."""
    torch.save(_plain(state), path)


def load_search_state(path: Path) -> dict:
    """Read a search state with `weights_only=True` and one allowed class, ModelOpt's QuantRecipe: a cache entry
    that anyone could write (a shared runner cache, a copied .quantsuite-cache) cannot run code here."""
    import pickle

    from modelopt.torch.quantization.algorithms import QuantRecipe

    try:
        with torch.serialization.safe_globals([QuantRecipe]):
            return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise UnsafeCacheEntry(f"{path}: refused, not plain data ({str(error).splitlines()[0][:200]}); delete the "
                               f"cache entry {Path(path).parent} and run again") from None  # fmt: skip


def group_scores(state: dict) -> dict[str, dict]:
    """Per layer group: module names, block, and score / cost per candidate format name."""
    groups = {}
    for hparam, stats in state["candidate_stats"].items():
        names = [recipe_name(recipe) for recipe in stats["formats"]]
        modules = list(stats["module_names"])
        blocks = {block_index(name) for name in modules}
        groups[hparam] = {
            "modules": modules,
            "block": blocks.pop() if len(blocks) == 1 else None,
            "scores": {name: float(score) for name, score in zip(names, stats["scores"], strict=True)},
            "costs": {name: float(cost) for name, cost in zip(names, stats["costs"], strict=True)},
            "recipes": dict(zip(names, stats["formats"], strict=True)),
        }
    return groups


def picked_effective_bits(state: dict, group_formats: dict[str, str]) -> float:
    """ModelOpt's cost model applied to a pick: 16 x chosen costs / cost denominator (LM linear weights)."""
    groups = group_scores(state)
    return 16 * sum(groups[hparam]["costs"][fmt] for hparam, fmt in group_formats.items()) / state["cost_denominator"]


def block_sensitivity(state: dict) -> dict[int, float]:
    """Decoder block -> summed score cost of its groups' best FP8 format versus BF16 (higher = more sensitive)."""
    totals: dict[int, float] = {}
    for group in group_scores(state).values():
        if group["block"] is None:
            continue
        quantized = [score for name, score in group["scores"].items() if name != NO_QUANT]
        if quantized:
            cost = min(quantized) - group["scores"].get(NO_QUANT, 0.0)
            totals[group["block"]] = totals.get(group["block"], 0.0) + cost
    return dict(sorted(totals.items()))


def exact_pick(state: dict, effective_bits: float) -> tuple[dict[str, str], float]:
    """Minimum total score under the effective-bits budget, solved exactly (MILP); returns picks, objective."""
    from scipy.optimize import LinearConstraint, milp

    all_groups = group_scores(state)
    groups = [(name, g) for name, g in all_groups.items() if len(g["scores"]) > 1]
    fixed_cost = sum(min(g["costs"].values()) for g in all_groups.values() if len(g["scores"]) == 1)
    options = [(name, fmt, g["scores"][fmt], g["costs"][fmt]) for name, g in groups for fmt in g["scores"]]
    scale = max((abs(score) for *_, score, _ in options), default=1.0) or 1.0
    objective = np.array([score / scale for *_, score, _ in options])
    budget = state["cost_denominator"] * effective_bits / 16.0 - fixed_cost
    cost_row = np.array([[cost for *_, cost in options]])
    one_hot = np.array([[1.0 if option[0] == name else 0.0 for option in options] for name, _ in groups])
    constraints = [LinearConstraint(cost_row, -np.inf, budget), LinearConstraint(one_hot, 1, 1)]
    solution = milp(
        objective,
        constraints=constraints,
        integrality=np.ones(len(options)),
        bounds=(0, 1),
        options={"mip_rel_gap": 0.0},
    )  # proven optimal, not within HiGHS's default 1e-4
    if not solution.success:
        raise RuntimeError(f"exact solve failed at {effective_bits} bits: {solution.message}")
    picks = {options[i][0]: options[i][1] for i, x in enumerate(solution.x) if x > 0.5}
    return picks, float(sum(options[i][2] for i, x in enumerate(solution.x) if x > 0.5))


def pick_objective(state: dict, picks: dict[str, str]) -> float:
    """The LP's objective for a pick: the summed scores of the chosen formats over groups with a choice."""
    groups = group_scores(state)
    return float(sum(groups[name]["scores"][fmt] for name, fmt in picks.items() if len(groups[name]["scores"]) > 1))


def top_k_blocks(sensitivity: dict[int, float], coverage: float) -> list[int]:
    """The least sensitive round(coverage * blocks) decoder blocks (at least one), ties broken by index."""
    count = max(1, math.floor(coverage * len(sensitivity) + 0.5))
    ranked = sorted(sensitivity, key=lambda block: (sensitivity[block], block))
    return sorted(ranked[:count])


@dataclass(frozen=True)
class Resolution:
    """A scheme's decisions: the mtq.quantize config, group -> format name, and why (block ranking, or both
    solvers' objectives: the sum of the picked formats' scores, lower is better)."""

    quant_config: dict
    group_formats: dict[str, str]
    block_sensitivity: dict[int, float]
    chosen_blocks: tuple[int, ...] | None  # top_k_blocks only
    solver: dict | None = None  # auto only: both solvers' picks (objective, effective bits), which one was used
    groups: dict[str, dict] = field(default_factory=dict)  # group_scores of the search state it was resolved from


def resolve_config(state: dict, scheme: SchemeSpec) -> Resolution:
    """Per-scheme decisions from one stored search state (no model, no data: a pure function of the scores)."""
    from modelopt.torch.quantization.algorithms import _resolve_best_recipe

    groups = group_scores(state)
    sensitivity = block_sensitivity(state)
    chosen: tuple[int, ...] | None = None
    solver: dict | None = None
    if scheme.coverage_mode == "auto":
        bits = scheme.target_effective_bits
        recipes = _resolve_best_recipe(state, {"effective_bits": bits})  # the LP pick get_auto_quantize_config applies
        modelopt = {hparam: recipe_name(recipe) for hparam, recipe in recipes.items()}
        exact, _ = exact_pick(state, bits)
        exact = {hparam: exact.get(hparam, next(iter(group["scores"]))) for hparam, group in groups.items()}
        solver = {"used": scheme.solver, "differing_groups": sorted(h for h in groups if modelopt[h] != exact[h])}
        for name, pick in (("modelopt", modelopt), ("exact", exact)):
            solver[name] = {"objective": pick_objective(state, pick),
                            "effective_bits": picked_effective_bits(state, pick)}  # fmt: skip
        if scheme.solver == "exact":
            recipes = {hparam: groups[hparam]["recipes"][fmt] for hparam, fmt in exact.items()}
    else:
        chosen = tuple(top_k_blocks(sensitivity, scheme.target_coverage or 0.0))
        recipes = {}
        for hparam, group in groups.items():
            quantized = {name: score for name, score in group["scores"].items() if name != NO_QUANT}
            pick = min(quantized, key=quantized.get) if group["block"] in chosen and quantized else NO_QUANT
            recipes[hparam] = group["recipes"][pick]
    config = picks_config(state, recipes)
    group_formats = {hparam: recipe_name(recipe) for hparam, recipe in recipes.items()}
    return Resolution(config, group_formats, sensitivity, chosen, solver, groups)


def picks_config(state: dict, recipes: dict) -> dict:
    """The `mtq.quantize` config ModelOpt builds for `recipes` (group hparam -> QuantRecipe) picked over the search
    state `state`: its `get_auto_quantize_config` replaying them as the search's best."""
    import modelopt.torch.quantization as mtq

    replay = copy.copy(state)
    replay["best"] = dict(state["best"], recipe=recipes)
    return mtq.get_auto_quantize_config(replay)


@torch.no_grad()
def calibrate_loop(batches: list[dict], device: torch.device, description: str):
    def forward_loop(model: torch.nn.Module) -> None:
        for batch in tqdm(batches, desc=description, leave=False):
            model(**model_inputs(batch, device, labels=True))

    return forward_loop


def apply_config(model: torch.nn.Module, config: dict, batches: list[dict], device: torch.device) -> torch.nn.Module:
    """mtq.quantize `model` in place with `config`, calibrated on `batches` (the calibration split)."""
    import modelopt.torch.quantization as mtq

    model = mtq.quantize(model, config, forward_loop=calibrate_loop(batches, device, "Calibrating scheme"))
    model.eval()
    return model


def calibrate_kv_cache(model: torch.nn.Module, kv_preset: str, batches: list[dict], device: torch.device) -> None:
    """Switch on `kv_preset`'s K/V quantizers in the language model (the vision tower stays off) and calibrate
    them alone: every other quantizer is off for that pass and restored after, so the layer decisions and their
    calibrated scales are those of the scheme without a KV cache."""
    import modelopt.torch.quantization as mtq

    entries = copy.deepcopy(getattr(mtq, kv_preset))["quant_cfg"]
    entries.append(vision_tower_off())
    mtq.set_quantizer_by_cfg(model, entries)
    with mtq.set_quantizer_by_cfg_context(model, [{"quantizer_name": "*", "enable": False}, *entries]):
        mtq.calibrate(model, algorithm="max", forward_loop=calibrate_loop(batches, device, "Calibrating KV cache"))
    model.eval()
