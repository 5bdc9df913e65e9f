"""The pytest layer (quantsuite/plugin/): sharing CPU cores between pytest-xdist workers (torch's intra-op
threads) and a GPU between their vLLM engines, the order in which a scheme's tests run, and the shards of a run
(--shard)."""

from __future__ import annotations

import pytest

from quantsuite.plugin.collection import scheme_major_order
from quantsuite.plugin.session import vllm_engine_share, worker_threads


@pytest.mark.parametrize(("count", "override", "expected"), [
    ("2", None, 4), ("3", None, 2), ("16", None, None), (None, None, None), ("1", None, None), ("2", "3", 3),
])  # fmt: skip
def test_each_worker_gets_its_share_of_the_cores(monkeypatch, count, override, expected):
    """8 cores: 2 workers get 4 threads each, 3 get 2; 16 workers (fewer cores than workers) and no xdist (or one
    worker) keep torch's own default; QUANTSUITE_TORCH_THREADS wins."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)))
    for name, value in (("PYTEST_XDIST_WORKER_COUNT", count), ("QUANTSUITE_TORCH_THREADS", override)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert worker_threads() == expected


@pytest.mark.parametrize(("workers", "gpus", "expected"), [
    (None, 1, 0.3), ("1", 1, 0.3), ("2", 1, 0.15), ("2", 2, 0.3), ("3", 2, 0.15), ("4", 1, 0.075), ("2", 0, 0.3),
])  # fmt: skip
def test_workers_sharing_a_gpu_divide_its_engine_share(monkeypatch, workers, gpus, expected):
    """Each process keeps two vLLM engines at 0.3 of the card: two workers on one GPU would ask for 1.2 of it."""
    monkeypatch.setattr("torch.cuda.device_count", lambda: gpus)
    if workers is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
    assert vllm_engine_share() == pytest.approx(expected)


def test_a_scheme_runs_its_tests_together():
    """pytest's own order (by session-scoped parameters) put each scheme's cuda verdict after every other scheme's
    tests; with --drop-exports its export was then built again. Each scheme's tests run together now, and tests of
    no scheme keep their places, as does each scheme's first test (the xdist work units keep their order)."""
    pytest_order = ["export[bf16]", "vllm[model_free-bf16]", "export[top50]", "vllm[model_free-top50]",
                    "solver_test", "vllm[cuda-bf16]", "vllm[cuda-top50]", "noise_floor"]  # fmt: skip

    def scheme_of(test: str) -> str | None:
        return test.rstrip("]").split("-")[-1].split("[")[-1] if "[" in test else None

    ordered = scheme_major_order(pytest_order, scheme_of)
    assert ordered == ["export[bf16]", "vllm[model_free-bf16]", "vllm[cuda-bf16]", "export[top50]",
                       "vllm[model_free-top50]", "vllm[cuda-top50]", "solver_test", "noise_floor"]  # fmt: skip


def test_the_export_benchmark_leads_its_scheme_then_the_fake_quant_ones():
    """In a step that runs a scheme's tests and benchmarks together (the nightly's per-scheme step on one GPU), the
    export benchmark comes first, so that the build it times is the scheme's only one (the drift tests of
    tests/stages/ came first and built it: run gpu-33 built every export twice), then the fake-quant benchmarks,
    while that model is held."""
    from tests.plugin.test_options import collections

    (tests,) = collections(("-m", "per_scheme and (drift or export or vllm_compat or benchmark)", "--scheme=top50"))
    names = [test.rpartition("::")[2] for test in tests]
    assert names[:3] == ["test_export_time_and_size[fp8_autoquant_top50]",
                         "test_fake_quant_throughput[fp8_autoquant_top50-prefill]",
                         "test_fake_quant_throughput[fp8_autoquant_top50-decode]"], names[:5]  # fmt: skip
    assert "test_cached_drift_touches_no_export[fp8_autoquant_top50]" in names[3:]


def test_a_schemes_vllm_tests_end_it_after_its_pytorch_work(pytestconfig):
    """A scheme's speed pair and verdict keep two vLLM engines open (the BF16 reference's and the scheme's); its
    PyTorch benchmarks ran beside both, between the speed pair and the verdict. The tests that use vLLM now end the
    scheme, so the PyTorch work runs beside the BF16 reference's engine alone: first the checks (each computes its
    PyTorch reference before its engine loads; the patched one last on the CPU build), then the speed pair, which
    reuses the engine the last check loaded. After the speed pair, the cuda verdict's reference ran beside both
    engines and ran out of memory on an 80 GiB H100 at 7B (run gpu-43). A planted fault that runs vLLM on an
    engine of its own comes after the speed pair: its PyTorch reference closes the scheme's engine."""
    from quantsuite.plugin.collection import vllm_checks
    from tests.plugin.test_options import collections

    nightly, whole = collections(("-m", "per_scheme and (autoquant or drift or export or vllm_compat or benchmark)",
                                  "--scheme=top50"), ("--scheme=top50", "--scheme=default"))  # fmt: skip
    names = [test.rpartition("::")[2].partition("[")[0] for test in nightly]
    checks = len(vllm_checks(pytestconfig))  # model_free and the loads this machine's vLLM can run
    assert names[-1 - checks :] == ["test_vllm"] * checks + ["test_vllm_speed"], names
    pytorch_work = {"test_real_fp8_paired", "test_drift_within_bounds", "test_export_matches_manifest"}
    assert pytorch_work <= set(names[: -1 - checks])
    default = [test.rpartition("::")[2] for test in whole if "fp8_modelopt_default]" in test]
    speed = default.index("test_vllm_speed[fp8_modelopt_default]")
    assert [name.partition("[")[0] for name in default[speed - checks : speed]] == ["test_vllm"] * checks, default
    assert default[speed + 1 :] == ["test_a_verdict_fed_another_exports_reference[fp8_modelopt_default]"], default


def test_shards_split_the_run_into_whole_schemes_the_same_in_every_step():
    """--scheme keeps a test only when every scheme it builds is selected (named in its parameters or its
    `uses_schemes` marks). --shard K/N: the shards together run every test once; each scheme's tests (by name or
    alias: the planted faults on top50), and the scheme-free vLLM tests, stay on one shard; and a scheme is on the
    same shard in another step (the benchmarks), where its cache is."""
    from quantsuite.catalog import load_catalog
    from quantsuite.plugin.collection import scheduling_group, schemes_named
    from tests.plugin.test_options import collections

    schemes = ("--scheme=bf16", "--scheme=top50", "--scheme=default", "--scheme=int8_sq")
    names = {"bf16", "fp8_autoquant_top50", "fp8_modelopt_default", "int8_smoothquant"}
    names_by_key = load_catalog().names_by_key()
    whole, *shards, benchmarks = collections(schemes, (*schemes, "--shard=1/2"), (*schemes, "--shard=2/2"),
                                             ("-m", "benchmark", *schemes, "--shard=1/2"))  # the nightly's later step
    named_anywhere = {name for test in whole for name in schemes_named(test, names_by_key)}
    assert named_anywhere == names, "--scheme kept a test of another scheme (a planted fault, a nested pair)"
    kept = {test.partition("[")[0].rpartition("::")[2] for test in whole}  # a test of the machinery: by its marks
    assert {"test_garbage_load_is_not_called_compatible", "test_drop_keeps_the_bf16_reference"} <= kept
    built_elsewhere = {"test_export_for_another_manifest_fails_naming_both",  # top25
                       "test_a_wrong_kv_scale_fails_the_export_checks",  # top50_kv
                       "test_the_calibration_choice_is_in_the_manifest_and_the_key"}  # int8_sq_image
    assert not kept & built_elsewhere, "--scheme kept a test that builds an unselected scheme (uses_schemes)"
    assert sorted(shards[0] + shards[1]) == sorted(whole) and not set(shards[0]) & set(shards[1])
    assert all(shards), "a shard with nothing to run"
    units = [{scheduling_group(test, names_by_key) for test in shard} for shard in shards]
    assert not units[0] & units[1], "a scheme (or the vLLM group) split over both shards"
    assert names <= units[0] | units[1] and "vllm" in units[0] | units[1]
    assert all(unit & names for unit in units), "a shard with no scheme: the catalog is not spread"
    assert benchmarks and set(benchmarks) <= set(shards[0]), "a scheme moved shard in another step"


def test_a_uses_schemes_mark_naming_no_scheme_is_one_usage_error(tmp_path):
    """A typo in a `uses_schemes` mark would make --scheme keep or drop the test silently: every run refuses it,
    naming the test, the mark and where names come from."""
    from tests.plugin.test_options import _pytest, suite_plugins

    (tmp_path / "test_typo.py").write_text('import pytest\n\n\n@pytest.mark.uses_schemes("top5O")\n'
                                           "def test_typo():\n    pass\n")  # fmt: skip
    done = _pytest("-p", "no:cacheprovider", *suite_plugins("options", "session", "collection"), "--collect-only",
                   "test_typo.py", cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 4, output[-3000:]  # pytest's usage error
    assert "test_typo.py::test_typo: @pytest.mark.uses_schemes names ['top5O'], not in the catalog" in output
