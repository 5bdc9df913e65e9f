"""Models under test: the embedded tiny Qwen2.5-VL, a local directory of real weights, or the 3B shape.

`--model` takes one of
- `tiny` (default): a small Qwen2_5_VLForConditionalGeneration (8 LM layers, 2 vision blocks) with an
  in-project BPE tokenizer carrying Qwen2.5-VL's special tokens, trained for a few CPU minutes on the bundled
  captions and committed as a real HF directory (`quantsuite/assets/tiny-qwen2.5-vl`). Rebuild it with
  `python scripts/train_tiny.py` (deterministic from its seed).
- a local directory holding Qwen2.5-VL-3B-Instruct / 7B-Instruct (config.json + safetensors + tokenizer),
  loaded offline; models too large for one GPU load with `device_map="auto"`.
- `qwen2.5-vl-3b-shape` / `qwen2.5-vl-7b-shape`: the real 3B / 7B architecture (7B: untied lm_head, as
  released) with seeded random weights (GPU performance and scale runs); they use the tiny model's tokenizer,
  with the special-token ids in their config set to match.

Nothing here touches the network: a hub id without a local copy fails at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from quantsuite.timing import STAGE_TIMES

TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny-qwen2.5-vl"
SHAPE_3B = "qwen2.5-vl-3b-shape"
SHAPE_7B = "qwen2.5-vl-7b-shape"
SHAPES = {SHAPE_3B: "3b", SHAPE_7B: "7b"}  # --model name -> make_config shape
NAMED_MODELS = ("tiny", *SHAPES)
# Released architectures (config.json of Qwen2.5-VL-3B-Instruct / -7B-Instruct): text model, vision tower
# (hidden, depth, heads, intermediate, out_hidden = the text width), and whether lm_head is tied to the embedding.
ARCHITECTURES = {
    "3b": ({"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
            "intermediate_size": 11008, "vocab_size": 151936}, (1280, 32, 16, 3420, 2048), True),
    "7b": ({"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "intermediate_size": 18944, "vocab_size": 152064}, (1280, 32, 16, 3420, 3584), False),
}  # fmt: skip
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SUPPORTED_DTYPES = ("bfloat16",)  # export_hf_checkpoint(dtype=bf16) and load_export are bf16 end to end

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelSourceError(ValueError):
    """A --model / --device / --dtype value that cannot be used; the message names the fix."""


class SafetensorsHeaderError(ValueError):
    """A safetensors file whose header cannot be read or whose length disagrees with it."""


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"} from a safetensors header, validating the file's length."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise SafetensorsHeaderError(f"{path}: truncated safetensors file")
        size = int.from_bytes(raw, "little")
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SafetensorsHeaderError(f"{path}: corrupt safetensors header ({error})") from error
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if path.stat().st_size != 8 + size + end:
        raise SafetensorsHeaderError(f"{path}: {path.stat().st_size} bytes on disk, header says {8 + size + end}: "
                                     "truncated")  # fmt: skip
    return {key: entry for key, entry in header.items() if key != "__metadata__"}


def check_weight_files(source: Path, config: dict) -> None:
    """Every safetensors file of a model directory reads whole, and the token embedding has the config's shape."""
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"--model {source}: no *.safetensors weights next to config.json; copy the model's "
                               "weights (model*.safetensors) into it")  # fmt: skip
    text = config.get("text_config") or config
    expected = [text.get("vocab_size"), text.get("hidden_size")]
    for file in files:
        try:
            header = read_safetensors_header(file)
        except SafetensorsHeaderError as error:
            raise ModelSourceError(f"{error}; copy the model's weights again") from None
        for name, entry in header.items():
            if name.endswith("embed_tokens.weight") and None not in expected and entry["shape"] != expected:
                raise ModelSourceError(f"{file}: {name} has shape {entry['shape']}, but config.json says vocab_size "
                                       f"x hidden_size = {expected}; the weights and config.json are of different "
                                       "models")  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """What to load and where. `name` is `tiny`, `qwen2.5-vl-3b-shape` or a local directory."""

    name: str = "tiny"
    device: str = "auto"
    dtype: str = "bfloat16"
    seed: int = 0

    @property
    def tag(self) -> str:
        """Short name used in report paths: `tiny`, `qwen2.5-vl-3b-shape` or the model directory's name."""
        return self.name if self.name in NAMED_MODELS else Path(self.name).name

    def source_dir(self) -> Path:
        """Directory holding config / tokenizer for this model (the tiny one for the 3B shape)."""
        if self.name in NAMED_MODELS:
            return TINY_DIR
        path = Path(self.name).expanduser()
        if not (path / "config.json").is_file():
            hub_like = re.fullmatch(r"[\w.-]+/[\w.-]+", self.name) and not path.exists()
            where = f"no model directory at {path.absolute()}" + (" (a hub id?)" if hub_like else "")
            raise ModelSourceError(
                f"--model {self.name!r}: {where}; nothing is downloaded here. Pass a local directory with "
                f"config.json and safetensors (e.g. a copy of Qwen2.5-VL-3B-Instruct), or one of {NAMED_MODELS}"
            )
        return path

    def validate(self) -> None:
        """Every problem with --model / --device / --dtype at once, as a ModelSourceError naming the fix."""
        source = self.source_dir()
        if self.name not in NAMED_MODELS:
            config = json.loads((source / "config.json").read_text())
            kind, architectures = config.get("model_type"), config.get("architectures") or []
            if kind != "qwen2_5_vl" and "Qwen2_5_VLForConditionalGeneration" not in architectures:
                raise ModelSourceError(f"--model {self.name}: config.json says model_type {kind!r} {architectures}; "
                                       "the suite runs Qwen2.5-VL (model_type qwen2_5_vl), e.g. a local copy of "
                                       "Qwen2.5-VL-3B-Instruct")  # fmt: skip
            check_weight_files(source, config)
        if self.dtype not in SUPPORTED_DTYPES:
            supported = ", ".join(SUPPORTED_DTYPES)
            raise ModelSourceError(f"--dtype {self.dtype}: only {supported} is supported end to end (ModelOpt's "
                                   "export and the FP8 reload write and read bf16); leave --dtype out")  # fmt: skip
        self.torch_device()

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise ModelSourceError(f"--dtype {self.dtype!r}: use one of {sorted(DTYPES)}")
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ModelSourceError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelSourceError(f"--device {self.device}: no CUDA device is visible; use --device cpu")
        return torch.device(self.device)

    def fingerprint(self) -> str:
        """Identity of the weights: config + tokenizer + weight files (name, size, first MiB) + seed/dtype."""
        digest = hashlib.sha256(f"{self.name if self.name in NAMED_MODELS else 'path'}|{self.dtype}".encode())
        if self.name in SHAPES:
            digest.update(f"seed={self.seed}".encode())
        source = self.source_dir()
        for file in sorted(source.iterdir()):
            if file.is_file() and (file.suffix in (".json", ".safetensors", ".jinja", ".txt")):
                digest.update(file.name.encode() + file_identity(file))
        return digest.hexdigest()


WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole


def file_identity(path: Path) -> bytes:
    """What identifies a model file's content: a file up to WHOLE_FILE_BYTES, all of it (a tiny model retrained in
    one part only, its vision tower, must change it); a larger one (real weights, GBs), its size, modification time
    and 64 MiB-spaced samples of 64 KiB besides its first MiB (reading all of a 3B's 7.5 GB each run would cost
    seconds; a file rewritten in place gets a new modification time)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            return hashlib.sha256(handle.read()).digest()
        digest = hashlib.sha256(f"{size}:{path.stat().st_mtime_ns}".encode() + handle.read(1 << 20))
        for offset in range(1 << 20, size, 64 << 20):
            handle.seek(offset)
            digest.update(handle.read(64 << 10))
        return digest.digest()


def device_for_worker(device: str, worker: str, gpu_count: int) -> str:
    """The device of one pytest-xdist worker: with `auto` and several GPUs, worker gwN takes cuda:(N mod GPUs), so
    `-n <GPUs> --dist loadgroup` puts one scheme on each GPU; otherwise the device as given.

    >>> device_for_worker("auto", "gw3", 2)
    'cuda:1'
    """
    if device == "auto" and worker.startswith("gw") and worker[2:].isdigit() and gpu_count > 1:
        return f"cuda:{int(worker[2:]) % gpu_count}"
    return device


def indexed_device(device: torch.device) -> torch.device:
    """`cuda` as the CUDA device it means (`cuda:<current>`: where tensors placed on `cuda` land); others as given.

    >>> indexed_device(torch.device("cpu"))
    device(type='cpu')
    """
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The language model of a Qwen2.5-VL model (transformers 5: `model.language_model`; its decoder layers are
    `.layers`)."""
    return model.model.language_model


def clear_image_positions(model: torch.nn.Module) -> None:
    """Forget the M-RoPE offsets Qwen2.5-VL keeps from its last image prompt (`rope_deltas`): transformers adds them
    to the positions of every later forward on a KV cache without explicit positions, so a text decode after image
    prompts (a model calibrated or measured on them) would take their positions, or fail on their batch size."""
    for module in model.modules():
        if getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    source_dir: Path
    device: torch.device


def _vision_config(hidden: int, depth: int, heads: int, intermediate: int, out_hidden: int) -> dict:
    return {
        "depth": depth, "hidden_size": hidden, "num_heads": heads, "intermediate_size": intermediate,
        "out_hidden_size": out_hidden, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "window_size": 112, "fullatt_block_indexes": [depth - 1] if depth < 8 else [7, 15, 23, 31],
    }  # fmt: skip


def make_config(tokenizer, shape: str = "tiny"):
    """Qwen2_5_VLConfig for `tiny`, `3b` or `7b` (ARCHITECTURES), with special-token ids from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    if shape == "tiny":
        vocab = int(math.ceil(len(tokenizer) / 64) * 64)
        text = {
            "hidden_size": 128,
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 512,
            "vocab_size": vocab,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        }
        vision, tied = _vision_config(64, 2, 2, 128, 128), True
    else:
        text, vision_shape, tied = ARCHITECTURES[shape]
        text = text | {
            "max_position_embeddings": 128000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        }
        vision = _vision_config(*vision_shape)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}  # fmt: skip
    text |= {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
             "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
             "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"), "tie_word_embeddings": tied}  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]  # export needs it (is_multimodal_model)
    return config


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    """Byte-level BPE trained on `texts`, then Qwen2.5-VL's special tokens appended (ids after the BPE vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right",
        model_max_length=32768, extra_special_tokens={"image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_processor(tokenizer, directory: Path) -> None:
    """Write tokenizer + Qwen2.5-VL processor files (image/video processor configs, chat template).

    Written as plain JSON: transformers' video processor needs torchvision, which the CPU set-up lacks.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer.save_pretrained(directory)
    saved = json.loads((directory / "tokenizer.json").read_text())  # a tokenizer used with truncation saves it
    (directory / "tokenizer.json").write_text(json.dumps(saved | {"truncation": None, "padding": None},
                                                         indent=2, ensure_ascii=False))  # fmt: skip
    image = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2).to_dict()
    image |= {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    video = {
        key: image[key]
        for key in (
            "do_resize",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "image_mean",
            "image_std",
            "do_convert_rgb",
            "patch_size",
            "merge_size",
            "temporal_patch_size",
        )
    }
    video |= {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "min_pixels": 3136,
        "max_pixels": 12845056,
    }
    files = {
        "preprocessor_config.json": image,
        "video_preprocessor_config.json": video,
        "processor_config.json": {"processor_class": "Qwen2_5_VLProcessor"},
    }
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content, indent=2, sort_keys=True, default=str) + "\n")
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def load_image_processor(directory: Path):
    """The Qwen2-VL image processor of a model directory (its preprocessor_config.json), the PIL implementation:
    transformers' default one needs torchvision, which the CPU set-up lacks."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    settings = json.loads((Path(directory) / "preprocessor_config.json").read_text())
    return Qwen2VLImageProcessorPil(**{k: v for k, v in settings.items() if k not in ("image_processor_type",
                                                                                      "processor_class")})  # fmt: skip


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load the model in eval mode on the requested device (HF offline: no network is attempted)."""
    with STAGE_TIMES.measure("load the BF16 model"):
        return _load_model(spec)


def _load_model(spec: ModelSpec) -> LoadedModel:
    from transformers import Qwen2_5_VLForConditionalGeneration

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source, dtype, device = spec.source_dir(), spec.torch_dtype(), spec.torch_device()
    tokenizer = load_tokenizer(source)
    if spec.name in SHAPES:
        torch.manual_seed(spec.seed)
        with device:
            config = make_config(tokenizer, SHAPES[spec.name])
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    else:
        options: dict = {"dtype": dtype, "local_files_only": True}
        if device.type == "cuda" and spec.name not in NAMED_MODELS:
            options["device_map"] = "auto"  # spreads models larger than one GPU
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, **options)
        if "device_map" not in options:
            model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, spec, source, device)


def train_tiny(output_dir: Path = TINY_DIR, seed: int = 1234, steps: int = 600, log=print) -> dict:
    """Build and train the tiny model on the training split of the bundled captions; write it atomically.

    Returns `{"evaluation_perplexity", "uniform_perplexity", "steps"}`. Deterministic for a given seed, torch
    version and thread count (training runs in float32 on the CPU, weights are saved in bfloat16).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from quantsuite.data import DataConfig, load_splits, tokenize_batches

    torch.manual_seed(seed)
    splits = load_splits(DataConfig())
    tokenizer = build_tokenizer([caption.text for caption in splits.training])
    config = make_config(tokenizer, "tiny")
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    batches = tokenize_batches(splits.training, tokenizer, batch_size=16, sequence_length=64)
    train_steps(model, [batches], steps, 3e-3, seed, log)
    model.eval()
    model.to(torch.bfloat16)
    evaluation = tokenize_batches(splits.evaluation, tokenizer, batch_size=16, sequence_length=64)
    result = {
        "evaluation_perplexity": perplexity(model, evaluation),
        "uniform_perplexity": float(len(tokenizer)),
        "steps": steps,
        "seed": seed,
    }
    output_dir = Path(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        save_processor(tokenizer, staging)
        (staging / "training.json").write_text(json.dumps(result, indent=1) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.chmod(0o755)
        staging.rename(output_dir)
    finally:  # a failed save leaves no half-written copy next to the model (one was once committed)
        shutil.rmtree(staging, ignore_errors=True)
    return result


def train_steps(model: torch.nn.Module, sources: list[list[dict]], steps: int, max_lr: float, seed: int,
                log=print) -> None:  # fmt: skip
    """`steps` AdamW steps (one-cycle schedule up to `max_lr`, gradients clipped at 1) on the CPU, step i on a batch
    drawn from `sources[i % len(sources)]` (deterministic from `seed`); image prompts' M-RoPE offsets are cleared
    after each step."""
    from quantsuite.data import model_inputs

    optimizer = torch.optim.AdamW(model.parameters(), lr=max_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        batches = sources[step % len(sources)]
        batch = batches[int(torch.randint(len(batches), (1,), generator=generator))]
        loss = model(**model_inputs(batch, torch.device("cpu"), labels=True)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        clear_image_positions(model)
        if step % 100 == 0 or step >= steps - len(sources):
            log(f"step {step:4d} loss {loss.item():.3f}")


def train_tiny_vision(model_dir: Path = TINY_DIR, seed: int = 1234, steps: int = 400, log=print) -> dict:
    """Train the tiny model's vision tower and language model together on the training split of the bundled scenes
    (image prompts), alternating with text batches of the bundled captions' training split so that the language
    model keeps its text; rewrite the model in place, atomically.

    Returns (merged into training.json) the text evaluation perplexity after it, and the scenes' evaluation
    perplexity over the caption tokens when the model reads each caption with its own image, with another scene's
    image, with a blank grey image, and as text alone (`image_helps`: own image below each of the others).
    Deterministic for a given seed, torch version and thread count.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from quantsuite.data import DataConfig, image_caption_batches, load_image_splits, load_splits, tokenize_batches

    torch.manual_seed(seed)
    config = DataConfig()
    splits = load_image_splits(config)
    tokenizer, processor = load_tokenizer(model_dir), load_image_processor(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    size, length = config.image_size, config.sequence_length
    text = load_splits(config)
    image_batches = image_caption_batches(splits.training, tokenizer, processor, 16, length, size)
    text_batches = tokenize_batches(text.training, tokenizer, batch_size=16, sequence_length=64)
    train_steps(model, [image_batches, text_batches], steps, 2e-3, seed, log)
    model.eval()
    model.to(torch.bfloat16)
    figures = image_perplexities(model, tokenizer, processor, list(splits.evaluation), config)
    text_perplexity = perplexity(model, tokenize_batches(text.evaluation, tokenizer, batch_size=16, sequence_length=64))
    result = {"evaluation_perplexity": text_perplexity, "scenes_evaluation_perplexity": figures,
              "image_steps": steps, "image_seed": seed,
              "image_helps": all(figures["own_image"] < value for key, value in figures.items() if key != "own_image")}
    training = json.loads((Path(model_dir) / "training.json").read_text()) | result
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=Path(model_dir).parent))
    try:
        model.save_pretrained(staging)
        for path in Path(model_dir).iterdir():  # tokenizer and processor files as they were (unchanged here)
            if not (staging / path.name).exists():
                shutil.copy2(path, staging / path.name)
        (staging / "training.json").write_text(json.dumps(training, indent=1) + "\n")
        staging.chmod(0o755)
        backup = Path(model_dir).with_name(".tiny-previous")
        Path(model_dir).rename(backup)
        staging.rename(model_dir)
        shutil.rmtree(backup)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return training


def image_perplexities(model: torch.nn.Module, tokenizer, processor, captions: list, config) -> dict[str, float]:
    """Perplexity over the caption tokens of image `captions` (grouped by image, as the splits are) read with each
    caption's own image, with another image's (the next group's), with a blank grey image, and as text alone: what
    the model takes from the image (`config`: a DataConfig, for image size and sequence length)."""
    from quantsuite.data import image_caption_batches, prompt_image, tokenize_batches

    size, length = config.image_size, config.sequence_length
    images = list(dict.fromkeys(caption.image for caption in captions))  # each image once, in order
    another = [images[(images.index(caption.image) + 1) % len(images)] for caption in captions]

    def with_images(images: list[str]) -> float:
        chosen = [replace(caption, image=image) for caption, image in zip(captions, images, strict=True)]
        found = image_caption_batches(chosen, tokenizer, processor, 16, length, size)
        value = perplexity(model, found)
        clear_image_positions(model)
        return value

    with tempfile.TemporaryDirectory() as blank_dir:
        blank = Path(blank_dir) / "blank.png"
        prompt_image(captions[0].image, size).point(lambda _: 128).save(blank)
        return {"own_image": with_images([c.image for c in captions]), "another_image": with_images(another),
                "blank_image": with_images([str(blank)] * len(captions)),
                "text_alone": perplexity(model, tokenize_batches(captions, tokenizer, 16, length))}


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: list[dict]) -> float:
    """Token-weighted perplexity of `model` on causal-LM batches, image prompts included (padding and image tokens
    excluded by the labels)."""
    from quantsuite.data import model_inputs

    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for batch in batches:
        batch = model_inputs(batch, device, labels=True)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total_loss += float(model(**batch).loss) * tokens
        total_tokens += tokens
    return math.exp(total_loss / max(total_tokens, 1))
