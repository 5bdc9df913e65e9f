"""The nightly (scripts/nightly.sh -> quantsuite.steps): its regression gate (+ quantsuite.bench.gate_baseline): a
benchmark run compared against an earlier run fails when a gated benchmark's median got slower by more than the gate,
passes against itself, and ignores benchmarks that are not gated (host-bound ones vary run to run); and its steps, run
together or as separate jobs (STEPS), each with its wall time and exit status recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from quantsuite import PROJECT_ROOT, REPORTS_DIR
from quantsuite.bench import fp8_matmul_support, gate_baseline
from quantsuite.steps import GATE


def _benchmark_run(tmp_path: Path, cache_dir: str, *extra: str) -> subprocess.CompletedProcess:
    """Real-FP8 prefill (gated at 8 x 1024) and decode (never gated) of the BF16 export, one round each."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")}
    env |= {"QUANTSUITE_BENCH_BATCH": "8", "QUANTSUITE_BENCH_PREFILL_TOKENS": "1024", "QUANTSUITE_BENCH_ROUNDS": "1",
            "QUANTSUITE_BENCH_WARMUP": "0"}  # fmt: skip
    command = [sys.executable, "-m", "pytest", str(PROJECT_ROOT / "tests" / "test_bench.py"), "-m", "benchmark",
               "-k", "real_fp8_throughput", "--scheme", "bf16", "-p", "no:xdist", "--no-report", "-q",
               "--cache-dir", cache_dir, "--reports-dir", str(tmp_path / "reports"), *extra]  # fmt: skip
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)


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
    if reason := fp8_matmul_support(workbench.context.device):
        pytest.skip(f"the gated real-FP8 benchmarks skip here: {reason}")
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
                              GATE)  # fmt: skip

    # Baselines 100x apart from this run, so the outcome does not hang on this machine's timing noise.
    regressed = compared_with(_baseline(data, {"real_fp8_prefill": 100, "real_fp8_decode": 0.01},
                                        tmp_path / "prefill-was-faster.json"))  # fmt: skip
    assert regressed.returncode != 0, regressed.stdout[-2000:]
    assert "Performance has regressed" in regressed.stdout + regressed.stderr

    decode_only = compared_with(_baseline(data, {"real_fp8_prefill": 0.01, "real_fp8_decode": 100},
                                          tmp_path / "decode-was-faster.json"))  # fmt: skip
    assert decode_only.returncode == 0, "a decode slow-down is not gated: " + decode_only.stdout[-2000:]


def _nightly(steps: str, pytest_command: str, run_id: str | None = None,
             **settings: str) -> tuple[subprocess.CompletedProcess, Path]:  # fmt: skip
    """scripts/nightly.sh with PYTEST standing in for pytest (`true`: every step passes, `false`: every step fails)."""
    run_id = run_id or f"test-nightly-{uuid.uuid4().hex[:8]}"
    env = os.environ | {"STEPS": steps, "PYTEST": pytest_command, "PYTHON": sys.executable, "GPUS": "1",
                        "RUN_ID": run_id} | settings  # fmt: skip
    done = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "nightly.sh")], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    return done, REPORTS_DIR / f"{run_id}-nightly-steps.tsv"


def test_steps_run_as_separate_jobs_and_record_their_times():
    """Two jobs of one RUN_ID: the second adds its rows to the first's step table (one header), and each job's exit
    status says whether its own steps failed."""
    run_id = f"test-nightly-{uuid.uuid4().hex[:8]}"
    done, steps = _nightly("research benchmark", "false", run_id)
    try:
        assert done.returncode == 1, done.stderr
        assert "nightly: failed steps: research benchmark" in done.stderr
        passed, _ = _nightly("schemes", "true", run_id)
        assert passed.returncode == 0, passed.stderr
        rows = [line.split("\t") for line in steps.read_text().splitlines()]
        assert rows[0] == ["step", "seconds", "exit"]
        assert [(name, status) for name, _, status in rows[1:]] == [("research", "1"), ("benchmark", "1"),
                                                                  ("schemes", "0")]  # fmt: skip
    finally:
        steps.unlink(missing_ok=True)


def test_a_shard_runs_every_step_on_its_shard(tmp_path):
    """SHARD=K/N: every step's pytest gets --shard K/N, and the step table says which shard a row is."""
    log = tmp_path / "calls"
    done, steps = _nightly("schemes benchmark", f"bash -c 'echo \"$*\" >> {log}' pytest", SHARD="2/3")
    try:
        assert done.returncode == 0, done.stderr
        calls = log.read_text().splitlines()
        assert len(calls) == 2 and all("--shard=2/3" in call for call in calls), calls
        assert [row.split("\t")[0] for row in steps.read_text().splitlines()[1:]] == [
            "schemes (shard 2/3)", "benchmark (shard 2/3)"]  # fmt: skip
    finally:
        steps.unlink(missing_ok=True)


@pytest.mark.parametrize(("listed", "expected"), [
    ("1930, VLLM::EngineCore, 43526\n", ["nightly: before step schemes the GPU already runs 1930 VLLM::EngineCore "
                                         "43526 (pid, process, MiB): this step's times and speed figures are not a "
                                         "quiet machine's"]),
    ("", []),  # a quiet GPU: nothing said
])  # fmt: skip
def test_a_step_that_starts_beside_another_gpu_process_says_so(tmp_path, listed, expected):
    """Each step first asks nvidia-smi which processes compute on the GPU: a step that starts beside one (a vLLM
    engine core a cut command left held 43.5 GiB of the H200 in run gpu-40) says which, since its times are not a
    quiet machine's."""
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{listed}'\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    done, steps = _nightly("schemes", "true", PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    steps.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if "GPU" in line] == expected, done.stderr


@pytest.mark.parametrize(("gpus", "timing"), [("1", "schemes"), ("2", "benchmark")])
def test_the_step_that_times_the_schemes_writes_the_json_the_gate_compares(tmp_path, gpus, timing):
    """The benchmark JSON the next night's gate reads (`<run>-benchmarks.json`) and the gate (COMPARE) go with the
    step that times the schemes' PyTorch benchmarks (the gated kinds are theirs): the per-scheme step on one GPU,
    the benchmark step on several; on one GPU the benchmark step's scheme-free timings get a JSON of their own."""
    log, previous = tmp_path / "calls", tmp_path / "previous.json"
    previous.write_text(json.dumps({"benchmarks": []}))
    done, steps = _nightly("schemes benchmark", f"bash -c 'echo \"$*\" >> {log}' pytest", GPUS=gpus,
                           COMPARE=str(previous))  # fmt: skip
    run_id = steps.name.removesuffix("-nightly-steps.tsv")
    try:
        assert done.returncode == 0, done.stderr
        calls = dict(zip(["schemes", "benchmark"], log.read_text().splitlines(), strict=True))
        other = "benchmark" if timing == "schemes" else "schemes"
        assert f"--benchmark-json=reports/{run_id}-benchmarks.json" in calls[timing].split()
        assert "--benchmark-compare-fail=median:10%" in calls[timing].split()
        assert "--benchmark-compare-fail=median:10%" not in calls[other]
        assert ("--benchmark-json=reports/" in calls[other]) == (gpus == "1")
    finally:
        steps.unlink(missing_ok=True)
        (REPORTS_DIR / f"{run_id}-gate-baseline.json").unlink(missing_ok=True)


def test_an_unknown_step_is_refused_naming_the_steps():
    done, steps = _nightly("schemes bogus", "true")
    assert done.returncode == 2
    assert "nightly: STEPS has 'bogus'; accepted steps: schemes machinery studies research benchmark" in done.stderr
    assert not steps.exists()


def test_ci_stops_at_the_first_failing_pass(tmp_path):
    """CI's passes run in order with the same extra arguments; a failing pass ends the run with its status."""
    log = tmp_path / "calls"
    stand_in = f"bash -c 'echo \"$*\" >> {log}; exit $FAIL' pytest"
    for fail, calls in (("0", 2), ("3", 1)):
        log.unlink(missing_ok=True)
        env = os.environ | {"PYTEST": stand_in, "FAIL": fail}
        done = subprocess.run([sys.executable, "-m", "quantsuite.steps", "ci", "-k", "x"], cwd=PROJECT_ROOT, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == int(fail), done.stderr
        lines = log.read_text().splitlines()
        assert len(lines) == calls and all(line.endswith("--run-id=latest-tiny -k x") for line in lines), lines


def test_steps_keep_python_bytecode(tmp_path):
    """Each pass's processes write bytecode even where PYTHONDONTWRITEBYTECODE is set (every pytest process re-rewrote
    the test modules), where Python puts it (no PYTHONPYCACHEPREFIX of the suite's: the installed packages' bytecode
    would be compiled again into it), and a prefix the caller placed stays."""
    log = tmp_path / "calls"
    stand_in = f"bash -c 'echo \"${{PYTHONPYCACHEPREFIX-none}} ${{PYTHONDONTWRITEBYTECODE-unset}}\" >> {log}' pytest"
    caller = {key: value for key, value in os.environ.items() if key != "PYTHONPYCACHEPREFIX"}
    caller |= {"PYTEST": stand_in, "PYTHONDONTWRITEBYTECODE": "1"}
    for env, expected in ((caller, "none"), (caller | {"PYTHONPYCACHEPREFIX": str(tmp_path)}, str(tmp_path))):
        log.unlink(missing_ok=True)
        done = subprocess.run([sys.executable, "-m", "quantsuite.steps", "ci"], cwd=PROJECT_ROOT, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert log.read_text().splitlines() == [f"{expected} unset"] * 2


def test_ci_runs_every_test_in_exactly_one_pass():
    """Each combination of the marks that choose a CI pass (a unit test, a PyTorch benchmark, a vLLM speed pair:
    `benchmark` + `paired`) is selected by one pass's -m expression, the speed pairs by the first (in the engines of
    their scheme's verdicts), none by both (run twice) or neither (never run)."""
    from _pytest.mark.expression import Expression

    from quantsuite.steps import CI

    expressions = [Expression.compile(step.args[step.args.index("-m") + 1]) for step in CI]
    for marks, expected in (((), "tests"), (("benchmark",), "benchmarks"), (("benchmark", "paired"), "tests")):
        chosen = [step.name for step, expression in zip(CI, expressions, strict=True)
                  if expression.evaluate(lambda name, marks=marks, **kwargs: name in marks)]  # fmt: skip
        assert chosen == [expected], f"marks {marks}: passes {chosen}"


@pytest.mark.parametrize("started_as", ["foreground", "background job"])
def test_an_interrupt_reaches_the_running_step_once_and_stops_the_rest(tmp_path, started_as):
    """SIGINT to the nightly (what `timeout -s INT` sends) reaches the running step's pytest, which finishes its
    summary; its row is recorded and no later step runs. The stand-in counts the SIGINTs it gets. Also when the
    nightly was started as a shell's background job (`nightly.sh &`, nohup), which starts with SIGINT ignored."""
    started, log = tmp_path / "started", tmp_path / "log"
    stand_in = tmp_path / "pytest.py"
    stand_in.write_text(f"""import signal, sys, time
from pathlib import Path
count = []
signal.signal(signal.SIGINT, lambda *_: count.append(1))
Path({str(started)!r}).write_text("")
for _ in range(200):
    time.sleep(0.05)
    if count:
        time.sleep(0.3)  # a second SIGINT would arrive now
        break
with open({str(log)!r}, "a") as log:
    log.write(f"summary after {{len(count)}} SIGINT\\n")
sys.exit(2 if count else 0)
""")
    run_id = f"test-nightly-{uuid.uuid4().hex[:8]}"
    env = os.environ | {"STEPS": "schemes benchmark", "PYTEST": f"{sys.executable} {stand_in}", "GPUS": "1",
                        "PYTHON": sys.executable, "RUN_ID": run_id}  # fmt: skip
    ignored = started_as == "background job"
    nightly = subprocess.Popen(["bash", str(PROJECT_ROOT / "scripts" / "nightly.sh")], env=env, stderr=subprocess.PIPE,
                               text=True, preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored
                               else None)  # fmt: skip
    steps = REPORTS_DIR / f"{run_id}-nightly-steps.tsv"
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        nightly.send_signal(signal.SIGINT)
        _, stderr = nightly.communicate(timeout=30)
        assert log.read_text() == "summary after 1 SIGINT\n"
        assert "nightly: interrupted; the later steps do not run" in stderr
        assert [row.split("\t")[0::2] for row in steps.read_text().splitlines()[1:]] == [["schemes", "2"]]
        assert nightly.returncode == 1, stderr
    finally:
        nightly.kill()
        steps.unlink(missing_ok=True)


def test_the_nightly_runs_each_stage_test_once_per_scheme_step_or_machinery_step():
    """On one GPU, step 1 (`schemes`) takes the cases of the `scheme` parameter (vLLM speed and PyTorch benchmarks
    included), step 1b (`machinery`) the other tests of the stage marks but those that read every selected scheme's
    results (`catalog`: on a shard they built the other shards' schemes again, ~30 s a scheme at 3B, gpu-37), step 2a
    (`studies`) the research studies that read no scheme's results, step 2b (`research`) the catalog readers and the
    report's, step 3 (`benchmark`) the other benchmarks: together every test of those marks, none twice, no scheme's
    case in machinery, studies, research or benchmark."""
    from quantsuite.steps import STAGES, nightly_steps
    from tests.plugin.test_options import collections

    steps = {step.name: step.args[:2] for step in nightly_steps(1)}  # -m and its expression
    names = ("schemes", "machinery", "studies", "research", "benchmark")
    assert [step.name for step in nightly_steps(1)] == list(names)
    runs = [steps[name] for name in names] + [("-m", f"{STAGES} or benchmark")]
    *chosen, every = map(set, collections(*runs))
    assert all(chosen)
    assert all(not chosen[a] & chosen[b] for a in range(5) for b in range(a + 1, 5))
    per_scheme, machinery, studies, research, once = chosen
    assert every <= per_scheme | machinery | research | once
    readers = {"tests/test_drift.py::test_more_fp8_never_means_less_drift",
               "tests/test_autoquant.py::test_decisions_repeat_in_a_fresh_process",
               "tests/stages/test_research.py::test_proxy_matches_the_manifests_and_the_drift"}
    assert readers <= research and any(test.startswith("tests/test_report.py::") for test in research)
    assert studies == {f"tests/stages/test_research.py::{name}" for name in (
        "test_the_studies_but_the_proxy_need_no_schemes_results", "test_score_size_study_matches_its_search_states",
        "test_grouping_study_compares_fused_with_per_linear_picks")}  # fmt: skip
    assert "tests/test_drift.py::test_drift_within_bounds[fp8_autoquant_top50]" in per_scheme
    assert "tests/test_bench.py::test_vllm_speed[fp8_autoquant_top50]" in per_scheme  # beside its verdict: one engine
    assert "tests/test_bench.py::test_export_time_and_size[fp8_autoquant_top50]" in per_scheme  # its one build
    assert "tests/test_bench.py::test_autoquant_time[scoring]" in once
    assert not any("test_drift_within_bounds" in test for test in machinery)
    assert "tests/stages/test_export.py::test_drop_keeps_the_bf16_reference" in machinery


@pytest.mark.parametrize("gpus", [1, 2])
def test_each_nightly_test_runs_in_one_step_on_any_number_of_gpus(gpus):
    """Each combination of the marks that choose a nightly step is selected by exactly one step's -m expression:
    a scheme's PyTorch benchmarks in its per-scheme step on one GPU (its export and fake-quant model built there),
    in the benchmark step on several (the per-scheme step then runs under pytest-xdist, which pytest-benchmark does
    not time); the vLLM speed pairs always beside their scheme's verdicts."""
    from _pytest.mark.expression import Expression

    from quantsuite.steps import nightly_steps

    steps = [step for step in nightly_steps(gpus) if "-m" in step.args]
    expressions = [Expression.compile(step.args[step.args.index("-m") + 1]) for step in steps]
    schemes_benchmarks = "schemes" if gpus == 1 else "benchmark"
    for marks, expected in ((("drift", "per_scheme"), "schemes"), (("export",), "machinery"),
                            (("benchmark", "paired", "per_scheme"), "schemes"),
                            (("benchmark", "per_scheme"), schemes_benchmarks),
                            (("autoquant", "benchmark", "per_scheme"), schemes_benchmarks),
                            (("benchmark",), "benchmark"), (("drift", "catalog"), "research"),
                            (("autoquant", "catalog"), "research"), (("catalog",), "research"),
                            (("studies",), "studies")):  # fmt: skip
        chosen = [step.name for step, expression in zip(steps, expressions, strict=True)
                  if expression.evaluate(lambda name, marks=marks, **kwargs: name in marks)]  # fmt: skip
        assert chosen == [expected], f"{gpus} GPUs, marks {marks}: steps {chosen}"
    timing = [step.name for step in nightly_steps(gpus) if step.times_schemes]
    assert timing == [schemes_benchmarks], "the schemes' benchmarks are timed, JSON'd and gated in one step"


def test_a_passing_test_leaves_no_tmp_path_behind(tmp_path):
    """On the 3B shape the machinery step's export tests copy 4-12 GiB each into their tmp_path, and pytest kept every
    one (and three sessions of them): the step filled a 64 GiB disk (gpu-37). Under the suite's pytest.ini a passing
    test's tmp_path is gone after it, a failing test's stays for diagnosis, and a later session keeps none from earlier
    ones. Planted: the ini without its retention settings keeps the passing test's files."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "pytest.ini").write_text((PROJECT_ROOT / "pytest.ini").read_text())
    (probe / "test_probe.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('outcome', ['passes', 'fails'])\n"
        "def test_writes(tmp_path, outcome):\n"
        "    (tmp_path / 'export.safetensors').write_bytes(bytes(1 << 20))\n"
        "    assert outcome == 'passes'\n"
    )  # fmt: skip
    temproot = tmp_path / "temproot"
    temproot.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env["PYTEST_DEBUG_TEMPROOT"] = str(temproot)  # pytest's own variable for where its sessions' folders go

    def session() -> list[str]:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "test_probe.py"], cwd=probe,
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 1 and "1 failed, 1 passed" in done.stdout, done.stdout + done.stderr
        kept = temproot.glob("pytest-of-*/pytest-*/*/export.safetensors")  # session folder / test folder / file
        return sorted(f"{file.parts[-3]}/{file.parts[-2]}" for file in kept  # not through pytest's `*current` links
                      if not (file.parent.is_symlink() or file.parent.parent.is_symlink()))  # fmt: skip

    assert session() == ["pytest-0/test_writes_fails_0"]
    assert session() == ["pytest-1/test_writes_fails_0"]


def test_the_workflow_runs_the_research_step_once_on_the_shards_merged_results():
    """.github/workflows/gpu-nightly.yml: the shards run every step but studies and research, a studies job beside
    them the studies step alone, and each uploads the results the research step reads (quantsuite.cache.MERGED_KINDS);
    one research job after them merges those into its cache and runs the research step alone; the merge job joins the
    shards', the studies' and the research job's reports/."""
    import yaml

    from quantsuite.cache import MERGED_KINDS
    from quantsuite.steps import nightly_steps

    jobs = yaml.safe_load((PROJECT_ROOT / ".github" / "workflows" / "gpu-nightly.yml").read_text())["jobs"]
    names = [step.name for step in nightly_steps(1)]
    assert jobs["nightly"]["env"]["STEPS"].split() == [name for name in names if name not in ("studies", "research")]
    studies, research = jobs["studies"], jobs["research"]
    assert studies["env"]["STEPS"] == "studies" and "SHARD" not in studies["env"] and "needs" not in studies
    downloads = [step["with"]["pattern"] for step in research["steps"] if "download-artifact" in step.get("uses", "")]
    assert len(downloads) == 1
    for job in ("nightly", "studies"):  # each runner's results, as the research job downloads them
        uploads = [step["with"] for step in jobs[job]["steps"] if step.get("with", {}).get("name", "").startswith(
            "quantsuite-cache-")]  # fmt: skip
        assert len(uploads) == 1 and uploads[0]["name"].startswith(downloads[0].rstrip("*")), (job, uploads)
        folders = [line.rsplit("/", 1)[-1] for line in uploads[0]["path"].splitlines() if not line.startswith("!")]
        assert folders == list(MERGED_KINDS), job
        assert uploads[0]["include-hidden-files"] is True  # the entries' .complete markers: without, none merges
    assert set(research["needs"]) == {"nightly", "studies"}
    assert research["env"]["STEPS"] == "research" and "SHARD" not in research["env"]
    runs = " ".join(step.get("run", "") for step in research["steps"])
    assert "-m quantsuite.cache --merge runner-caches/*/" in runs and "scripts/nightly.sh" in runs
    assert set(jobs["merge"]["needs"]) == {"nightly", "studies", "research"}
    reports = next(s["with"]["pattern"] for s in jobs["merge"]["steps"] if "download-artifact" in s.get("uses", ""))
    uploaded = [s["with"]["name"] for job in ("nightly", "studies", "research") for s in jobs[job]["steps"]
                if s.get("with", {}).get("name", "").startswith("quantsuite-reports-")]  # fmt: skip
    assert len(uploaded) == 3 and all(name.startswith(reports.rstrip("*")) for name in uploaded), (reports, uploaded)
