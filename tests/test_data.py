"""COCO captions loading (with and without images), disjoint deterministic splits, and causal-LM batches with
masked padding, text and image prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantsuite.data import (
    BUNDLED_CAPTIONS,
    IGNORE_INDEX,
    CaptionDataError,
    DataConfig,
    image_caption_batches,
    load_captions,
    load_image_splits,
    load_splits,
    tokenize_batches,
)  # fmt: skip
from quantsuite.models import TINY_DIR, load_image_processor, load_tokenizer


def _coco_file(tmp_path, annotations):
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps({"info": {}, "images": [], "annotations": annotations}))
    return path


def test_reads_real_coco_format(tmp_path):
    path = _coco_file(tmp_path, [{"image_id": 9, "id": 1, "caption": "A  dog\n on a bench. "},
                                 {"image_id": 9, "id": 2, "caption": "A brown dog sitting."}])  # fmt: skip
    captions = load_captions(path)
    assert [(c.image_id, c.annotation_id, c.text) for c in captions] == [
        (9, 1, "A dog on a bench."), (9, 2, "A brown dog sitting.")]  # fmt: skip


def test_bundled_corpus_is_coco_format():
    document = json.loads(BUNDLED_CAPTIONS.read_text())
    assert {"images", "annotations"} <= set(document)
    assert len(document["annotations"]) >= 300
    assert all({"image_id", "id", "caption"} <= set(a) for a in document["annotations"])


def test_splits_disjoint_by_image_and_deterministic():
    config = DataConfig(calibration_samples=40, scoring_samples=50, evaluation_samples=60)
    splits = load_splits(config)
    assert (len(splits.calibration), len(splits.scoring), len(splits.evaluation)) == (40, 50, 60)
    parts = [splits.evaluation, splits.scoring, splits.calibration, splits.training]
    ids = [{c.annotation_id for c in part} for part in parts]
    assert sum(map(len, ids)) == len(set().union(*ids))
    images = [{c.image_id for c in part} for part in parts[:2]]
    assert not images[0] & images[1], "an image's captions leaked across evaluation and scoring"
    assert load_splits(config) == splits
    assert load_splits(DataConfig(seed=1, calibration_samples=40, scoring_samples=50, evaluation_samples=60)
                       ).fingerprint != splits.fingerprint  # fmt: skip


def test_batches_mask_padding():
    tokenizer = load_tokenizer(TINY_DIR)
    splits = load_splits(DataConfig())
    batches = tokenize_batches(splits.calibration[:5], tokenizer, batch_size=4, sequence_length=64)
    assert [len(batch["input_ids"]) for batch in batches] == [4, 1]
    batch = batches[0]
    padding = batch["attention_mask"] == 0
    assert padding.any(), "captions of different lengths should pad"
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["labels"][~padding] == batch["input_ids"][~padding]).all()


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    (json.dumps({"images": []}), 'non-empty "annotations" list'),
    (json.dumps({"annotations": [{"id": 1, "caption": "x"}]}), r'annotations\[0\] needs integer "image_id"'),
])  # fmt: skip
def test_bad_files_fail_with_the_fix(tmp_path, content, message):
    path = tmp_path / "captions.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CaptionDataError, match=message):
        load_captions(path)


def test_too_few_captions_names_the_options(tmp_path):
    path = _coco_file(tmp_path, [{"image_id": i, "id": i, "caption": f"caption {i}"} for i in range(10)])
    with pytest.raises(CaptionDataError, match="--eval-samples / --score-samples / --calib-samples"):
        load_splits(DataConfig(path=str(path)))


def _coco_folder(tmp_path, images: int = 40, captions_per_image: int = 5):
    """A COCO-layout folder (annotations/captions.json, train/ of JPEGs) of `images` small photos-like images."""
    from PIL import Image

    folder = tmp_path / "train"
    folder.mkdir()
    entries, annotations = [], []
    for image_id in range(1, images + 1):
        name = f"{image_id:012d}.jpg"
        Image.new("RGB", (96 + image_id, 64), (image_id * 6 % 256, 80, 200)).save(folder / name)
        entries.append({"id": image_id, "file_name": name, "width": 96 + image_id, "height": 64})
        annotations += [{"image_id": image_id, "id": image_id * 10 + k, "caption": f"photo {image_id} view {k}"}
                        for k in range(captions_per_image)]  # fmt: skip
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return path, folder


def test_images_resolve_in_coco_layout_and_splits_stay_disjoint_by_image(tmp_path):
    path, folder = _coco_folder(tmp_path)
    config = DataConfig(path=str(path), images_dir=str(folder), calibration_samples=20, scoring_samples=20,
                        evaluation_samples=20)  # fmt: skip
    splits = load_image_splits(config)
    parts = (splits.evaluation, splits.scoring, splits.calibration, splits.training)
    images = [{c.image for c in part} for part in parts]
    assert all(c.image == str(folder / f"{c.image_id:012d}.jpg") for part in parts for c in part)
    assert all(not (a & b) for i, a in enumerate(images) for b in images[i + 1 :])
    # the text splits of the same file are the same captions, and adding the images leaves their fingerprint alone
    text = load_splits(config)
    assert [c.text for c in text.evaluation] == [c.text for c in splits.evaluation]
    assert text.fingerprint == load_splits(DataConfig(path=str(path), calibration_samples=20, scoring_samples=20,
                                                      evaluation_samples=20)).fingerprint  # fmt: skip
    assert splits.fingerprint != text.fingerprint


def test_a_captions_file_without_images_dir_is_text_only_and_the_default_has_scenes(tmp_path):
    path, _ = _coco_folder(tmp_path)
    assert load_image_splits(DataConfig(path=str(path))) is None
    scenes = load_image_splits(DataConfig())
    assert scenes is not None and all(c.image and c.image.endswith(".png") for c in scenes.evaluation)


@pytest.mark.parametrize("fault", ["missing file", "not an image", "no images entry", "no images list", "not a folder",
                                   "images dir alone"])  # fmt: skip
def test_a_missing_or_unreadable_image_is_one_error_naming_the_file(tmp_path, fault):
    path, folder = _coco_folder(tmp_path)
    document = json.loads(path.read_text())
    first = sorted(load_image_splits(DataConfig(path=str(path), images_dir=str(folder), calibration_samples=20,
                                                scoring_samples=20, evaluation_samples=20)).evaluation,
                   key=lambda c: c.image_id)[0]  # fmt: skip
    config = {"path": str(path), "images_dir": str(folder), "calibration_samples": 20, "scoring_samples": 20,
              "evaluation_samples": 20}  # fmt: skip
    expected = {"missing file": first.image, "not an image": first.image,
                "no images entry": f"image_id [{first.image_id}] of its annotations have no images[] entry",
                "no images list": 'no "images" list', "not a folder": "is not a folder",
                "images dir alone": "--images-dir needs --calib-data"}[fault]  # fmt: skip
    if fault == "missing file":
        Path(first.image).unlink()
    elif fault == "not an image":
        Path(first.image).write_bytes(b"not a jpeg")
    elif fault == "no images entry":
        document["images"] = [e for e in document["images"] if e["id"] != first.image_id]
        path.write_text(json.dumps(document))
    elif fault == "no images list":
        path.write_text(json.dumps({"annotations": document["annotations"]}))
    elif fault == "not a folder":
        config["images_dir"] = str(path)
    else:
        config["path"] = None
    with pytest.raises(CaptionDataError) as error:
        load_splits(DataConfig(**config))
        load_image_splits(DataConfig(**config))
    assert expected in str(error.value), str(error.value)


def test_image_prompt_batches_label_the_caption_only():
    """<|vision_start|> + image tokens (grid / 2x2 merge) + <|vision_end|> + caption + EOS; labels and measured
    positions on the caption only (measured: the position before each caption token)."""
    tokenizer, processor = load_tokenizer(TINY_DIR), load_image_processor(TINY_DIR)
    captions = load_image_splits(DataConfig()).evaluation[:3]
    (batch,) = image_caption_batches(captions, tokenizer, processor, batch_size=8, sequence_length=64, image_size=112)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3 and batch["pixel_values"].shape[0] == 3 * 64
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, caption in enumerate(captions):
        ids, labels, measured = batch["input_ids"][row], batch["labels"][row], batch["measure_mask"][row]
        assert int((ids == pad).sum()) == 16
        text = tokenizer(caption.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert labels[labels != IGNORE_INDEX].tolist() == text
        assert int(measured.sum()) == len(text) and bool(measured[17]) and not bool(measured[16])



def test_image_prompts_get_the_3d_positions_a_served_model_uses():
    """The tiny model reads our image prompt with Qwen2.5-VL's 3-D M-RoPE positions (what vLLM and the model's own
    processor give it): the logits equal those with the positions get_rope_index computes, and differ from those
    of the same batch without mm_token_type_ids, where transformers quietly falls back to 1-D positions (every image
    figure was measured so until vLLM disagreed: 40x the text floor on the tiny BF16 export)."""
    from quantsuite.models import ModelSpec, load_model

    tokenizer, image_processor = load_tokenizer(TINY_DIR), load_image_processor(TINY_DIR)
    captions = load_image_splits(DataConfig()).evaluation[:2]
    (batch,) = image_caption_batches(captions, tokenizer, image_processor, batch_size=2, sequence_length=64,
                                     image_size=112)  # fmt: skip
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == pad).int())
    model = load_model(ModelSpec("tiny")).model
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    positions, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                              image_grid_thw=batch["image_grid_thw"],
                                              attention_mask=batch["attention_mask"])  # fmt: skip
    assert positions.shape[0] == 3 and not torch.equal(positions[1], positions[2]), "no 3-D positions"
    with torch.no_grad():
        ours = model(**inputs, mm_token_type_ids=batch["mm_token_type_ids"]).logits
        explicit = model(**inputs, position_ids=positions).logits
        one_d = model(**inputs).logits
    mask = batch["measure_mask"]
    assert torch.equal(ours[mask], explicit[mask])
    assert not torch.allclose(ours[mask], one_d[mask], atol=1e-3)
