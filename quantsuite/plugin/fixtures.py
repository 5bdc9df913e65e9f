"""Session fixtures: the catalog, model and data settings, one Workbench per process, a scheme's fake-quant model,
export and drift, and vLLM's environment and service; each benchmark's timing handed to the benchmarks stage."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from filelock import FileLock

from quantsuite.data import DataConfig
from quantsuite.models import ModelSpec
from quantsuite.plugin.session import (
    WORKBENCH,
    catalog_readers_drop_exports,
    freeze_loaded_heap,
    settings,
    vllm_engine_share,
)


@pytest.fixture(scope="session")
def catalog(pytestconfig):
    return settings(pytestconfig).catalog


@pytest.fixture(scope="session")
def model_spec(pytestconfig: pytest.Config) -> ModelSpec:
    return settings(pytestconfig).model_spec


@pytest.fixture(scope="session")
def small_model_spec(model_spec: ModelSpec) -> ModelSpec:
    """The tiny model on the run's device and dtype, for the tests of size-free logic that build a fresh cache from
    nothing (how the cache reuses scores, keeps, drops and rebuilds exports): at the 3B shape they were the slowest
    rows of the GPU nightly's machinery step (reports/profile-gpu-h200-nightly/README.md, gpu-39)."""
    return dataclasses.replace(model_spec, name="tiny")


@pytest.fixture(scope="session")
def data_config(pytestconfig: pytest.Config) -> DataConfig:
    return settings(pytestconfig).data_config


@pytest.fixture(scope="session")
def workbench(pytestconfig, model_spec, data_config, catalog):
    """One Workbench per session (per xdist worker); the disk cache + file locks share work across workers."""
    from quantsuite.pipeline import Workbench

    cache_dir = Path(pytestconfig.getoption("--cache-dir"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / "workbench.lock")):  # tokenizer / split set-up touches shared files once
        bench = Workbench(model_spec, data_config, catalog, cache_dir, Path(pytestconfig.getoption("--reports-dir")),
                          run_id=pytestconfig.getoption("--run-id"), research=settings(pytestconfig).research,
                          vllm_engine_share=vllm_engine_share(),
                          drop_exports=catalog_readers_drop_exports(pytestconfig))  # fmt: skip
    pytestconfig.stash[WORKBENCH] = bench
    freeze_loaded_heap()
    return bench


@pytest.fixture(scope="session")
def scheme_result(workbench, scheme):
    return workbench.schemes.result(scheme)


@pytest.fixture
def fake_quant_model(workbench, scheme):
    """The scheme's fake-quantized model, run forward; skips where ModelOpt can only run it on CUDA. Per test: the
    schemes stage keeps the model for the scheme's next test, and a vLLM engine or PyTorch reference that needs the
    device frees it (`RunContext.release`); a session-scoped value kept it on the device through the scheme's vLLM
    tests (7B on an 80 GiB H100: run gpu-43)."""
    from quantsuite.stages.context import CudaRequired

    try:
        workbench.drift.require_runnable(scheme)
    except CudaRequired as reason:
        pytest.skip(str(reason))
    return workbench.schemes.model(scheme)


@pytest.fixture(scope="session")
def export_dropped_after(pytestconfig, workbench, scheme):
    """Builds nothing (a test served from the cache needs no export); when the scheme's tests are done its vLLM
    engine (kept for its verdict and speed pair) closes and, with --drop-exports, its export, if one was made, is
    deleted."""
    yield
    workbench.vllm.close_engines("scheme")
    if pytestconfig.getoption("--drop-exports"):
        workbench.exports.drop(scheme)


@pytest.fixture(scope="session")
def exported(workbench, scheme, export_dropped_after):
    """The scheme's export directory (built once; see export_dropped_after for --drop-exports)."""
    return workbench.exports.path(scheme)


@pytest.fixture(scope="session")
def measurement(workbench, scheme, export_dropped_after):
    """The scheme's drift. Served from the cache it needs neither the fake-quant model nor the export (a re-run
    with --drop-exports on the 3B shape used to rebuild both for every scheme: run gpu-26); skips where ModelOpt
    runs the scheme on CUDA only."""
    from quantsuite.stages.context import CudaRequired

    try:
        return workbench.drift.measure(scheme)
    except CudaRequired as reason:
        pytest.skip(str(reason))


@pytest.fixture(scope="session")
def vllm_python(pytestconfig):
    from quantsuite.vllm.service import HOW_TO_SET_UP

    python = settings(pytestconfig).vllm_python
    if python is None:
        pytest.skip(HOW_TO_SET_UP)
    return python


@pytest.fixture(scope="session")
def vllm_service(pytestconfig, vllm_python, workbench):
    """One vLLM server per test process (vLLM imported once), pinned to this worker's GPU; closed at the end."""
    from quantsuite.stages.vllm import VllmUnsupportedHere
    from quantsuite.vllm.service import VllmService, pinned_environment

    log_dir = Path(pytestconfig.getoption("--cache-dir")) / "logs"
    with VllmService(vllm_python, log_dir, pinned_environment(workbench.context.device)) as service, \
            workbench.vllm.engines_closed():
        try:  # the BF16 floor every verdict needs: a machine whose vLLM cannot compute skips them all, saying why
            workbench.vllm.check(workbench.context.reference_scheme(), workbench.vllm.backend(vllm_python), service)
        except VllmUnsupportedHere as error:
            pytest.skip(f"this machine cannot run vLLM's checks: {error}")
        yield service


@pytest.fixture(autouse=True)
def _benchmark_published(request):
    """After a test that timed something with pytest-benchmark: its median round and extra_info go to the benchmarks
    stage (reports/benchmarks/), which the report reads."""
    yield
    arguments = request.node.funcargs or {}  # None when the run was interrupted (Ctrl-C, a timeout's SIGINT)
    benchmark, bench = arguments.get("benchmark"), arguments.get("workbench")
    stats = getattr(benchmark, "stats", None)
    if bench is None or stats is None or not stats.stats.data:  # not timed: disabled, skipped, or failed in its rounds
        return
    bench.benchmarks.record(dict(benchmark.extra_info), benchmark.stats.stats.median)
