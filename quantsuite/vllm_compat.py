"""Does vLLM load an export, and does it compute what the checkpoint means? Answered by real vLLM, always in
a subprocess of vLLM's own environment (its torch / transformers pins conflict with ModelOpt's).

`--vllm-python` names that environment's interpreter (default `.venv-vllm/bin/python`, made by
`scripts/setup_vllm_cpu.sh`). `VllmService` starts `vllm_worker.py serve` there once per test process: vLLM is
imported once, each engine is a process forked from it (its exit frees its memory), and every request has a
timeout, so a crash, SIGILL or hang fails one check with its reason and the next request starts a fresh server.

- `model_free_verdict`: vLLM's own ModelOpt config + Qwen2.5-VL name mapper + `is_layer_excluded`, per vLLM
  linear layer, cross-checked against the safetensors dtypes and the scheme's manifest. A BF16 layer that vLLM
  would treat as FP8 (a load that "works" and computes garbage), an FP8 layer it would leave unquantized (a
  load that fails), a rejected config or a split fused group is a problem naming the modules.
- Teacher-forced comparison (the verdict of a real load): the same fixed token sequences (the evaluation
  captions) go through vLLM (`prompt_logprobs`) and through the PyTorch reference of the same export
  (`export.load_export`); per position we compare the logprob of the actual next token and the top-1 token.
  The BF16 export, compared the same way in the same run, gives the noise floor of the two implementations;
  `decide` passes a scheme whose error stays within its bound x that floor (see NOISE_FACTOR). Greedy generation
  agreement is kept as an extra, reported metric (on random weights greedy tokens flip on kernel noise).
- `paired_speed`: vLLM throughput as users see it (CUDA graphs on a GPU), BF16 and the scheme alternating
  round by round on the same prompts, ratio = median of per-round ratios.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quantsuite.export import QUANTIZED_DTYPES, Fp8Linear, hub_name
from quantsuite.formats import to_fp8
from quantsuite.models import indexed_device
from quantsuite.timing import STAGE_TIMES

WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
HOW_TO_SET_UP = ("no vLLM environment: run `bash scripts/setup_vllm_cpu.sh` (CPU build into .venv-vllm) or pass "
                 "--vllm-python=/path/to/vllm-env/bin/python")  # fmt: skip
GREEDY_TOKENS = 12
PROMPTS = (  # fixed greedy-decoding prompts, each well over the 1-3 tokens that crash vLLM's CPU attention
    "A man riding a bicycle in a park",
    "Two dogs playing with a ball on",
    "A plate of food with broccoli and",
    "A red bus driving down a city street",
)
MIN_SEQUENCE_TOKENS = 5  # vLLM's CPU attention crashes (SIGILL) on prompts of 1-3 tokens
# The verdict: a scheme's teacher-forced logprob error against the PyTorch reference of its own checkpoint (with
# vLLM's fused-layer scales, `fuse_like_vllm`) may be at most its bound x the BF16 export's error measured the same
# way in the same run (FLOOR_MIN keeps a floor of ~0 from making the bound 0). The bound is the scheme's measured
# one (quantsuite.bounds, `vllm.error_ratio`); NOISE_FACTOR is what a scheme without one gets, on a device class
# without a record (reports/bounds/README.md gives the figures it came from).
NOISE_FACTOR = 16.0
FLOOR_MIN = 1e-3
FLOOR_MAX = 0.1  # the BF16 floor itself (nats): larger means vLLM's BF16 computes something else
TIMEOUT_S = {"verdict": 300, "open": 900, "score": 300, "generate": 300, "timed": 600, "close": 120}
TRANSIENT_PATTERNS = r"out of memory|OutOfMemory|less than desired GPU memory utilization|CUDA error"
# What this machine's hardware cannot run (not a fact about the export): the check skips here, nothing is cached.
UNSUPPORTED_HERE_PATTERNS = r"requires x86 with AVX-512 or AMX"


class VllmSetupError(ValueError):
    """A --vllm-python that cannot be used; the message names the fix."""


def resolve_vllm_python(option: str | None) -> Path | None:
    """The vLLM interpreter: --vllm-python or $QUANTSUITE_VLLM_PYTHON (must work: a bad one is an error), else
    .venv-vllm/bin/python if present, else None (the vLLM tests skip and say how to set one up)."""
    for source, candidate in (("--vllm-python", option), ("$QUANTSUITE_VLLM_PYTHON",
                                                          os.environ.get("QUANTSUITE_VLLM_PYTHON"))):  # fmt: skip
        if candidate:
            path = Path(candidate).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise VllmSetupError(
                    f"{source} {candidate}: no executable file there; pass the python of a vLLM environment "
                    "(e.g. .venv-vllm/bin/python from scripts/setup_vllm_cpu.sh)"
                )
            if vllm_version(path) == "unknown":
                raise VllmSetupError(
                    f"{source} {candidate}: this interpreter has no vllm (nor vllm-cpu) installed; pass the "
                    "python of the environment where vLLM is installed"
                )
            return path
    return DEFAULT_VLLM_PYTHON if DEFAULT_VLLM_PYTHON.is_file() else None


@functools.cache
def vllm_version(python: Path) -> str:
    """`vllm-cpu 0.32.0` or `vllm 0.26.0` (distribution name and version) of the vLLM environment."""
    script = ("import importlib.metadata as m\nfor name in ('vllm-cpu', 'vllm'):\n    try:\n        "
              "print(name, m.version(name)); break\n    except m.PackageNotFoundError: pass")  # fmt: skip
    try:
        completed = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return completed.stdout.strip() or "unknown"


def is_cpu_build(python: Path) -> bool:
    return vllm_version(python).startswith("vllm-cpu")


def is_transient(error: dict | None) -> bool:
    """Failures that are not facts about the export (timeout, crash, out of memory): never cached."""
    if not error:
        return False
    return error.get("type") in ("Timeout", "Crashed") or bool(
        re.search(TRANSIENT_PATTERNS, f"{error.get('type')} {error.get('key_line')}")
    )


def is_unsupported_here(error: dict | None) -> bool:
    """An error that says this machine cannot run the check, not that the export is wrong: an ISA the CPU build
    requires, or vLLM's inductor-compiled CPU ops failing under ATen's scalar kernel set (ATEN_CPU_CAPABILITY=default,
    which vLLM inherits; reports/bounds/README.md)."""
    if not error:
        return False
    if re.search(UNSUPPORTED_HERE_PATTERNS, str(error.get("key_line"))):
        return True
    return error.get("type") == "BackendCompilerFailed" and os.environ.get("ATEN_CPU_CAPABILITY") == "default"


def error_text(error: dict) -> str:
    return f"{error.get('stage')}: {error.get('type')}: {error.get('key_line')}"


# -- the service ------------------------------------------------------------------------------------------------
class VllmService:
    """One `vllm_worker.py serve` process (vLLM imported once); restarted after a timeout or a crash.

    >>> with VllmService(python, log_dir=Path("/tmp")) as service:     # doctest: +SKIP
    ...     with service.engine(export_dir, {"enforce_eager": True}) as engine:
    ...         engine.call("score", prompts=[[1, 2, 3, 4, 5]])
    """

    def __init__(self, python: Path, log_dir: Path, environment: dict[str, str] | None = None) -> None:
        self.python, self.log_dir = Path(python), Path(log_dir)
        self.environment = environment or {}
        self.process: subprocess.Popen | None = None
        self.replies = Path(tempfile.mkdtemp(prefix="quantsuite-vllm-"))
        self.log_path = self.log_dir / f"vllm-service-{os.getpid()}.log"
        self.requests = 0
        self.starts = 0

    def __enter__(self) -> VllmService:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        settings = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": os.environ.get("QUANTSUITE_VLLM_PYTHONPATH", "")}  # fmt: skip
        environment = os.environ | settings | self.environment
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(self.python), str(WORKER), "serve"], stdin=subprocess.PIPE,
                                            stdout=log, stderr=subprocess.STDOUT, env=environment,
                                            start_new_session=True)  # fmt: skip
        self.starts += 1

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # the server and every engine it forked
            self.process.wait()
        self.process = None

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.stdin.write(b'{"op": "exit"}\n')
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._stop()
        shutil.rmtree(self.replies, ignore_errors=True)

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.is_file() else 0

    def request(self, op: str, timeout: float | None = None, **payload) -> dict:
        """Send one request and wait for its reply; a timeout or a dead server is an error record."""
        starting = self.process is None or self.process.poll() is not None
        stage = f"vLLM {payload.get('method', op)}" + (" (starts the server: imports vLLM)" if starting else "")
        with STAGE_TIMES.measure(stage):
            return self._request(op, starting, timeout, **payload)

    def _request(self, op: str, starting: bool, timeout: float | None, **payload) -> dict:
        if starting:
            self._start()
        self.requests += 1
        reply = self.replies / f"{self.requests}.json"
        timeout = timeout or TIMEOUT_S.get(payload.get("method", op), 600)
        self.process.stdin.write((json.dumps({"op": op, "reply": str(reply), **payload}) + "\n").encode())
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while not reply.is_file():
            if self.process.poll() is not None:
                code = self.process.returncode
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                self.process = None
                return {"error": {"type": "Crashed", "stage": payload.get("method", op),
                                  "key_line": f"vLLM server ended ({how}); log: {self.log_path}"}}  # fmt: skip
            if time.monotonic() > deadline:
                self._stop()
                return {"error": {"type": "Timeout", "stage": payload.get("method", op),
                                  "key_line": f"vLLM did not answer {op} within {timeout:.0f} s"}}  # fmt: skip
            time.sleep(0.05)
        result = json.loads(reply.read_text())
        reply.unlink()
        return result

    def verdict(self, export_dir: Path) -> dict:
        return self.request("verdict", export=str(export_dir))

    def engine(self, export_dir: Path, options: dict, patch: bool = False, name: str | None = None) -> Engine:
        return Engine(self, Path(export_dir), options, patch, name or f"engine{self.requests}")


class Engine:
    """A vLLM engine process for one export; a context manager that frees itself (process exit)."""

    def __init__(self, service: VllmService, export_dir: Path, options: dict, patch: bool, name: str) -> None:
        self.service, self.export_dir, self.options, self.patch, self.name = service, export_dir, options, patch, name
        self.opened: dict = {}

    def __enter__(self) -> Engine:
        offset = self.service.log_offset()
        self.opened = self.service.request("open", engine=self.name, export=str(self.export_dir),
                                           options=self.options, patch=self.patch)  # fmt: skip
        log = self.service.log_since(offset)
        # "Selected CutlassFP8ScaledMMLinearKernel for ModelOptFp8LinearMethod", "Using MarlinNvFp4LinearKernel for
        # NVFP4 GEMM" (a weight-only kernel there means the checkpoint's activation quantization is not applied)
        self.opened["kernels"] = sorted(set(re.findall(r"(?:Selected|Using) (\w+Kernel\b[^\n]*)", log)))
        return self

    @property
    def error(self) -> dict | None:
        return self.opened.get("error")

    def call(self, method: str, **args) -> dict:
        if self.error:
            return {"error": self.error}
        return self.service.request("call", engine=self.name, method=method, args=args)

    def __exit__(self, *_exc) -> None:
        if not self.error and self.service.process is not None:
            self.service.request("close", engine=self.name)


# -- engine settings ------------------------------------------------------------------------------------------
CUDA_GRAPH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def memory_utilization(device: torch.device, share: float = 0.85, reserve_gib: float = 4.0) -> float:
    """A `gpu_memory_utilization` that fits what is free on `device` now (vLLM refuses to start when the
    requested share of the card exceeds the free memory): min(share, (free - reserve) / total)."""
    free, total = torch.cuda.mem_get_info(device)
    fitted = (free - reserve_gib * 2**30) / total
    if fitted < 0.1:
        raise MemoryError(f"only {free / 2**30:.1f} GiB free on {device}: not enough for a vLLM engine")
    return round(min(share, fitted), 3)


def engine_options(device: torch.device, purpose: str, share: float = 0.85) -> dict:
    """Engine arguments per backend: `check` (eager, small, engine core inside the engine process) or `speed`
    on a GPU as users run vLLM: CUDA graphs, and the engine core in a process of its own (vLLM's default; the
    worker pops `separate_engine_core`). Measured on an H200 with the core inside the engine process, batch-256
    BF16 output tokens/s moved 12.6k-24.1k between rounds: host-bound, scheduling serialized with the GPU work.
    The CPU build keeps it inside (its spawned processes would lack quantsuite's opt-in compatibility patch)."""
    options: dict = {"max_model_len": 512, "enforce_eager": True}
    if device.type == "cuda":
        options["gpu_memory_utilization"] = memory_utilization(device, share)
        if purpose == "speed":
            graphs = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": CUDA_GRAPH_SIZES}
            options |= {"enforce_eager": False, "max_num_seqs": 256, "compilation_config": graphs,
                        "separate_engine_core": True}  # fmt: skip
    return options


def pinned_environment(device: torch.device) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a vLLM process that must use `device` (the xdist worker's GPU) only."""
    if device.type != "cuda":
        return {}
    index = indexed_device(device).index
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",")[index] if visible else str(index)
    return {"CUDA_VISIBLE_DEVICES": physical}


# -- model-free verdict ---------------------------------------------------------------------------------------
def model_free_verdict(service: VllmService, export_dir: Path, manifest: dict) -> dict:
    """vLLM's per-layer reading of the export, and every disagreement with the disk and the manifest."""
    raw = service.verdict(export_dir)
    return {"vllm": raw, "problems": verdict_problems(raw, export_dir, manifest), "error": raw.get("error")}


def verdict_problems(raw: dict, export_dir: Path, manifest: dict) -> list[str]:
    if raw.get("error"):
        error = raw["error"]
        return [f"vLLM rejects the export: {error['type']}: {error['key_line']}"]
    problems = []
    manifest_quantized = {hub_name(m["name"]): m["format"] for m in manifest["modules"] if m["format"] != "BF16"}
    manifest_algorithms = {hub_name(m["name"]): m["quant_algo"] for m in manifest["modules"]}
    for layer in raw["layers"]:
        shards, disk = layer["shards"], layer["disk"]
        if layer.get("error"):
            problems.append(f"{layer['prefix']}: vLLM: {layer['error']['key_line']}")
            continue
        on_disk = [dtype in QUANTIZED_DTYPES for dtype in disk]
        if layer["quantized"] and not all(on_disk):
            bf16 = [s for s, quantized in zip(shards, on_disk, strict=True) if not quantized]
            problems.append(f"{layer['prefix']}: vLLM treats it as quantized but {bf16} are BF16 on disk "
                            "(loads with a warning and generates garbage)")  # fmt: skip
        if not layer["quantized"] and any(on_disk):
            algo = f" (MIXED_PRECISION layer algo {layer['algo']}, which vLLM has no linear method for)" if layer.get(
                "algo") else ""  # fmt: skip
            problems.append(f"{layer['prefix']}: vLLM leaves it unquantized but {shards} are quantized on disk "
                            f"(load fails: no parameter for the scales){algo}")  # fmt: skip
        wanted = {manifest_algorithms.get(shard) for shard in shards}
        if layer.get("algo") and layer["quantized"] and wanted != {layer["algo"]}:
            problems.append(f"{layer['prefix']}: vLLM reads {layer['algo']} from quantized_layers, the manifest "
                            f"says {sorted(map(str, wanted))}")  # fmt: skip
        for shard, quantized in zip(shards, on_disk, strict=True):
            if quantized != (shard in manifest_quantized) and not shard.startswith("visual."):
                problems.append(f"{shard}: {'quantized' if quantized else 'BF16'} on disk, manifest says "
                                f"{manifest_quantized.get(shard, 'BF16')}")  # fmt: skip
        if layer["prefix"].startswith("visual.") and layer["quantized"]:
            problems.append(f"{layer['prefix']}: vision layer treated as quantized by vLLM")
    wanted_kv, vllm_kv = manifest["totals"]["kv_cache_format"], raw.get("kv_cache")
    if (vllm_kv or "BF16") != wanted_kv:
        problems.append(f"KV cache: vLLM reads {vllm_kv or 'no'} KV-cache quantization from the export "
                        f"(kv_cache_quant_algo), the manifest says {wanted_kv}")  # fmt: skip
    config = json.loads((Path(export_dir) / "config.json").read_text())
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings"))
    if tied and "lm_head" in manifest_quantized:
        problems.append("lm_head: quantized in the export while config.json keeps tie_word_embeddings=true "
                        "(vLLM ties lm_head to the BF16 embeddings)")  # fmt: skip
    return problems


# -- teacher-forced comparison --------------------------------------------------------------------------------
def teacher_forced_sequences(tokenizer, captions: list[str], sequence_length: int) -> list[list[int]]:
    """Token ids of the evaluation captions (no padding), cut to `sequence_length`; the same for every scheme."""
    sequences = [tokenizer(caption)["input_ids"][:sequence_length] for caption in captions]
    return [ids for ids in sequences if len(ids) >= MIN_SEQUENCE_TOKENS]


def prompt_token_ids(tokenizer) -> list[list[int]]:
    ids = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    if min(map(len, ids)) < MIN_SEQUENCE_TOKENS:
        raise ValueError("vLLM's CPU attention crashes on prompts of 1-3 tokens; every prompt needs >= 5 tokens")
    return ids


FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@torch.no_grad()
def fuse_like_vllm(model: torch.nn.Module) -> int:
    """Give the reloaded export vLLM's fused-layer semantics: q/k/v and gate/up run as one GEMM with one weight
    scale and one input scale, so vLLM requantizes shards with a smaller weight scale to the group's max
    (dequantized in float16, rounded to FP8 again) and takes the max input scale. Returns the groups changed."""
    changed = 0
    for parent in model.modules():
        for group in FUSED_GROUPS:
            shards = [getattr(parent, name, None) for name in group]
            if not all(isinstance(shard, Fp8Linear) and shard.weight_scale.numel() == 1 for shard in shards):
                continue
            weight_scale = max(shard.weight_scale for shard in shards)
            input_scale = max(shard.input_scale for shard in shards)
            for shard in shards:
                if shard.weight_scale != weight_scale:
                    dequantized = shard.weight_fp8.to(torch.float16) * shard.weight_scale.to(torch.float16)
                    shard.weight_fp8.copy_(to_fp8(dequantized.float(), weight_scale))
                    shard.weight_scale.copy_(weight_scale)
                shard.input_scale.copy_(input_scale)
            changed += 1
    return changed


@torch.no_grad()
def reference_scores(model: torch.nn.Module, sequences: list[list[int]], device: torch.device) -> dict:
    """What `score` returns, computed by the PyTorch reference: per position, the logprob of the actual next
    token and the top-1 token."""
    results = []
    for ids in sequences:
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
        log_softmax = torch.log_softmax(logits, dim=-1)
        actual = log_softmax.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0]
        results.append({"actual_logprobs": actual.tolist(), "top1": logits.argmax(-1).tolist()})
    return {"sequences": results}


def teacher_forced(reference: dict, candidate: dict) -> dict:
    """Per-position agreement of vLLM with the reference: mean |logprob error| of the actual next tokens, its
    99th percentile, the share of positions with the same top-1 token, and each sequence's summed error (what
    `error_ratio_se` resamples)."""
    errors, same_top1, sums = [], [], []
    for ours, theirs in zip(reference["sequences"], candidate["sequences"], strict=True):
        sequence = [abs(a - b) for a, b in zip(ours["actual_logprobs"], theirs["actual_logprobs"], strict=True)]
        errors += sequence
        sums.append(sum(sequence))
        same_top1 += [a == b for a, b in zip(ours["top1"], theirs["top1"], strict=True)]
    ordered = sorted(errors)
    return {"logprob_mae": sum(errors) / len(errors), "logprob_p99": ordered[min(len(ordered) - 1,
            int(0.99 * len(ordered)))], "top1_agreement": sum(same_top1) / len(same_top1),
            "positions": len(errors), "sequence_error_sums": sums}  # fmt: skip


def error_ratio_se(metrics: dict, floor: dict, resamples: int = 2000) -> float:
    """Within-run standard error of the scheme's MAE / the floor's: both are measured on the same sequences, so
    whole sequences are resampled, paired (scipy's bootstrap, fixed seed). 0 where either lacks its sums."""
    from scipy.stats import bootstrap

    ours, theirs = metrics.get("sequence_error_sums"), floor.get("sequence_error_sums")
    if not ours or not theirs or len(ours) != len(theirs) or len(ours) < 2 or sum(theirs) == 0:
        return 0.0
    result = bootstrap((ours, theirs), lambda a, b, axis=-1: a.sum(axis) / b.sum(axis), paired=True,
                       vectorized=True, n_resamples=resamples, method="percentile", rng=0)  # fmt: skip
    return float(result.standard_error)


@dataclass(frozen=True)
class Decision:
    """A teacher-forced verdict against the BF16 noise floor."""

    compatible: bool
    error_ratio: float  # the scheme's logprob MAE / the floor's
    error_ratio_se: float  # its within-run standard error
    bound: float
    text: str


def decide(metrics: dict, floor: dict, bound: float = NOISE_FACTOR, source: str = "NOISE_FACTOR") -> Decision:
    """Compatible iff the scheme's logprob MAE <= bound x max(floor's MAE, FLOOR_MIN). `bound` is the scheme's
    (VllmChecks.bound: from measured spread where recorded, else NOISE_FACTOR); `source` says where from."""
    base = max(floor["logprob_mae"], FLOOR_MIN)
    ratio = metrics["logprob_mae"] / base
    se = error_ratio_se(metrics, floor) if floor["logprob_mae"] >= FLOOR_MIN else 0.0
    text = (f"teacher-forced logprob MAE {metrics['logprob_mae']:.4g} = {ratio:.2f}x (se {se:.2f}) the BF16 noise "
            f"floor {floor['logprob_mae']:.4g}, bound {bound:.3g}x ({source}); top-1 agreement "
            f"{metrics['top1_agreement']:.3f} (BF16 {floor['top1_agreement']:.3f})")  # fmt: skip
    return Decision(ratio <= bound, ratio, se, bound, text)


@torch.no_grad()
def reference_generate(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int,
                       device: torch.device) -> list[dict]:  # fmt: skip
    """Greedy decoding in PyTorch (no EOS stop, like the vLLM run) with the chosen tokens' logprobs."""
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        tokens, logprobs = [], []
        for _ in range(max_tokens):
            logits = model(input_ids=ids).logits[0, -1].float()
            log_softmax = torch.log_softmax(logits, dim=-1)
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(log_softmax[token]))
            ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
        outputs.append({"token_ids": tokens, "logprobs": logprobs})
    return outputs


def agreement(reference: list[dict], candidate: list[dict]) -> dict:
    """Token agreement of greedy outputs (reported, not decisive): matched prefix share (before the first
    divergence), position-wise share, mean |logprob difference| of the chosen tokens over the matched prefixes."""
    prefix, positional, differences = [], [], []
    for ours, theirs in zip(reference, candidate, strict=True):
        a, b = ours["token_ids"], theirs["token_ids"]
        matched = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(matched / len(a))
        positional.append(sum(x == y for x, y in zip(a, b, strict=False)) / len(a))
        differences += [abs(x - y) for x, y in zip(ours["logprobs"][:matched], theirs.get("logprobs", [])[:matched],
                                                    strict=False)]  # fmt: skip
    return {"prefix_agreement": sum(prefix) / len(prefix), "token_agreement": sum(positional) / len(positional),
            "logprob_mae": sum(differences) / len(differences) if differences else math.nan}  # fmt: skip


# -- speed ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """A fixed generation job: `prompts` x `max_tokens` new tokens (greedy, EOS ignored)."""

    name: str
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int


def workloads(tokenizer, captions: list[str], cuda: bool) -> tuple[Workload, Workload]:
    """(large batch, batch 1) on the same token stream for every scheme: GPU 256 x (128 in, 128 out) and
    1 x (128 in, 256 out); CPU (CI) 8 x (16 in, 16 out) and 1 x (16 in, 16 out): CPU figures are no speed claim,
    and on an AMX box vLLM's per-token FP8 path took 160 s of the CI's benchmark pass at 16 x (32 in, 32 out)."""
    stream: list[int] = []
    for caption in captions:
        stream += tokenizer(caption)["input_ids"]
    batch, prompt_tokens, new_tokens, single_tokens = (256, 128, 128, 256) if cuda else (8, 16, 16, 16)
    while len(stream) < batch * prompt_tokens:
        stream += stream
    prompts = tuple(tuple(stream[i * prompt_tokens : (i + 1) * prompt_tokens]) for i in range(batch))
    return (Workload(f"batch{batch}", prompts, new_tokens), Workload("batch1", prompts[:1], single_tokens))


def paired_speed(baseline: Engine, candidate: Engine, workload: Workload, rounds: int) -> dict:
    """Alternate baseline and candidate (ABBA order, one warm-up each); output tokens/s per round and the median
    of the per-round ratios candidate / baseline."""
    arguments = {"prompts": [list(p) for p in workload.prompts], "max_tokens": workload.max_tokens}
    per_round: dict[str, list[float]] = {"baseline": [], "candidate": []}
    for engine in (baseline, candidate):
        warm = engine.call("timed", **arguments)
        if warm.get("error"):
            return {"error": warm["error"]}
    for index in range(rounds):
        order = (("baseline", baseline), ("candidate", candidate))
        for label, engine in order if index % 2 == 0 else order[::-1]:
            timed = engine.call("timed", **arguments)
            if timed.get("error"):
                return {"error": timed["error"]}
            per_round[label].append(timed["output_tokens"] / timed["seconds"])
    ratios = [c / b for b, c in zip(per_round["baseline"], per_round["candidate"], strict=True)]
    batch = len(workload.prompts)
    return {"workload": workload.name, "batch": batch, "prompt_tokens": len(workload.prompts[0]),
            "new_tokens": workload.max_tokens, "rounds": rounds, "baseline_tokens_per_s": per_round["baseline"],
            "candidate_tokens_per_s": per_round["candidate"], "ratios": ratios, "ratio": statistics.median(ratios),
            "baseline_ms_per_token": 1000 * batch / statistics.median(per_round["baseline"]),
            "candidate_ms_per_token": 1000 * batch / statistics.median(per_round["candidate"])}  # fmt: skip
