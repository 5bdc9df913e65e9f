"""The research report: generated from the run's JSON, every plot a valid PNG with data."""

from __future__ import annotations

import json

import pytest

from quantsuite.report import PLOTS, build_report


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, workbench, catalog, request):
    for scheme in catalog.select(request.config.getoption("--scheme")):
        workbench.measure(scheme)
        if request.config.getoption("--drop-exports"):
            workbench.drop_export(scheme)
    research = workbench.research()
    assert research["sweep"] and research["optimality_gap"]
    return build_report(workbench.reports_dir, workbench.model_tag, run_id=f"test-{workbench.model_tag}")


def test_report_and_summary_exist(report_dir, workbench, catalog, request):
    text = (report_dir / "report.md").read_text()
    summary = json.loads((report_dir / "summary.json").read_text())
    for scheme in catalog.select(request.config.getoption("--scheme")):
        assert f"| {scheme.name} |" in text
        assert summary["schemes"][scheme.name]["totals"]["lm_effective_bits"] >= 8
    assert "Spearman" in text and "exact objective" in text


@pytest.mark.parametrize("plot", PLOTS)
def test_plot_is_a_png_with_data(report_dir, plot):
    from PIL import Image, ImageStat

    path = report_dir / plot
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(path).convert("L")
    assert image.size[0] > 300 and image.size[1] > 200
    assert ImageStat.Stat(image).stddev[0] > 10, "blank plot"


def test_research_numbers_are_consistent(workbench):
    research = workbench.research()
    gap = research["optimality_gap"]
    assert all(row["relative_gap"] >= -1e-9 for row in gap), "an exact solve cannot be worse than a heuristic"
    bits = [row["lm_effective_bits"] for row in research["sweep"]]
    targets = [row["target_effective_bits"] for row in research["sweep"]]
    assert all(b <= t + 1e-9 for b, t in zip(bits, targets, strict=True))
    assert -1.0 <= research["sensitivity"].get("spearman", 0.0) <= 1.0


def test_speed_ratios_come_from_the_benchmark_json(tmp_path, report_dir, workbench):
    """Ratios to BF16 are computed from the same benchmark JSON (same run, same device)."""
    entries = [
        {"stats": {"median": median}, "extra_info": {"scheme": name, "kind": "fake_quant_prefill", "tokens": 100}}
        for name, median in (("bf16", 0.1), ("fp8_autoquant_top50", 0.2))
    ] + [{"stats": {"median": 0.1}, "extra_info": {"scheme": "fp8_autoquant_top50", "kind": "real_fp8_prefill_paired",
                                                   "tokens": 100, "paired_ratio_median": 1.25}}]  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": entries}))
    out = build_report(workbench.reports_dir, workbench.model_tag, f"test-speed-{workbench.model_tag}",
                       tmp_path / "bench.json")  # fmt: skip
    line = next(
        row for row in (out / "report.md").read_text().splitlines() if row.startswith("| fp8_autoquant_top50 |")
    )
    assert "fake_quant_prefill:0.50x" in line
    assert "real_fp8_prefill_paired:1.25x" in line, "paired benchmarks carry their own BF16 rounds"


def test_report_without_a_run_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytest -m autoquant --model tiny"):
        build_report(tmp_path, "tiny", "empty")
    assert not (tmp_path / "empty").exists(), "a failed report leaves no directory behind"
