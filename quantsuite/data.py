"""Calibration, scoring and evaluation data from COCO captions annotation files, with or without their images.

Reads the real `captions_train2017.json` format (`{"annotations": [{"image_id", "id", "caption"}], "images":
[{"id", "file_name"}]}`) or the bundled corpus in the same format (`quantsuite/assets/captions_bundled.json`, the
default, text only). Captions are split by image, deterministically from a seed, into disjoint evaluation / scoring
/ calibration / training parts, so no image's captions leak from the held-out evaluation split into the data that
chose the scheme.

Image prompts (`load_image_splits`, `image_caption_batches`): with `--images-dir` each caption's image is its
`file_name` under that folder, COCO's own layout; without `--calib-data` they come from the bundled generated
scenes (`quantsuite.scenes`); a captions file without `--images-dir` is text only. Every image a split uses is
opened at start-up, and a missing or unreadable one is one error naming the file.

    >>> config = DataConfig(calibration_samples=32, scoring_samples=32, evaluation_samples=32)
    >>> splits = load_splits(config)
    >>> len(splits.calibration), len(splits.scoring), len(splits.evaluation)
    (32, 32, 32)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

BUNDLED_CAPTIONS = Path(__file__).resolve().parent / "assets" / "captions_bundled.json"
BUNDLED_SCENES = Path(__file__).resolve().parent / "assets" / "scenes"  # quantsuite.scenes writes it
IGNORE_INDEX = -100  # label value the causal-LM loss skips (padding)


class CaptionDataError(ValueError):
    """A captions file or a data setting that cannot be used; the message names the fix."""


@dataclass(frozen=True)
class Caption:
    image_id: int
    annotation_id: int
    text: str
    image: str | None = None  # its image file (resolved under an images folder); None: text only


@dataclass(frozen=True)
class DataConfig:
    """Where the captions come from and how much of them each stage uses (counts are captions)."""

    path: str | None = None  # None: the bundled corpus
    images_dir: str | None = None  # the folder of `path`'s images (COCO layout: images[].file_name under it)
    image_size: int = 112  # image prompts: each image resized to this many pixels per side (112: 16 image tokens)
    seed: int = 0
    batch_size: int = 8
    sequence_length: int = 64
    calibration_samples: int = 64
    scoring_samples: int = 64
    evaluation_samples: int = 64

    @property
    def source(self) -> Path:
        return Path(self.path) if self.path else BUNDLED_CAPTIONS

    @property
    def image_source(self) -> tuple[Path, Path] | None:
        """(captions file, images folder) of the image prompts: `path` with `images_dir`, the bundled scenes
        without `path`; None for a captions file without an images folder (text only)."""
        if self.images_dir:
            return self.source, Path(self.images_dir)
        return None if self.path else (BUNDLED_SCENES / "captions.json", BUNDLED_SCENES / "images")


@dataclass(frozen=True)
class CaptionSplits:
    """Disjoint caption splits; `training` is everything left (used only to train the tiny model)."""

    evaluation: tuple[Caption, ...]
    scoring: tuple[Caption, ...]
    calibration: tuple[Caption, ...]
    training: tuple[Caption, ...]
    fingerprint: str  # sha256 over the texts of every split and the settings that made them


def load_captions(path: str | Path, images_dir: str | Path | None = None) -> list[Caption]:
    """Read a COCO captions annotation file; every problem is one error naming the file and the field. With
    `images_dir`, each caption carries its image's path (`images[].file_name` under it; not opened here)."""
    path = Path(path)
    if not path.is_file():
        raise CaptionDataError(
            f"--calib-data: {path} does not exist; pass a COCO captions file such as "
            "annotations/captions_train2017.json, or leave the option out for the bundled corpus"
        )
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CaptionDataError(f"{path}: not valid JSON ({error}); expected a COCO captions file") from error
    annotations = document.get("annotations") if isinstance(document, dict) else None
    if not isinstance(annotations, list) or not annotations:
        raise CaptionDataError(
            f'{path}: expected a COCO captions file with a non-empty "annotations" list of '
            '{"image_id", "id", "caption"} objects'
        )
    captions = []
    for index, annotation in enumerate(annotations):
        try:
            text = " ".join(str(annotation["caption"]).split())
            captions.append(Caption(int(annotation["image_id"]), int(annotation["id"]), text))
        except (KeyError, TypeError, ValueError) as error:
            raise CaptionDataError(
                f'{path}: annotations[{index}] needs integer "image_id" and "id" and a "caption" string ({error!r})'
            ) from error
    empty = [index for index, caption in enumerate(captions) if not caption.text]
    if empty:
        raise CaptionDataError(f"{path}: {len(empty)} of {len(captions)} captions are empty (annotations{empty[:5]}"
                               f"{'...' if len(empty) > 5 else ''}); give them text or remove them")  # fmt: skip
    return captions if images_dir is None else _with_images(captions, document, path, Path(images_dir))


def _with_images(captions: list[Caption], document: dict, path: Path, images_dir: Path) -> list[Caption]:
    if not images_dir.is_dir():
        raise CaptionDataError(f"--images-dir: {images_dir} is not a folder; pass the folder of {path.name}'s images "
                               "(COCO layout: e.g. train2017/ beside annotations/)")  # fmt: skip
    images = document.get("images")
    if not isinstance(images, list):
        raise CaptionDataError(f'{path}: no "images" list of {{"id", "file_name"}} objects, so --images-dir cannot '
                               "resolve the captions' images; use COCO's captions file, which has one")  # fmt: skip
    try:
        names = {int(image["id"]): str(image["file_name"]) for image in images}
    except (KeyError, TypeError, ValueError) as error:
        raise CaptionDataError(f'{path}: every images[] entry needs an integer "id" and a "file_name" '
                               f"({error!r})") from error  # fmt: skip
    missing = sorted({c.image_id for c in captions} - set(names))
    if missing:
        raise CaptionDataError(f"{path}: image_id {missing[:5]} of its annotations have no images[] entry "
                               f"({len(missing)} in all); add them or remove those captions")  # fmt: skip
    return [replace(caption, image=str(images_dir / names[caption.image_id])) for caption in captions]


def check_images(captions: tuple[Caption, ...] | list[Caption], source: Path) -> None:
    """Open every image `captions` use (once each); a missing or unreadable one is a CaptionDataError naming it."""
    from PIL import Image, UnidentifiedImageError

    problems = []
    for file in sorted({caption.image for caption in captions if caption.image}):
        try:
            with Image.open(file) as image:
                image.verify()
        except (OSError, UnidentifiedImageError) as error:
            problems.append(f"{file}: {type(error).__name__}: {error}")
    if problems:
        raise CaptionDataError(f"{source}: {len(problems)} image(s) under --images-dir cannot be read, e.g.\n  "
                               + "\n  ".join(problems[:5]) + "\nput the files there (COCO layout: images[].file_name "
                               "under the folder) or point --images-dir at the right folder")  # fmt: skip


def _take_images(groups: list[list[Caption]], start: int, count: int) -> tuple[tuple[Caption, ...], int]:
    """Take whole images from `groups[start:]` until `count` captions are collected (the last image trimmed)."""
    taken: list[Caption] = []
    while len(taken) < count and start < len(groups):
        taken.extend(groups[start][: count - len(taken)])
        start += 1
    return tuple(taken), start


def split_captions(captions: list[Caption], config: DataConfig, source: Path | None = None) -> CaptionSplits:
    """Split by image into evaluation, scoring, calibration, training (in that order of priority)."""
    source = source or config.source
    by_image: dict[int, list[Caption]] = {}
    for caption in sorted(captions, key=lambda c: c.annotation_id):
        by_image.setdefault(caption.image_id, []).append(caption)

    def order(image_id: int) -> str:
        return hashlib.sha256(f"{config.seed}:{image_id}".encode()).hexdigest()

    groups = [by_image[image_id] for image_id in sorted(by_image, key=order)]
    wanted = config.evaluation_samples + config.scoring_samples + config.calibration_samples
    if len(captions) < wanted:
        raise CaptionDataError(
            f"{source}: {len(captions)} captions, but evaluation + scoring + calibration samples ask "
            f"for {wanted}; lower --eval-samples / --score-samples / --calib-samples"
        )
    evaluation, position = _take_images(groups, 0, config.evaluation_samples)
    scoring, position = _take_images(groups, position, config.scoring_samples)
    calibration, position = _take_images(groups, position, config.calibration_samples)
    training = tuple(caption for group in groups[position:] for caption in group)
    settings = asdict(config) | {"path": str(source.name), "images_dir": None}
    if not any(caption.image for caption in captions):
        settings.pop("image_size"), settings.pop("images_dir")  # text only: the image settings change nothing
    digest = hashlib.sha256(json.dumps(settings).encode())
    for part in (evaluation, scoring, calibration, training):
        digest.update(b"\x00".join(caption.text.encode() for caption in part) + b"\x01")
        for image in (caption.image for caption in part if caption.image):  # the images' names and sizes
            digest.update(f"{Path(image).name}:{Path(image).stat().st_size}".encode() if Path(image).is_file() else b"")
    return CaptionSplits(evaluation, scoring, calibration, training, digest.hexdigest())


def drawn_captions(splits: CaptionSplits, samples: int, seed: int) -> tuple[Caption, ...]:
    """`samples` captions drawn at random (by `seed`) from the scoring and training splits: the pool a study that
    varies the scoring data draws from (never the evaluation or calibration captions)."""
    pool = splits.scoring + splits.training
    require_samples("scoring + training", samples, len(pool), "a score-size study")
    return tuple(sorted(pool, key=lambda c: hashlib.sha256(f"{seed}:{c.annotation_id}".encode()).hexdigest())[:samples])


SAMPLE_OPTIONS = {"calibration": "--calib-samples", "scoring": "--score-samples", "evaluation": "--eval-samples"}


def require_samples(split: str, wanted: int, held: int, who: str = "a scheme") -> None:
    """A CaptionDataError naming the option to raise when `who` asks for more `split` captions than it holds."""
    if wanted > held:
        raise CaptionDataError(f"{who} asks for {wanted} {split} samples but the split holds {held}; raise "
                               f"{SAMPLE_OPTIONS.get(split, split)} to at least {wanted}")  # fmt: skip


def load_splits(config: DataConfig) -> CaptionSplits:
    if min(config.calibration_samples, config.scoring_samples, config.evaluation_samples) < 1:
        raise CaptionDataError("--calib-samples, --score-samples and --eval-samples must each be at least 1")
    if config.batch_size < 1 or config.sequence_length < 8:
        raise CaptionDataError("--batch-size must be >= 1 and --seq-len >= 8")
    if config.images_dir and not config.path:
        raise CaptionDataError("--images-dir needs --calib-data, the COCO captions file whose images[].file_name it "
                               "resolves (without both, image prompts use the bundled scenes)")  # fmt: skip
    return split_captions(load_captions(config.source), config)


def load_image_splits(config: DataConfig) -> CaptionSplits | None:
    """Splits of the image prompts (`DataConfig.image_source`), split as the text ones, every image of the
    evaluation, scoring and calibration splits opened once; None where the data is text only."""
    if config.image_source is None:
        return None
    if config.image_size < 28 or config.image_size % 28:
        raise CaptionDataError(f"--image-size {config.image_size}: use a multiple of 28 (two 14-pixel patches per "
                               "merged image token), e.g. 112 or 224")  # fmt: skip
    captions_file, images_dir = config.image_source
    splits = split_captions(load_captions(captions_file, images_dir), config, captions_file)
    check_images(splits.evaluation + splits.scoring + splits.calibration, captions_file)
    return splits


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, labels: bool = False) -> dict:
    """What the model reads of a batch, on `device`: every key but `measure_mask` (which positions drift measures)
    and, unless `labels`, the labels (scoring's loss needs them; a forward that only reads logits does not)."""
    left_out = {"measure_mask"} | (set() if labels else {"labels"})
    return {key: value.to(device) for key, value in batch.items() if key not in left_out}


def split_batches(splits: CaptionSplits, split: str, samples: int | None, tokenizer, config: DataConfig,
                  image_processor=None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """The first `samples` captions of `split` (all of them for None) as causal-LM batches (`tokenize_batches`),
    or as image prompts (`image_caption_batches`) when an image processor is given."""
    captions = getattr(splits, split)
    if samples is not None:
        require_samples(split, samples, len(captions))
        captions = captions[:samples]
    if image_processor is None:
        return tokenize_batches(captions, tokenizer, config.batch_size, config.sequence_length)
    return image_caption_batches(captions, tokenizer, image_processor, config.batch_size, config.sequence_length,
                                 config.image_size)  # fmt: skip


def tokenize_batches(
    captions: tuple[Caption, ...] | list[Caption], tokenizer, batch_size: int, sequence_length: int
) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches: one caption per row ending in the tokenizer's EOS, right-padded, padding masked.

    Each batch is `{"input_ids", "attention_mask", "labels"}` (CPU tensors); labels are the input ids with
    padding set to -100 so the loss and the scores never see it.
    """
    end = tokenizer.eos_token or ""
    batches = []
    for start in range(0, len(captions), batch_size):
        texts = [caption.text + end for caption in captions[start : start + batch_size]]
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=sequence_length, return_tensors="pt")
        labels = encoded["input_ids"].clone()
        labels[encoded["attention_mask"] == 0] = IGNORE_INDEX
        batches.append(
            {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
        )
    return batches


def prompt_image(path: str | Path, image_size: int):
    """The image of an image prompt as the model's processor gets it: RGB, resized to `image_size` square (bicubic)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)


def image_caption_batches(captions: tuple[Caption, ...] | list[Caption], tokenizer, image_processor, batch_size: int,
                          sequence_length: int, image_size: int) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Batches of image prompts: `<|vision_start|>` + the image's tokens + `<|vision_end|>` + the caption (cut to
    `sequence_length` tokens) + EOS, right-padded. Each image is resized to `image_size` square and read by the
    model's image processor. Besides the causal-LM keys (labels only on the caption and EOS), each batch has
    `pixel_values`, `image_grid_thw`, `mm_token_type_ids` (1 at the image's tokens) and `measure_mask`: the
    positions whose next token is a caption token (from
    `<|vision_end|>` on), where drift is measured."""
    start, pad, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>",
                                                                     "<|vision_end|>"))  # fmt: skip
    merge = image_processor.merge_size**2
    batches = []
    for first in range(0, len(captions), batch_size):
        chunk = captions[first : first + batch_size]
        images = [prompt_image(caption.image, image_size) for caption in chunk]
        pixels = image_processor(images=images, return_tensors="pt")
        rows, labels, measured = [], [], []
        for caption, grid in zip(chunk, pixels["image_grid_thw"], strict=True):
            text = tokenizer(caption.text, add_special_tokens=False)["input_ids"][:sequence_length]
            text = [*text, tokenizer.eos_token_id]
            image = [start] + [pad] * (int(grid.prod()) // merge) + [end]
            rows.append(image + text)
            labels.append([IGNORE_INDEX] * len(image) + text)
            measured.append([False] * (len(image) - 1) + [True] * len(text) + [False])
        width = max(map(len, rows))
        batch = {"input_ids": torch.full((len(rows), width), tokenizer.pad_token_id),
                 "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
                 "labels": torch.full((len(rows), width), IGNORE_INDEX),
                 "measure_mask": torch.zeros((len(rows), width), dtype=torch.bool)}  # fmt: skip
        for index, (row, label, measure) in enumerate(zip(rows, labels, measured, strict=True)):
            batch["input_ids"][index, : len(row)] = torch.tensor(row)
            batch["attention_mask"][index, : len(row)] = 1
            batch["labels"][index, : len(row)] = torch.tensor(label)
            batch["measure_mask"][index, : len(row)] = torch.tensor(measure)
        # mm_token_type_ids (1 at the image's tokens): without it transformers gives the image prompt 1-D positions
        # instead of Qwen2.5-VL's 3-D M-RoPE ones, which is not what the model computes when served
        batches.append(batch | {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"],
                                "mm_token_type_ids": (batch["input_ids"] == pad).int()})  # fmt: skip
    return batches
