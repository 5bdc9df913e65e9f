"""The nightly's regression gate (scripts/nightly.sh + quantsuite.bench.gate_baseline): a benchmark run compared
against an earlier run fails when a gated benchmark's median got slower by more than the script's threshold,
passes against itself, and ignores benchmarks that are not gated (host-bound ones vary 20-80% run to run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from quantsuite.bench import gate_baseline

ROOT = Path(__file__).resolve().parents[1]


def _gate() -> str:
    found = re.search(r"--benchmark-compare-fail=([\w.:%]+)", (ROOT / "scripts" / "nightly.sh").read_text())
    assert found, "scripts/nightly.sh lost its --benchmark-compare-fail gate"
    return found.group(1)


def _benchmark_run(tmp_path: Path, cache_dir: str, *extra: str) -> subprocess.CompletedProcess:
    """Real-FP8 prefill (gated at 8 x 1024) and decode (never gated) of the BF16 export, one round each."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")}
    env |= {"QUANTSUITE_BENCH_BATCH": "8", "QUANTSUITE_BENCH_PREFILL_TOKENS": "1024", "QUANTSUITE_BENCH_ROUNDS": "1",
            "QUANTSUITE_BENCH_WARMUP": "0"}  # fmt: skip
    command = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_bench.py"), "-m", "benchmark",
               "-k", "real_fp8_throughput", "--scheme", "bf16", "-p", "no:xdist", "--no-report", "-q",
               "--cache-dir", cache_dir, "--reports-dir", str(tmp_path / "reports"), *extra]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _baseline(data: dict, speed: dict[str, float], path: Path) -> Path:
    """A gate baseline from `data` in which each kind ran `speed[kind]` times as fast as measured."""
    data = json.loads(json.dumps(data))
    for entry in data["benchmarks"]:
        factor = speed[entry["extra_info"]["kind"]]
        entry["stats"] = {key: value / factor if isinstance(value, float) else value
                          for key, value in entry["stats"].items()}  # fmt: skip
    previous = path.with_suffix(".previous.json")
    previous.write_text(json.dumps(data))
    assert gate_baseline(previous, path) == 1  # real_fp8_prefill at 8192 tokens; decode left out
    return path


def test_gate_fails_on_a_prefill_regression_only(tmp_path, pytestconfig, workbench, catalog):
    workbench.exports.path(catalog.select(["bf16"])[0])  # built before the subprocesses
    cache_dir = pytestconfig.getoption("--cache-dir")
    first_json = tmp_path / "first.json"
    first = _benchmark_run(tmp_path, cache_dir, "--benchmark-json", str(first_json))
    assert first.returncode == 0, first.stdout[-2000:]
    data = json.loads(first_json.read_text())
    assert sorted(entry["extra_info"]["kind"] for entry in data["benchmarks"]) == ["real_fp8_decode",
                                                                                   "real_fp8_prefill"]  # fmt: skip

    def compared_with(baseline: Path) -> subprocess.CompletedProcess:
        return _benchmark_run(tmp_path, cache_dir, f"--benchmark-compare={baseline}", "--benchmark-compare-fail",
                              _gate())  # fmt: skip

    # Baselines 100x apart from this run, so the outcome does not hang on this machine's timing noise.
    regressed = compared_with(_baseline(data, {"real_fp8_prefill": 100, "real_fp8_decode": 0.01},
                                        tmp_path / "prefill-was-faster.json"))  # fmt: skip
    assert regressed.returncode != 0, regressed.stdout[-2000:]
    assert "Performance has regressed" in regressed.stdout + regressed.stderr

    decode_only = compared_with(_baseline(data, {"real_fp8_prefill": 0.01, "real_fp8_decode": 100},
                                          tmp_path / "decode-was-faster.json"))  # fmt: skip
    assert decode_only.returncode == 0, "a decode slow-down is not gated: " + decode_only.stdout[-2000:]
