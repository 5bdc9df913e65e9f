"""Throughput of schemes in plain PyTorch: prefill and decode of the fake-quant model and of a real-FP8 path.

- `prefill_step` / `decode_step` return closures that run one timed unit of work (device-synchronised inside,
  so a benchmark's clock covers the GPU work) and the number of tokens it processes.
- `to_scaled_mm` converts a model loaded by `export.load_export` so that every FP8 layer runs a real FP8 GEMM
  (`torch._scaled_mm`, FP8 activations quantized with the checkpoint's input_scale); it needs the op on the
  device (CUDA compute capability >= 8.9, or a CPU build of torch that has it) and raises
  `Fp8MatmulUnavailable` elsewhere.
- `compile_decoder_layers` compiles each decoder layer of the language model with torch.compile (regional
  compilation: one graph serves every layer of the same structure). Inductor then fuses the FP8 activation
  quantization with the RMSNorm / SiLU-mul / residual add in front of each `_scaled_mm`; eagerly those are separate
  kernels, which made the real-FP8 path slower than BF16.
- `StaticCacheDecoder` decodes greedily on a static KV cache with the whole forward compiled in reduce-overhead mode
  (CUDA graphs), the path where batch-1 decode can show FP8 speed; `greedy_decode` is the eager dynamic-cache loop.
  Where inductor's CUDA-graph pool check fails in it, `describe_pool_leak` adds what holds the memory to the error.
- `host_bound_schemes` reads which schemes' host-bound figures are timed: PyTorch decode (QUANTSUITE_DECODE_SCHEMES)
  and vLLM's large-batch and image workloads (QUANTSUITE_VLLM_BATCH_SCHEMES); prefill and vLLM's batch 1 are timed
  for every scheme.
- `benchmark_shape` reads the benchmarks' batch, token counts and rounds from QUANTSUITE_BENCH_* (a bad value is one
  usage error when the run starts).
- `gate_baseline` keeps, from a previous run's benchmark JSON, the entries stable enough to fail a nightly on
  (the nightly's benchmark step, quantsuite/steps.py, compares against it).

pytest-benchmark times these closures (`tests/test_bench.py`); ratios to BF16 come from the same run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from quantsuite.catalog import Catalog, SchemeSpec
from quantsuite.checkpoint import FP8, Fp8Linear, per_token_scale, to_fp8
from quantsuite.formats import FP8_MAX
from quantsuite.models import clear_image_positions, language_model


class Fp8MatmulUnavailable(RuntimeError):
    """The device has no FP8 matrix multiply (torch._scaled_mm)."""


def fp8_matmul_support(device: torch.device) -> str | None:
    """None if torch._scaled_mm runs on `device` (CUDA >= 8.9, or a CPU build that has the op) as ScaledMmLinear
    calls it (per-tensor scales and a BF16 bias, rows padded to 16) in a process that has run a BF16 matmul, as
    every model forward has; else why not. A CPU whose oneDNN is capped below what torch detects (forced AVX2 on an
    AMX box) ran the op before its first BF16 matmul and failed it from then on (reports/bounds/README.md)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"FP8 GEMM needs compute capability >= 8.9 (Ada/Hopper); this GPU is {major}.{minor}"
    ones = torch.ones(16, 16, device=device)
    ones.bfloat16() @ ones.bfloat16()
    try:
        torch._scaled_mm(ones.to(FP8), ones.to(FP8).t(), scale_a=ones[0, 0], scale_b=ones[0, 0],
                         bias=ones[0].bfloat16(), out_dtype=torch.bfloat16)  # fmt: skip
    except (RuntimeError, NotImplementedError) as error:
        return (f"torch._scaled_mm FP8 GEMM does not run on {device} with torch {torch.__version__} (CPU kernels "
                f"{torch.backends.cpu.get_cpu_capability()}): {error}")  # fmt: skip
    return None


@functools.cache
def compiled_fp8_support(device: torch.device) -> str | None:
    """None if ScaledMmLinear under torch.compile computes what it computes eager (24 rows, then one row: its fused
    FP8 reduction), for layers of 128, 256 and 512 inputs, at this process's thread count; else why not. With torch
    2.13 and the AVX2 CPU kernel set inductor's fused FP8 reduction returned inf or nan for some of these shapes and
    thread counts on one box (not on another); under the scalar kernel set (ATEN_CPU_CAPABILITY=default) inductor's
    C++ build failed on one box (reports/bounds/README.md). Checked once per process; a process of its own (the
    probe's) keeps inductor's precompiled headers with its kernels, as the pytest layer's do."""
    from types import SimpleNamespace

    from quantsuite.vllm.worker import keep_precompiled_headers_with_inductor_cache

    keep_precompiled_headers_with_inductor_cache()

    generator = torch.Generator().manual_seed(0)
    for inputs in (128, 256, 512):
        weight = torch.randn(64, inputs, generator=generator)
        source = SimpleNamespace(weight_fp8=(weight / weight.abs().max() * FP8_MAX).to(FP8).to(device),
                                 bias=torch.randn(64, generator=generator).to(device, torch.bfloat16),
                                 weight_scale=torch.tensor(0.01, device=device), out_features=64,
                                 input_scale=torch.tensor(0.02, device=device))  # fmt: skip
        layer = ScaledMmLinear(source)
        x = torch.randn(24, inputs, generator=generator).to(device, torch.bfloat16)
        eager, compiled = layer(x).float(), torch.compile(layer, dynamic=True)
        for rows in (24, 1):
            try:
                error = float((compiled(x[:rows]).float() - eager[:rows]).norm() / eager[:rows].norm())
            except Exception as failure:  # whatever inductor raises here is a fact about this machine
                first_line = next(iter(str(failure).strip().splitlines()), "")[:200]
                return (f"torch {torch.__version__}'s torch.compile cannot build an FP8 layer on {device} (CPU "
                        f"kernels {torch.backends.cpu.get_cpu_capability()}): {type(failure).__name__}: "
                        f"{first_line}")  # fmt: skip
            if not error < 0.01:
                return (f"torch {torch.__version__} under torch.compile computes an FP8 layer ({inputs} inputs, "
                        f"{rows} rows, {torch.get_num_threads()} threads) {error:.3g} away from eager on {device} "
                        f"(CPU kernels {torch.backends.cpu.get_cpu_capability()})")  # fmt: skip
    return None


@functools.cache
def slow_fp8_matmul(device: torch.device, limit: float = 50.0) -> str | None:
    """On a CPU, why torch._scaled_mm is too slow to time a real-FP8 model (None if it is not, and on CUDA). Some
    CPU builds run it through a reference kernel, three orders of magnitude slower than a BF16 matmul of the same
    shape (reports/profile-cpu-2core/README.md). `limit`: the tolerated ratio. Measured once per process (per
    device and limit)."""
    if device.type != "cpu":
        return None
    import time

    a, b = torch.randn(256, 128), torch.randn(128, 128)
    a_fp8, b_fp8, one = a.to(FP8), b.to(FP8).t(), torch.tensor(1.0)
    a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)

    def seconds(function: Callable[[], object], repeats: int) -> float:
        function()
        started = time.perf_counter()
        for _ in range(repeats):
            function()
        return (time.perf_counter() - started) / repeats

    fp8 = seconds(lambda: torch._scaled_mm(a_fp8, b_fp8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 2)
    bf16 = seconds(lambda: a @ b, 20)
    if fp8 > limit * bf16:
        return (
            f"torch._scaled_mm on this CPU (torch {torch.__version__}) takes {fp8 * 1e3:.1f} ms for a 256 x 128 x "
            f"128 product, {fp8 / bf16:.0f}x a BF16 matmul: a reference kernel, so a real-FP8 timing would "
            "measure it, not FP8; run the real-FP8 benchmarks on a GPU with compute capability >= 8.9"
        )
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ScaledMmLinear(torch.nn.Module):
    """Real FP8 W8A8 linear: fp8(x / s_x) @ w_fp8^T via torch._scaled_mm, bf16 out, + bias. Per-tensor scales
    (FP8), or row-wise ones (FP8_PER_CHANNEL_PER_TOKEN: s_x per token computed at run time, one weight scale per
    output channel).

    Under torch.compile, inputs of at most `reduce_rows` rows (batch-1 decoding) skip _scaled_mm: the FP8 x FP8
    products (exact in FP32) are summed by a reduction that inductor fuses with the FP8 loads and the scales: end to
    end it beat always calling _scaled_mm at batch 1 (reports/gpu-speed-scale-h200/README.md, gpu-17 and gpu-18).
    """

    reduce_rows = 1

    def __init__(self, source: Fp8Linear):
        super().__init__()
        self.register_buffer("weight_t", source.weight_fp8.t())  # column-major view for _scaled_mm
        rowwise = source.input_scale is None
        self.register_buffer("weight_scale", source.weight_scale.reshape(1, -1).float() if rowwise
                             else source.weight_scale.reshape(()).float())  # fmt: skip
        self.register_buffer("input_scale", None if rowwise else source.input_scale.reshape(()).float())
        self.bias = source.bias
        self.out_features = source.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_2d = x.reshape(-1, shape[-1])
        scale = per_token_scale(x_2d) if self.input_scale is None else self.input_scale
        x_fp8 = to_fp8(x_2d, scale)
        rows = x_fp8.shape[0]
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        if rows <= self.reduce_rows and torch.compiler.is_compiling():
            products = x_fp8.float()[:, None, :] * self.weight_t.t().float()[None]  # rows x out x in, fused away
            out = products.sum(-1) * scale * self.weight_scale
            out = (out if bias is None else out + bias.float()).to(torch.bfloat16)  # one rounding, as _scaled_mm
            return out.reshape(*shape[:-1], self.out_features)
        padded = -rows % 16  # _scaled_mm wants dimensions that are multiples of 16
        if padded:
            x_fp8 = torch.nn.functional.pad(x_fp8.view(torch.uint8), (0, 0, 0, padded)).view(FP8)
            if scale.dim() == 2:
                scale = torch.nn.functional.pad(scale, (0, 0, 0, padded), value=1.0)
        out = torch._scaled_mm(x_fp8, self.weight_t, scale_a=scale, scale_b=self.weight_scale, bias=bias,
                               out_dtype=torch.bfloat16)  # fmt: skip
        return out[:rows].reshape(*shape[:-1], self.out_features)


def to_scaled_mm(model: torch.nn.Module, device: torch.device) -> int:
    """Swap every Fp8Linear of a reloaded export for ScaledMmLinear; returns how many were swapped."""
    reason = fp8_matmul_support(device)
    if reason:
        raise Fp8MatmulUnavailable(reason)
    swaps = [(name, module) for name, module in model.named_modules() if isinstance(module, Fp8Linear)]
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, ScaledMmLinear(module))
    return len(swaps)


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """torch.compile every decoder layer in place (vision tower, embeddings and lm_head stay eager); returns how
    many. Compilation happens on the first call of each new input shape (tens of seconds), so warm up before
    timing. Layers of one structure share a graph; a scheme that mixes FP8 and BF16 layers compiles one graph per
    structure, and decoding (a growing KV length) one more with dynamic shapes, so the recompile limit is raised."""
    import torch._dynamo

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    layers = language_model(model).layers
    for layer in layers:
        layer.compile()
    return len(layers)


def prefill_step(model: torch.nn.Module, batch_size: int, sequence_length: int, device: torch.device,
                 vocab: int, seed: int = 0) -> tuple[Callable[[], None], int]:  # fmt: skip
    """One forward over batch_size x sequence_length random tokens; returns (step, tokens per step)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, sequence_length), generator=generator).to(device)

    @torch.no_grad()
    def step() -> None:
        model(input_ids=ids, use_cache=False)
        synchronize(device)

    return step, batch_size * sequence_length


class StaticCacheDecoder:
    """Greedy decoding on a preallocated (static) KV cache, the forward under torch.compile(mode="reduce-overhead"):
    on CUDA each call replays a CUDA graph (one for the prompt's shape, one for a single token), so a decoded token
    costs one graph replay and a little Python, with no kernel-by-kernel launches. On other devices it runs eagerly
    on the same cache and positions. `decode` also returns each step's logits (what the tests check against a
    teacher-forced forward).

        decoder = StaticCacheDecoder(model, batch_size=1, max_length=32)
        tokens = decoder(ids, new_tokens=16)   # (batch, 16); the cache is reset on every call
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int):
        from transformers import StaticCache

        self.model, self.max_length = model, max_length
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        with torch.no_grad():  # the cache allocates its tensors on first use: do that eagerly, not while tracing
            self._forward(torch.zeros(batch_size, 1, dtype=torch.long, device=self.device),
                          torch.zeros(batch_size, 1, dtype=torch.long, device=self.device))  # fmt: skip
        self.cache.reset()
        compiled = self.device.type == "cuda"
        self.forward = (
            torch.compile(self._forward, mode="reduce-overhead", dynamic=False) if compiled else self._forward
        )

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache, use_cache=True)
        return output.logits[:, -1]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens: batch x new_tokens, logits of each step: batch x new_tokens x vocab, float32)."""
        batch_size, prompt_length = ids.shape
        if prompt_length + new_tokens > self.max_length:
            raise ValueError(f"{prompt_length} + {new_tokens} tokens exceed the cache's max_length {self.max_length}")
        self.cache.reset()
        positions = torch.arange(prompt_length + new_tokens, device=self.device).expand(batch_size, -1)
        tokens, logits = [], []
        token = ids
        for step in range(new_tokens):
            start = 0 if step == 0 else prompt_length + step - 1
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's output is consumed: reuse its memory
            try:
                step_logits = self.forward(token, positions[:, start : prompt_length + step])
            except RuntimeError as error:  # inductor's CUDA-graph pool check: say what holds the memory it found
                holders = describe_pool_leak(str(error))
                if holders is None:
                    raise
                raise RuntimeError(f"{error}\n{holders}") from error
            token = step_logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step_logits.float())
        return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)

    def __call__(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return self.decode(ids, new_tokens)[0]


def pool_allocation_origins(device: torch.device):
    """A context in which torch.compile's CUDA-graph warm-ups record where each allocation of their pool came from
    (inductor's `cudagraph_trees_history_recording`), so that a "not tracked as outputs" error lists each block's
    allocation stack; nothing on other devices. For warm-ups only: it records on every allocation (a whole nightly
    step with it on: reports/profile-gpu-h200-nightly/README.md, gpu-35)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch({"triton.cudagraph_trees_history_recording": True})


POOL_LEAK = re.compile(r"in the cudagraph pool not tracked as outputs.*?data_ptr\(\) in OrderedSet\(\[([0-9, ]+)\]\)",
                       re.DOTALL)  # fmt: skip


def describe_pool_leak(message: str) -> str | None:
    """For inductor's "Detected N tensor(s) in the cudagraph pool not tracked as outputs" (a compiled function kept
    memory of its CUDA-graph pool alive beyond its outputs), the Python tensors whose storage is at the addresses
    the message lists, each with its shape, dtype and where it is held (`Owner['attribute']...` paths), or that no
    Python object holds an address (then a C++ cache or a kernel launcher does); None for any other message."""
    import gc
    import warnings

    match = POOL_LEAK.search(message)
    if match is None:
        return None
    at: dict[int, list[torch.Tensor]] = {int(part): [] for part in match.group(1).split(",") if part.strip()}
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and (address := _storage_address(obj)) in at:
                at[address].append(obj)
    own = {id(tensors) for tensors in at.values()}  # this search's lists, not holders
    lines = []
    for address, tensors in sorted(at.items()):
        found = [f"{type(t).__name__} {tuple(t.shape)} {t.dtype} held by "
                 f"{', '.join(_holders(t, own)) or 'no Python object'}" for t in tensors]  # fmt: skip
        lines.append(f"- {address}: " + ("; ".join(found) or "no Python tensor has it (a C++ cache or a kernel "
                                                               "launcher holds it)"))  # fmt: skip
    return "What holds those addresses (quantsuite.bench.describe_pool_leak):\n" + "\n".join(lines)


def _storage_address(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except Exception:  # a tensor without storage (fake, functional, sparse): not a pool block
        return None


def _holders(obj: object, ignore: set[int], depth: int = 4) -> list[str]:
    """Where `obj` is referred to from, as paths up through containers (at most `depth` levels): a dict by its key
    (an nn.Module's buffer: `Module['_buffers']['name']`), a list or tuple by its index, a closure cell by the
    function that closes over it (`function f[closure 0]`); an object by its type, a function by its name. Frames
    and `ignore` are left out."""
    import gc
    import inspect
    import types

    referrers = gc.get_referrers(obj)
    ignore = ignore | {id(referrers)}
    paths = []
    for referrer in referrers:
        if id(referrer) in ignore or inspect.isframe(referrer):
            continue
        if isinstance(referrer, (dict, list, tuple)):  # loops, not generators: a closure over obj would refer to it
            keys = list(referrer) if isinstance(referrer, dict) else range(len(referrer))
            key = "?"
            for candidate in keys:
                if referrer[candidate] is obj:
                    key = candidate
                    break
            step = f"[closure {key}]" if isinstance(obj, types.CellType) else f"[{key!r}]"
        elif isinstance(referrer, types.CellType):
            step = ""
        elif isinstance(referrer, types.FunctionType):
            paths.append(f"function {referrer.__qualname__}")
            continue
        else:
            paths.append(type(referrer).__name__)
            continue
        owners = _holders(referrer, ignore, depth - 1) if depth > 1 else []
        paths += [owner + step for owner in owners] or [type(referrer).__name__ + step]
    return paths


def greedy_decode(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding of `new_tokens` after the prompt `ids` (batch x prompt) with transformers' dynamic cache:
    a plain loop over forward calls, the KV growing by one token per step (no fixed shapes: eager kernels, bound by
    the host at batch 1 on a GPU). Returns the new tokens (batch x new_tokens)."""
    clear_image_positions(model)  # positions from 0, not an earlier image prompt's
    output = model(input_ids=ids, use_cache=True)
    tokens = [output.logits[:, -1:].argmax(-1)]
    for _ in range(new_tokens - 1):
        output = model(input_ids=tokens[-1], past_key_values=output.past_key_values, use_cache=True)
        tokens.append(output.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)


def decode_step(model: torch.nn.Module, batch_size: int, prompt_length: int, new_tokens: int,
                device: torch.device, vocab: int, seed: int = 0, static_cache: bool = False,
                ) -> tuple[Callable[[], None], int]:  # fmt: skip
    """Greedy decoding of `new_tokens` after a random prompt, prefill included once per step: the dynamic-cache
    loop (`greedy_decode`), or with static_cache a `StaticCacheDecoder` built once (CUDA graphs on CUDA; the first
    step captures them, so warm up before timing)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, prompt_length), generator=generator).to(device)
    decode = (StaticCacheDecoder(model, batch_size, prompt_length + new_tokens) if static_cache
              else functools.partial(greedy_decode, model))  # fmt: skip

    @torch.no_grad()
    def step() -> None:
        decode(ids, new_tokens)
        synchronize(device)

    return step, batch_size * new_tokens


@dataclass(frozen=True)
class BenchmarkShape:
    """The PyTorch benchmarks' workload and rounds (docs/benchmarks.md): prefill `batch` x `prefill_tokens`; decode
    `batch` x `decode_tokens` new tokens after a 16-token prompt; `rounds` timed after `warmup` untimed."""

    batch: int = 4
    prefill_tokens: int = 64
    decode_tokens: int = 16
    rounds: int = 5
    warmup: int = 2


SHAPE_VARIABLES = {"batch": ("QUANTSUITE_BENCH_BATCH", 1), "prefill_tokens": ("QUANTSUITE_BENCH_PREFILL_TOKENS", 1),
                   "decode_tokens": ("QUANTSUITE_BENCH_DECODE_TOKENS", 1), "rounds": ("QUANTSUITE_BENCH_ROUNDS", 1),
                   "warmup": ("QUANTSUITE_BENCH_WARMUP", 0)}  # fmt: skip


def benchmark_shape(environ: Mapping[str, str]) -> BenchmarkShape:
    """BenchmarkShape from its variables (SHAPE_VARIABLES; unset or empty: the default); a value that is not a whole
    number at least the variable's minimum raises ValueError naming the variable, the minimum and the default."""
    values = {}
    for name, (variable, minimum) in SHAPE_VARIABLES.items():
        text = environ.get(variable, "").strip()
        if not text:
            continue
        if not text.isdigit() or int(text) < minimum:
            raise ValueError(f"{variable}={text!r}: expected a whole number of at least {minimum} (unset: "
                             f"{getattr(BenchmarkShape, name)})")  # fmt: skip
        values[name] = int(text)
    return BenchmarkShape(**values)


DECODE_SCHEMES = "QUANTSUITE_DECODE_SCHEMES"
VLLM_BATCH_SCHEMES = "QUANTSUITE_VLLM_BATCH_SCHEMES"
RENAMED = {"QUANTSUITE_COMPILED_DECODE_SCHEMES": DECODE_SCHEMES}


def host_bound_schemes(environ: Mapping[str, str], catalog: Catalog, selected: list[SchemeSpec],
                         variable: str = DECODE_SCHEMES) -> frozenset[str]:  # fmt: skip
    """The schemes whose host-bound benchmarks run, from `variable`: `all` (unset), `none`, or comma-separated scheme
    names or aliases. $QUANTSUITE_DECODE_SCHEMES picks the PyTorch decode benchmarks (fake-quant and real-FP8
    decode, the eager and compiled batch-1 decode pairs): eager decode is bound by the host, so its rounds spread
    more than FP8 changes it, and each compiled pair compiles two whole forwards. $QUANTSUITE_VLLM_BATCH_SCHEMES
    picks vLLM's large-batch and image-prompt workloads of the paired speed runs: host-bound on an H200 at the 3B
    shape, read as within noise in every GPU run (reports/profile-gpu-h200-nightly, gpu-40). The GPU nightly names
    one scheme for each (quantsuite/steps.py); every scheme's decode speed comes from vLLM's paired batch-1 runs.
    The BF16 reference joins when a `selected` scheme is named: the unpaired decode ratios divide by its figures. A
    bad value raises ValueError naming the fix."""
    for old, new in RENAMED.items():
        if old in environ and new == variable:
            raise ValueError(f"{old} is now {new} (it picks the eager decode benchmarks too); set {new} instead")
    value = environ.get(variable, "").strip() or "all"
    if value == "all":
        return frozenset(scheme.name for scheme in catalog.schemes)
    if value == "none":
        return frozenset()
    accepted = f"{variable}={value}: accepted values are all, none or comma-separated scheme names"
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:  # catalog.select([]) means every scheme
        raise ValueError(accepted)
    index = catalog.names_by_key()
    unknown = [name for name in names if name not in index]
    if unknown:
        raise ValueError(f"{accepted} or aliases of schemes.yaml; unknown: {', '.join(unknown)}; schemes (alias): "
                         f"{catalog.listing()}")
    named = {index[name] for name in names}
    if named & {scheme.name for scheme in selected}:
        named |= {scheme.name for scheme in catalog.schemes if scheme.mode == "none"}
    return frozenset(named)


# What a nightly may fail on: the benchmarks that repeat between identical runs (compute-bound real-FP8 prefill);
# host-bound ones are reported, never gated (docs/benchmarks.md, reports/sample-3b-shape-h200/).
GATED_KINDS = ("real_fp8_prefill", "real_fp8_prefill_paired")
GATED_MIN_TOKENS = 8192


def gate_baseline(previous: Path, out: Path) -> int:
    """Write `out`: `previous` (a pytest-benchmark JSON) with only the gated entries (GATED_KINDS at a prefill
    of >= GATED_MIN_TOKENS tokens); pytest-benchmark compares only benchmarks the baseline holds. Returns how
    many entries were kept."""
    data = json.loads(Path(previous).read_text())
    data["benchmarks"] = [
        entry for entry in data.get("benchmarks", [])
        if entry.get("extra_info", {}).get("kind") in GATED_KINDS
        and entry["extra_info"].get("tokens", 0) >= GATED_MIN_TOKENS
    ]  # fmt: skip
    Path(out).write_text(json.dumps(data))
    return len(data["benchmarks"])

