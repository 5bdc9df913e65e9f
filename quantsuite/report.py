"""Research report from what a run wrote under reports/: `reports/<run-id>/report.md`, `summary.json`, PNGs.

Reads only JSON (manifests, drift, vLLM results, research, benchmarks); it never runs a model. Shards of one run
(`--shard K/N`, each on its own runner) are merged into one reports/ first, then reported as one run.

    python -m quantsuite.report --model tiny --results-of <run-id>
    python -m quantsuite.report --model tiny --results-of <run-id> --merge shard-1/reports shard-2/reports
    python -m quantsuite.report --model tiny --results-of <run-a> <run-b>     # schemes of two runs, one report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import ScalarFormatter

from quantsuite import REPORTS_DIR, analysis
from quantsuite.bench import VLLM_BATCH_SCHEMES
from quantsuite.cache import write_atomic

PLOTS = ("sensitivity.png", "coverage_heatmap.png", "pareto.png", "localization.png", "optimality_gap.png",
         "clipping.png", "score_size.png", "proxy.png", "frontier.png")  # speed_frontier, vllm_vs_kl: vLLM runs only


def merge_reports(shards: list[Path], into: Path) -> list[str]:
    """Merge the reports/ folders of a run's shards into `into` (which may be one of them); returns the merged
    files' relative paths. A JSON file several shards wrote (the BF16 reference each built, a vLLM result whose
    checks ran apart) joins its top-level keys, the earlier shard's value kept where both have one, and
    pytest-benchmark's "benchmarks" lists join; a step table joins its rows; another file is the first shard's.
    The shards' own reports (folders with a report.md) and locks are left out: the merged run is reported anew."""
    into = Path(into)
    files: dict[Path, list[Path]] = {}
    for shard in map(Path, shards):
        if not shard.is_dir():
            raise FileNotFoundError(f"--merge {shard}: not a folder (give each shard's reports/ folder)")
        for path in sorted(shard.rglob("*")):
            relative = path.relative_to(shard)
            if path.is_file() and path.suffix != ".lock" and not any(
                    (shard / parent / "report.md").is_file() for parent in relative.parents):  # fmt: skip
                files.setdefault(relative, []).append(path)
    for relative, copies in files.items():
        if relative.suffix == ".json":
            documents = [json.loads(copy.read_text()) for copy in copies]
            merged = documents[0]
            for document in documents[1:]:
                if isinstance(merged, dict) and isinstance(document, dict):
                    lists = [d.get("benchmarks") for d in (merged, document)]
                    merged = document | merged
                    if all(isinstance(entries, list) for entries in lists):  # pytest-benchmark's output
                        merged["benchmarks"] = lists[0] + lists[1]
            text = json.dumps(merged, indent=2)
        elif relative.suffix == ".tsv":
            rows = [copy.read_text().splitlines() for copy in copies]
            text = "\n".join(rows[0] + [row for other in rows[1:] for row in other[1:]]) + "\n"
        else:
            text = copies[0].read_bytes()
        write_atomic(into / relative, text)
    return sorted(map(str, files))


def _of_runs(document: dict, results_of: list[str] | None) -> bool:
    """Whether `document` is stamped with one of the run ids `results_of` (None: any)."""
    return results_of is None or document.get("run_id") in results_of


def _load_dir(path: Path, results_of: list[str] | None = None) -> dict[str, dict]:
    """name -> JSON of the files in `path`; with `results_of`, only those stamped with one of those run ids."""
    if not path.is_dir():
        return {}
    documents = {file.stem: json.loads(file.read_text()) for file in sorted(path.glob("*.json"))}
    return {name: doc for name, doc in documents.items() if _of_runs(doc, results_of)}


@dataclass(frozen=True)
class BenchmarkResults:
    """What the report takes from the benchmarks stage (reports/benchmarks/<model>/).

    tokens_per_s: scheme -> {kind: tokens/s of the median round}; paired: scheme -> {kind: median of per-round
    ratios to BF16} for benchmarks that alternate BF16 and the scheme (no separate BF16 entry); context: device,
    versions and prefill shape of the run.
    """

    tokens_per_s: dict[str, dict[str, float]] = field(default_factory=dict)
    paired: dict[str, dict[str, float]] = field(default_factory=dict)
    context: dict = field(default_factory=dict)


def read_benchmarks(reports_dir: Path, model: str, results_of: list[str] | None = None) -> BenchmarkResults:
    """The benchmarks stage's results (reports/benchmarks/<model>/, one part per kind) of the runs `results_of`."""
    results = BenchmarkResults()
    for scheme, parts in _load_dir(Path(reports_dir) / "benchmarks" / model, results_of).items():
        for kind, info in parts.items():
            if not isinstance(info, dict):
                continue  # run_id
            for key in ("device", "versions", "prefill_shape"):
                results.context.setdefault(key, info.get(key))
            if info.get("tokens"):
                results.tokens_per_s.setdefault(scheme, {})[kind] = info["tokens"] / info["median_s"]
            if info.get("paired_ratio_median"):
                results.paired.setdefault(scheme, {})[kind] = info["paired_ratio_median"]
    return results


def _context_line(context: dict) -> str:
    parts = [str(context.get("device"))]
    if context.get("prefill_shape"):
        parts.append(f"prefill shape (batch x tokens) {context['prefill_shape']}")
    parts.append(", ".join(f"{name} {version}" for name, version in (context.get("versions") or {}).items()))
    return "; ".join([*parts, "speed ratios are medians from this one run"])


def _fmt(value, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _vllm_cell(result: dict | None) -> str:
    """`model_free:ok cuda:ok(1.3x floor) batch1:1.06x(bound 1.23x, faster)`: each check's verdict as the test
    decided it (failures recorded), then the paired vLLM speed ratio per workload with its bound and reading."""
    if not result:
        return "-"
    cells = []
    for check in ("model_free", "cpu", "cpu_patched", "cuda"):
        if check in result:
            entry = result[check]
            ratio = (entry.get("decision") or {}).get("error_ratio")
            detail = f"({ratio:.1f}x floor)" if ratio is not None else ""
            cells.append(f"{check}:{'FAIL' if entry.get('failures') else 'ok'}{detail}")
    speed = result.get("speed") or {}
    for workload, paired in sorted(speed.get("workloads", {}).items()):
        reading = speed_reading(paired, speed["weight_bytes_bound"])[1]
        cells.append(f"{workload}:{paired['ratio']:.2f}x(bound {speed['weight_bytes_bound']:.2f}x, {reading})")
    return " ".join(cells)


# The largest difference between identical runs of a paired vLLM speed ratio, per workload, where measured; their
# 3-round medians (the GPU default) stay inside it (source: reports/gpu-3b-shape-h200-vllm/README.md "Repeat").
# A reading's noise is the larger of this and the run's own BF16 spread.
BETWEEN_RUN_SPREAD = {"H200": {"batch1": 0.033, "batch256": 0.226}}


def between_run_spread(device: str, workload: str) -> float:
    """The recorded spread between identical runs for this device and workload (0.0 where none was measured)."""
    return next((spreads.get(workload, 0.0) for name, spreads in BETWEEN_RUN_SPREAD.items() if name in device), 0.0)


def speed_reading(paired: dict, bound: float, between_runs: float = 0.0) -> tuple[float, str]:
    """The BF16 rounds' own spread ((max - min) / median tokens/s over the paired rounds) and what the ratio says
    against it: `faster` / `slower` only where it differs from 1 by more than that spread, `within noise` where
    it does not, and `past the bound (suspect)` where a decode workload's gain exceeds the weight-bytes bound by
    more than the spread (decode reads every weight per step, so weight bytes bound its gain; an image workload is
    prefill, compute-bound, and has no such bound; reports/gpu-3b-shape-h200-vllm/README.md has the spreads
    measured).

    `between_runs`: the spread between identical runs (between_run_spread), when larger than the rounds' own.

    >>> speed_reading({"ratio": 1.10, "baseline_tokens_per_s": [100.0, 101.0, 99.0]}, bound=1.5)
    (0.02, 'faster')
    >>> speed_reading({"ratio": 1.024, "baseline_tokens_per_s": [100.0, 101.0, 99.0]}, 1.5, between_runs=0.033)
    (0.033, 'within noise')
    """
    rates = paired["baseline_tokens_per_s"]
    spread = max(round((max(rates) - min(rates)) / statistics.median(rates), 6), between_runs)
    ratio = paired["ratio"]
    if abs(ratio - 1) <= spread:
        return spread, "within noise"
    if ratio > 1 and not paired.get("images") and ratio - bound > spread:
        return spread, "past the bound (suspect)"
    return spread, "faster" if ratio > 1 else "slower"


def _vllm_sections(vllm: dict[str, dict], garbage: dict | None) -> list[str]:
    """The vLLM verdict table (teacher-forced error against the BF16 noise floor) and the paired speed table;
    a section without data is left out."""
    verdicts, speeds, untimed = [], [], []
    for name, checks in sorted(vllm.items()):
        for check, entry in sorted(checks.items()):
            if not isinstance(entry, dict):
                continue  # run_id
            if check == "speed":
                if entry.get("untimed_workloads"):
                    untimed.append(f"{name} ({', '.join(entry['untimed_workloads'])})")
                for workload, paired in sorted(entry.get("workloads", {}).items()):
                    share = paired.get("bound_share")
                    between = between_run_spread(entry["device"], workload)
                    spread, reading = speed_reading(paired, entry["weight_bytes_bound"], between)
                    speeds.append(f"| {name} | {workload} | {paired['ratio']:.3f}x | {min(paired['ratios']):.3f}-"
                                  f"{max(paired['ratios']):.3f} | {100 * spread:.1f}% | {reading} | "
                                  f"{paired['baseline_ms_per_token']:.2f} / "
                                  f"{paired['candidate_ms_per_token']:.2f} | {entry['weight_bytes_bound']:.2f}x | "
                                  f"{_fmt(None if share is None else 100 * share, '.0f')}% | "
                                  f"{entry['device']} |")  # fmt: skip
            elif "decision" in entry or entry.get("failures"):
                decision, forced = entry.get("decision") or {}, entry.get("teacher_forced") or {}
                verdicts.append(f"| {name} | {check} | {'FAIL' if entry.get('failures') else 'ok'} | "
                                f"{_fmt(decision.get('error_ratio'), '.2f')} | "
                                f"{_fmt(forced.get('logprob_mae'), '.4f')} | "
                                f"{_fmt(forced.get('top1_agreement'), '.3f')} | "
                                f"{_fmt((entry.get('fusion_effect') or {}).get('logprob_mae'), '.4f')} | "
                                f"{_fmt((entry.get('greedy') or {}).get('prefix_agreement'), '.2f')} | "
                                f"{'; '.join(entry.get('failures', []))[:200]} |")  # fmt: skip
    lines = []
    if verdicts:
        lines += ["## vLLM: does it compute what the checkpoint means?", "",
                  "Teacher-forced on the evaluation captions: vLLM's logprob of each actual next token against the "
                  "PyTorch reference of the same export (with vLLM's fused-layer scales); the bound is a multiple of "
                  "the BF16 export's error (the noise floor). Greedy agreement is reported, not decisive.", "",
                  "| scheme | check | verdict | error / floor | logprob MAE | top-1 agreement | fusion effect | "
                  "greedy prefix | failure |", "|---|---|---|---|---|---|---|---|---|", *verdicts, ""]  # fmt: skip
        if garbage:
            lines += [f"Negative control (BF16 layers of top50 read as FP8 by vLLM): {garbage['error_ratio']:.0f}x "
                      f"the floor, top-1 agreement {garbage['teacher_forced']['top1_agreement']:.3f}.", ""]  # fmt: skip
    if speeds:
        lines += ["## vLLM speed as users run it (paired with BF16, same prompts)", "",
                  "Ratio = median over rounds of scheme tokens/s / BF16 tokens/s (alternating rounds); bound = BF16 "
                  "checkpoint bytes / scheme bytes (memory-bound decode); share = (ratio - 1) / (bound - 1). Noise = "
                  "the larger of the BF16 rounds' (max - min) / median tokens/s and the spread measured between "
                  "identical runs on this device (quantsuite.report.BETWEEN_RUN_SPREAD); a ratio within it reads "
                  "`within noise`, a gain past the bound by more than it `past the bound (suspect)`.", "",
                  "| scheme | workload | ratio | per-round range | noise | reading | BF16 / scheme ms per token "
                  "| bound | share of bound's gain | device |", "|---|---|---|---|---|---|---|---|---|---|", *speeds,
                  ""]  # fmt: skip
        if untimed:
            lines += [f"Timed at batch 1 only ({VLLM_BATCH_SCHEMES} names the schemes whose large-batch and image "
                      f"workloads are timed; they are host-bound on an H200): {'; '.join(untimed)}.", ""]  # fmt: skip
    return lines


def build_report(reports_dir: Path, model: str, run_id: str | None = None,
                 results_of: str | list[str] | None = None) -> Path:  # fmt: skip
    """Write reports/<run-id>/{report.md, summary.json, *.png} from the JSON stamped with `results_of` (a run id, or
    several: runs of one code whose schemes join, as gpu-26's INT8 SmoothQuant and gpu-27's other formats on the 3B
    shape, their shared schemes' drift bit-identical; None joins everything under reports/); returns the report
    directory."""
    reports_dir = Path(reports_dir)
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S") + f"-{model}"
    results_of = [results_of] if isinstance(results_of, str) else results_of
    manifests = _load_dir(reports_dir / "manifests" / model, results_of)
    if not manifests:
        runs = f" of {' '.join(results_of)}" if results_of else ""
        raise FileNotFoundError(f"no scheme manifests{runs} in "
                                f"{reports_dir / 'manifests' / model}: a report needs a "
                                f"run first, e.g. pytest -m autoquant --model {model} --reports-dir "
                                f"{reports_dir}")  # fmt: skip
    out = reports_dir / run_id
    out.mkdir(parents=True, exist_ok=True)
    drift = _load_dir(reports_dir / "drift" / model, results_of)
    vllm = _load_dir(reports_dir / "vllm" / model, results_of)
    research_path = reports_dir / "research" / model / "research.json"
    research = json.loads(research_path.read_text()) if research_path.is_file() else {}
    if not _of_runs(research, results_of):
        research = {}
    benchmarks = read_benchmarks(reports_dir, model, results_of)
    speed = benchmarks.tokens_per_s
    baseline = speed.get("bf16", {})

    rows, summary = [], {"model": model, "run_id": run_id, "results_of": results_of, "schemes": {}}
    for name, manifest in manifests.items():
        spec, totals = manifest["scheme"], manifest["totals"]
        fake = drift.get(name, {}).get("fake_quant", {})
        ratios = {kind: value / baseline[kind] for kind, value in speed.get(name, {}).items() if baseline.get(kind)}
        ratios |= benchmarks.paired.get(name, {})
        target = spec.get("coverage") if spec.get("coverage") is not None else spec.get("effective_bits")
        settings = f"{spec['mode']} {spec['method'] if spec['mode'] == 'autoquant' else ''} {spec['coverage_mode'] if spec['mode'] == 'autoquant' else ''} {_fmt(target)}"  # noqa: E501
        summary["schemes"][name] = {"settings": settings.split(), "totals": totals, "drift": {k: fake.get(k) for k in
                                    ("kl_mean", "kl_p99", "top1_agreement", "perplexity_delta", "logit_sqnr_db")},
                                    "vllm": vllm.get(name), "throughput": speed.get(name),
                                    "ratios": ratios}  # fmt: skip
        formats = ", ".join(f"{fmt} {share:.2f}" for fmt, share in totals.get("coverage_by_format", {}).items())
        quantized = totals.get("quantized_layers", totals.get("fp8_layers"))  # schema < 5 said fp8_layers
        rows.append(f"| {name} | {' '.join(settings.split())} | {formats or 'BF16'} | "
                    f"{quantized}/{totals['bf16_layers']} | "
                    f"{totals['lm_effective_bits']:.2f} | {_fmt(totals.get('lm_storage_bits'), '.2f')} | "
                    f"{totals['model_effective_bits']:.2f} | "
                    f"{totals['coverage_by_weights']:.3f} | {_fmt(fake.get('kl_mean'))} | {_fmt(fake.get('top1_agreement'), '.4f')} | "  # noqa: E501
                    f"{_fmt(fake.get('perplexity_delta'), '+.3g')} | {_vllm_cell(vllm.get(name))} | "
                    + " ".join(f"{k}:{v:.2f}x" for k, v in sorted(ratios.items())) + " |")  # fmt: skip

    intervals = kl_intervals(drift)
    engine = engine_against_kl(vllm, drift, manifests, intervals)
    frontier = speed_frontier(vllm, drift, intervals)
    storage = storage_frontier(manifests, drift, intervals)
    summary["vllm_against_kl"] = {k: engine[k] for k in ("schemes", "spearman", "interval", "misordered", "unresolved",
                                                         "repeats", "ratios", "ratio_intervals")}  # fmt: skip
    summary["speed_frontier"] = frontier
    summary["storage_frontier"] = storage
    plots = {
        "sensitivity.png": _plot_sensitivity(research, out / "sensitivity.png"),
        "coverage_heatmap.png": _plot_heatmap(manifests, out / "coverage_heatmap.png"),
        "pareto.png": _plot_pareto(research, manifests, drift, out / "pareto.png"),
        "localization.png": _plot_localization(drift, out / "localization.png"),
        "optimality_gap.png": _plot_gap(research, out / "optimality_gap.png"),
        "clipping.png": _plot_clipping(drift, out / "clipping.png"),
        "score_size.png": _plot_score_size(research.get("score_size", {}), out / "score_size.png"),
        "proxy.png": _plot_proxy(research.get("proxy", {}), out / "proxy.png"),
        "frontier.png": _plot_frontier(storage, out / "frontier.png"),
        "speed_frontier.png": _plot_speed_frontier(frontier, out / "speed_frontier.png"),
        "vllm_vs_kl.png": _plot_engine_against_kl(engine, out / "vllm_vs_kl.png"),
    }
    summary["research"] = research
    summary["plots"] = plots  # data points drawn per plot; a plot without data is not written
    device = next(iter(manifests.values()), {}).get("device", "unknown")
    sensitivity = research.get("sensitivity", {})

    def section(title: str, plot: str, *text: str) -> list[str]:
        if not plots[plot]:
            return []  # no data for it in this run: no empty plot, no empty section
        return [f"## {title}", "", f"![{plot}]({plot}){'  ' + ' '.join(text) if text else ''}", ""]

    spread = sensitivity.get("spearman_range")
    spearman = (f"Spearman rank correlation of per-block sensitivity between {' and '.join(sensitivity['methods'])}: "
                f"{_fmt(sensitivity.get('spearman'))}"
                + (f" (range {_fmt(spread[0])} to {_fmt(spread[1])} over {len(sensitivity['spearman_by_draw'])} "
                   "scoring draws)." if spread else ".") if sensitivity.get("methods") else "")  # fmt: skip
    gap_rows = [f"| {r['effective_bits']} | {r['autoquant_objective']:.4g} | {r['exact_objective']:.4g} | "
                f"{100 * r['relative_gap']:.1f}% | {_range(r.get('relative_gap_range'), 100, '.1f')} |"
                for r in research.get("optimality_gap", [])]  # fmt: skip
    solver_rows = [f"| {name} | {m['scheme']['effective_bits']} | {m['selection']['solver']['used']} | "
                   f"{m['selection']['solver']['modelopt']['objective']:.4g} | "
                   f"{m['selection']['solver']['exact']['objective']:.4g} | "
                   f"{_fmt(_lower_by(m['selection']['solver']), '.1%')} | "
                   f"{len(m['selection']['solver']['differing_groups'])} |"
                   for name, m in sorted(manifests.items()) if m["selection"].get("solver")]  # fmt: skip
    lines = [
        f"# quantsuite report — {model} ({run_id})", "",
        f"Device: {device}. Generated from reports/ JSON (manifests, drift, vLLM, research, benchmarks).", "",
        *([f"Benchmarks: {_context_line(benchmarks.context)}.", ""] if benchmarks.context else []),
        "## Schemes", "",
        "| scheme | settings | formats (share of LM linear weights) | quantized/BF16 layers | LM eff. bits | LM storage bits | model eff. bits | coverage | KL mean | top-1 | Δppl | vLLM | speed vs BF16 (same run) |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows, "",
        *_vllm_sections(vllm, _load_dir(reports_dir / "vllm" / model / "controls", results_of).get("garbage_load")),
        *_image_prompt_section(drift, plots["clipping.png"], manifests),
        *section("Which layers are sensitive, and does the method change that?", "sensitivity.png", spearman),
        *section("Which blocks each scheme quantizes (any format)", "coverage_heatmap.png"),
        *section("Drift versus effective bits (targets re-solved from one scoring pass)", "pareto.png"),
        *section("Where error enters (per-block relative error of the hidden states)", "localization.png"),
        *section("AutoQuant's pick versus an exact solve of the same scores", "optimality_gap.png"),
        *(["| target bits | AutoQuant objective | exact objective | gap | gap over scoring draws (%) |",
           "|---|---|---|---|---|", *gap_rows] if gap_rows else []),
        *_research_sections(research, plots, vllm, drift, manifests),
        *_storage_frontier_section(storage, plots["frontier.png"]),
        *_engine_section(engine, plots["vllm_vs_kl.png"]),
        *_speed_frontier_section(frontier, plots["speed_frontier.png"]),
        *(["", "## Solvers per scheme: ModelOpt's LP pick and the exact pick of the same scores", "",
           "Objective = sum of the picked formats' scores (lower is better); `solver` is the pick applied.", "",
           "| scheme | target bits | solver | ModelOpt objective | exact objective | exact lower by | groups that "
           "differ |", "|---|---|---|---|---|---|---|", *solver_rows] if solver_rows else []),
    ]  # fmt: skip
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return out


def _range(pair: list[float] | None, scale: float = 1.0, spec: str = ".3g") -> str:
    return "-" if not pair else f"{format(scale * pair[0], spec)} to {format(scale * pair[1], spec)}"


def _kl_cell(measured: dict) -> str:
    """`1.2e-04 [9.8e-05, 2.1e-04]`: a mean KL with its 95% interval over the evaluation captions."""
    low, high = measured["kl_interval"]
    return f"{measured['kl_mean']:.3g} [{low:.2g}, {high:.2g}]"


def vllm_errors(vllm: dict[str, dict]) -> tuple[dict[str, float], dict[str, tuple[list, list]] | None]:
    """Scheme -> vLLM's teacher-forced error against the BF16 floor, from the check that ran on the real engine
    (cuda, else the patched CPU engine, else the plain one); and, where every such check kept them, the error sums
    per evaluation caption of the scheme and of its floor (for intervals that resample vLLM's prompts too)."""
    ratios, by_caption = {}, {}
    for name, checks in vllm.items():
        for check in ("cuda", "cpu_patched", "cpu"):
            result = checks.get(check) or {}
            decision = result.get("decision") or {}
            if decision.get("error_ratio") is not None:
                ratios[name] = decision["error_ratio"]
                by_caption[name] = ((result.get("teacher_forced") or {}).get("sequence_error_sums"),
                                    (decision.get("floor") or {}).get("sequence_error_sums"))  # fmt: skip
                break
    complete = all(ours and floor and len(ours) == len(floor) for ours, floor in by_caption.values())
    return ratios, (by_caption if complete else None)


def _research_sections(research: dict, plots: dict, vllm: dict, drift: dict, manifests: dict) -> list[str]:
    """The studies of issue 26 (score size, grouping, proxy); each only where it ran."""
    lines: list[str] = []
    study = research.get("score_size")
    if study:
        spread = study["seed_spread"]["overlap_min"]
        lines += ["## How many scoring samples make the picks stable?", "",
                  f"Reference: {study['reference']['size']} samples, draw {study['reference']['draw']}; each size "
                  f"scored on {len(study['draws'])} draws of captions from the scoring + training splits. Overlap = "
                  "Jaccard of the quantized layers of the exact pick at each budget. Seed spread: the largest size's "
                  "other draws against the reference, overlap at least "
                  + ", ".join(f"{spread[str(b)]:.2f} at {b} bits" for b in study["budgets"]) + ".", "",
                  f"**Smallest stable size: {study['stable_size']}** (every draw of it and of every larger size "
                  "picks within the seed spread at every budget).", "",
                  "![score_size.png](score_size.png)" if plots.get("score_size.png") else "", "",
                  "| samples | Spearman vs reference (draws) | Kendall | overlap min over draws | KL of the pick at "
                  f"{study.get('measured_budget')} bits (draws) |", "|---|---|---|---|---|"]  # fmt: skip
        for size in study["sizes"]:
            rows = [r for r in study["runs"] if r["size"] == size]
            overlap = ", ".join(f"{b}: {min(r['overlap'][str(b)] for r in rows):.2f}" for b in study["budgets"])
            kls = [r["drift"]["kl_mean"] for r in rows if r.get("drift")]
            lines.append(f"| {size} | {_range([min(r['spearman'] for r in rows), max(r['spearman'] for r in rows)])} "
                         f"| {_range([min(r['kendall'] for r in rows), max(r['kendall'] for r in rows)])} | "
                         f"{overlap} | {_range([min(kls), max(kls)]) if kls else '-'} |")  # fmt: skip
        lines.append("")
    grouping = research.get("grouping")
    if grouping:
        lines += ["## What fused q/k/v and gate/up decisions cost", "",
                  "Exact picks of the same budget from ModelOpt's fused groups and from one decision per linear layer "
                  "(grouping rules emptied); cost = fused KL minus per-linear KL, with its paired 95% interval over "
                  "the evaluation captions.", "",
                  "| target bits | overlap | fused: bits, KL | per linear: bits, KL | cost of fusing | differs |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for row in grouping["rows"]:
            cost = row["fused_cost"]
            lines.append(f"| {row['target_effective_bits']} | {row['overlap']:.2f} | "
                         f"{row['fused']['lm_effective_bits']:.2f}, {_kl_cell(row['fused'])} | "
                         f"{row['per_linear']['lm_effective_bits']:.2f}, {_kl_cell(row['per_linear'])} | "
                         f"{cost['difference']:+.2g} [{cost['interval'][0]:+.2g}, {cost['interval'][1]:+.2g}] | "
                         f"{'yes' if cost['differs'] else 'no'} |")  # fmt: skip
        finer = {n: v for n, v in vllm.items()
                 if manifests.get(n, {}).get("scheme", {}).get("grouping") == "per_linear"}  # fmt: skip
        for name, checks in sorted(finer.items()):
            lines.append(f"\nvLLM with a per-linear pick ({name}): {_vllm_cell(checks)}.")
        lines.append("")
    proxy = research.get("proxy")
    if proxy and proxy.get("spearman") is not None:
        misordered = "; ".join(f"{m['lower_score']} scores lower than {m['higher_score']} but drifts more "
                               f"({m['difference']:+.2g} [{m['interval'][0]:+.2g}, {m['interval'][1]:+.2g}])"
                               for m in proxy["misordered"]) or "none"  # fmt: skip
        lines += ["## Does AutoQuant's objective predict the drift?", "",
                  f"Spearman of the objective (summed scores of each pick under one scoring pass) against PyTorch KL "
                  f"over {len(proxy['schemes'])} picks (the run's catalog schemes the scores describe, and the sweep): "
                  f"**{proxy['spearman']:.3f}** [{proxy['interval'][0]:.3f}, {proxy['interval'][1]:.3f}]. "
                  f"Misordered beyond the interval: {misordered}. Left out: "
                  + "; ".join(f"{n} ({r[:90]})" for n, r in sorted(proxy["left_out"].items())) + ".", "",
                  "![proxy.png](proxy.png)" if plots.get("proxy.png") else "", ""]  # fmt: skip
    return lines


def kl_intervals(drift: dict[str, dict]) -> dict[str, list[float]]:
    """Each scheme's fake-quant mean KL interval over resampled evaluation captions (analysis.kl_interval),
    computed once per report for every section and plot that shows it; its keys are the schemes those sections
    take (a KL above 0, with per-caption sums)."""
    return {name: analysis.kl_interval(measured["fake_quant"]) for name, measured in drift.items()
            if measured.get("fake_quant", {}).get("kl_mean", 0) > 0 and "kl_by_caption" in measured["fake_quant"]}


def engine_against_kl(vllm: dict[str, dict], drift: dict[str, dict], manifests: dict[str, dict],
                      intervals: dict[str, list[float]]) -> dict:  # fmt: skip
    """Does vLLM's teacher-forced error (against the BF16 floor) order the quantized schemes as PyTorch KL does?
    The reference is left out (its ratio is 1 by definition) and a scheme whose drift repeats another's bit for
    bit (the same pick) counts once. `intervals`: kl_intervals(drift). Returns rank_against_kl's result plus
    `repeats`, `ratios`, `kl`, `kl_intervals` and `ratio_intervals` (each scheme's error ratio over resampled
    captions, where the sums were kept)."""
    kl = {name: drift[name]["fake_quant"] for name in intervals
          if manifests.get(name, {}).get("scheme", {}).get("mode") != "none"}  # fmt: skip
    ratios, by_caption = vllm_errors(vllm)
    repeats = analysis.same_drift({name: kl[name] for name in kl if name in ratios})
    ratios = {name: ratio for name, ratio in ratios.items() if name in kl and name not in repeats}
    captions = {len(m["kl_by_caption"]["sums"]) for m in kl.values()}
    if by_caption is not None:
        by_caption = {name: sums for name, sums in by_caption.items() if name in ratios}
        if {len(ours) for ours, _ in by_caption.values()} - captions:
            by_caption = None  # vLLM scored other captions than the KL: only the KL side is resampled
    result = analysis.rank_against_kl(ratios, kl, by_caption)
    ratio_intervals = ({name: analysis.ratio_interval(*by_caption[name]) for name in result["schemes"]}
                       if by_caption else {})  # fmt: skip
    return result | {"repeats": repeats, "ratios": ratios, "kl": {n: kl[n] for n in result["schemes"]},
                     "kl_intervals": {n: intervals[n] for n in result["schemes"]}, "ratio_intervals": ratio_intervals,
                     "paired": by_caption is not None}  # fmt: skip


def _engine_section(engine: dict, plotted: int) -> list[str]:
    if engine["spearman"] is None:
        return []
    def pairs(found: list[dict]) -> str:
        return "; ".join(f"{m['lower_score']} has the lower vLLM error but the higher KL than {m['higher_score']} (KL "
                         f"{m['difference']:+.2g} [{m['interval'][0]:+.2g}, {m['interval'][1]:+.2g}]"
                         + (f", vLLM error / floor {-m['score_interval'][1]:+.2g} .. {-m['score_interval'][0]:+.2g}"
                            if "score_interval" in m else "") + ")" for m in found)  # fmt: skip

    misordered = pairs(engine["misordered"]) or "none"
    tied = (f" Ordered otherwise within vLLM's noise (its paired difference's interval holds 0): "
            f"{pairs(engine['unresolved'])}." if engine["unresolved"] else "")
    repeats = "; ".join(f"{name} = {first}" for name, first in sorted(engine["repeats"].items()))
    resampled = "the evaluation captions of both, paired" if engine["paired"] else "the evaluation captions of the KL"
    rows = [f"| {name} | {_kl_cell(engine['kl'][name] | {'kl_interval': engine['kl_intervals'][name]})}"
            f" | {engine['ratios'][name]:.2f}"
            + (f" [{engine['ratio_intervals'][name][0]:.2f}, {engine['ratio_intervals'][name][1]:.2f}]"
               if name in engine["ratio_intervals"] else "") + " |"
            for name in sorted(engine["schemes"], key=lambda n: engine["kl"][n]["kl_mean"])]  # fmt: skip
    return ["## Does vLLM's error follow PyTorch KL?", "",
            f"vLLM's teacher-forced error against the BF16 floor (the check on the real engine) against PyTorch "
            f"fake-quant KL over {len(engine['schemes'])} quantized schemes: Spearman **{engine['spearman']:.3f}** "
            f"[{engine['interval'][0]:.3f}, {engine['interval'][1]:.3f}] (interval over {resampled}). Misordered "
            f"beyond the intervals of both: {misordered}.{tied} The BF16 reference is left out (its ratio is 1 by "
            "definition)"
            + (f"; counted once, their drift bit-identical (one pick): {repeats}" if repeats else "") + ".", "",
            "| scheme | KL [95%] | vLLM error / floor [95%] |", "|---|---|---|", *rows, "",
            *(["![vllm_vs_kl.png](vllm_vs_kl.png)", ""] if plotted else [])]  # fmt: skip


def _plot_engine_against_kl(engine: dict, path: Path) -> int:
    names = engine["schemes"]
    if engine["spearman"] is None:
        return 0
    figure, axis = plt.subplots(figsize=(9, 4.5))
    x = [engine["kl"][n]["kl_mean"] for n in names]
    y = [engine["ratios"][n] for n in names]
    axis.errorbar(x, y, xerr=_error_bars(x, [engine["kl_intervals"][n] for n in names]),
                  yerr=_error_bars(y, [engine["ratio_intervals"].get(n) for n in names]), fmt="o", ms=4)  # fmt: skip
    axis.set(xscale="log", yscale="log", xlabel="PyTorch KL(BF16 || fake quant), mean per token",
             ylabel="vLLM teacher-forced error / BF16 floor",
             title=f"vLLM against PyTorch (Spearman {engine['spearman']:.3f})")  # fmt: skip
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(ScalarFormatter())
    numbered_labels(figure, axis, list(zip(names, x, y, strict=True)))
    _save(figure, path)
    return len(names)


def speed_frontier(vllm: dict[str, dict], drift: dict[str, dict], intervals: dict[str, list[float]]) -> dict[str, dict]:
    """Scheme -> its vLLM batch-1 speed ratio (with per-round range and noise, as the speed table reads it), its KL
    and interval (`intervals`: kl_intervals(drift)), whether it is on the Pareto front of the medians (faster and
    less drift), and the schemes that dominate it beyond noise (analysis.dominated_beyond_noise)."""
    points, rows = {}, {}
    for name, checks in vllm.items():
        speed = checks.get("speed") or {}
        paired = speed.get("workloads", {}).get("batch1")
        if paired is None or name not in intervals:
            continue
        fake = drift[name]["fake_quant"]
        noise = speed_reading(paired, speed["weight_bytes_bound"],
                              between_run_spread(speed["device"], "batch1"))[0]  # fmt: skip
        points[name] = (paired["ratio"], noise, fake)
        rows[name] = {"ratio": paired["ratio"], "range": [min(paired["ratios"]), max(paired["ratios"])],
                      "noise": noise, "kl_mean": fake["kl_mean"], "kl_interval": intervals[name],
                      "device": speed["device"]}  # fmt: skip
    front = set(pareto_front({name: (-ratio, kl["kl_mean"]) for name, (ratio, _, kl) in points.items()}))
    for name, beaten_by in analysis.dominated_beyond_noise(points).items():
        rows[name] |= {"on_front": name in front, "dominated_by": sorted(beaten_by)}
    return rows


def storage_frontier(manifests: dict[str, dict], drift: dict[str, dict],
                     intervals: dict[str, list[float]]) -> dict[str, dict]:  # fmt: skip
    """Scheme -> its language model's storage bits per weight (scales included), KL and interval (`intervals`:
    kl_intervals(drift)), whether it is on the Pareto front (fewer bits and less drift), and the schemes that
    dominate it beyond the KL's noise: as many bits or fewer, KL lower outside the paired interval."""
    points, rows = {}, {}
    for name in sorted(intervals.keys() & manifests.keys()):
        fake = drift[name]["fake_quant"]
        totals = manifests[name]["totals"]
        bits = totals.get("lm_storage_bits", totals["lm_effective_bits"])
        points[name] = (-bits, 0.0, fake)
        rows[name] = {"bits": bits, "kl_mean": fake["kl_mean"], "kl_interval": intervals[name]}
    front = set(pareto_front({name: (row["bits"], row["kl_mean"]) for name, row in rows.items()}))
    for name, beaten_by in analysis.dominated_beyond_noise(points).items():
        rows[name] |= {"on_front": name in front, "dominated_by": sorted(beaten_by)}
    return rows


def _storage_frontier_section(rows: dict[str, dict], plotted: int) -> list[str]:
    if not plotted:
        return []
    table = [f"| {name} | {r['bits']:.2f} | {r['kl_mean']:.3g} [{r['kl_interval'][0]:.2g}, {r['kl_interval'][1]:.2g}]"
             f" | {'yes' if r['on_front'] else 'no'} | {', '.join(r['dominated_by']) or '-'} |"
             for name, r in sorted(rows.items(), key=lambda item: (item[1]["bits"], item[1]["kl_mean"]))]  # fmt: skip
    return ["## Frontier: storage bits against KL, every format", "",
            "Storage bits: the language model's bits per weight with the formats' scales. On the front: no scheme "
            "stores fewer bits with less KL (means). Dominated beyond noise: another scheme stores as many bits or "
            "fewer with KL lower outside the paired 95% interval over the evaluation captions.", "",
            "| scheme | LM storage bits | KL [95%] | on the front | dominated beyond noise by |",
            "|---|---|---|---|---|", *table, "",
            "![frontier.png](frontier.png)  Bars: 95% intervals; the line joins the front.", ""]  # fmt: skip


def _speed_frontier_section(rows: dict[str, dict], plotted: int) -> list[str]:
    if not plotted:
        return []
    table = [f"| {name} | {r['ratio']:.3f}x ({r['range'][0]:.3f}-{r['range'][1]:.3f}) | {100 * r['noise']:.1f}% | "
             f"{r['kl_mean']:.3g} [{r['kl_interval'][0]:.2g}, {r['kl_interval'][1]:.2g}] | "
             f"{'yes' if r['on_front'] else 'no'} | {', '.join(r['dominated_by']) or '-'} |"
             for name, r in sorted(rows.items(), key=lambda item: -item[1]["ratio"])]  # fmt: skip
    devices = ", ".join(sorted({r["device"] for r in rows.values()}))
    return ["## Frontier: vLLM batch-1 speed against KL", "",
            f"Paired batch-1 decode ratio against BF16 ({devices}) and PyTorch KL. On the front: no scheme is both "
            "faster and lower in KL (medians). Dominated beyond noise: another scheme is faster by more than the "
            "larger noise of the two (the speed table's) and lower in KL outside the paired 95% interval; a "
            "scheme off the front that no one dominates beyond noise may be on it.", "",
            "| scheme | batch-1 ratio (rounds) | noise | KL [95%] | on the front | dominated beyond noise by |",
            "|---|---|---|---|---|---|", *table, "", "![speed_frontier.png](speed_frontier.png)", ""]  # fmt: skip


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point beats on both (lower x and lower y), ordered by x."""
    front = [name for name, (x, y) in points.items()
             if not any(ox <= x and oy <= y and (ox, oy) != (x, y) for ox, oy in points.values())]  # fmt: skip
    return sorted(front, key=lambda name: points[name])


def _error_bars(values: list[float], intervals: list[list[float] | None]) -> list[list[float]]:
    low = [v - i[0] if i else 0.0 for v, i in zip(values, intervals, strict=True)]
    high = [i[1] - v if i else 0.0 for v, i in zip(values, intervals, strict=True)]
    return [[max(x, 0.0) for x in low], [max(x, 0.0) for x in high]]


def _plot_score_size(study: dict, path: Path) -> int:
    if not study:
        return 0
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for draw in study["draws"]:
        rows = [r for r in study["runs"] if r["draw"] == draw]
        left.plot([r["size"] for r in rows], [r["spearman"] for r in rows], "o-", label=f"draw {draw}")
    for index, budget in enumerate(study["budgets"]):
        sizes = study["sizes"]
        worst = [min(r["overlap"][str(budget)] for r in study["runs"] if r["size"] == size) for size in sizes]
        right.plot(sizes, worst, marker="o", label=f"{budget} bits", **line_style(index))
        right.axhline(study["seed_spread"]["overlap_min"][str(budget)], **line_style(index), alpha=0.3)
    left.set(xscale="log", xlabel="scoring samples", ylabel="Spearman vs reference", title="Layer ranking")
    right.set(xscale="log", xlabel="scoring samples", ylabel="overlap (worst draw)",
              title="Picks (faint: seed spread)")  # fmt: skip
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    _save(figure, path)
    return len(study["runs"])


def _plot_proxy(proxy: dict, path: Path) -> int:
    names = proxy.get("schemes", [])
    if len(names) < 2:
        return 0
    figure, axis = plt.subplots(figsize=(9, 4.5))
    x = [proxy["objective"][n] for n in names]
    y = [proxy["kl_mean"][n] for n in names]
    axis.errorbar(x, y, yerr=_error_bars(y, [proxy["kl_interval"][n] for n in names]), fmt="o", ms=4)
    axis.set(xscale="log", yscale="log", xlabel="AutoQuant objective of the pick (summed scores)",
             ylabel="KL(BF16 || quant), mean per token",
             title=f"Proxy against outcome (Spearman {proxy['spearman']:.3f})")  # fmt: skip
    numbered_labels(figure, axis, list(zip(names, x, y, strict=True)))
    _save(figure, path)
    return len(names)


def _plot_against_drift(path: Path, points: dict[str, tuple[float, float]], front: list[str], *,
                        xerr: list[list[float]] | None, yerr: list[list[float]], front_label: str, **axes) -> int:
    """Scatter of schemes (x, KL) with their error bars, the front joined by a line, numbered labels."""
    figure, axis = plt.subplots(figsize=(9, 4.5))
    names = sorted(points)
    axis.errorbar([points[n][0] for n in names], [points[n][1] for n in names], xerr=xerr, yerr=yerr, fmt="o",
                  ms=4)  # fmt: skip
    axis.plot([points[n][0] for n in front], [points[n][1] for n in front], "-", alpha=0.5, label=front_label)
    axis.set(yscale="log", **axes)
    axis.legend(fontsize=7)
    numbered_labels(figure, axis, [(n, *points[n]) for n in names])
    _save(figure, path)
    return len(names)


def _plot_frontier(rows: dict[str, dict], path: Path) -> int:
    if len(rows) < 2:
        return 0
    points = {name: (row["bits"], row["kl_mean"]) for name, row in rows.items()}
    names = sorted(points)
    yerr = _error_bars([points[n][1] for n in names], [rows[n]["kl_interval"] for n in names])
    return _plot_against_drift(path, points, pareto_front(points), xerr=None, yerr=yerr, front_label="Pareto front",
                               xlabel="LM storage bits per weight (scales included)",
                               ylabel="KL(BF16 || quant), mean per token",
                               title="Storage bits against drift, every scheme")  # fmt: skip


def _plot_speed_frontier(rows: dict[str, dict], path: Path) -> int:
    if len(rows) < 2:
        return 0
    points = {name: (row["ratio"], row["kl_mean"]) for name, row in rows.items()}
    names = sorted(points)
    xerr = _error_bars([points[n][0] for n in names], [rows[n]["range"] for n in names])
    yerr = _error_bars([points[n][1] for n in names], [rows[n]["kl_interval"] for n in names])
    front = sorted((n for n in names if rows[n]["on_front"]), key=lambda n: rows[n]["ratio"])
    return _plot_against_drift(path, points, front, xerr=xerr, yerr=yerr, front_label="Pareto front (medians)",
                               xlabel="vLLM batch-1 decode speed / BF16 (paired; bars: per-round range)",
                               ylabel="KL(BF16 || quant) [95%]", title="Speed against drift")  # fmt: skip


def _calibration_pairs(manifests: dict[str, dict]) -> list[tuple[str, str]]:
    """(text-calibrated, image-calibrated) scheme pairs that differ only in `calibration`."""
    def rest(spec: dict) -> str:
        return json.dumps({k: v for k, v in spec.items() if k not in ("name", "alias", "description", "calibration",
                                                                      "expect")}, sort_keys=True)  # fmt: skip

    calibrated = {name: m["scheme"].get("calibration", "text") for name, m in manifests.items()}
    text = {rest(m["scheme"]): name for name, m in manifests.items() if calibrated[name] == "text"}
    return [(text[rest(m["scheme"])], name) for name, m in sorted(manifests.items())
            if calibrated[name] != "text" and rest(m["scheme"]) in text]  # fmt: skip


def _image_prompt_section(drift: dict[str, dict], plotted: int, manifests: dict[str, dict] | None = None) -> list[str]:
    """Per scheme: drift on image prompts beside text, and the worst clipping at image positions (and at text
    positions of the same prompts); a scheme whose image KL or clipping exceeds its text ones is listed."""
    sources = {d.get("image_prompts", {}).get("source") for d in drift.values()} - {None}
    if not sources:
        return []
    rows, readings = [], []
    for name, measurement in sorted(drift.items()):
        images = measurement.get("image_prompts", {})
        if "fake_quant" not in images:
            continue
        text_kl, image_kl = measurement["fake_quant"]["kl_mean"], images["fake_quant"]["kl_mean"]
        clipping = images.get("clipping", [])
        worst = max(clipping, key=lambda r: r["image_clipped_share"], default=None)
        worst_text = max((r["text_clipped_share"] for r in clipping), default=0.0)
        ratio = image_kl / text_kl if text_kl else None
        rows.append(f"| {name} | {_fmt(text_kl)} | {_fmt(image_kl)} | {_fmt(ratio, '.2f')} | "
                    f"{_fmt(images['fake_quant']['top1_agreement'], '.4f')} | {_fmt(images['export']['kl_mean'])} | "
                    f"{_fmt(worst['image_clipped_share'] if worst else None, '.2%')} "
                    f"({worst['layer'] if worst and worst['image_clipped_share'] else '-'}) | "
                    f"{_fmt(worst_text, '.2%')} |")  # fmt: skip
        text_calibrated = (manifests or {}).get(name, {}).get("scheme", {}).get("calibration", "text") == "text"
        clips_more = worst is not None and worst["image_clipped_share"] > worst_text
        if text_calibrated and ratio is not None and ratio > 1.5 and clips_more:
            readings.append(name)
    text = ("Text-calibrated schemes whose image-prompt KL is over 1.5x their text KL and which clip more at image "
            f"positions than at text ones: {', '.join(readings)}; candidates for image calibration." if readings else
            "No scheme's image-prompt KL is over 1.5x its text KL with more clipping at image positions.")  # fmt: skip
    pairs = [(a, b) for a, b in _calibration_pairs(manifests or {}) if "fake_quant" in
             drift.get(a, {}).get("image_prompts", {}) and "fake_quant" in drift.get(b, {}).get("image_prompts", {})]
    pair_rows = [f"| {a} / {b} | {_fmt(drift[a]['fake_quant']['kl_mean'])} / {_fmt(drift[b]['fake_quant']['kl_mean'])} "
                 f"| {_fmt(drift[a]['image_prompts']['fake_quant']['kl_mean'])} / "
                 f"{_fmt(drift[b]['image_prompts']['fake_quant']['kl_mean'])} |" for a, b in pairs]  # fmt: skip
    calibration = (["Text-calibrated against image-calibrated (schemes equal but for `calibration`):", "",
                    "| text / image_text | text KL | image-prompt KL |", "|---|---|---|", *pair_rows, ""]
                   if pairs else [])  # fmt: skip
    return ["## Image prompts: what the image positions do to the quantized language model", "",
            f"Source: {'; '.join(sorted(sources))}. Figures over the captions' positions after the image; clipping: "
            "share of a layer's input values beyond its calibrated static amax, at image positions (worst layer) and "
            "at the same prompts' text positions (worst layer).", "",
            "| scheme | text KL | image-prompt KL | ratio | image-prompt top-1 | export KL (image prompts) | "
            "clipped at image positions (layer) | clipped at text positions |", "|---|---|---|---|---|---|---|---|",
            *rows, "", text, "", *calibration, *(["![clipping.png](clipping.png)", ""] if plotted else [])]  # fmt: skip


def _plot_clipping(drift: dict, path: Path) -> int:
    """Per scheme with static input amax: each layer's largest |input| at image and at text positions, as a
    multiple of its calibrated amax (above 1: clipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {name: d["image_prompts"]["clipping"] for name, d in sorted(drift.items())
              if d.get("image_prompts", {}).get("clipping")}  # fmt: skip
    if not series:
        return 0
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for index, (name, rows) in enumerate(series.items()):
        color = plt.cm.tab20(index % 20)
        axis.plot([r["image_max"] / r["amax"] for r in rows], "o-", color=color, ms=3, label=f"{name} image")
        axis.plot([r["text_max"] / r["amax"] for r in rows], "x:", color=color, ms=3, label=f"{name} text")
    axis.axhline(1.0, color="black", lw=0.8)
    axis.set_xlabel("quantized LM layer with a static input amax (model order)")
    axis.set_ylabel("largest |input| / calibrated amax")
    axis.legend(fontsize=6, ncol=2)
    _save(figure, path)
    return sum(len(rows) for rows in series.values())


def _lower_by(solver: dict) -> float | None:
    """How much lower the exact pick's objective is than ModelOpt's, relative to ModelOpt's."""
    modelopt = solver["modelopt"]["objective"]
    return (modelopt - solver["exact"]["objective"]) / modelopt if modelopt > 0 else None


def _save(figure, path: Path) -> None:
    """Write the PNG to a temp file and rename it, so a reader (another xdist worker) never sees half a file."""
    figure.tight_layout()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(handle)
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def _plot_sensitivity(research: dict, path: Path) -> int:
    blocks = research.get("sensitivity", {}).get("blocks", {})
    points = sum(len(values) for values in blocks.values())
    if not points:
        return 0
    figure, axis = plt.subplots(figsize=(9, 3.5))
    width = 0.8 / max(len(blocks), 1)
    for offset, (method, values) in enumerate(blocks.items()):
        keys = sorted(values, key=int)
        total = sum(values.values()) or 1.0
        axis.bar([int(k) + offset * width for k in keys], [values[k] / total for k in keys], width, label=method)
    rank = _fmt(research.get("sensitivity", {}).get("spearman"))
    axis.set(xlabel="decoder block", ylabel="share of summed sensitivity",
             title=f"Per-block sensitivity (Spearman {rank})")  # fmt: skip
    axis.legend()
    _save(figure, path)
    return points


def _plot_heatmap(manifests: dict, path: Path) -> int:
    names = list(manifests)
    blocks = max((len(m["blocks"]) for m in manifests.values()), default=0)
    if not names or not blocks:
        return 0
    grid = [[0.0] * blocks for _ in names]
    for row, name in enumerate(names):
        weights: dict[int, list[int]] = {}
        for module in manifests[name]["modules"]:
            if module["block"] is not None:
                entry = weights.setdefault(module["block"], [0, 0])
                entry[0] += module["weight_count"] * (module["format"] != "BF16")
                entry[1] += module["weight_count"]
        for block, (fp8, total) in weights.items():
            grid[row][block] = fp8 / total
    figure, axis = plt.subplots(figsize=(max(6, blocks * 0.3 + 3), 0.35 * len(names) + 1.5))
    image = axis.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    labels = [f"{name} ({'+'.join(sorted(manifests[name]['totals'].get('coverage_by_format', {}))) or 'BF16'})"
              for name in names]  # fmt: skip
    axis.set_yticks(range(len(names)), labels, fontsize=7)
    axis.set(xlabel="decoder block", title="Quantized share of each block's linear weights (row label: formats)")
    figure.colorbar(image, ax=axis)
    _save(figure, path)
    return len(names) * blocks


def _plot_pareto(research: dict, manifests: dict, drift: dict, path: Path) -> int:
    sweep = research.get("sweep", [])
    measured_points = [n for n, m in drift.items() if n in manifests and m["fake_quant"]["kl_mean"] > 0]
    if not sweep and not measured_points:
        return 0
    figure, axis = plt.subplots(figsize=(9, 4.5))
    if sweep:
        axis.plot([r["lm_effective_bits"] for r in sweep], [r["kl_mean"] for r in sweep], "o-", label="AutoQuant sweep")
    markers: dict[str, str] = {}
    points: list[tuple[str, float, float]] = []
    for name, measured in drift.items():
        if name in measured_points:
            totals = manifests[name]["totals"]
            bits = totals.get("lm_storage_bits", totals["lm_effective_bits"])  # what the export spends per weight
            family = "+".join(sorted(totals.get("coverage_by_format", {}))) or "BF16"
            first = family not in markers
            marker = markers.setdefault(family, "xo^svD*P<>"[len(markers) % 10])
            axis.scatter(bits, measured["fake_quant"]["kl_mean"], marker=marker, label=family if first else None)
            points.append((name, bits, measured["fake_quant"]["kl_mean"]))
    axis.set(xlabel="LM bits per weight (sweep: effective bits; schemes: storage bits, scales included)",
             ylabel="KL(BF16 || quant), mean per token", yscale="log",
             title="Drift versus bits, all formats")  # fmt: skip
    if sweep or markers:
        axis.legend(fontsize=7, loc="upper right")
    if points:
        numbered_labels(figure, axis, points)
    _save(figure, path)
    return len(sweep) + len(measured_points)


def numbered_labels(figure, axis, points: list[tuple[str, float, float]]) -> list:
    """Label each point with its number and list the numbers' names beside the plot: points whose labels would
    overlap share one label ("3,4") at the first of them, merged until no two labels overlap. Returns the labels."""
    ordered = sorted(points, key=lambda point: (point[1], point[2], point[0]))
    clusters = [[index] for index in range(len(ordered))]
    renderer = figure.canvas.get_renderer()
    while True:
        texts = [axis.annotate(",".join(str(i + 1) for i in cluster), ordered[cluster[0]][1:], fontsize=7,
                               xytext=(3, 3), textcoords="offset points") for cluster in clusters]  # fmt: skip
        boxes = [text.get_window_extent(renderer) for text in texts]
        clash = next(((a, b) for a in range(len(boxes)) for b in range(a + 1, len(boxes))
                      if boxes[a].overlaps(boxes[b])), None)  # fmt: skip
        if clash is None:
            break
        for text in texts:
            text.remove()
        a, b = clash
        clusters[a] += clusters.pop(b)
    table = "\n".join(f"{index + 1}  {name}" for index, (name, _, _) in enumerate(ordered))
    axis.text(1.02, 1.0, table, transform=axis.transAxes, fontsize=6, va="top", family="monospace")
    return texts


def _plot_localization(drift: dict, path: Path) -> int:
    lines = {name: measured["fake_quant"]["layers"] for name, measured in drift.items()
             if any(layer["relative_error"] > 0 for layer in measured["fake_quant"]["layers"])}  # fmt: skip
    if not lines:
        return 0
    figure, axis = plt.subplots(figsize=(10, 4.5))
    for index, (name, layers) in enumerate(lines.items()):
        style = line_style(index)
        axis.plot(range(len(layers)), [max(layer["relative_error"], 1e-8) for layer in layers], label=name, **style)
    axis.set(xlabel="decoder block (last point: final norm)", ylabel="relative error of hidden states",
             yscale="log", title="Where quantization error enters and how it accumulates")  # fmt: skip
    axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, not over them
    _save(figure, path)
    return sum(len(layers) for layers in lines.values())


def line_style(index: int) -> dict:
    """A line's colour and dash, distinct for up to 80 lines: tab20's 20 colours, then the next dash pattern."""
    return {"color": plt.cm.tab20(index % 20), "linestyle": ("-", "--", ":", "-.")[index // 20 % 4]}


def _plot_gap(research: dict, path: Path) -> int:
    rows = research.get("optimality_gap", [])
    if not rows:
        return 0
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar([str(r["effective_bits"]) for r in rows], [100 * r["relative_gap"] for r in rows])
    axis.set(xlabel="target effective bits", ylabel="objective gap to exact solve (%)",
             title="AutoQuant pick versus exact 0/1 solve")  # fmt: skip
    _save(figure, path)
    return len(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--reports-dir", default=str(REPORTS_DIR))
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--results-of", nargs="+", default=None, metavar="RUN_ID",
                        help="join only the JSON of this run id, or of these (default: all)")  # fmt: skip
    parser.add_argument("--merge", nargs="+", default=None, metavar="SHARD_REPORTS",
                        help="first merge these shards' reports/ folders into --reports-dir")  # fmt: skip
    arguments = parser.parse_args()
    if arguments.merge:
        merged = merge_reports([Path(folder) for folder in arguments.merge], Path(arguments.reports_dir))
        print(f"merged {len(merged)} files of {len(arguments.merge)} shards into {arguments.reports_dir}")
    print(build_report(Path(arguments.reports_dir), arguments.model, arguments.run_id, arguments.results_of))
