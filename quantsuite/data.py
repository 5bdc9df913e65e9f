"""Text-only calibration, scoring and evaluation data from COCO captions annotation files.

Reads the real `captions_train2017.json` format (`{"annotations": [{"image_id", "id", "caption"}]}`) or the
bundled corpus in the same format (`quantsuite/assets/captions_bundled.json`, the default). Captions are split
by image, deterministically from a seed, into disjoint evaluation / scoring / calibration / training parts, so
no image's captions leak from the held-out evaluation split into the data that chose the scheme.

    >>> config = DataConfig(calibration_samples=32, scoring_samples=32, evaluation_samples=32)
    >>> splits = load_splits(config)
    >>> len(splits.calibration), len(splits.scoring), len(splits.evaluation)
    (32, 32, 32)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BUNDLED_CAPTIONS = Path(__file__).resolve().parent / "assets" / "captions_bundled.json"
IGNORE_INDEX = -100  # label value the causal-LM loss skips (padding)


class CaptionDataError(ValueError):
    """A captions file or a data setting that cannot be used; the message names the fix."""


@dataclass(frozen=True)
class Caption:
    image_id: int
    annotation_id: int
    text: str


@dataclass(frozen=True)
class DataConfig:
    """Where the captions come from and how much of them each stage uses (counts are captions)."""

    path: str | None = None  # None: the bundled corpus
    seed: int = 0
    batch_size: int = 8
    sequence_length: int = 64
    calibration_samples: int = 64
    scoring_samples: int = 64
    evaluation_samples: int = 64

    @property
    def source(self) -> Path:
        return Path(self.path) if self.path else BUNDLED_CAPTIONS


@dataclass(frozen=True)
class CaptionSplits:
    """Disjoint caption splits; `training` is everything left (used only to train the tiny model)."""

    evaluation: tuple[Caption, ...]
    scoring: tuple[Caption, ...]
    calibration: tuple[Caption, ...]
    training: tuple[Caption, ...]
    fingerprint: str  # sha256 over the texts of every split and the settings that made them


def load_captions(path: str | Path) -> list[Caption]:
    """Read a COCO captions annotation file; every problem is one error naming the file and the field."""
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
    return captions


def _take_images(groups: list[list[Caption]], start: int, count: int) -> tuple[tuple[Caption, ...], int]:
    """Take whole images from `groups[start:]` until `count` captions are collected (the last image trimmed)."""
    taken: list[Caption] = []
    while len(taken) < count and start < len(groups):
        taken.extend(groups[start][: count - len(taken)])
        start += 1
    return tuple(taken), start


def split_captions(captions: list[Caption], config: DataConfig) -> CaptionSplits:
    """Split by image into evaluation, scoring, calibration, training (in that order of priority)."""
    by_image: dict[int, list[Caption]] = {}
    for caption in sorted(captions, key=lambda c: c.annotation_id):
        by_image.setdefault(caption.image_id, []).append(caption)

    def order(image_id: int) -> str:
        return hashlib.sha256(f"{config.seed}:{image_id}".encode()).hexdigest()

    groups = [by_image[image_id] for image_id in sorted(by_image, key=order)]
    wanted = config.evaluation_samples + config.scoring_samples + config.calibration_samples
    if len(captions) < wanted:
        raise CaptionDataError(
            f"{config.source}: {len(captions)} captions, but evaluation + scoring + calibration samples ask "
            f"for {wanted}; lower --eval-samples / --score-samples / --calib-samples"
        )
    evaluation, position = _take_images(groups, 0, config.evaluation_samples)
    scoring, position = _take_images(groups, position, config.scoring_samples)
    calibration, position = _take_images(groups, position, config.calibration_samples)
    training = tuple(caption for group in groups[position:] for caption in group)
    digest = hashlib.sha256(json.dumps(asdict(config) | {"path": str(config.source.name)}).encode())
    for part in (evaluation, scoring, calibration, training):
        digest.update(b"\x00".join(caption.text.encode() for caption in part) + b"\x01")
    return CaptionSplits(evaluation, scoring, calibration, training, digest.hexdigest())


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
    return split_captions(load_captions(config.source), config)


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
