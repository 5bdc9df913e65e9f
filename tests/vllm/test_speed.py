"""vLLM speed workloads (quantsuite/vllm/speed.py) and the requests the worker builds from them (no vLLM needed)."""

from __future__ import annotations

from PIL import Image

from quantsuite.vllm import worker
from quantsuite.vllm.speed import image_workload, timed_workloads

PAD = 7


def _image_inputs(tmp_path, count: int) -> dict:
    images = []
    for index in range(count):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (28, 28), (index * 40, 0, 0)).save(path)
        images.append(str(path))
    sequences = [[1, PAD, PAD, PAD, PAD, 2 + index, 3] for index in range(count)]
    return {"sequences": sequences, "images": images, "image_token": PAD}


def test_image_workload_cycles_the_image_prompts_to_a_batch(tmp_path):
    inputs = _image_inputs(tmp_path, 3)
    cpu, gpu = image_workload(inputs, cuda=False), image_workload(inputs, cuda=True)
    assert (len(cpu.prompts), cpu.max_tokens, len(gpu.prompts), gpu.max_tokens) == (8, 4, 256, 8)
    assert cpu.name == "images8" and cpu.image_token == PAD
    for index, (prompt, image) in enumerate(zip(cpu.prompts, cpu.images, strict=True)):
        assert list(prompt) == inputs["sequences"][index % 3] and image == inputs["images"][index % 3]


def test_timed_image_requests_are_new_to_every_vllm_cache(tmp_path):
    """A timed round must not reuse an earlier round's processed image, vision-tower output or prefix: each image
    gets an id of its own per call (multi_modal_uuids) and each request a prefix-cache salt; the image's tokens
    collapse to one pad, as in scoring. Text prompts go as they are."""
    inputs = _image_inputs(tmp_path, 2)
    first = worker.requests(inputs["sequences"], inputs["images"], PAD, fresh="round0")
    second = worker.requests(inputs["sequences"], inputs["images"], PAD, fresh="round1")
    assert [r["prompt_token_ids"] for r in first] == [[1, PAD, 2, 3], [1, PAD, 3, 3]]
    ids = [r["multi_modal_uuids"]["image"][0] for r in first + second]
    salts = [r["cache_salt"] for r in first + second]
    assert len(set(ids)) == len(set(salts)) == 4
    assert first[1]["multi_modal_data"]["image"].getpixel((0, 0)) == (40, 0, 0)
    scored = worker.requests(inputs["sequences"], inputs["images"], PAD)  # scoring: vLLM's own hashes
    assert all("multi_modal_uuids" not in r and "cache_salt" not in r for r in scored)
    assert worker.requests([[1, 2, 3]], None, None, fresh="x") == [{"prompt_token_ids": [1, 2, 3]}]


class _Engine:
    """Stands in for vllm.service.Engine: `timed` answers `rate` tokens/s and logs the call."""

    def __init__(self, name: str, rate: float, log: list) -> None:
        self.name, self.rate, self.log, self.warmed = name, rate, log, set()

    def call(self, method: str, **args) -> dict:
        self.log.append(self.name)
        return {"output_tokens": self.rate, "seconds": 1.0}


def test_a_kept_baseline_engine_is_warmed_once_per_workload():
    """Each engine runs a workload once untimed before its first timed round, the BF16 engine kept for every scheme
    only once per run; the rounds alternate ABBA and the ratio is the median per-round ratio."""
    from quantsuite.vllm.speed import Workload, paired_speed

    log: list[str] = []
    bf16, first, second = _Engine("bf16", 100.0, log), _Engine("a", 150.0, log), _Engine("b", 50.0, log)
    batch, single = Workload("batch8", ((1, 2, 3),) * 8, 4), Workload("batch1", ((1, 2, 3),), 4)
    assert paired_speed(bf16, first, batch, rounds=2)["ratio"] == 1.5
    assert log == ["bf16", "a", "bf16", "a", "a", "bf16"]  # warm-ups, then ABBA
    log.clear()
    assert paired_speed(bf16, second, batch, rounds=2)["ratio"] == 0.5
    assert log == ["b", "bf16", "b", "b", "bf16"]  # the kept BF16 engine ran this workload already
    log.clear()
    paired_speed(bf16, second, single, rounds=1)
    assert log == ["bf16", "b", "bf16", "b"]  # a workload new to both engines warms both


def test_the_batch_and_image_workloads_are_timed_only_where_asked(tmp_path):
    """Batch 1 (every scheme's decode speed) is always timed; the large batch and the image prompts, host-bound on an
    H200, only for the schemes $QUANTSUITE_VLLM_BATCH_SCHEMES names, and the others' result says which it left out."""
    def tokenizer(text):
        return {"input_ids": [3, 4, 5]}

    inputs = _image_inputs(tmp_path, 2)
    timed, untimed = timed_workloads(tokenizer, ["a caption"], inputs, cuda=False)
    assert ([w.name for w in timed], untimed) == (["batch8", "batch1", "images8"], [])
    timed, untimed = timed_workloads(tokenizer, ["a caption"], inputs, cuda=True, batches=False)
    assert ([w.name for w in timed], untimed) == (["batch1"], ["batch256", "images256"])
    timed, untimed = timed_workloads(tokenizer, ["a caption"], None, cuda=False, batches=False)
    assert ([w.name for w in timed], untimed) == (["batch1"], ["batch8"])
