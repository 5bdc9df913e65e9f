"""Run context (quantsuite/stages/context.py): what every stage shares."""

from __future__ import annotations

import json

import pytest

from quantsuite.data import CaptionDataError
from quantsuite.stages.context import RunContext


@pytest.fixture
def context(tmp_path, model_spec, data_config, catalog):
    return RunContext(model_spec, data_config, catalog, tmp_path / "cache", tmp_path / "reports", run_id="run-x")


def test_publish_writes_one_stamped_json_per_stage_result(context, tmp_path):
    path = context.publish("drift", "top50", {"kl_mean": 0.1})
    assert path == tmp_path / "reports" / "drift" / context.model_tag / "top50.json"
    assert json.loads(path.read_text()) == {"kl_mean": 0.1, "run_id": "run-x"}
    assert [p.name for p in path.parent.iterdir()] == ["top50.json"]  # written via a temp file and a rename


def test_asking_for_more_samples_than_the_split_holds_names_the_option(context):
    held = len(context.splits.calibration)
    with pytest.raises(CaptionDataError, match="raise --calib-samples"):
        context.batches("calibration", held + 1)
    assert len(context.batches("calibration", held)) >= 1


def test_release_drops_what_every_stage_keeps(context):
    kept = {"a": object()}
    context.holds_device_memory(kept.clear)
    context.release()
    assert kept == {}


def test_a_catalog_without_a_bf16_reference_is_refused_by_name(context, catalog):
    context.catalog = catalog.model_copy(update={"schemes": tuple(s for s in catalog.schemes if s.mode != "none")})
    with pytest.raises(ValueError, match="no scheme with `mode: none`"):
        context.reference_scheme()
