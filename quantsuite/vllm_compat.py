"""Does vLLM load an export, and does it run it correctly? Always answered by real vLLM, in a subprocess.

vLLM lives in its own environment (its torch / transformers pins conflict with ModelOpt's): `--vllm-python`
points at its interpreter (default `.venv-vllm/bin/python`, made by `scripts/setup_vllm_cpu.sh`). Every call
runs `vllm_worker.py` there with a timeout, so a crash, SIGILL or hang fails one check with its reason.

- `model_free_verdicts`: vLLM's own ModelOpt config + Qwen2.5-VL name mapper + `is_layer_excluded`, per vLLM
  linear layer, cross-checked here against the safetensors dtypes and the scheme's manifest. A BF16 layer that
  vLLM would treat as FP8 (a load that "works" and generates garbage), an FP8 layer it would leave
  unquantized (a load that fails), a rejected config or a split fused group is a problem naming the modules.
- `vllm_generate`: `LLM(..., quantization="modelopt", enforce_eager=True)` + greedy decoding with logprobs,
  unpatched or with the opt-in `vllm_cpu_fp8_compat` layer (`patched=True`); `agreement` compares it with the
  PyTorch reference of the same checkpoint (`reference_generate` on `export.load_export`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from quantsuite.export import hub_name

WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
WORKER_FILES = (WORKER, WORKER.with_name("vllm_cpu_fp8_compat.py"))
MAX_NEW_TOKENS = 12
# Greedy matched-prefix agreement with the PyTorch reference of the same checkpoint that counts as "runs
# correctly". Measured on the tiny model with vllm-cpu 0.32.0 + compat layer: 0.88 (FP8 KV cache) to 1.0; a
# garbage load (BF16 layers read as FP8) scores far below.
PREFIX_AGREEMENT_MIN = 0.75
PROMPTS = (  # fixed greedy-decoding prompts, each well over the 1-3 tokens that crash vLLM's CPU attention
    "A man riding a bicycle in a park",
    "Two dogs playing with a ball on",
    "A plate of food with broccoli and",
    "A red bus driving down a city street",
)
DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
MARKER = "QUANTSUITE_RESULT "
HOW_TO_SET_UP = ("no vLLM environment: run `bash scripts/setup_vllm_cpu.sh` (CPU build into .venv-vllm) or pass "
                 "--vllm-python /path/to/vllm-env/bin/python")  # fmt: skip


def prompt_token_ids(tokenizer) -> list[list[int]]:
    ids = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    if min(map(len, ids)) < 5:
        raise ValueError("vLLM's CPU attention crashes on prompts of 1-3 tokens; every prompt needs >= 5 tokens")
    return ids


def find_vllm_python(option: str | None) -> Path | None:
    """The vLLM interpreter: --vllm-python, $QUANTSUITE_VLLM_PYTHON, or .venv-vllm/bin/python if present."""
    for candidate in (option, os.environ.get("QUANTSUITE_VLLM_PYTHON"), str(DEFAULT_VLLM_PYTHON)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def run_worker(python: Path, arguments: list[str], timeout: float) -> dict:
    """Run vllm_worker.py in the vLLM environment; a crash or timeout becomes an error record, not an exception."""
    environment = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}  # fmt: skip
    try:
        completed = subprocess.run([str(python), str(WORKER), *arguments], capture_output=True, text=True,
                                   timeout=timeout, env=environment)  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stderr or b"")[-2000:] if isinstance(expired.stderr, bytes) else (expired.stderr or "")[-2000:]
        return {"error": {"type": "Timeout", "key_line": f"vLLM did not finish within {timeout:.0f} s",
                          "stage": "worker", "log_tail": str(tail)}}  # fmt: skip
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER) :])
            log = (completed.stdout + completed.stderr).splitlines()
            selected = {line.split("Selected ", 1)[1].strip() for line in log if "Selected " in line}
            result["kernels"] = sorted(kernel for kernel in selected if "Kernel" in kernel)
            return result
    signal = f" (signal {-completed.returncode})" if completed.returncode < 0 else ""
    key_line = f"vLLM exited with code {completed.returncode}{signal} before reporting"
    return {"error": {"type": "Crashed", "stage": "worker", "key_line": key_line, "log_tail": completed.stderr[-3000:]}}


@functools.cache
def vllm_version(python: Path) -> str:
    """`vllm-cpu 0.32.0` or `vllm 0.26.0` (distribution name and version) of the vLLM environment."""
    script = ("import importlib.metadata as m\nfor name in ('vllm-cpu', 'vllm'):\n    try:\n        "
              "print(name, m.version(name)); break\n    except m.PackageNotFoundError: pass")  # fmt: skip
    completed = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120)
    return completed.stdout.strip() or "unknown"


def is_cpu_build(python: Path) -> bool:
    return vllm_version(python).startswith("vllm-cpu")


def model_free_verdict(python: Path, export_dir: Path, manifest: dict, timeout: float = 300) -> dict:
    """vLLM's per-layer reading of the export, and every disagreement with the disk and the manifest."""
    raw = run_worker(python, ["verdict", str(export_dir)], timeout)
    return {"vllm": raw, "problems": verdict_problems(raw, export_dir, manifest)}


def verdict_problems(raw: dict, export_dir: Path, manifest: dict) -> list[str]:
    if raw.get("error"):
        error = raw["error"]
        return [f"vLLM rejects the export: {error['type']}: {error['key_line']}"]
    problems = []
    manifest_fp8 = {hub_name(m["name"]) for m in manifest["modules"] if m["format"] != "BF16"}
    for layer in raw["layers"]:
        shards, disk = layer["shards"], layer["disk"]
        if layer.get("error"):
            problems.append(f"{layer['prefix']}: vLLM: {layer['error']['key_line']}")
            continue
        on_disk_fp8 = [dtype == "F8_E4M3" for dtype in disk]
        if layer["fp8"] and not all(on_disk_fp8):
            bf16 = [s for s, fp8 in zip(shards, on_disk_fp8, strict=True) if not fp8]
            problems.append(f"{layer['prefix']}: vLLM treats it as FP8 but {bf16} are BF16 on disk "
                            "(loads with a warning and generates garbage)")  # fmt: skip
        if not layer["fp8"] and any(on_disk_fp8):
            problems.append(f"{layer['prefix']}: vLLM leaves it unquantized but {shards} are FP8 on disk "
                            "(load fails: no parameter for input_scale)")  # fmt: skip
        for shard, fp8 in zip(shards, on_disk_fp8, strict=True):
            if fp8 != (shard in manifest_fp8) and not shard.startswith("visual."):
                problems.append(f"{shard}: {'FP8' if fp8 else 'BF16'} on disk, manifest says "
                                f"{'FP8' if shard in manifest_fp8 else 'BF16'}")  # fmt: skip
        if layer["prefix"].startswith("visual.") and layer["fp8"]:
            problems.append(f"{layer['prefix']}: vision layer treated as FP8 by vLLM")
    config = json.loads((Path(export_dir) / "config.json").read_text())
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings"))
    if tied and "lm_head" in manifest_fp8:
        problems.append("lm_head: FP8 in the export while config.json keeps tie_word_embeddings=true "
                        "(vLLM ties lm_head to the BF16 embeddings)")  # fmt: skip
    return problems


def vllm_generate(python: Path, export_dir: Path, prompts: list[list[int]], max_tokens: int, patched: bool,
                  timeout: float = 600, throughput: bool = False) -> dict:  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(prompts, handle)
    try:
        flags = [*(["--patch"] if patched else []), *(["--throughput"] if throughput else [])]
        arguments = ["generate", str(export_dir), handle.name, str(max_tokens), *flags]
        return run_worker(python, arguments, timeout)
    finally:
        os.unlink(handle.name)


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
    """Token agreement of greedy outputs: matched prefix share (before the first divergence) and position-wise
    share; mean |logprob difference| of the chosen tokens over the matched prefixes."""
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
