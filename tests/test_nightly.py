"""The nightly's regression gate (scripts/nightly.sh): a benchmark run compared against an earlier run's JSON
fails when a median got slower by more than the script's threshold, and passes against itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gate() -> str:
    found = re.search(r"--benchmark-compare-fail=([\w.:%]+)", (ROOT / "scripts" / "nightly.sh").read_text())
    assert found, "scripts/nightly.sh lost its --benchmark-compare-fail gate"
    return found.group(1)


def _benchmark_run(tmp_path: Path, cache_dir: str, *extra: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")}
    command = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_bench.py"), "-m", "benchmark",
               "-k", "autoquant_resolve_time", "--scheme", "top50", "-p", "no:xdist", "--no-report", "-q",
               "--cache-dir", cache_dir, "--reports-dir", str(tmp_path / "reports"), *extra]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_compare_fails_on_a_regression_and_passes_against_itself(tmp_path, pytestconfig, workbench, catalog):
    workbench.scheme(catalog.select(["top50"])[0])  # scores and scheme cached before the subprocesses
    cache_dir = pytestconfig.getoption("--cache-dir")
    baseline = tmp_path / "previous.json"
    first = _benchmark_run(tmp_path, cache_dir, "--benchmark-json", str(baseline))
    assert first.returncode == 0, first.stdout[-2000:]
    data = json.loads(baseline.read_text())
    assert data["benchmarks"], "no benchmark in the baseline run"

    same = _benchmark_run(tmp_path, cache_dir, f"--benchmark-compare={baseline}", "--benchmark-compare-fail",
                          "median:1000%")  # fmt: skip
    assert same.returncode == 0, same.stdout[-2000:]

    for entry in data["benchmarks"]:  # the previous run was 100x faster: this run is a regression
        entry["stats"] = {key: value / 100 if isinstance(value, float) else value
                          for key, value in entry["stats"].items()}  # fmt: skip
    faster = tmp_path / "faster.json"
    faster.write_text(json.dumps(data))
    regressed = _benchmark_run(tmp_path, cache_dir, f"--benchmark-compare={faster}", "--benchmark-compare-fail",
                               _gate())  # fmt: skip
    assert regressed.returncode != 0, regressed.stdout[-2000:]
    assert "Performance has regressed" in regressed.stdout + regressed.stderr
