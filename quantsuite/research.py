"""Research measurements behind the report: method comparison, a Pareto sweep and the solver's optimality gap.

All are pure functions of stored artifacts (search states) plus, for the sweep, one calibration and one
evaluation pass per target; `Workbench.research()` caches their JSON under `.quantsuite-cache/research/`.

- `block_sensitivities`: per-block sensitivity from each scoring method's search state (gradient, kl_div)
  and their Spearman rank correlation.
- `optimality_gap`: AutoQuant's LP pick (`mtq.get_auto_quantize_config` / the solver inside it) against an
  exact 0/1 solve of the same scores and costs (scipy's MILP, scores rescaled to order 1), per target.
- the sweep (run by the workbench): targets re-solved from one scoring pass, each applied and measured.
"""

from __future__ import annotations

import numpy as np

from quantsuite.autoquant import NO_QUANT, block_sensitivity, group_scores, resolve_config


def spearman(first: list[float], second: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(first, second).statistic)


def block_sensitivities(states: dict[str, dict]) -> dict:
    """method -> {block: sensitivity}; plus Spearman between the first two methods (when both exist)."""
    blocks = {method: {str(k): v for k, v in block_sensitivity(state).items()} for method, state in states.items()}
    result: dict = {"blocks": blocks}
    if len(blocks) >= 2:
        first, second = list(blocks.values())[:2]
        common = sorted(set(first) & set(second), key=int)
        result["spearman"] = spearman([first[b] for b in common], [second[b] for b in common])
        result["methods"] = list(blocks)[:2]
    return result


def exact_pick(state: dict, effective_bits: float) -> tuple[dict[str, str], float]:
    """Minimum total score under the effective-bits budget, solved exactly (MILP); returns picks, objective."""
    from scipy.optimize import LinearConstraint, milp

    groups = [(name, g) for name, g in group_scores(state).items() if len(g["scores"]) > 1]
    fixed_cost = sum(min(g["costs"].values()) for _, g in group_scores(state).items() if len(g["scores"]) == 1)
    options = [(name, fmt, g["scores"][fmt], g["costs"][fmt]) for name, g in groups for fmt in g["scores"]]
    scale = max((abs(score) for *_, score, _ in options), default=1.0) or 1.0
    objective = np.array([score / scale for *_, score, _ in options])
    budget = state["cost_denominator"] * effective_bits / 16.0 - fixed_cost
    cost_row = np.array([[cost for *_, cost in options]])
    one_hot = np.array([[1.0 if option[0] == name else 0.0 for option in options] for name, _ in groups])
    constraints = [LinearConstraint(cost_row, -np.inf, budget), LinearConstraint(one_hot, 1, 1)]
    solution = milp(objective, constraints=constraints, integrality=np.ones(len(options)), bounds=(0, 1))
    if not solution.success:
        raise RuntimeError(f"exact solve failed at {effective_bits} bits: {solution.message}")
    picks = {options[i][0]: options[i][1] for i, x in enumerate(solution.x) if x > 0.5}
    return picks, float(sum(options[i][2] for i, x in enumerate(solution.x) if x > 0.5))


def pick_objective(state: dict, picks: dict[str, str]) -> float:
    groups = group_scores(state)
    return float(sum(groups[name]["scores"][fmt] for name, fmt in picks.items() if len(groups[name]["scores"]) > 1))


def optimality_gap(state: dict, scheme_factory, targets: list[float]) -> list[dict]:
    """Per target: AutoQuant's objective, the exact optimum, and the relative gap (0 = optimal)."""
    rows = []
    for bits in targets:
        resolution = resolve_config(state, scheme_factory(bits))
        autoquant = pick_objective(state, resolution.group_formats)
        _, exact = exact_pick(state, bits)
        rows.append({"effective_bits": bits, "autoquant_objective": autoquant, "exact_objective": exact,
                     "relative_gap": (autoquant - exact) / exact if exact > 0 else 0.0,
                     "fp8_groups": sum(fmt != NO_QUANT for fmt in resolution.group_formats.values())})  # fmt: skip
    return rows
