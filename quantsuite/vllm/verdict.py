"""Does vLLM compute what an export means? The model-free verdict (vLLM's own reading of the checkpoint, layer by
layer, against the disk and the manifest), the PyTorch reference of the same export (with vLLM's fused-layer scales),
and the teacher-forced decision against the BF16 export's noise floor.

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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from quantsuite.checkpoint import QUANTIZED_DTYPES, Fp8Linear, hub_name
from quantsuite.data import model_inputs
from quantsuite.formats import to_fp8
from quantsuite.vllm.service import VllmService

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


# Sequences of one length per forward of the PyTorch reference, by device type; one at a time elsewhere. Grouping
# changes the GEMMs' shapes: it is on where test_grouping_the_reference_moves_it_by_less_than_a_tenth_of_the_noise_floor
# passes (reports/bounds/README.md, session 39), and off on CUDA, where that check failed (session 40).
REFERENCE_BATCH = {"cpu": 8}


def reference_batch(device: torch.device) -> int:
    """How many sequences of one length the reference runs in one forward on `device` (REFERENCE_BATCH)."""
    return REFERENCE_BATCH.get(device.type, 1)


def same_length_groups(sequences: list[list[int]], size: int) -> list[list[int]]:
    """Indices of `sequences` in groups of at most `size` sequences of one length: the reference runs a group as
    one forward without padding, so each row computes what it would alone; padding moves a row's logits (a GEMM
    of other shape: reports/bounds/README.md, session 39)."""
    by_length: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        by_length.setdefault(len(sequence), []).append(index)
    return [indices[start : start + size] for indices in by_length.values() for start in range(0, len(indices), size)]


def _row_scores(logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor | None = None) -> dict:
    """One sequence's score from its logits at positions 0..n-2 and its ids 0..n-1: the logprob of the actual
    next token and the top-1 token, at the positions `keep` marks (all where None)."""
    actual = torch.log_softmax(logits, dim=-1).gather(1, ids[1:, None])[:, 0]
    top1 = logits.argmax(-1)
    if keep is not None:
        actual, top1 = actual[keep], top1[keep]
    return {"actual_logprobs": actual.tolist(), "top1": top1.tolist()}


@torch.no_grad()
def reference_scores(model: torch.nn.Module, sequences: list[list[int]], device: torch.device,
                     batch: int | None = None) -> dict:  # fmt: skip
    """What `score` returns, computed by the PyTorch reference: per position, the logprob of the actual next
    token and the top-1 token; `batch` sequences of one length share a forward (`same_length_groups`; default
    `reference_batch(device)`)."""
    results: list[dict] = [{}] * len(sequences)
    for group in same_length_groups(sequences, batch or reference_batch(device)):
        ids = torch.tensor([sequences[index] for index in group], device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        for row, index in enumerate(group):
            results[index] = _row_scores(logits[row], ids[row])
    return {"sequences": results}


@torch.no_grad()
def reference_image_scores(model: torch.nn.Module, batches: list[dict], device: torch.device) -> dict:
    """`reference_scores` of image prompts (quantsuite.data.image_caption_batches), the image read through its
    pixels: per prompt, the logprob of the actual next token and the top-1 token at the caption's positions."""
    results = []
    for batch in batches:
        logits = model(**model_inputs(batch, device)).logits.float()
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            results.append(_row_scores(logits[row, : length - 1], batch["input_ids"][row, :length].to(device),
                                       batch["measure_mask"][row, : length - 1].to(device)))  # fmt: skip
    return {"sequences": results}


def at_positions(scores: dict, masks: list[list[bool]]) -> dict:
    """`score`'s answer kept at the positions each mask marks (the caption's positions of an image prompt)."""
    return {"sequences": [{key: [value for value, kept in zip(sequence[key], mask, strict=True) if kept]
                           for key in ("actual_logprobs", "top1")}
                          for sequence, mask in zip(scores["sequences"], masks, strict=True)]}  # fmt: skip


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
def reference_generate(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int, device: torch.device,
                       batch: int | None = None) -> list[dict]:  # fmt: skip
    """Greedy decoding in PyTorch (no EOS stop, like the vLLM run) with the chosen tokens' logprobs; `batch`
    prompts of one length decode together (as in `reference_scores`: they stay of one length)."""
    outputs: list[dict] = [{}] * len(prompts)
    for group in same_length_groups(prompts, batch or reference_batch(device)):
        ids = torch.tensor([prompts[index] for index in group], device=device)
        tokens: list[list[int]] = [[] for _ in group]
        logprobs: list[list[float]] = [[] for _ in group]
        for _ in range(max_tokens):
            logits = model(input_ids=ids).logits[:, -1].float()
            log_softmax = torch.log_softmax(logits, dim=-1)
            chosen = logits.argmax(-1)
            picked = log_softmax.gather(1, chosen[:, None])[:, 0]  # read from the device once a step, not per row
            for row, (token, logprob) in enumerate(zip(chosen.tolist(), picked.tolist(), strict=True)):
                tokens[row].append(token)
                logprobs[row].append(logprob)
            ids = torch.cat([ids, chosen[:, None]], dim=1)
        for row, index in enumerate(group):
            outputs[index] = {"token_ids": tokens[row], "logprobs": logprobs[row]}
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
