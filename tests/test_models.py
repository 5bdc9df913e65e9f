"""The embedded tiny model carries signal, matches Qwen2.5-VL conventions, and model sources fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

from quantsuite.data import DataConfig, load_splits, tokenize_batches
from quantsuite.models import (
    SPECIAL_TOKENS,
    TINY_DIR,
    ModelSourceError,
    ModelSpec,
    device_for_worker,
    load_model,
    load_tokenizer,
    make_config,
    perplexity,
)  # fmt: skip


def test_tiny_is_a_real_hf_directory():
    config = json.loads((TINY_DIR / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "processor_config.json", "chat_template.jinja"):  # fmt: skip
        assert (TINY_DIR / name).is_file(), name


def test_the_bundled_tokenizer_cuts_nothing_it_is_not_asked_to():
    """Encodings without explicit settings keep every token, and --seq-len above 64 reaches the model. The
    tokenizers library applies the tokenizer.json's saved settings (transformers' own calls override them): a saved
    truncation of 64 once cut every image prompt that vLLM's processor encoded."""
    from quantsuite.data import Caption, tokenize_batches

    tokenizer = load_tokenizer(TINY_DIR)
    text = "a man riding a bicycle down a busy city street next to a red bus " * 10
    assert len(tokenizer.backend_tokenizer.encode(text).ids) > 100 and len(tokenizer(text)["input_ids"]) > 100
    (batch,) = tokenize_batches([Caption(1, 1, text)], tokenizer, batch_size=1, sequence_length=96)
    assert batch["input_ids"].shape[1] == 96


def test_tokenizer_special_tokens_match_config():
    tokenizer = load_tokenizer(TINY_DIR)
    config = json.loads((TINY_DIR / "config.json").read_text())
    for key, token in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ):
        assert config[key] == tokenizer.convert_tokens_to_ids(token), key  # fmt: skip
    assert all(token in tokenizer.get_vocab() for token in SPECIAL_TOKENS)
    assert len(tokenizer) <= config["text_config"]["vocab_size"]


def test_tiny_held_out_perplexity_far_below_uniform():
    """Measured 4.3 on the evaluation split (uniform: 911); the bound 20 leaves a wide margin for numerics
    while a random or broken model (~900) fails it by far."""
    loaded = load_model(ModelSpec("tiny", device="cpu"))
    splits = load_splits(DataConfig())
    batches = tokenize_batches(splits.evaluation, loaded.tokenizer, 16, 64)
    assert perplexity(loaded.model, batches) < 20.0 < len(loaded.tokenizer) / 40


def test_3b_shape_config_matches_qwen25_vl_3b():
    config = make_config(load_tokenizer(TINY_DIR), "3b")
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (2048, 36, 16, 2, 11008, 151936)  # fmt: skip
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and config.tie_word_embeddings
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.intermediate_size) == (
        32,
        1280,
        2048,
        3420,
    )


def test_7b_shape_config_matches_qwen25_vl_7b():
    """The released 7B architecture: 28 layers of width 3584, 4 KV heads, untied lm_head, 8.29B parameters
    (counted on the meta device: nothing is allocated)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = make_config(load_tokenizer(TINY_DIR), "7b")
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 18944, 152064)  # fmt: skip
    assert not config.tie_word_embeddings and vision.out_hidden_size == 3584 and vision.depth == 32
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.29


@pytest.mark.parametrize("name,message", [
    ("Qwen/Qwen2.5-VL-3B-Instruct", r"no model directory at .*Qwen2.5-VL-3B-Instruct \(a hub id\?\); nothing is "
                                    r"downloaded here. Pass a local directory"),
    ("/nonexistent/dir", r"'/nonexistent/dir': no model directory at /nonexistent/dir; nothing is downloaded"),
])  # fmt: skip
def test_unknown_model_source_fails_at_once(name, message):
    with pytest.raises(ModelSourceError, match=message):
        ModelSpec(name).validate()


def test_model_that_is_not_qwen2_5_vl_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ModelSourceError, match=r"model_type 'llama' \['LlamaForCausalLM'\]; the suite runs Qwen2.5-VL"):
        ModelSpec(str(tmp_path)).validate()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_dtypes_other_than_bf16_are_refused_up_front(dtype):
    """Export and reload are bf16 end to end: another dtype used to be accepted and silently ignored there."""
    with pytest.raises(ModelSourceError, match=f"--dtype {dtype}: only bfloat16 is supported end to end"):
        ModelSpec(dtype=dtype).validate()


def test_bad_device_and_dtype():
    with pytest.raises(ModelSourceError, match="--dtype 'int3': use one of"):
        ModelSpec(dtype="int3").torch_dtype()
    with pytest.raises(ModelSourceError, match="--device 'tpu'"):
        ModelSpec(device="tpu").torch_device()


def test_fingerprint_tracks_identity(tmp_path):
    local = tmp_path / "copy"
    local.mkdir()
    for file in TINY_DIR.iterdir():
        (local / file.name).write_bytes(file.read_bytes())
    assert ModelSpec(str(local)).fingerprint() == ModelSpec(str(local)).fingerprint()
    assert ModelSpec("tiny").fingerprint() != ModelSpec("qwen2.5-vl-3b-shape").fingerprint()
    before = ModelSpec(str(local)).fingerprint()
    (local / "config.json").write_text((local / "config.json").read_text() + " ")
    assert ModelSpec(str(local)).fingerprint() != before


@pytest.mark.parametrize(
    ("device", "worker", "gpus", "expected"),
    [("auto", "gw0", 2, "cuda:0"), ("auto", "gw3", 2, "cuda:1"), ("auto", "gw5", 4, "cuda:1"),
     ("auto", "gw1", 1, "auto"), ("auto", "", 4, "auto"), ("cuda:1", "gw0", 4, "cuda:1"), ("cpu", "gw2", 4, "cpu")],
)  # fmt: skip
def test_one_scheme_per_gpu_worker_mapping(device, worker, gpus, expected):
    assert device_for_worker(device, worker, gpus) == expected


def test_train_tiny_leaves_nothing_behind_when_saving_fails(tmp_path, monkeypatch):
    """A failed save used to leave `.tiny-*` next to the model (a 4.7 MB copy was once committed)."""
    from quantsuite import models

    def broken_save(tokenizer, directory):
        raise OSError("disk full")

    monkeypatch.setattr(models, "save_processor", broken_save)
    with pytest.raises(OSError, match="disk full"):
        models.train_tiny(tmp_path / "tiny", steps=1, log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_sees_a_change_anywhere_in_the_weights(tmp_path, monkeypatch):
    """The tiny model retrained in its vision tower only changed bytes past the first MiB of model.safetensors, which
    the fingerprint once read alone: a small file is hashed whole; a large one (real weights) by size, modification
    time and samples, so a file rewritten in place changes it too."""
    from quantsuite import models

    local = tmp_path / "copy"
    local.mkdir()
    for file in TINY_DIR.iterdir():
        (local / file.name).write_bytes(file.read_bytes())
    weights = local / "model.safetensors"
    before = ModelSpec(str(local)).fingerprint()
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # a bit in the last tensor
    weights.write_bytes(bytes(data))
    changed = ModelSpec(str(local)).fingerprint()
    assert changed != before
    monkeypatch.setattr(models, "WHOLE_FILE_BYTES", 1 << 20)  # the large-file path on the same files
    large = ModelSpec(str(local)).fingerprint()
    assert large == ModelSpec(str(local)).fingerprint()
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))  # rewritten in place: a new modification time
    assert ModelSpec(str(local)).fingerprint() != large


IMAGE_CONTENT_NATS_MIN = 0.08  # per caption token; source: reports/image-prompts-tiny-cpu/README.md ("The tiny model")


def test_the_tiny_model_reads_its_images():
    """Issue 25's tiny default that actually looks: on the held-out scenes, a caption read with its own image must be
    more predictable than with another scene's image by IMAGE_CONTENT_NATS_MIN per caption token (what the image's
    content is worth to it), and than with a blank image or none. The untrained tower fails it: it took only the
    presence of an image, not its content."""
    import math

    from quantsuite.data import DataConfig, load_image_splits
    from quantsuite.models import image_perplexities, load_image_processor, load_model, load_tokenizer

    loaded = load_model(ModelSpec("tiny", device="cpu"))
    splits = load_image_splits(DataConfig())
    figures = image_perplexities(loaded.model, load_tokenizer(TINY_DIR), load_image_processor(TINY_DIR),
                                 list(splits.evaluation), DataConfig())  # fmt: skip
    assert all(figures["own_image"] < value for name, value in figures.items() if name != "own_image"), figures
    assert math.log(figures["another_image"] / figures["own_image"]) >= IMAGE_CONTENT_NATS_MIN, figures
