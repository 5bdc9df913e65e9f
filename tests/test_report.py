"""The research report: generated from the run's JSON, every plot a valid PNG with data."""

from __future__ import annotations

import json

import pytest

from quantsuite.report import PLOTS, build_report


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, workbench, catalog, request):
    for scheme in catalog.select(request.config.getoption("--scheme")):
        workbench.drift.measure(scheme)
        if request.config.getoption("--drop-exports"):
            workbench.exports.drop(scheme)
    research = workbench.research.run()
    assert research["sweep"] and research["optimality_gap"]
    context = workbench.context
    return build_report(context.reports_dir, context.model_tag, run_id=f"test-{context.model_tag}",
                        results_of=context.run_id)  # fmt: skip


def test_report_and_summary_exist(report_dir, workbench, catalog, request):
    text = (report_dir / "report.md").read_text()
    summary = json.loads((report_dir / "summary.json").read_text())
    for scheme in catalog.select(request.config.getoption("--scheme")):
        assert f"| {scheme.name} |" in text
        assert summary["schemes"][scheme.name]["totals"]["lm_effective_bits"] >= 8
    assert "Spearman" in text and "exact objective" in text


@pytest.mark.parametrize("plot", PLOTS)
def test_plot_is_a_png_with_data(report_dir, plot):
    """Every plot drew data points of this run (before: a non-blank image passed, axes and labels alone)."""
    from PIL import Image

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
    research = workbench.research.run()
    gap = research["optimality_gap"]
    assert all(row["relative_gap"] >= -1e-9 for row in gap), "an exact solve cannot be worse than a heuristic"
    bits = [row["lm_effective_bits"] for row in research["sweep"]]
    targets = [row["target_effective_bits"] for row in research["sweep"]]
    assert all(b <= t + 1e-9 for b, t in zip(bits, targets, strict=True))
    from scipy.stats import spearmanr

    blocks = research["sensitivity"]["blocks"]  # recomputed independently (before: asserted to lie in [-1, 1])
    first, second = (blocks[method] for method in research["sensitivity"]["methods"])
    common = sorted(set(first) & set(second), key=int)
    expected = spearmanr([first[b] for b in common], [second[b] for b in common]).statistic
    assert research["sensitivity"]["spearman"] == pytest.approx(expected, abs=1e-9)


def test_speed_ratios_come_from_the_benchmark_json(tmp_path, report_dir, workbench):
    """Ratios to BF16 are computed from the same benchmark JSON (same run, same device)."""
    entries = [
        {"stats": {"median": median}, "extra_info": {"scheme": name, "kind": "fake_quant_prefill", "tokens": 100}}
        for name, median in (("bf16", 0.1), ("fp8_autoquant_top50", 0.2))
    ] + [{"stats": {"median": 0.1}, "extra_info": {"scheme": "fp8_autoquant_top50", "kind": "real_fp8_prefill_paired",
                                                   "tokens": 100, "paired_ratio_median": 1.25}}]  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": entries}))
    context = workbench.context
    out = build_report(
        context.reports_dir, context.model_tag, f"test-speed-{context.model_tag}", tmp_path / "bench.json"
    )
    line = next(
        row for row in (out / "report.md").read_text().splitlines() if row.startswith("| fp8_autoquant_top50 |")
    )
    assert "fake_quant_prefill:0.50x" in line
    assert "real_fp8_prefill_paired:1.25x" in line, "paired benchmarks carry their own BF16 rounds"


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
