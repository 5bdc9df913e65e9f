"""Benchmarks (-m benchmark; pytest-benchmark, never under xdist). Results: --benchmark-json under reports/.

Every entry carries scheme, kind, tokens, device and versions in extra_info; the report divides each scheme's
tokens/s by BF16's from the same JSON (same run, same device).
"""

from __future__ import annotations

import contextlib
import os

import pytest

from quantsuite import PROJECT_ROOT
from quantsuite.bench import (
    DECODE_SCHEMES,
    VLLM_BATCH_SCHEMES,
    BenchmarkShape,
    StaticCacheDecoder,
    benchmark_shape,
    compiled_fp8_support,
    decode_step,
    fp8_matmul_support,
    host_bound_schemes,
    pool_allocation_origins,
    prefill_step,
    slow_fp8_matmul,
    synchronize,
    to_scaled_mm,
)
from quantsuite.checkpoint import FP8_LINEAR_ALGORITHMS, load_export
from quantsuite.timing import STAGE_TIMES

benchmark_test = pytest.mark.benchmark  # every timing test; the kernel check below runs in the default suite
# The shape from the environment, checked when the run starts (a bad value is one usage error, plugin.session). The
# prefill defaults keep CPU CI fast; on a GPU, eager PyTorch at 4 x 64 tokens is bound by the host (kernel launches),
# so the nightly also measures a compute-bound shape (e.g. 8 x 1024) where FP8 GEMMs can show.
SHAPE = benchmark_shape(os.environ)
PROMPT, NEW_TOKENS = 16, SHAPE.decode_tokens
BATCH, PREFILL_TOKENS, ROUNDS, WARMUP = SHAPE.batch, SHAPE.prefill_tokens, SHAPE.rounds, SHAPE.warmup
# Stage-table rows of the benchmark step (its 3B-shape run on an H200, gpu-19, spent 448 s, 74%, outside the named
# stages: the rounds were 158 s of it, warm-ups and torch.compile the rest)
ROUNDS_STAGE = "benchmark rounds (with warm-ups, BF16 pairs)"
PAIR_WARMUP_STAGE = "benchmark pair warm-up (torch.compile here)"
PAIRED_MODES = ("plain", "autoquant")  # schemes whose real-FP8 runs are timed beside BF16's (test_real_fp8_paired)


@pytest.fixture(autouse=True)
def _not_under_xdist(request):
    paired = request.node.get_closest_marker("paired")  # BF16 and the scheme alternate on this worker's GPU
    if os.environ.get("PYTEST_XDIST_WORKER") and request.node.get_closest_marker("benchmark") and not paired:
        pytest.skip("benchmarks never run under pytest-xdist (workers share the CPU/GPU); run them with -p no:xdist")


def _named_schemes(pytestconfig, catalog, variable: str) -> frozenset[str]:
    """host_bound_schemes of `variable` for this run; a bad value stops the run, saying what is accepted."""
    try:
        return host_bound_schemes(os.environ, catalog, catalog.select(pytestconfig.getoption("--scheme")), variable)
    except ValueError as error:
        pytest.exit(str(error), returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session")
def decode_schemes(pytestconfig, catalog) -> frozenset[str]:
    """The schemes whose PyTorch decode is timed ($QUANTSUITE_DECODE_SCHEMES)."""
    return _named_schemes(pytestconfig, catalog, DECODE_SCHEMES)


@pytest.fixture(scope="session")
def vllm_batch_schemes(pytestconfig, catalog) -> frozenset[str]:
    """The schemes whose vLLM large-batch and image workloads are timed ($QUANTSUITE_VLLM_BATCH_SCHEMES; batch 1 is
    timed for every scheme)."""
    return _named_schemes(pytestconfig, catalog, VLLM_BATCH_SCHEMES)


def _skip_unless_decode_timed(decode_schemes: frozenset[str], scheme) -> None:
    if scheme.name not in decode_schemes:
        pytest.skip(f"{DECODE_SCHEMES}={os.environ.get(DECODE_SCHEMES)}: PyTorch decode is timed for "
                    f"{', '.join(sorted(decode_schemes)) or 'no scheme'} (host-bound; vLLM's batch-1 pair times "
                    "every scheme's decode)")  # fmt: skip


def timed_rounds(benchmark, target, **options) -> None:
    """benchmark.pedantic(target, **options), its time in the stage table's ROUNDS_STAGE row (warm-up rounds and
    untimed setup included; a stage inside it, such as a vLLM call, keeps its own row)."""
    with STAGE_TIMES.measure(ROUNDS_STAGE):
        try:
            benchmark.pedantic(target, **options)
        except KeyboardInterrupt:  # flagged as pytest-benchmark flags an error: its rounds are left out of the JSON
            benchmark.has_error = True  # (an empty entry broke its JSON, the durations and the stage table: gpu-33c)
            raise


def _info(benchmark, workbench, scheme_name: str, kind: str, tokens: int) -> None:
    benchmark.extra_info.update({"scheme": scheme_name, "kind": kind, "tokens": tokens,
                                 "model": workbench.context.model_tag,
                                 "prefill_shape": f"{BATCH}x{PREFILL_TOKENS}",
                                 "device": workbench.context.device_name,
                                 "versions": workbench.context.versions})  # fmt: skip


def _vocab(workbench) -> int:
    return len(workbench.context.tokenizer)


def _skip_without_fp8_matmul(device, what: str = "") -> None:
    """Skip, `what` and then why, where torch._scaled_mm does not run on `device` as the FP8 layers call it."""
    if reason := fp8_matmul_support(device):
        pytest.skip(f"{what}{reason}")


def _pair_runs(kind: str, path: str, device) -> bool:
    """Whether test_real_fp8_paired times `kind` on `path` on `device`: everything on CUDA, eager prefill elsewhere."""
    return device.type == "cuda" or (path == "eager" and kind == "prefill")


def _skip_unless_fp8_layers_only(manifest: dict) -> None:
    """The real-FP8 path runs FP8 layers on torch._scaled_mm; other formats (INT4, NVFP4, MXFP8, ...) reload as
    QuantLinear, a dequantized reference with no fast kernel here: timing or matching it as FP8 would mislead.
    Decided from the scheme's manifest, which the export is verified against, before the export is loaded (each
    such test of a non-FP8 scheme loaded it to find out: run gpu-33 d)."""
    others = sorted({module["quant_algo"] for module in manifest["modules"]
                     if module.get("quant_algo") and module["quant_algo"] not in FP8_LINEAR_ALGORITHMS})  # fmt: skip
    if others:
        pytest.skip(f"real-FP8 path: {others} layers have no FP8 GEMM (the reload is a dequantized reference)")


def _skip_unless_real_fp8(workbench, scheme) -> None:
    """The checks of the real-FP8 path that need no load: the op is there, and the scheme has only FP8 layers."""
    _skip_without_fp8_matmul(workbench.context.device)
    _skip_unless_fp8_layers_only(workbench.schemes.result(scheme).manifest)


def _real_fp8_model(workbench, scheme, export_dir):
    """The reloaded export with every FP8 layer on torch._scaled_mm, alone on the device (skips without the op, for
    a scheme with other formats, or where the op is a slow reference kernel and the export has FP8 layers)."""
    _skip_unless_real_fp8(workbench, scheme)
    workbench.context.release()  # nothing else of ours on the device while this one is timed
    model = load_export(export_dir, workbench.context.device)
    if to_scaled_mm(model, workbench.context.device):
        reason = slow_fp8_matmul(workbench.context.device)
        if reason:
            pytest.skip(reason)
    return model


@benchmark_test
@pytest.mark.scheme_first
def test_export_time_and_size(benchmark, workbench, scheme, scheme_result):
    """The export stage's own build of the scheme's checkpoint (verified), one round: the export the scheme's later
    tests load, not an extra one (on one GPU the nightly's per-scheme step times its first build; with several, its
    benchmark step starts without it: --drop-exports); first among its scheme's tests (`scheme_first`), so that
    they find it built."""
    workbench.schemes.model(scheme)  # the fake-quant model is not part of the export's time
    paths = []
    _info(benchmark, workbench, scheme.name, "export", 0)
    timed_rounds(benchmark, lambda: paths.append(workbench.exports.rebuild(scheme)), rounds=1)
    benchmark.extra_info["checkpoint_bytes"] = sum(f.stat().st_size for f in paths[-1].iterdir() if f.is_file())


@benchmark_test
@pytest.mark.scheme_first  # while the export benchmark's fake-quant model is held (vLLM's checks free it)
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_fake_quant_throughput(benchmark, workbench, scheme, fake_quant_model, decode_schemes, kind):
    model = fake_quant_model
    if kind == "decode":
        _skip_unless_decode_timed(decode_schemes, scheme)
    if kind == "prefill":
        step, tokens = prefill_step(model, BATCH, PREFILL_TOKENS, workbench.context.device, _vocab(workbench))
    else:
        step, tokens = decode_step(model, BATCH, PROMPT, NEW_TOKENS, workbench.context.device, _vocab(workbench))
    _info(benchmark, workbench, scheme.name, f"fake_quant_{kind}", tokens)
    timed_rounds(benchmark, step, rounds=ROUNDS, warmup_rounds=WARMUP)


@benchmark_test
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_real_fp8_throughput(benchmark, workbench, scheme, exported, decode_schemes, kind):
    """The exported checkpoint with real FP8 GEMMs (torch._scaled_mm); BF16 export as its baseline. Where the eager
    pair times the same step, this one is left to it: the same model, step and rounds again cost a reload and the
    rounds, and one figure has one home."""
    if kind == "decode":
        _skip_unless_decode_timed(decode_schemes, scheme)
    _skip_unless_real_fp8(workbench, scheme)
    if scheme.mode in PAIRED_MODES and _pair_runs(kind, "eager", workbench.context.device):
        pytest.skip(f"timed by test_real_fp8_paired[{scheme.name}-{kind}-eager] (its rounds are this export's "
                    f"real-FP8 {kind}, each beside a BF16 round)")
    model = _real_fp8_model(workbench, scheme, exported)
    maker = prefill_step if kind == "prefill" else decode_step
    arguments = (BATCH, PREFILL_TOKENS) if kind == "prefill" else (BATCH, PROMPT, NEW_TOKENS)
    step, tokens = maker(model, *arguments, workbench.context.device, _vocab(workbench))
    _info(benchmark, workbench, scheme.name, f"real_fp8_{kind}", tokens)
    timed_rounds(benchmark, step, rounds=ROUNDS, warmup_rounds=WARMUP)


@pytest.mark.scheme_modes("plain", "autoquant")
def test_scaled_mm_layers_match_the_dequantized_export(workbench, scheme, scheme_result, exported):
    """The real-FP8 benchmark path computes what the export means, layer by layer: ScaledMmLinear (FP8 x FP8 GEMM,
    FP32 accumulate, one rounding to BF16) against Fp8Linear (the same FP8 codes dequantized, BF16 GEMM) on the
    same input (24 rows: the pad-to-16 path runs). Only rounding differs. Layer level, because whole-model logits
    amplify rounding on the random-weight 3B shape (two FP8 paths: 12-28% apart there, 0.4-2.4% on tiny).
    Bound: 1%; measured max 0.36% (tiny, CPU) and 0.39% (3B shape, H200): about one BF16 rounding. A 25%
    weight-scale error gives > 10%. The same holds for ScaledMmLinear under torch.compile (the compiled benchmark
    path; one dynamic-shape graph for all layers, about 8 s on the 2-core CPU): 0.0 from eager on CPU; and for its
    one-row decode path (FP8 products summed by a fused reduction instead of _scaled_mm). A layer that an earlier
    scheme of this process held with the same codes, scales and bias has its figures already: they are reused
    (on the 2-core box with a reference-kernel _scaled_mm, 47 ms a call, each scheme took 2-6 s)."""
    import torch

    from quantsuite.checkpoint import Fp8Linear

    _skip_unless_real_fp8(workbench, scheme)
    model = load_export(exported, workbench.context.device)
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, Fp8Linear)]
    assert len(layers) == scheme_result.manifest["totals"]["quantized_layers"]
    compiled_unsupported = compiled_fp8_support(workbench.context.device)
    errors = {}
    with torch.no_grad():
        for name, layer in layers:
            content = (_fp8_layer_content(layer), compiled_unsupported is None)
            if content not in _CHECKED_FP8_LAYERS:  # the same layer in another scheme: the same input, same figures
                _CHECKED_FP8_LAYERS[content] = _fp8_path_errors(layer, workbench.context.device,
                                                                compiled=compiled_unsupported is None)  # fmt: skip
            errors |= {f"{name} ({path})": error for path, error in _CHECKED_FP8_LAYERS[content].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 0.01, f"{scheme.name}: {worst} relative error {errors[worst]:.4f} between the FP8 paths"
    if compiled_unsupported:
        pytest.skip(f"the eager path matches (worst {errors[worst]:.4f}); the compiled paths are not checked here: "
                    f"{compiled_unsupported}")  # fmt: skip


_CHECKED_FP8_LAYERS: dict[tuple, dict[str, float]] = {}  # (content, compiled) -> relative error per path (process)


def _fp8_layer_content(layer) -> str:
    """Digest of what an Fp8Linear computes with: shapes, FP8 codes, scales, bias."""
    import hashlib

    import torch

    digest = hashlib.sha256(f"{tuple(layer.weight_fp8.shape)}".encode())
    for tensor in (layer.weight_fp8, layer.weight_scale, layer.input_scale, layer.bias):
        digest.update(
            b"-" if tensor is None else tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().data
        )
    return digest.hexdigest()


def _fp8_path_errors(layer, device, compiled: bool = True) -> dict[str, float]:
    """Relative error of ScaledMmLinear (eager; with `compiled`, also compiled and compiled at one row) against the
    layer itself, on 24 rows spread over the calibrated FP8 range (per-token formats scale each row themselves). The
    input depends only on the layer's shape and input scale, so one layer gives the same figures in every scheme
    that holds it."""
    import torch

    from quantsuite.bench import ScaledMmLinear

    amax = 4.0 if layer.input_scale is None else float(layer.input_scale) * 448.0
    generator = torch.Generator().manual_seed(layer.in_features)
    x = (torch.randn(24, layer.in_features, generator=generator) * amax / 4).to(device, torch.bfloat16)
    expected = layer(x).float()
    fast = ScaledMmLinear(layer)
    paths = [("eager", fast, 24)]
    if compiled:
        graph = torch.compile(fast, dynamic=True)
        paths += [("compiled", graph, 24), ("compiled, 1 row", graph, 1)]
    errors = {}
    for path, module, rows in paths:
        got = module(x[:rows]).float()
        errors[path] = ((got - expected[:rows]).norm() / expected[:rows].norm()).item()
    return errors


def test_benchmark_rounds_are_a_stage_of_their_own():
    """The benchmark step's stage table names its rounds: a benchmark's pedantic call lands in ROUNDS_STAGE, with
    the options passed through, and a stage inside it (a vLLM call, an export reload) keeps its own row."""
    calls = []

    class Recorder:  # pytest-benchmark's fixture, as far as timed_rounds uses it
        def pedantic(self, target, **options):
            calls.append(options)
            with STAGE_TIMES.measure("vLLM timed"):
                target()

    before = STAGE_TIMES.as_dict()
    timed_rounds(Recorder(), lambda: None, rounds=3, warmup_rounds=1)
    after = STAGE_TIMES.as_dict()
    assert calls == [{"rounds": 3, "warmup_rounds": 1}]
    for stage in (ROUNDS_STAGE, "vLLM timed"):
        assert after[stage][1] == before.get(stage, [0, 0, 0])[1] + 1, stage


def test_a_run_interrupted_in_a_benchmark_still_writes_its_json_and_summary(tmp_path):
    """SIGINT (the nightly's cut) inside a benchmark's rounds: pytest-benchmark left that benchmark's empty entry in
    its session and failed on it (`min() iterable argument is empty`) while saving its JSON, so pytest printed
    neither the durations nor the stage table (run gpu-33c); timed_rounds flags it as an error, which
    pytest-benchmark leaves out. A real pytest run over this project's plugins and timed_rounds."""
    import subprocess
    import sys

    from conftest import pytest_plugins

    test = tmp_path / "test_cut.py"
    test.write_text("""from tests.test_bench import timed_rounds


def test_timed_once(benchmark):
    timed_rounds(benchmark, lambda: None, rounds=2)


def test_cut_in_its_first_round(benchmark):
    def target():
        raise KeyboardInterrupt

    timed_rounds(benchmark, target, rounds=3)
""")
    root = PROJECT_ROOT
    plugins = [arg for name in pytest_plugins for arg in ("-p", name)]
    out = tmp_path / "benchmarks.json"
    done = subprocess.run([sys.executable, "-m", "pytest", str(test), "-p", "no:xdist", *plugins, "--no-report",
                           f"--benchmark-json={out}", f"--rootdir={root}", "-c", str(root / "pytest.ini")],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")})  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]  # interrupted
    assert "min() iterable argument is empty" not in output and ROUNDS_STAGE in output, output[-3000:]
    import json

    assert [entry["name"] for entry in json.loads(out.read_text())["benchmarks"]] == ["test_timed_once"]


@pytest.mark.parametrize(("value", "selected", "expected"), [
    (None, ["top50"], "every scheme"),
    ("all", [], "every scheme"),
    ("none", [], set()),
    ("default", [], {"fp8_modelopt_default", "bf16"}),  # nothing selected: every scheme runs
    ("default", ["default", "top50"], {"fp8_modelopt_default", "bf16"}),  # BF16: the unpaired ratios' baseline
    ("default", ["top50"], {"fp8_modelopt_default"}),  # its BF16 decode would have nothing to be the baseline of
    (" fp8_modelopt_default , top50 ", ["top50"], {"fp8_modelopt_default", "fp8_autoquant_top50", "bf16"}),
])  # fmt: skip
@pytest.mark.parametrize("variable", [DECODE_SCHEMES, VLLM_BATCH_SCHEMES])
def test_host_bound_figures_are_timed_for_the_schemes_named(catalog, variable, value, selected, expected):
    environ = {} if value is None else {variable: value}
    everything = {scheme.name for scheme in catalog.schemes}
    chosen = host_bound_schemes(environ, catalog, catalog.select(selected), variable)
    assert chosen == (everything if expected == "every scheme" else expected)
    other = VLLM_BATCH_SCHEMES if variable == DECODE_SCHEMES else DECODE_SCHEMES
    assert host_bound_schemes(environ, catalog, catalog.select(selected), other) == everything  # the other list's own


@pytest.mark.parametrize(("variable", "environ", "names"), [
    (DECODE_SCHEMES, {DECODE_SCHEMES: "defualt"}, ["QUANTSUITE_DECODE_SCHEMES=defualt", "accepted values are all, none",
                                                   "fp8_modelopt_default (default)"]),
    (VLLM_BATCH_SCHEMES, {VLLM_BATCH_SCHEMES: "defualt"}, ["QUANTSUITE_VLLM_BATCH_SCHEMES=defualt",
                                                           "fp8_modelopt_default (default)"]),
    (DECODE_SCHEMES, {DECODE_SCHEMES: " , "}, ["accepted values are all, none or comma-separated scheme names"]),
    (DECODE_SCHEMES, {"QUANTSUITE_COMPILED_DECODE_SCHEMES": "default"}, [f"set {DECODE_SCHEMES} instead"]),
])  # fmt: skip
def test_a_bad_scheme_list_names_the_fix(catalog, variable, environ, names):
    with pytest.raises(ValueError) as error:
        host_bound_schemes(environ, catalog, [], variable)
    assert all(name in str(error.value) for name in names), str(error.value)


def test_the_benchmark_shape_comes_from_its_variables():
    assert benchmark_shape({}) == BenchmarkShape() == BenchmarkShape(4, 64, 16, 5, 2)
    assert benchmark_shape({"QUANTSUITE_BENCH_DECODE_TOKENS": " 8 ", "QUANTSUITE_BENCH_WARMUP": "0",
                            "QUANTSUITE_BENCH_BATCH": ""}) == BenchmarkShape(decode_tokens=8, warmup=0)  # fmt: skip
    for variable, value, minimum in [("QUANTSUITE_BENCH_DECODE_TOKENS", "0", 1), ("QUANTSUITE_BENCH_ROUNDS", "2.5", 1),
                                     ("QUANTSUITE_BENCH_WARMUP", "-1", 0), ("QUANTSUITE_BENCH_BATCH", "eight", 1)]:
        with pytest.raises(ValueError) as error:
            benchmark_shape({variable: value})
        assert f"{variable}={value!r}: expected a whole number of at least {minimum}" in str(error.value)


@pytest.mark.parametrize("name", ["default", "int4_awq", "mixed_fp8_int4_awq_eb10"])
def test_the_real_fp8_skip_is_decided_from_the_manifest_as_the_reload_would(workbench, catalog, name):
    """The real-FP8 tests skip a scheme with other formats before loading its export, from its manifest: the
    reload holds a QuantLinear (no FP8 GEMM) exactly where the manifest names another format."""
    from quantsuite.formats import QuantLinear

    scheme = catalog.select([name])[0]
    model = load_export(workbench.exports.path(scheme), "cpu")
    reloaded_others = any(isinstance(module, QuantLinear) for module in model.modules())
    try:
        _skip_unless_fp8_layers_only(workbench.schemes.result(scheme).manifest)
        skipped = False
    except pytest.skip.Exception:
        skipped = True
    assert skipped == reloaded_others, f"{name}: skipped {skipped}, the reload has QuantLinear: {reloaded_others}"


@pytest.mark.parametrize("fails", ["with a bias", "after a BF16 matmul", "never"])
def test_fp8_matmul_support_calls_the_op_as_the_layers_do(monkeypatch, fails):
    """Forced AVX2 on an AMX box (oneDNN capped below what torch detects): torch._scaled_mm ran until the process's
    first BF16 matmul and failed from then on, so a probe that called it first said yes and every real-FP8 layer
    then raised. Planted in the op's place (any box): the probe reports an op that fails with a BF16 bias, as
    ScaledMmLinear passes one, or after a BF16 matmul, as every model forward runs one; and passes one that works."""
    import torch

    ran = {"bf16 matmul": False}
    matmul = torch.Tensor.__matmul__

    def recorded_matmul(a, b):
        ran["bf16 matmul"] |= a.dtype == torch.bfloat16
        return matmul(a, b)

    def scaled_mm(a, b, *, bias=None, **_options):
        if (fails == "with a bias" and bias is not None) or (fails == "after a BF16 matmul" and ran["bf16 matmul"]):
            raise RuntimeError("could not create a primitive descriptor for the matmul primitive")
        return torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16)

    monkeypatch.setattr(torch.Tensor, "__matmul__", recorded_matmul)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    reason = fp8_matmul_support(torch.device("cpu"))
    if fails == "never":
        assert reason is None, reason
    else:
        assert reason is not None and "primitive descriptor" in reason, reason


def test_slow_fp8_matmul_is_measured_not_assumed():
    """The real-FP8 benchmarks skip on a CPU whose _scaled_mm is a reference kernel (1900x a BF16 matmul on the
    2-core box of 2026-12-01); the verdict comes from timing both products against the tolerated ratio."""
    import torch

    cpu = torch.device("cpu")
    _skip_without_fp8_matmul(cpu)
    assert "x a BF16 matmul" in slow_fp8_matmul(cpu, limit=0.0)
    assert slow_fp8_matmul(cpu, limit=1e9) is None


def test_static_cache_decoder_computes_what_the_model_means(workbench, catalog):
    """The compiled decode benchmark runs StaticCacheDecoder (static KV cache, CUDA graphs on CUDA); its per-step
    logits must be the model's own: those of one full forward over the prompt and the tokens it chose (teacher
    forcing, no cache), for the BF16 export and `fp8_modelopt_default` (on CUDA its real-FP8 layers, with their
    one-row decode path; on CPU the dequantized reload, run eagerly). Greedy tokens alone cannot tell: the tiny
    model's near-ties flip on any kernel change. Bound 0.2 (largest relative L2 error of one step's logits).
    Measured: tiny 0.0099 (BF16) / 0.0091 (FP8) eager on CPU, 0.082 for FP8 under CPU inductor; both under 0.2 on an
    H200 (gpu-17); decoding at positions shifted by one gives 0.46-0.51. On a random-weight shape only BF16 is
    checked (3B shape on the H200: 0.050): its near-uniform logits amplify FP8 rounding (the compiled FP8 decode
    measured 0.40 there, as two FP8 paths differ by 12-28%); the layer check covers FP8 numerics."""
    import torch

    from quantsuite.models import SHAPES

    names = ("bf16",) if workbench.context.model_tag in SHAPES else ("bf16", "fp8_modelopt_default")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _vocab(workbench), (2, PROMPT), generator=generator).to(workbench.context.device)
    errors = {}
    for scheme in (s for s in catalog.schemes if s.name in names):
        model = load_export(workbench.exports.path(scheme), workbench.context.device)
        if scheme.mode != "none" and workbench.context.device.type == "cuda":
            assert to_scaled_mm(model, workbench.context.device) > 0
        tokens, logits = StaticCacheDecoder(model, 2, PROMPT + NEW_TOKENS).decode(ids, NEW_TOKENS)
        assert tokens.shape == (2, NEW_TOKENS) and logits.shape[:2] == (2, NEW_TOKENS)
        with torch.no_grad():
            forced = torch.cat([ids, tokens[:, :-1]], dim=1)
            expected = model(input_ids=forced, use_cache=False).logits[:, PROMPT - 1 :].float()
        errors[scheme.name] = ((logits - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()
    assert len(errors) == len(names)
    assert max(errors.values()) < 0.2, f"static-cache decode logits vs the model's own (relative L2): {errors}"


def _pool_leak_message(*addresses: int) -> str:
    """torch inductor's CUDA-graph pool check message (torch 2.11-2.13 wording; gpu-34's log)."""
    listed = ", ".join(map(str, addresses))
    return (f"Detected {len(addresses)} tensor(s) in the cudagraph pool not tracked as outputs. All live allocations "
            "must be tracked for correctness.\nDebugging:\n- Set torch._inductor.config.triton."
            "cudagraph_trees_history_recording = True for allocation origins\n- Search gc.get_objects() for tensors "
            f"with data_ptr() in OrderedSet([{listed}])\n- Use refcycle to find what is preventing cleanup\n"
            "Allocations:\nData Pointer: 1, history: \n")  # fmt: skip


def test_compiled_warm_ups_record_allocation_origins_on_cuda_only():
    """The compiled pairs' warm-ups run inside pool_allocation_origins: on CUDA inductor records each pool
    allocation's stack there (and only there), so a pool leak's error says where the blocks came from."""
    import torch
    import torch._inductor.config as inductor

    from quantsuite.bench import pool_allocation_origins

    assert not inductor.triton.cudagraph_trees_history_recording
    with pool_allocation_origins(torch.device("cuda", 0)):
        assert inductor.triton.cudagraph_trees_history_recording
    assert not inductor.triton.cudagraph_trees_history_recording
    with pool_allocation_origins(torch.device("cpu")):
        assert not inductor.triton.cudagraph_trees_history_recording


def test_a_cudagraph_pool_leak_names_what_holds_the_memory(workbench, catalog):
    """The compiled decode pair of `fp8_modelopt_default` failed on an H200 with inductor's "Detected 3 tensor(s) in
    the cudagraph pool not tracked as outputs" (gpu-34, reports/profile-gpu-h200-nightly): the message gives only
    addresses. StaticCacheDecoder now adds, per address, the Python tensor there (shape, dtype) and where it is
    held, or that no Python object holds it. Here on any device: a module buffer, a plain attribute and a closure's
    variable are named by their paths (and nothing else: the search's own references are left out), an address no
    tensor has is said to be held outside Python, and another error passes unchanged."""
    import torch

    from quantsuite.bench import describe_pool_leak

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("kept_scale", torch.ones(3, 5, dtype=torch.bfloat16))
            self.cached = torch.zeros(7)

    def launcher_of(tensor):  # a kernel launcher that keeps its last argument
        def launch():
            return tensor

        return launch

    holder, launch = Holder(), launcher_of(torch.full((2,), 3.0))
    free = torch.empty(1).untyped_storage().data_ptr() + 1  # no tensor's storage starts there
    buffer, attribute = holder.kept_scale.untyped_storage().data_ptr(), holder.cached.untyped_storage().data_ptr()
    closed_over = launch().untyped_storage().data_ptr()
    text = describe_pool_leak(_pool_leak_message(buffer, attribute, closed_over, free))
    lines = {line.split(":")[0].lstrip("- "): line.partition(": ")[2] for line in text.splitlines()[1:]}
    assert lines[str(buffer)] == "Tensor (3, 5) torch.bfloat16 held by Holder['_buffers']['kept_scale']", text
    assert lines[str(attribute)] == "Tensor (7,) torch.float32 held by Holder['cached']", text
    assert lines[str(closed_over)].endswith("held by function " + launch.__qualname__ + "[closure 0]"), text
    assert "no Python tensor has it" in lines[str(free)]
    assert describe_pool_leak("CUDA error: an illegal memory access was encountered") is None

    bf16 = next(s for s in catalog.schemes if s.mode == "none")  # the decoder adds it to the error it raises
    decoder = StaticCacheDecoder(load_export(workbench.exports.path(bf16), workbench.context.device), 1, 8)

    def leaking(ids, positions):
        raise RuntimeError(_pool_leak_message(buffer))

    decoder.forward = leaking
    with pytest.raises(RuntimeError, match=r"(?s)not tracked as outputs.*Holder\['_buffers'\]\['kept_scale'\]"):
        decoder.decode(torch.zeros(1, 4, dtype=torch.long, device=workbench.context.device), 2)

    def failing(ids, positions):
        raise RuntimeError("another failure")

    decoder.forward = failing
    with pytest.raises(RuntimeError, match=r"^another failure$"):
        decoder.decode(torch.zeros(1, 4, dtype=torch.long, device=workbench.context.device), 2)


@benchmark_test
@pytest.mark.scheme_modes(*PAIRED_MODES)
@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_real_fp8_paired(benchmark, workbench, catalog, scheme, exported, decode_schemes, kind, path):
    """Real-FP8 prefill (BATCH x PREFILL_TOKENS) or batch-1 decode (PROMPT + NEW_TOKENS) of this export and of the
    BF16 export, alternating round by round on one device (B, A, B, A, ...): host noise that drifts over minutes
    hits both alike, so the ratio is the per-round pair ratio. `compiled` (CUDA only; the same treatment for BF16,
    so the ratio is FP8's own): prefill runs each decoder layer under torch.compile (bench.compile_decoder_layers);
    decode runs bench.StaticCacheDecoder, a static KV cache with the whole forward compiled in "reduce-overhead" mode
    (CUDA graphs: one replay per token; with a dynamic cache the layers recompile and launch kernel by kernel).
    The timed rounds are this scheme's; extra_info carries the BF16 rounds and the pair ratios."""
    import statistics
    import time

    from quantsuite.bench import compile_decoder_layers

    device = workbench.context.device
    if not _pair_runs(kind, path, device):
        pytest.skip(f"real-FP8 {path} {kind} pairs are timed on CUDA only: on CPU, batch-1 decode of the tiny model "
                    "times Python overhead (and took 7 s per scheme) and inductor's CPU FP8 code is not the speed "
                    "this measures; the compiled path's numerics are checked on CPU by "
                    "test_scaled_mm_layers_match_the_dequantized_export")  # fmt: skip
    if kind == "decode":
        _skip_unless_decode_timed(decode_schemes, scheme)
    bf16 = next(s for s in catalog.schemes if s.mode == "none")
    model = _real_fp8_model(workbench, scheme, exported)
    baseline = load_export(workbench.exports.path(bf16), device)
    if path == "compiled" and kind == "prefill":
        compile_decoder_layers(model)
        compile_decoder_layers(baseline)
    vocab = _vocab(workbench)
    if kind == "prefill":
        baseline_step, tokens = prefill_step(baseline, BATCH, PREFILL_TOKENS, device, vocab)
        step, _ = prefill_step(model, BATCH, PREFILL_TOKENS, device, vocab)
    else:
        static_cache = path == "compiled"
        baseline_step, tokens = decode_step(baseline, 1, PROMPT, NEW_TOKENS, device, vocab, static_cache=static_cache)
        step, _ = decode_step(model, 1, PROMPT, NEW_TOKENS, device, vocab, static_cache=static_cache)
    # compiled: the first call of each shape compiles; a CUDA-graph pool leak then names its allocations' origins
    with STAGE_TIMES.measure(PAIR_WARMUP_STAGE), pool_allocation_origins(device):
        for _ in range(WARMUP + (path == "compiled")):
            baseline_step()
            step()
    baseline_rounds = []

    def time_baseline():  # untimed by pytest-benchmark: runs right before each timed round
        synchronize(device)
        started = time.perf_counter()
        baseline_step()
        baseline_rounds.append(time.perf_counter() - started)

    label = "real_fp8" + ("_compiled" if path == "compiled" else "")
    _info(benchmark, workbench, scheme.name, f"{label}_{kind}_paired", tokens)
    if kind == "decode":
        benchmark.extra_info.update({"decode_batch": 1, "kv_cache": "static" if static_cache else "dynamic"})
    timed_rounds(benchmark, step, setup=time_baseline, rounds=max(ROUNDS, 3))
    if benchmark.stats is None:  # --benchmark-disable
        return
    ratios = [base / own for base, own in zip(baseline_rounds, benchmark.stats.stats.data, strict=True)]
    benchmark.extra_info.update({"bf16_rounds_s": baseline_rounds, "paired_ratios": ratios,
                                 "paired_ratio_median": statistics.median(ratios)})  # fmt: skip
    assert len(baseline_rounds) == len(benchmark.stats.stats.data), "every scheme round has its own BF16 round"


@benchmark_test
@pytest.mark.parametrize("phase", ["calibration", "scoring"])
def test_autoquant_time(benchmark, workbench, catalog, phase):
    """AutoQuant's calibration (mtq.quantize with the FP8 format, same batches) and full scoring pass, timed after
    one untimed round: a process's first round also pays one-time costs (a CUDA extension built on a fresh cache, a
    first backward), which `first_round_s` keeps apart from the timed rounds."""
    import time

    from quantsuite.autoquant import apply_config, run_scoring

    scheme = next(s for s in catalog.schemes if s.mode == "autoquant" and s.method == "gradient")
    plan = workbench.scores.plan(scheme)
    batches = workbench.context.batches("scoring", plan.score_samples)

    def fresh():
        return (workbench.context.load().model,), {}

    if phase == "calibration":
        config = catalog.formats[scheme.formats[0]].quant_config()

        def target(model):
            apply_config(model, config, batches, workbench.context.device)
    else:

        def target(model):
            run_scoring(model, plan, batches, workbench.context.device)

    rounds_s = []

    def timed_target(model):
        started = time.perf_counter()
        target(model)
        synchronize(workbench.context.device)
        rounds_s.append(time.perf_counter() - started)

    _info(benchmark, workbench, scheme.name, f"autoquant_{phase}", 0)
    timed_rounds(benchmark, timed_target, setup=fresh, rounds=2, warmup_rounds=min(WARMUP, 1))
    if WARMUP and benchmark.stats is not None:
        benchmark.extra_info["first_round_s"] = rounds_s[0]


@benchmark_test
@pytest.mark.scheme_modes("autoquant")
def test_autoquant_resolve_time(benchmark, workbench, scheme):
    from quantsuite.autoquant import resolve_config

    state, _ = workbench.scores.state(workbench.scores.plan(scheme))
    _info(benchmark, workbench, scheme.name, "autoquant_resolve", 0)
    timed_rounds(benchmark, resolve_config, args=(state, scheme), rounds=10, warmup_rounds=1)


@benchmark_test
@pytest.mark.paired
def test_vllm_speed(benchmark, workbench, scheme, vllm_python, vllm_service, export_dropped_after, vllm_batch_schemes):
    """vLLM throughput of each export against BF16, paired (alternating rounds on the same prompts): batch-1 decode
    ms/token, with the weight-bytes bound, and for the schemes $QUANTSUITE_VLLM_BATCH_SCHEMES names (all unless set)
    large-batch and image-prompt output tokens/s. Runs under xdist too (one scheme and one engine pair per GPU);
    results go to reports/vllm/<model>/<scheme>.json (`speed`) and, without xdist, to the benchmark JSON's
    extra_info."""
    from quantsuite.stages.vllm import VllmUnsupportedHere
    from quantsuite.vllm.service import vllm_version

    if scheme.mode == "none":
        pytest.skip("the BF16 reference is the baseline of every pair (its tokens/s are in each scheme's result)")
    check = workbench.vllm.backend(vllm_python)
    expected = workbench.vllm.expected_failure(scheme, check)
    if expected is not None:
        pytest.skip(f"expected to fail in vLLM ({check}): {expected.reason}")
    results = []
    rounds = int(os.environ.get("QUANTSUITE_VLLM_ROUNDS", 3 if workbench.context.device.type == "cuda" else 2))
    with contextlib.ExitStack() as stack:
        try:  # decided before the benchmark starts: a skip inside it leaves pytest-benchmark an empty entry to save
            measure = stack.enter_context(workbench.vllm.speed_session(scheme, vllm_service))
        except VllmUnsupportedHere as error:
            pytest.skip(f"this machine cannot run it in vLLM: {error}")
        _info(benchmark, workbench, scheme.name, "vllm_paired", 0)
        batches = scheme.name in vllm_batch_schemes
        timed_rounds(benchmark, lambda: results.append(measure(rounds, batches)), rounds=1)
    result = results[-1]
    benchmark.extra_info.update({"vllm_check": check, "vllm": vllm_version(vllm_python),
                                 "weight_bytes_bound": result["weight_bytes_bound"],
                                 "vllm_paired": {name: {k: w[k] for k in ("ratio", "ratios", "bound_share",
                                                                          "baseline_ms_per_token",
                                                                          "candidate_ms_per_token")}
                                                 for name, w in result["workloads"].items()}})  # fmt: skip


def test_compiled_fp8_support_is_measured_on_this_kernel_set(tmp_path):
    """torch 2.13's inductor computed the fused FP8 reduction wrongly under the AVX2 kernel set at one thread on one
    box (a forced-AVX2 clone failed every FP8 scheme's compiled one-row path with an infinite error) and right on
    another (an AMD EPYC box, forced AVX2: the probe said None and the compiled one-row paths matched); under the
    scalar kernel set inductor's C++ build failed in one clone and built and agreed with eager in another
    (reports/bounds/README.md). Each is a measured fact the probe must report, in a fresh process at one thread
    (this process may hold compiled code of another thread count); nothing on the native kernels. A None is checked
    where it is used: `test_scaled_mm_layers_match_the_dequantized_export` then runs the compiled paths. That the
    probe catches a wrong or failing compile wherever it happens: the planted faults below. Its process keeps
    inductor's precompiled headers (~150 MB) in the suite's cache, not in torch's <tmp>/torchinductor_<user>."""
    import os
    import subprocess
    import sys

    import torch

    _skip_without_fp8_matmul(torch.device("cpu"), "no FP8 layer to compile: ")
    probe = ("import torch; torch.set_num_threads(1); from quantsuite.bench import compiled_fp8_support; "
             "print('REASON', compiled_fp8_support(torch.device('cpu')))")  # fmt: skip
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600,
                               env=os.environ | {"TMPDIR": str(tmp_path)})  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert not list(tmp_path.glob("torchinductor_*")), "inductor wrote its precompiled headers outside the cache"
    reason = completed.stdout.rpartition("REASON ")[2].strip()
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX2":  # wrong on one box, right on another
        assert reason == "None" or "away from eager" in reason, reason
    elif capability == "DEFAULT":  # the scalar kernel set: inductor's C++ build failed on one box, built on another
        assert reason == "None" or "cannot build" in reason, reason
    else:
        assert reason == "None", reason


@pytest.mark.parametrize(("compiled", "expected"), [
    (lambda layer: layer, None),  # what eager computes
    (lambda layer: lambda x: layer(x) * 1.05, "away from eager"),  # 5% off
    (lambda layer: lambda x: layer(x) if x.shape[0] > 1 else layer(x) * float("inf"), "away from eager"),  # one row
    (lambda layer: lambda x: layer(x) * float("nan"), "away from eager"),
    (lambda layer: lambda x: (_ for _ in ()).throw(RuntimeError("CppCompileError: at::vec")), "cannot build"),
])  # fmt: skip
def test_the_compiled_fp8_probe_catches_a_wrong_or_failing_compile(monkeypatch, compiled, expected):
    """Planted faults in torch.compile's place (any box, no inductor): the probe reports a compiled FP8 layer that
    computes something else (the AVX2 box's inf on one row, a nan, 5% off) or does not build, and passes one that
    computes what eager does."""
    import torch

    from quantsuite.bench import compiled_fp8_support

    _skip_without_fp8_matmul(torch.device("cpu"), "no FP8 layer to compile: ")
    monkeypatch.setattr(torch, "compile", lambda layer, **_options: compiled(layer))
    reason = compiled_fp8_support.__wrapped__(torch.device("cpu"))  # not the process's cached answer
    assert reason is None if expected is None else expected in reason, reason
