"""vLLM's speed as users see it: `paired_speed` runs BF16 and a scheme alternating round by round on the same
prompts (CUDA graphs on a GPU), ratio = median of per-round ratios, over `workloads` (a batch and batch 1) and,
where the data has images, `image_workload` (image prompts, prefill-heavy); `timed_workloads` picks which.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from quantsuite.vllm.service import Engine


# -- speed ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """A fixed generation job: `prompts` x `max_tokens` new tokens (greedy, EOS ignored); with `images` (one
    prepared image file per prompt) each prompt is an image prompt whose image tokens are `image_token`."""

    name: str
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    images: tuple[str, ...] = ()
    image_token: int | None = None


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


def image_workload(image_inputs: dict, cuda: bool) -> Workload:
    """Image prompts (VllmChecks.image_inputs: the evaluation split's, each an image and its caption) cycled to a
    batch of GPU 256 / CPU 8, 8 / 4 new tokens each: prefill-heavy, the vision tower (BF16 in every scheme) and the
    LM's prefill over image and caption. Every round processes each image afresh (EngineCalls.timed)."""
    batch, new_tokens = (256, 8) if cuda else (8, 4)
    count = len(image_inputs["sequences"])
    picks = [index % count for index in range(batch)]
    return Workload(f"images{batch}", tuple(tuple(image_inputs["sequences"][i]) for i in picks), new_tokens,
                    tuple(image_inputs["images"][i] for i in picks), image_inputs["image_token"])  # fmt: skip


def timed_workloads(tokenizer, captions: list[str], image_inputs: dict | None, cuda: bool,
                    batches: bool = True) -> tuple[list[Workload], list[str]]:  # fmt: skip
    """(the workloads to time, the names of those left untimed): batch 1 always; the large batch and, where the data
    has images, the image prompts only with `batches` (the schemes $QUANTSUITE_VLLM_BATCH_SCHEMES names:
    quantsuite.bench.host_bound_schemes)."""
    large, single = workloads(tokenizer, captions, cuda)
    images = [image_workload(image_inputs, cuda)] if image_inputs else []
    if batches:
        return [large, single, *images], []
    return [single], [workload.name for workload in (large, *images)]


def paired_speed(baseline: Engine, candidate: Engine, workload: Workload, rounds: int) -> dict:
    """Alternate baseline and candidate (ABBA order); output tokens/s per round and the median of the per-round
    ratios candidate / baseline. Each engine first runs the workload once untimed, unless it already did (the BF16
    engine is kept for every scheme of a run)."""
    arguments = {"prompts": [list(p) for p in workload.prompts], "max_tokens": workload.max_tokens}
    if workload.images:
        arguments |= {"images": list(workload.images), "image_token": workload.image_token}
    per_round: dict[str, list[float]] = {"baseline": [], "candidate": []}
    for engine in (baseline, candidate):
        if workload.name in engine.warmed:
            continue
        warm = engine.call("timed", **arguments)
        if warm.get("error"):
            return {"error": warm["error"]}
        engine.warmed.add(workload.name)
    for index in range(rounds):
        order = (("baseline", baseline), ("candidate", candidate))
        for label, engine in order if index % 2 == 0 else order[::-1]:
            timed = engine.call("timed", **arguments)
            if timed.get("error"):
                return {"error": timed["error"]}
            per_round[label].append(timed["output_tokens"] / timed["seconds"])
    ratios = [c / b for b, c in zip(per_round["baseline"], per_round["candidate"], strict=True)]
    batch = len(workload.prompts)
    return {"workload": workload.name, "batch": batch, "prompt_tokens": statistics.mean(map(len, workload.prompts)),
            "images": len(workload.images),
            "new_tokens": workload.max_tokens, "rounds": rounds, "baseline_tokens_per_s": per_round["baseline"],
            "candidate_tokens_per_s": per_round["candidate"], "ratios": ratios, "ratio": statistics.median(ratios),
            "baseline_ms_per_token": 1000 * batch / statistics.median(per_round["baseline"]),
            "candidate_ms_per_token": 1000 * batch / statistics.median(per_round["candidate"])}  # fmt: skip
