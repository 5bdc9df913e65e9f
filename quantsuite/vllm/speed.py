"""vLLM's speed as users see it: `paired_speed` runs BF16 and a scheme alternating round by round on the same
prompts (CUDA graphs on a GPU), ratio = median of per-round ratios, over `workloads` (a batch and batch 1).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from quantsuite.vllm.service import Engine


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
