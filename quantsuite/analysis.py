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

import numpy as np

from quantsuite.autoquant import (
    NO_QUANT,
    block_sensitivity,
    exact_pick,
    group_scores,
    pick_objective,
    resolve_config,
)


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


# --- uncertainty: intervals over the evaluation captions ---------------------------------------------------------
CONFIDENCE = 0.95
RESAMPLES = 2000


def caption_sums(measurement: dict) -> tuple[np.ndarray, np.ndarray]:
    """(per-caption summed KL, per-caption tokens) of a `divergence.compare` result, in caption order."""
    by_caption = measurement["kl_by_caption"]
    return np.asarray(by_caption["sums"], dtype=float), np.asarray(by_caption["tokens"], dtype=float)


def bootstrap_interval(statistic, captions: int, resamples: int = RESAMPLES, vectorized: bool = False) -> list[float]:
    """95% percentile interval of `statistic(indices)` when the evaluation captions are resampled whole
    (scipy.stats.bootstrap over the caption indices: every figure in one statistic sees the same resample, so
    differences and rank correlations between schemes are paired). Fixed seed. `vectorized`: the statistic takes
    every resample at once (indices of shape (resamples, captions), one value per row): the same resamples and
    values, without a Python call per resample."""
    from scipy.stats import bootstrap

    if captions < 2:
        value = float(statistic(np.arange(captions)))
        return [value, value]
    result = bootstrap((np.arange(captions),), lambda indices, axis=-1: statistic(indices.astype(int)),
                       vectorized=vectorized, n_resamples=resamples, method="percentile",
                       confidence_level=CONFIDENCE, rng=0)  # fmt: skip
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def ratio_of_sums(first: np.ndarray, second: np.ndarray):
    """The statistic sum(first) / sum(second) over resampled captions (indices: one resample or a row per one)."""
    return lambda indices: first[indices].sum(-1) / second[indices].sum(-1)


def kl_interval(measurement: dict) -> list[float]:
    """Interval of one measurement's mean KL (summed KL / tokens over resampled captions)."""
    sums, tokens = caption_sums(measurement)
    return bootstrap_interval(ratio_of_sums(sums, tokens), len(sums), vectorized=True)


def kl_difference(first: dict, second: dict) -> dict:
    """first's mean KL minus second's, both measured on the same evaluation captions, with its paired interval;
    `differs` only when the interval excludes 0."""
    a, tokens = caption_sums(first)
    b, other = caption_sums(second)
    if not np.array_equal(tokens, other):
        raise ValueError("kl_difference needs two measurements over the same evaluation captions")
    low, high = bootstrap_interval(lambda i: (a[i].sum(-1) - b[i].sum(-1)) / tokens[i].sum(-1), len(a),
                                   vectorized=True)  # fmt: skip
    return {"difference": float((a.sum() - b.sum()) / tokens.sum()), "interval": [low, high],
            "differs": not low <= 0.0 <= high}  # fmt: skip


def rank_against_kl(scores: dict[str, float], measurements: dict[str, dict],
                    score_by_caption: dict[str, tuple[list[float], list[float]]] | None = None) -> dict:
    """Does a per-scheme figure (`scores`: an objective, storage bits...) order the schemes as their mean KL does?
    Spearman with its interval over resampled evaluation captions (every scheme's KL from the same resample), and
    the pairs it misorders: a lower score but a higher KL, the KL difference outside its interval.

    `score_by_caption` (every scheme of `scores`) makes the scores measured too: each is the ratio of two sums over
    the same evaluation captions (vLLM's error over its BF16 floor's), recomputed from each resample with the KL's
    captions, so the interval holds the noise of both sides; a pair is then misordered only where the scores'
    paired difference is outside its interval as well, else it is `unresolved` (the scores tie within their noise;
    H200, gpu-27: eb13 and eb13_exact's vLLM errors 1.54 and 1.58, paired difference [-0.14, +0.06])."""
    names = sorted(set(scores) & set(measurements))
    result: dict = {"schemes": names, "spearman": None, "interval": None, "misordered": [], "unresolved": []}
    if len(names) < 3:
        return result
    sums = np.stack([caption_sums(measurements[name])[0] for name in names])
    tokens = caption_sums(measurements[names[0]])[1]
    kl = dict(zip(names, sums.sum(1) / tokens.sum(), strict=True))
    result["spearman"] = spearman([scores[name] for name in names], [kl[name] for name in names])
    if score_by_caption is None:
        def scores_of(_: np.ndarray) -> list[float]:
            return [scores[name] for name in names]
    else:
        parts = np.array([score_by_caption[name] for name in names], dtype=float)  # scheme, (ours, floor), caption
        if parts.shape[2] != len(tokens):
            raise ValueError(f"score_by_caption has {parts.shape[2]} captions, the KL {len(tokens)}: rank_against_kl "
                             "needs both over the same evaluation captions")  # fmt: skip

        def scores_of(indices: np.ndarray) -> list[float]:
            return list(parts[:, 0, indices].sum(1) / parts[:, 1, indices].sum(1))
    result["interval"] = bootstrap_interval(lambda i: spearman(scores_of(i), list(sums[:, i].sum(1) / tokens[i].sum())),
                                            len(tokens))  # fmt: skip

    def gap(up: int, down: int):  # one scheme's score minus another's, from a resample
        return lambda indices: (values := scores_of(indices))[up] - values[down]

    for index, first in enumerate(names):
        for second in names[index + 1 :]:
            if scores[first] == scores[second]:
                continue
            lower, higher = sorted((first, second), key=scores.get)
            if kl[lower] <= kl[higher]:
                continue  # ordered as the scores order them: no interval needed
            difference = kl_difference(measurements[lower], measurements[higher])
            if not (difference["differs"] and difference["difference"] > 0):
                continue
            pair = {"lower_score": lower, "higher_score": higher} | difference
            if score_by_caption is not None:
                pair["score_interval"] = bootstrap_interval(gap(names.index(higher), names.index(lower)), len(tokens))
                if pair["score_interval"][0] <= 0.0:
                    result["unresolved"].append(pair)
                    continue
            result["misordered"].append(pair)
    return result


# --- the studies' comparisons (pure functions of search states and manifests) ------------------------------------
def same_drift(measurements: dict[str, dict]) -> dict[str, str]:
    """name -> the earlier name (sorted) whose per-caption KL it repeats bit for bit: the same model measured twice
    (two schemes whose settings give one pick), which a rank over schemes must count once."""
    seen: dict[tuple, str] = {}
    repeats = {}
    for name in sorted(measurements):
        sums, tokens = caption_sums(measurements[name])
        key = (tuple(sums.tolist()), tuple(tokens.tolist()))
        if key in seen:
            repeats[name] = seen[key]
        else:
            seen[key] = name
    return repeats


def ratio_interval(ours: list[float], floor: list[float]) -> list[float]:
    """Interval of a ratio of two sums over the same evaluation captions (vLLM's error over its floor's)."""
    first, second = np.asarray(ours, dtype=float), np.asarray(floor, dtype=float)
    return bootstrap_interval(ratio_of_sums(first, second), len(first), vectorized=True)


def dominated_beyond_noise(points: dict[str, tuple[float, float, dict]]) -> dict[str, list[str]]:
    """A figure against drift: name -> the schemes that beat it on both beyond their noise. `points`: name ->
    (figure, its noise, drift measurement); the figure is higher-is-better (a speed ratio; minus storage bits, whose
    noise is 0). Another scheme dominates one when its figure is higher by more than the larger of the two noises
    (with no noise: at least as high) and its KL lower with the paired interval excluding 0 (kl_difference)."""
    beaten: dict[str, list[str]] = {name: [] for name in points}
    for name, (ratio, noise, measured) in points.items():
        for other, (other_ratio, other_noise, other_measured) in points.items():
            gain, margin = other_ratio - ratio, max(noise, other_noise)
            if other == name or (gain <= margin if margin else gain < 0):
                continue
            difference = kl_difference(other_measured, measured)
            if difference["differs"] and difference["difference"] < 0:
                beaten[name].append(other)
    return beaten


def jaccard(first: list[str], second: list[str]) -> float:
    """Overlap of two picks' quantized layers: |A & B| / |A | B| (1 when both quantize nothing)."""
    a, b = set(first), set(second)
    return len(a & b) / len(a | b) if a | b else 1.0


def group_sensitivity(state: dict) -> dict[str, float]:
    """LM layer group -> its best quantized format's score minus BF16's (the ranking AutoQuant's pick follows)."""
    result = {}
    for hparam, group in group_scores(state).items():
        quantized = [score for name, score in group["scores"].items() if name != NO_QUANT]
        if group["block"] is not None and quantized:
            result[hparam] = min(quantized) - group["scores"].get(NO_QUANT, 0.0)
    return result


def rank_agreement(first: dict[str, float], second: dict[str, float]) -> dict[str, float]:
    """Spearman and Kendall's tau between two rankings of the same layer groups."""
    from scipy.stats import kendalltau

    common = sorted(set(first) & set(second))
    a, b = [first[k] for k in common], [second[k] for k in common]
    return {"spearman": spearman(a, b), "kendall": float(kendalltau(a, b).statistic)}


def quantized_modules(groups: dict[str, dict], picks: dict[str, str]) -> list[str]:
    """The layers a pick (group -> format name) quantizes in any format; `groups` as `group_scores` gives them."""
    return sorted(module for hparam, fmt in picks.items() if fmt != NO_QUANT for module in groups[hparam]["modules"])


def exact_quantized_modules(state: dict, effective_bits: float) -> list[str]:
    """The layers the exact pick of `state`'s scores at `effective_bits` quantizes (any format)."""
    return quantized_modules(group_scores(state), exact_pick(state, effective_bits)[0])


def score_size_stability(states: dict[tuple[int, int], dict], budgets: tuple[float, ...]) -> dict:
    """Every (size, draw) scoring run against the reference, the largest size's draw 0: rank agreement of the layer
    groups' sensitivities and overlap of the exact picks at each budget. The seed spread is how far the largest
    size's other draws are from the reference; the smallest stable size is the smallest from which every size's
    every draw picks, at every budget, at least as close to the reference as the worst of those draws."""
    sizes = sorted({size for size, _ in states})
    draws = sorted({draw for _, draw in states})
    reference_run = (sizes[-1], draws[0])
    reference = states[reference_run]
    reference_sensitivity = group_sensitivity(reference)
    picks = {run: {bits: exact_quantized_modules(state, bits) for bits in budgets} for run, state in states.items()}
    runs = []
    for (size, draw), state in sorted(states.items()):
        agreement = rank_agreement(group_sensitivity(state), reference_sensitivity)
        overlap = {str(bits): jaccard(picks[size, draw][bits], picks[reference_run][bits]) for bits in budgets}
        runs.append({"size": size, "draw": draw, **agreement, "overlap": overlap})
    spread_runs = [r for r in runs if r["size"] == sizes[-1] and r["draw"] != draws[0]]
    spread = {"spearman_min": min(r["spearman"] for r in spread_runs),
              "overlap_min": {str(b): min(r["overlap"][str(b)] for r in spread_runs) for b in budgets}}  # fmt: skip

    def stable(size: int) -> bool:
        return all(r["overlap"][str(b)] >= spread["overlap_min"][str(b)] - 1e-12 for r in runs if r["size"] == size
                   for b in budgets)  # fmt: skip

    stable_size = None
    for size in reversed(sizes):
        if not stable(size):
            break
        stable_size = size
    return {"reference": {"size": reference_run[0], "draw": reference_run[1]}, "sizes": sizes, "draws": draws,
            "budgets": list(budgets), "runs": runs, "seed_spread": spread, "stable_size": stable_size}  # fmt: skip


def scheme_objective(state: dict, manifest: dict, presets: dict[str, str]) -> tuple[float | None, str]:
    """AutoQuant's objective for any scheme's decisions (its manifest): the summed scores, under `state`, of the
    preset each layer group took (`presets`: catalog format name -> its ModelOpt preset). None with the reason where
    the scores cannot describe it: a preset the pass did not score, a group split between formats, a quantized
    layer outside the scored groups (lm_head)."""
    formats = {entry["name"]: presets.get(entry["format"], entry["format"]) for entry in manifest["modules"]}
    grouped = set()
    picks = {}
    for hparam, group in group_scores(state).items():
        taken = {formats.get(module, "BF16") for module in group["modules"]}
        grouped.update(group["modules"])
        if len(taken) > 1:
            return None, f"{hparam}: split between {sorted(taken)}"
        fmt = NO_QUANT if taken == {"BF16"} else taken.pop()
        if fmt not in group["scores"]:
            return None, f"format {fmt} was not scored (scored: {sorted(group['scores'])})"
        picks[hparam] = fmt
    outside = sorted(name for name, fmt in formats.items() if fmt != "BF16" and name not in grouped)
    if outside:
        return None, f"quantized outside the scored groups: {outside[:3]}"
    return pick_objective(state, picks), ""
