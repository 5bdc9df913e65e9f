"""The research report: generated from the run's JSON, every plot a valid PNG with data; shards of a run merged
into the report of one run."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

from quantsuite.plugin.session import catalog_readers_drop_exports
from quantsuite.report import PLOTS, build_report
from tests.test_analysis import measurement, vllm_results

pytestmark = pytest.mark.catalog  # the nightly's research step


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, workbench, catalog, request):
    from quantsuite.stages.context import CudaRequired

    keep = not catalog_readers_drop_exports(request.config)  # a cache without their drift: one export per scheme
    for scheme in catalog.select(request.config.getoption("--scheme")):
        try:
            workbench.drift.measure(scheme, keep)
        except CudaRequired:
            with contextlib.suppress(CudaRequired):  # AutoQuant over a CUDA-only format: not scored here, no row
                workbench.schemes.result(scheme)  # its row in the report, without drift on this device
    research = workbench.research.run()
    assert all(research[study] for study in workbench.research.settings.studies)
    context = workbench.context
    return build_report(context.reports_dir, context.model_tag, run_id=f"test-{context.model_tag}",
                        results_of=context.run_id)  # fmt: skip


def test_report_and_summary_exist(report_dir, workbench, catalog, request):
    text = (report_dir / "report.md").read_text()
    summary = json.loads((report_dir / "summary.json").read_text())
    on_cpu = workbench.context.device.type != "cuda"
    for scheme in catalog.select(request.config.getoption("--scheme")):
        if on_cpu and catalog.scoring_needs_cuda(scheme):
            assert f"| {scheme.name} |" not in text
            continue
        row = next(line for line in text.splitlines() if line.startswith(f"| {scheme.name} |"))
        assert all(f" {fmt} " in row for fmt in scheme.formats), row  # the formats column, per format
        assert summary["schemes"][scheme.name]["totals"]["lm_storage_bits"] > 4
    assert "Spearman" in text and "exact objective" in text
    images = text.split("## Image prompts", 1)[1].split("\n## ", 1)[0]
    assert f"Source: {workbench.context.image_source}" in images
    for name, drift in summary_drift(workbench, catalog, request).items():
        if "fake_quant" in drift.get("image_prompts", {}):
            assert f"| {name} | " in images, name


def summary_drift(workbench, catalog, request) -> dict:
    """The drift JSON of the selected schemes that have one on this device."""
    path = workbench.context.reports_dir / "drift" / workbench.context.model_tag
    names = [s.name for s in catalog.select(request.config.getoption("--scheme"))]
    return {n: json.loads((path / f"{n}.json").read_text()) for n in names if (path / f"{n}.json").is_file()}


STUDY_OF_PLOT = {"sensitivity.png": "sensitivity", "pareto.png": "sweep", "optimality_gap.png": "optimality_gap",
                 "score_size.png": "score_size", "proxy.png": "proxy"}  # fmt: skip


@pytest.mark.parametrize("plot", PLOTS)
def test_plot_is_a_png_with_data(report_dir, plot, workbench):
    """Every plot drew data points of this run (before: a non-blank image passed, axes and labels alone)."""
    from PIL import Image

    study = STUDY_OF_PLOT.get(plot)
    if study and study not in workbench.research.settings.studies:
        pytest.skip(f"{plot}: the {study} study is switched off (--research-studies)")

    assert json.loads((report_dir / "summary.json").read_text())["plots"][plot] > 0, f"{plot}: no data drawn"
    path = report_dir / plot
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(path).convert("L")
    assert image.size[0] > 300 and image.size[1] > 200


def test_sections_without_data_are_left_out(tmp_path, workbench, catalog):
    """A run that only produced a manifest (`pytest -m autoquant --scheme top50`): the report holds its table and
    coverage heatmap, and no empty plot or section (before: five plots, three with no artists)."""
    import shutil
    import warnings

    scheme = catalog.scheme("top50")
    workbench.schemes.result(scheme)
    manifests = tmp_path / "manifests" / workbench.context.model_tag
    manifests.mkdir(parents=True)
    shutil.copy(
        workbench.context.reports_dir / "manifests" / workbench.context.model_tag / f"{scheme.name}.json", manifests
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = build_report(tmp_path, workbench.context.model_tag, "only-top50")
    assert sorted(p.name for p in out.glob("*.png")) == ["coverage_heatmap.png"]
    text = (out / "report.md").read_text()
    assert "| fp8_autoquant_top50 |" in text and "Spearman" not in text and "pareto.png" not in text
    assert not [w for w in caught if "No artists" in str(w.message)], [str(w.message) for w in caught]


def test_research_numbers_are_consistent(workbench):
    """Each enabled study's figures against what they must satisfy; a study switched off (--research-studies) is not
    read (the GPU run gpu-39 ran without the sensitivity study, and this test failed on its missing key)."""
    studies = workbench.research.settings.studies
    if not {"optimality_gap", "sweep", "sensitivity"} & set(studies):
        pytest.skip("--research-studies switches off the optimality gap, the sweep and the sensitivity study")
    research = workbench.research.run()
    if "optimality_gap" in studies:
        gap = research["optimality_gap"]
        assert all(row["relative_gap"] >= -1e-9 for row in gap), "an exact solve cannot be worse than a heuristic"
    if "sweep" in studies:
        bits = [row["lm_effective_bits"] for row in research["sweep"]]
        targets = [row["target_effective_bits"] for row in research["sweep"]]
        assert all(b <= t + 1e-9 for b, t in zip(bits, targets, strict=True))
    if "sensitivity" in studies:
        blocks = research["sensitivity"]["blocks"]
        first, second = (blocks[method] for method in research["sensitivity"]["methods"])
        common = sorted(set(first) & set(second), key=int)
        assert research["sensitivity"]["spearman"] == pytest.approx(
            rank_correlation([first[b] for b in common], [second[b] for b in common]), abs=1e-9
        )


def rank_correlation(first: list[float], second: list[float]) -> float:
    """Spearman's rho by its definition, not through scipy.stats.spearmanr (which the report calls): the Pearson
    correlation of the two rank vectors, ties given their mean rank."""
    import numpy as np
    from scipy.stats import rankdata

    return float(np.corrcoef(rankdata(first), rankdata(second))[0, 1])


def test_rank_correlation_by_definition():
    """The reference the research Spearman is checked against: known values, and it disagrees with a wrong rho."""
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert rank_correlation([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert rank_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    from quantsuite.analysis import spearman

    first, second = [3, 1, 2, 5, 4], [1, 2, 3, 4, 5]
    assert spearman(first, second) == pytest.approx(rank_correlation(first, second))
    assert spearman(first, second) != pytest.approx(rank_correlation(first, second[::-1]))


def test_speed_ratios_come_from_the_benchmarks_stage(tmp_path, workbench):
    """Ratios to BF16 are computed from the benchmarks stage's parts of one run (same run, same device); another
    run's benchmarks are not joined."""
    from quantsuite.pipeline import Workbench

    context = workbench.context
    bench = Workbench(context.model_spec, context.data_config, context.catalog, context.cache.root, tmp_path,
                      run_id="speed")  # fmt: skip
    for name in ("bf16", "fp8_autoquant_top50"):
        bench.schemes.result(context.catalog.scheme(name))  # this run's manifests (from the cache)
    for name, median in (("bf16", 0.1), ("fp8_autoquant_top50", 0.2)):
        bench.benchmarks.record({"scheme": name, "kind": "fake_quant_prefill", "tokens": 100}, median)
    bench.benchmarks.record({"scheme": "fp8_autoquant_top50", "kind": "real_fp8_prefill_paired", "tokens": 100,
                             "paired_ratio_median": 1.25}, 0.1)  # fmt: skip
    out = build_report(tmp_path, context.model_tag, "speed-report", results_of="speed")
    rows = (out / "report.md").read_text().splitlines()
    line = next(row for row in rows if row.startswith("| fp8_autoquant_top50 |"))
    assert "fake_quant_prefill:0.50x" in line
    assert "real_fp8_prefill_paired:1.25x" in line, "paired benchmarks carry their own BF16 rounds"
    later = Workbench(context.model_spec, context.data_config, context.catalog, context.cache.root, tmp_path,
                      run_id="later")  # fmt: skip
    for name in ("bf16", "fp8_autoquant_top50"):
        later.schemes.result(context.catalog.scheme(name))
    line = next(row for row in (build_report(tmp_path, context.model_tag, "later-report", results_of="later")
                                / "report.md").read_text().splitlines() if row.startswith("| fp8_autoquant_top50 |"))
    assert "fake_quant_prefill" not in line, "another run's benchmarks were joined"


def test_report_joins_one_run(tmp_path, workbench, catalog):
    """Before: report.md joined every JSON under reports/, whatever run left it. Now `--scheme top50` after an
    earlier full run reports top50 only."""
    earlier, latest = catalog.scheme("top25"), catalog.scheme("top50")
    manifests = tmp_path / "manifests" / workbench.context.model_tag
    manifests.mkdir(parents=True)
    for scheme, run in ((earlier, "run-a"), (latest, "run-b")):
        source = workbench.context.reports_dir / "manifests" / workbench.context.model_tag / f"{scheme.name}.json"
        workbench.schemes.result(scheme)
        (manifests / source.name).write_text(json.dumps(json.loads(source.read_text()) | {"run_id": run}))
    text = (
        build_report(tmp_path, workbench.context.model_tag, "report-b", results_of="run-b") / "report.md"
    ).read_text()
    assert "| fp8_autoquant_top50 |" in text and "fp8_autoquant_top25" not in text
    everything = (build_report(tmp_path, workbench.context.model_tag, "report-all") / "report.md").read_text()
    assert "| fp8_autoquant_top25 |" in everything  # by hand, without --results-of, everything is joined


def test_stage_results_carry_the_run_id(workbench, catalog):
    path = workbench.context.reports_dir / "manifests" / workbench.context.model_tag / "fp8_autoquant_top50.json"
    workbench.schemes.result(catalog.scheme("top50"))
    assert json.loads(path.read_text())["run_id"] == workbench.context.run_id


def test_report_without_a_run_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytest -m autoquant --model tiny"):
        build_report(tmp_path, "tiny", "empty")
    assert not (tmp_path / "empty").exists(), "a failed report leaves no directory behind"


def test_speed_reading_separates_findings_from_noise():
    """Figures of the H200 run gpu-20261128: batch 256, the BF16 rounds moved 29k-37k tokens/s, so top50's
    0.846x is no finding; batch 1, they moved under 1%, so 1.057x is. A gain past the weight-bytes bound by more
    than the noise is flagged, not reported as a speed-up."""
    from quantsuite.report import speed_reading

    noisy = [32813.0, 37440.0, 29196.0, 33483.0]
    spread, reading = speed_reading({"ratio": 0.846, "baseline_tokens_per_s": noisy}, bound=1.227)
    assert reading == "within noise" and spread == pytest.approx(0.2487, abs=1e-3)
    steady = [290.0, 291.0, 289.0, 291.5]
    assert speed_reading({"ratio": 1.057, "baseline_tokens_per_s": steady}, bound=1.227)[1] == "faster"
    assert speed_reading({"ratio": 0.90, "baseline_tokens_per_s": steady}, bound=1.227)[1] == "slower"
    # fp8_attn_only at batch 256: 1.25x against a 1.047x bound, BF16 rounds 11.5% apart
    attention = {"ratio": 1.250, "baseline_tokens_per_s": [30000.0, 33450.0, 31000.0, 32000.0]}
    assert speed_reading(attention, bound=1.047)[1] == "past the bound (suspect)"


def test_speed_section_shows_ratio_bound_share_and_reading():
    from quantsuite.report import _vllm_cell, _vllm_sections

    paired = {"ratio": 1.1, "ratios": [1.08, 1.12], "baseline_tokens_per_s": [100.0, 102.0], "bound_share": 0.2,
              "baseline_ms_per_token": 10.0, "candidate_ms_per_token": 9.1}  # fmt: skip
    speed = {"workloads": {"batch1": paired}, "weight_bytes_bound": 1.5, "device": "NVIDIA H200"}
    lines = _vllm_sections({"fp8_x": {"run_id": "r", "speed": speed}}, None)
    row = next(line for line in lines if line.startswith("| fp8_x | batch1 |"))
    assert row.split(" | ")[2:6] == ["1.100x", "1.080-1.120", "3.3%", "faster"]  # H200 batch 1: identical runs 3.3%
    assert "| 1.50x | 20% | NVIDIA H200 |" in row
    assert _vllm_cell({"run_id": "r", "speed": speed}) == "batch1:1.10x(bound 1.50x, faster)", "the schemes table"
    assert not any("Timed at batch 1 only" in line for line in lines)
    lines = _vllm_sections({"fp8_x": {"run_id": "r", "speed": speed | {"untimed_workloads": ["batch256", "images256"]}},
                            "fp8_y": {"run_id": "r", "speed": speed}}, None)  # fmt: skip
    said = [line for line in lines if line.startswith("Timed at batch 1 only")]
    assert len(said) == 1 and said[0].endswith(": fp8_x (batch256, images256)."), lines
    assert "QUANTSUITE_VLLM_BATCH_SCHEMES" in said[0]


def test_solver_table_lists_every_auto_scheme(report_dir, workbench, catalog, request):
    """Both solvers' objectives per auto scheme, with the solver the scheme applied (schemes scored on this device:
    AutoQuant over a CUDA-only format is not scored on a CPU)."""
    text = (report_dir / "report.md").read_text()
    scored_here = workbench.context.device.type == "cuda"
    auto = [s for s in catalog.select(request.config.getoption("--scheme"))
            if s.mode == "autoquant" and s.coverage_mode == "auto"
            and (scored_here or not catalog.scoring_needs_cuda(s))]  # fmt: skip
    if not auto:
        pytest.skip("no auto AutoQuant scheme selected")
    section = text.split("## Solvers per scheme")[1]
    for scheme in auto:
        assert f"| {scheme.name} | {scheme.effective_bits} | {scheme.solver} |" in section


def test_a_speed_ratio_inside_the_spread_between_identical_runs_is_no_finding():
    """top25's 1.024x at batch 1 on an H200 read `faster` against its rounds' 1% spread; identical runs differ by up
    to 3.3% there, so it is within noise. Elsewhere nothing is recorded and the rounds' spread alone decides."""
    from quantsuite.report import between_run_spread, speed_reading

    paired = {"ratio": 1.024, "baseline_tokens_per_s": [100.0, 101.0, 100.5]}
    assert between_run_spread("NVIDIA H200", "batch1") == 0.033
    assert speed_reading(paired, 1.2, between_run_spread("NVIDIA H200", "batch1"))[1] == "within noise"
    assert speed_reading(paired, 1.2, between_run_spread("cpu", "batch1")) == (pytest.approx(0.00995), "faster")
    assert speed_reading(paired | {"ratio": 1.05}, 1.2, between_run_spread("NVIDIA H200", "batch1"))[1] == "faster"


def test_point_labels_never_overlap_and_every_point_is_named():
    """The drift-versus-bits plot printed int4_awq over w4a8_awq and default over its KV twin: labels are numbers,
    merged where they would overlap, with the names listed beside the plot."""
    import matplotlib.pyplot as plt

    from quantsuite.report import numbered_labels

    points = [("int4_awq", 4.25, 0.0166), ("w4a8_awq", 4.25, 0.0189), ("default", 8.5, 0.00338),
              ("default_kv", 8.5, 0.00339), ("top50", 12.3, 0.00039), ("eb13", 13.0, 0.000114),
              ("eb13_exact", 13.0, 0.000115), ("full", 8.6, 0.00129)]  # fmt: skip
    figure, axis = plt.subplots(figsize=(9, 4.5))
    axis.scatter([p[1] for p in points], [p[2] for p in points])
    axis.set_yscale("log")
    labels = numbered_labels(figure, axis, points)
    renderer = figure.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert not any(boxes[a].overlaps(boxes[b]) for a in range(len(boxes)) for b in range(a + 1, len(boxes)))
    numbered = sorted(int(n) for label in labels for n in label.get_text().split(","))
    assert numbered == list(range(1, len(points) + 1))
    assert len(labels) < len(points)  # the coincident pairs share a label
    plt.close(figure)


def test_line_styles_are_distinct_for_every_scheme():
    """The localization plot drew 20 schemes in 10 repeating colours."""
    from quantsuite.report import line_style

    styles = [line_style(index) for index in range(30)]
    assert len({(tuple(style["color"]), style["linestyle"]) for style in styles}) == 30


def test_two_shards_merge_into_the_report_of_one_run(tmp_path):
    """The same selection run as --shard 1/2 + 2/2 (real pytest runs, each on a cache and reports/ of its own, as two
    runners) and whole: the shards' reports/ merged (`merge_reports`) give the whole run's report, every scheme row
    and figure the same. The runs compute the tiny model on the CPU whatever this run's model: sharding and merging
    do not depend on it, and on the 3B shape three fresh caches would build ~15 GB of exports and minutes of drift
    in the nightly's research step. The whole run reads the shards' merged caches
    (`python -m quantsuite.cache --merge`) and, with it, a check that reads every scheme's results (`catalog`, the
    research step of a sharded nightly: the nested-scheme drift check reads each scheme's drift, and its manifest
    and search state): it builds none of the schemes' artifacts again. Planted: a merge that lost a shard gives
    another report; by hand (session 30), a whole run on shard 1's cache alone built top50's scores, scheme, export
    and drift."""
    from quantsuite.cache import main as merge_caches
    from quantsuite.models import ModelSpec
    from quantsuite.report import merge_reports
    from tests.plugin.test_options import _pytest

    schemes = ["--scheme=bf16", "--scheme=top50", "--scheme=default", "--model=tiny", "--device=cpu",
               "--run-id=sharded"]  # fmt: skip
    drift = ["tests/test_drift.py", "-k", "test_drift_within_bounds"]
    for shard in ("1/2", "2/2"):
        name = f"shard-{shard[0]}"
        done = _pytest(*drift, *schemes, f"--shard={shard}", "--no-report", f"--cache-dir={tmp_path / name / 'cache'}",
                       f"--reports-dir={tmp_path / name / 'reports'}")  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    merged_cache = tmp_path / "merged-cache"
    merge_caches(["--merge", str(tmp_path / "shard-1" / "cache"), str(tmp_path / "shard-2" / "cache"),
                  "--into", str(merged_cache)])  # fmt: skip

    def artifacts() -> list[Path]:  # kind/key, not the compilers' caches (toolchains/) or the vLLM logs
        return sorted(path.relative_to(merged_cache) for path in merged_cache.glob("*/*")
                      if path.suffix != ".lock" and path.parent.name not in ("toolchains", "logs"))  # fmt: skip

    before = artifacts()
    readers = ["tests/test_drift.py", "-k", "test_drift_within_bounds or test_more_fp8_never_means_less_drift"]
    done = _pytest(*readers, *schemes, "-n", "2", f"--cache-dir={merged_cache}", f"--reports-dir={tmp_path / 'whole'}",
                   xdist=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    after = artifacts()
    assert after == before, sorted(set(after) - set(before))  # nothing of the schemes built again
    assert (tmp_path / "whole" / "sharded" / "report.md").is_file()  # xdist's controller wrote it (workers told it)
    tag = ModelSpec("tiny").tag

    def report_of(reports: Path) -> tuple[dict, list[str]]:
        out = build_report(reports, tag, run_id="report", results_of="sharded")
        rows = [row for row in (out / "report.md").read_text().splitlines() if row.startswith("| ")]
        return json.loads((out / "summary.json").read_text())["schemes"], rows

    merge_reports([tmp_path / "shard-1" / "reports", tmp_path / "shard-2" / "reports"], tmp_path / "merged")
    whole, merged = report_of(tmp_path / "whole"), report_of(tmp_path / "merged")
    assert set(whole[0]) == {"bf16", "fp8_autoquant_top50", "fp8_modelopt_default"}
    assert merged == whole
    merge_reports([tmp_path / "shard-1" / "reports"], tmp_path / "lost-a-shard")
    assert report_of(tmp_path / "lost-a-shard")[0] != whole[0]


def test_merge_joins_what_several_shards_wrote(tmp_path):
    """A file two shards wrote: a vLLM result whose checks ran apart keeps both checks (the first shard's value
    where both have one), pytest-benchmark lists join, step tables join their rows; the shards' own reports and
    locks are left out; a missing shard folder is an error naming it."""
    from quantsuite.report import merge_reports

    def write(shard: str, relative: str, content) -> None:
        path = tmp_path / shard / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))

    write("a", "vllm/tiny/bf16.json", {"run_id": "r", "cpu": {"loaded": True}, "model_free": {"failures": []}})
    write("b", "vllm/tiny/bf16.json", {"run_id": "r", "cpu_patched": {"loaded": True}, "cpu": {"loaded": False}})
    write("a", "r-benchmarks.json", {"machine_info": {"node": "a"}, "benchmarks": [{"name": "x"}]})
    write("b", "r-benchmarks.json", {"machine_info": {"node": "b"}, "benchmarks": [{"name": "y"}]})
    write("a", "r-nightly-steps.tsv", "step\tseconds\texit\nschemes (shard 1/2)\t10\t0\n")
    write("b", "r-nightly-steps.tsv", "step\tseconds\texit\nschemes (shard 2/2)\t12\t1\n")
    write("a", "r/report.md", "shard a's own report")
    write("a", "vllm/tiny/bf16.json.lock", "")
    merged = merge_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    out = tmp_path / "out"
    assert json.loads((out / "vllm/tiny/bf16.json").read_text()) == {
        "run_id": "r", "cpu": {"loaded": True}, "model_free": {"failures": []}, "cpu_patched": {"loaded": True}}
    benchmarks = json.loads((out / "r-benchmarks.json").read_text())
    assert [b["name"] for b in benchmarks["benchmarks"]] == ["x", "y"] and benchmarks["machine_info"]["node"] == "a"
    assert (out / "r-nightly-steps.tsv").read_text().splitlines() == [
        "step\tseconds\texit", "schemes (shard 1/2)\t10\t0", "schemes (shard 2/2)\t12\t1"]
    assert not (out / "r").exists() and not (out / "vllm/tiny/bf16.json.lock").exists()
    assert "r/report.md" not in merged
    with pytest.raises(FileNotFoundError, match=r"--merge .*missing: not a folder"):
        merge_reports([tmp_path / "missing"], out)


def engine_results(errors: dict[str, float], floor: float = 0.026, captions: int = 64) -> dict[str, dict]:
    """vLLM results whose teacher-forced error is `errors[name]` x the floor on every caption."""
    return vllm_results({name: [ratio * floor] * captions for name, ratio in errors.items()}, [floor] * captions)


def drift_of(kl: dict[str, float], noise: list[float]) -> dict[str, dict]:
    """Drift results whose per-caption KL is `kl[name]` x (1 + the caption's noise)."""
    return {name: {"fake_quant": measurement([value * (1 + n) for n in noise])} for name, value in kl.items()}


def test_vllm_against_kl_counts_each_pick_once_and_names_what_it_misorders():
    """Measured on the H200 (gpu-27): vLLM's error ordered six FP8 schemes as their KL does. The reference (ratio 1
    by definition) and a second name of the same pick are left out; planted: one scheme's vLLM error swapped with
    another's is named, and the Spearman falls."""
    from quantsuite.report import engine_against_kl, kl_intervals

    noise = list(0.3 * np.random.default_rng(2).standard_normal(64))
    kl = {"bf16": 0.0, "top25": 0.00055, "eb13": 0.00104, "top50": 0.0015, "full": 0.0072, "default": 0.054}
    errors = {"bf16": 1.0, "top25": 1.38, "eb13": 1.54, "top50": 1.78, "full": 3.40, "default": 7.29}
    drift = drift_of(kl, noise)
    drift["top50_kl_div"] = drift["top50"]
    manifests = {name: {"scheme": {"mode": "none" if name == "bf16" else "autoquant"}} for name in drift}
    honest = engine_against_kl(engine_results(errors | {"top50_kl_div": 1.78}), drift, manifests, kl_intervals(drift))
    assert honest["schemes"] == sorted(set(kl) - {"bf16"}) and honest["repeats"] == {"top50_kl_div": "top50"}
    assert honest["spearman"] == pytest.approx(1.0) and not honest["misordered"] and honest["paired"]
    low, high = honest["ratio_intervals"]["full"]
    assert low == pytest.approx(3.40) and high == pytest.approx(3.40)  # every caption at 3.4x its floor
    planted = engine_against_kl(engine_results(errors | {"top25": 7.29, "default": 1.38}), drift, manifests,
                                kl_intervals(drift))  # fmt: skip
    assert planted["spearman"] < 0.5
    assert {(m["lower_score"], m["higher_score"]) for m in planted["misordered"]} == {
        ("default", name) for name in ("top25", "eb13", "top50", "full")} | {
        (name, "top25") for name in ("eb13", "top50", "full")}  # fmt: skip


def test_speed_frontier_reads_its_gaps_against_their_noise():
    """Measured on the H200 (gpu-27): at batch 1 no FP8 scheme beat another on both speed and KL beyond noise
    (3.3% between identical runs). Planted: a scheme 10% faster than default with half its KL dominates it;
    default leaves the front."""
    from quantsuite.report import kl_intervals, speed_frontier

    noise = list(0.3 * np.random.default_rng(3).standard_normal(64))
    rates = [300.0, 301.0, 299.0, 300.5]

    def speed(ratio: float) -> dict:
        return {"speed": {"device": "NVIDIA H200", "weight_bytes_bound": 1.5, "workloads": {"batch1": {
            "ratio": ratio, "ratios": [ratio - 0.01, ratio + 0.01], "baseline_tokens_per_s": rates}}}}

    vllm = {"full": speed(1.105), "mlp_only": speed(1.125), "default": speed(1.113), "top25": speed(1.016)}
    drift = drift_of({"full": 0.0072, "mlp_only": 0.0266, "default": 0.0544, "top25": 0.00055}, noise)
    rows = speed_frontier(vllm, drift, kl_intervals(drift))
    assert {name for name, row in rows.items() if row["on_front"]} == {"full", "mlp_only", "top25"}
    assert all(not row["dominated_by"] for row in rows.values())
    planted = drift | drift_of({"planted": 0.027}, noise)
    rows = speed_frontier(vllm | {"planted": speed(1.22)}, planted, kl_intervals(planted))
    assert rows["default"]["dominated_by"] == ["planted"] and not rows["default"]["on_front"]
    assert rows["top25"]["dominated_by"] == [] and rows["top25"]["on_front"]


def test_storage_frontier_names_what_stores_as_much_for_more_drift():
    """3B shape, H200 (gpu-26/27): at 4.25 bits W4A8 AWQ drifts more than INT4 AWQ (0.344 against 0.327), so INT4
    AWQ dominates it at equal storage; INT8 SmoothQuant's per-channel scales store 8.01 bits, so its lower KL does
    not dominate FP8's 8.00. Planted: a scheme with INT4 AWQ's bits and KL, on other captions' noise, is a tie."""
    from quantsuite.report import kl_intervals, storage_frontier

    noise = list(0.3 * np.random.default_rng(5).standard_normal(64))
    bits = {"int4_awq": 4.25, "w4a8_awq": 4.25, "default": 8.0, "int8_sq": 8.01, "full": 8.99}
    drift = drift_of({"int4_awq": 0.327, "w4a8_awq": 0.344, "default": 0.0544, "int8_sq": 0.0293, "full": 0.00717},
                     noise)  # fmt: skip
    manifests = {name: {"totals": {"lm_storage_bits": value, "lm_effective_bits": value}} for name, value in
                 (bits | {"tie": 4.25}).items()}  # fmt: skip
    rows = storage_frontier(manifests, drift, kl_intervals(drift))
    assert {name for name, row in rows.items() if row["on_front"]} == {"int4_awq", "default", "int8_sq", "full"}
    assert rows["w4a8_awq"]["dominated_by"] == ["int4_awq"] and not rows["w4a8_awq"]["on_front"]
    assert all(not rows[name]["dominated_by"] for name in ("int4_awq", "default", "int8_sq", "full"))
    tied = drift | drift_of({"tie": 0.327}, list(np.roll(noise, 7)))
    rows = storage_frontier(manifests, tied, kl_intervals(tied))
    assert rows["tie"]["dominated_by"] == [] and "tie" not in rows["int4_awq"]["dominated_by"]
