"""COCO captions loading, disjoint deterministic splits, and causal-LM batches with masked padding."""

from __future__ import annotations

import json

import pytest

from quantsuite.data import (
    BUNDLED_CAPTIONS,
    IGNORE_INDEX,
    CaptionDataError,
    DataConfig,
    load_captions,
    load_splits,
    tokenize_batches,
)  # fmt: skip
from quantsuite.models import TINY_DIR, load_tokenizer


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
