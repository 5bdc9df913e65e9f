"""Research measurements behind the report: method comparison, a Pareto sweep and the solver's optimality gap.

All are pure functions of stored artifacts (search states) plus, for the sweep, one calibration and one
evaluation pass per target; the research stage (`quantsuite.stages.research.Research.run`) caches their JSON under
`.quantsuite-cache/research/`.

- `block_sensitivities`: per-block sensitivity from each scoring method's search state (gradient, kl_div)
  and their Spearman rank correlation.
- `optimality_gap`: AutoQuant's LP pick (`mtq.get_auto_quantize_config` / the solver inside it) against an
  exact 0/1 solve of the same scores and costs (scipy's MILP, scores rescaled to order 1), per target.
- the sweep (run by the workbench): targets re-solved from one scoring pass, each applied and measured.
"""

from __future__ import annotations

from quantsuite.autoquant import NO_QUANT, block_sensitivity, resolve_config


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


def optimality_gap(state: dict, scheme_factory, targets: list[float]) -> list[dict]:
    """Per target: AutoQuant's objective, the exact optimum (both from `resolve_config`'s solver record), and the
    relative gap (0 = optimal)."""
    rows = []
    for bits in targets:
        resolution = resolve_config(state, scheme_factory(bits))
        autoquant, exact = (resolution.solver[name]["objective"] for name in ("modelopt", "exact"))
        rows.append({"effective_bits": bits, "autoquant_objective": autoquant, "exact_objective": exact,
                     "relative_gap": (autoquant - exact) / exact if exact > 0 else 0.0,
                     "fp8_groups": sum(fmt != NO_QUANT for fmt in resolution.group_formats.values())})  # fmt: skip
    return rows
