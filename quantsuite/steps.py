"""The steps of a run, declared once: CI's two passes and the GPU nightly's five steps. `scripts/test.sh` (what CI and
`make test` run) and `scripts/nightly.sh` (the GPU workflow, `make nightly`) only call this.

    python -m quantsuite.steps ci [pytest args]   # CI: every test on 2 xdist workers, then the benchmarks
    python -m quantsuite.steps nightly            # the GPU nightly; settings from the environment (scripts/nightly.sh)

CI stops at the first failing pass. The nightly runs every step it is given even after one fails (the report then
shows where the scheme broke), records each step's wall time and exit status in reports/<RUN_ID>-nightly-steps.tsv,
and exits non-zero at the end if any failed. A SIGINT (Ctrl-C, `timeout -s INT`) is passed on to the running step's
pytest once, which prints its durations and stage table before it stops; no later step runs.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantsuite import PROJECT_ROOT, REPORTS_DIR

GATE = "median:10%"  # the nightly fails on a gated benchmark's median more than this slower than COMPARE's


@dataclass(frozen=True)
class Step:
    name: str
    args: tuple[str, ...]  # pytest arguments
    parallel: bool = False  # spread over the run's workers (CI: 2 CPU workers; nightly: one per GPU)
    env: dict[str, str] = field(default_factory=dict)  # defaults; the caller's environment wins
    times_schemes: bool = False  # the nightly step that times the schemes' PyTorch benchmarks (JSON, the gate)


CI_RUN_ID = "latest-tiny"  # one run id for both passes: the report joins this run's results only
CI = (
    # everything but the PyTorch benchmarks, each scheme's tests on one worker; the vLLM speed pairs (`paired`) run
    # here, as in the nightly's per-scheme step, in the engines the scheme's verdicts opened (on CPU they are no speed
    # claim; vLLM's large-batch and image workloads timed for one scheme, as in the nightly, batch 1 for every one);
    # the score-size study on 3 sizes x 2 draws (6 scoring passes, not the default 18: its checks are the same;
    # reports/research-studies-tiny-cpu ran all)
    Step("tests", ("-m", "not benchmark or paired", "--durations=25", "--research-score-sizes=16,64,128",
                   "--research-draws=0,1"), parallel=True,
         env={"QUANTSUITE_VLLM_BATCH_SCHEMES": "fp8_modelopt_default"}),
    # the PyTorch benchmarks in one process (never under xdist); they write their JSON and the run's report; each
    # decode round 8 new tokens, not 16 (eager decode on CPU is ModelOpt's per-call fake quant of every weight)
    Step("benchmarks", ("-m", "benchmark and not paired", "--benchmark-disable-gc", "-p", "no:xdist",
                        "--benchmark-json=reports/benchmarks-tiny.json", "--durations=15"),
         env={"QUANTSUITE_BENCH_ROUNDS": "3", "QUANTSUITE_BENCH_WARMUP": "1", "QUANTSUITE_BENCH_DECODE_TOKENS": "8"}),
)  # fmt: skip

STAGES = "(autoquant or export or drift or vllm_compat)"
TIMED = ("--benchmark-disable-gc",)  # pytest-benchmark's options for a step that times PyTorch benchmarks


def nightly_steps(gpus: int) -> tuple[Step, ...]:
    """The nightly's steps on `gpus` GPUs, in order. On one GPU each scheme's PyTorch benchmarks run in its
    per-scheme step, while its export and fake-quant model are built: in a later process of their own they were
    built again for the export's timing (runs gpu-32 and gpu-33, reports/profile-gpu-h200-nightly). On several
    GPUs that step runs one scheme per GPU under pytest-xdist, where pytest-benchmark does not time, so they wait
    for the benchmark step, as before."""
    alone = gpus <= 1
    return (
        # 1. each scheme's decisions, export, drift, vLLM verdict and vLLM speed (BF16 and the scheme alternating
        # inside one test, CUDA graphs) in turn: one export and one vLLM engine per scheme; alone on its GPU, its
        # PyTorch benchmarks too; with several GPUs one scheme per GPU (speed measurements one at a time per host)
        Step("schemes", ("-m", f"per_scheme and ({STAGES} or benchmark)" if alone else
                         f"per_scheme and (paired or {STAGES} and not benchmark)", "--no-report",
                         *(TIMED if alone else ())), parallel=True, times_schemes=alone),
        # 1b. the tests of the machinery on this device, once (planted faults, cache, engine lifecycle): not per scheme
        Step("machinery", ("-m", f"{STAGES} and not per_scheme and not catalog", "--no-report")),
        # 2a. the research studies that need no scheme's results (sensitivity by method, Pareto sweep, optimality gap,
        # score size, grouping: scoring passes and the BF16 model alone): beside sharded runs, on a runner of its own
        Step("studies", ("-m", "studies", "-p", "no:xdist", "--no-report")),
        # 2b. the research report (the proxy study, reading every scheme's drift, and the cached studies), its own
        # checks and the checks that read every scheme's results (`catalog`): after sharded runs, once, on their and
        # the studies' merged caches
        Step("research", ("-m", "catalog", "-p", "no:xdist", "--no-report")),
        # 3. the PyTorch benchmarks in one process (the scheme-free ones only, where step 1 timed the schemes'); this
        # step writes the report from everything the earlier ones left
        Step("benchmark", ("-m", "benchmark and not paired" + (" and not per_scheme" if alone else ""), *TIMED,
                           "-p", "no:xdist"), times_schemes=not alone),
    )  # fmt: skip


# Prefill benchmarks at a compute-bound shape (docs/benchmarks.md); PyTorch decode (host-bound, eager and compiled)
# and vLLM's large-batch and image workloads (host-bound on an H200) timed for one scheme: vLLM's paired batch-1 runs
# time every scheme's decode (reports/profile-gpu-h200-nightly)
NIGHTLY_ENV = {"QUANTSUITE_BENCH_BATCH": "8", "QUANTSUITE_BENCH_PREFILL_TOKENS": "1024",
               "QUANTSUITE_DECODE_SCHEMES": "fp8_modelopt_default",
               "QUANTSUITE_VLLM_BATCH_SCHEMES": "fp8_modelopt_default"}  # fmt: skip


def _pytest() -> list[str]:
    """The pytest command: $PYTEST (tests stand in `true` / `false`), else this interpreter's pytest."""
    return shlex.split(os.environ.get("PYTEST") or f"{shlex.quote(sys.executable)} -m pytest")


class Interrupted(Exception):
    """A step was stopped by SIGINT (Ctrl-C, `timeout -s INT`); its pytest finished its summary, no later step runs."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def step_environment(defaults: dict[str, str]) -> dict[str, str]:
    """A step's environment: its defaults, then the caller's, without PYTHONDONTWRITEBYTECODE (set on the CI box): a
    step starts dozens of Python processes (xdist workers, the vLLM server, the pytest runs of the machinery tests),
    and without bytecode kept each compiled the project's modules and pytest rewrote every test and plugin module
    again (reports/profile-cpu-2core/README.md, session 23). The bytecode goes where Python puts it by default
    (`__pycache__/`, ignored by git); the installed packages' own bytecode is used as it is (a PYTHONPYCACHEPREFIX
    would have Python compile all of torch's modules once more, into it)."""
    environment = defaults | os.environ
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    return environment


def _run(command: list[str], env: dict[str, str]) -> int:
    """Run one step's pytest (in `step_environment(env)`) and return its exit status. pytest runs in a process
    group of its own, and a SIGINT this runner gets is passed on to it once, so the cut step still prints its
    durations and stage table and writes its report (a terminal's Ctrl-C would otherwise reach pytest twice, and
    `timeout -s INT` not at all); the step's status then raises Interrupted."""
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=step_environment(env), start_new_session=True)
    interrupted = False
    while True:
        try:
            status = process.wait()
            break
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)  # a second one is pytest's own hard stop, as in a terminal
            interrupted = True
    if interrupted:
        raise Interrupted(status)
    return status


def ci(pytest_args: list[str]) -> int:
    """CI's passes in order with the same extra pytest arguments; the first failing one's exit status."""
    for step in CI:
        workers = ["-n", "2", "--dist", "loadgroup"] if step.parallel else []
        try:
            status = _run([*_pytest(), *workers, *step.args, f"--run-id={CI_RUN_ID}", *pytest_args], step.env)
        except Interrupted as stop:
            return stop.status or 130
        if status:
            return status
    return 0


def nightly() -> int:
    """The nightly steps named in $STEPS (default: all, in order); see scripts/nightly.sh for the settings."""
    env = os.environ
    gpus = int(env.get("GPUS") or _cuda_devices())
    steps = nightly_steps(gpus)
    accepted = [step.name for step in steps]
    names = env.get("STEPS", "").split() or accepted
    for name in names:
        if name not in accepted:
            print(f"nightly: STEPS has '{name}'; accepted steps: {' '.join(accepted)}", file=sys.stderr)
            return 2
    run_id = env.get("RUN_ID") or time.strftime("nightly-%Y%m%d")
    shard = env.get("SHARD")
    common = [f"--model={env.get('QUANTSUITE_MODEL') or 'qwen2.5-vl-3b-shape'}", "--drop-exports",
              f"--run-id={run_id}", *(f"--scheme={name}" for name in env.get("SCHEMES", "").split()),
              *([f"--shard={shard}"] if shard else [])]  # fmt: skip
    table = REPORTS_DIR / f"{run_id}-nightly-steps.tsv"
    table.parent.mkdir(parents=True, exist_ok=True)
    if not table.exists():  # steps run as separate jobs add their rows to one table
        table.write_text("step\tseconds\texit\n")
    failed = []
    for step in (step for step in steps if step.name in names):
        extra = ["-n", str(gpus), "--dist", "loadgroup"] if step.parallel and gpus > 1 else []
        if step.times_schemes:  # the gated kinds are the schemes' (GATED_KINDS): their JSON is the one compared
            extra += [f"--benchmark-json=reports/{run_id}-benchmarks.json", *_gate_args(run_id)]
        elif step.name == "benchmark":
            extra += [f"--benchmark-json=reports/{run_id}-benchmarks-scheme-free.json"]
        if busy := gpu_processes():
            print(f"nightly: before step {step.name} the GPU already runs {'; '.join(busy)} (pid, process, MiB): "
                  "this step's times and speed figures are not a quiet machine's", file=sys.stderr)  # fmt: skip
        started = time.monotonic()
        try:
            status, interrupted = _run([*_pytest(), *step.args, *common, *extra], NIGHTLY_ENV), False
        except Interrupted as stop:
            status, interrupted = stop.status or 130, True
        seconds = round(time.monotonic() - started)
        with table.open("a") as rows:
            rows.write(f"{step.name}{f' (shard {shard})' if shard else ''}\t{seconds}\t{status}\n")
        print(f"nightly: step {step.name} took {seconds} s, exit {status}", file=sys.stderr)
        failed += [step.name] if status else []
        if interrupted:
            print("nightly: interrupted; the later steps do not run", file=sys.stderr)
            break
    print(f"report: reports/{run_id}/report.md; step times: {table.relative_to(PROJECT_ROOT)}")
    if failed:
        print(f"nightly: failed steps: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def gpu_processes() -> list[str]:
    """The compute processes on this host's GPUs now, as `pid process MiB` (nvidia-smi); none without nvidia-smi. A
    step that starts beside one runs with less GPU memory and a busier GPU and host than its figures say (run gpu-40,
    reports/profile-gpu-h200-nightly: a vLLM engine core that a cut command left, holding 43.5 GiB of the H200)."""
    query = ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode:
        return []
    return [" ".join(field.strip() for field in line.split(",")) for line in done.stdout.splitlines() if line.strip()]


def _cuda_devices() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def _gate_args(run_id: str) -> list[str]:
    """With $COMPARE (an earlier run's benchmark JSON): fail on a regression of the benchmarks that repeat
    (quantsuite/bench.py GATED_KINDS), compared against a baseline holding only those."""
    previous = os.environ.get("COMPARE")
    if not previous:
        return []
    from quantsuite.bench import gate_baseline

    baseline = REPORTS_DIR / f"{run_id}-gate-baseline.json"
    gate_baseline(Path(previous), baseline)
    return [f"--benchmark-compare={baseline}", f"--benchmark-compare-fail={GATE}"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A shell starts a background job (`nightly.sh &`, nohup) with SIGINT ignored, and Python then never raises
    # KeyboardInterrupt, nor would a step's pytest, which inherits the ignore: `kill -INT` or `timeout -s INT` to cut
    # the run would be lost (CI's test of it failed so). Python's own handler here; a step's pytest starts with the
    # default (a handler is reset at exec, an ignore is not).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not argv or argv[0] not in ("ci", "nightly"):
        print("usage: python -m quantsuite.steps ci [pytest args] | nightly", file=sys.stderr)
        return 2
    return ci(argv[1:]) if argv[0] == "ci" else nightly()


if __name__ == "__main__":
    sys.exit(main())
