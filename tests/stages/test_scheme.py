"""Scheme stage (quantsuite/stages/scheme.py): decisions once per scheme; quantized models rebuilt from them."""

from __future__ import annotations

import pytest
import torch

from quantsuite.manifest import enabled_quantizers
from quantsuite.pipeline import Workbench

pytestmark = pytest.mark.autoquant


@pytest.mark.uses_schemes("default", "top50")
def test_a_released_model_is_rebuilt_from_the_stored_decisions(tmp_path, workbench, model_spec, data_config, catalog):
    """After release (a vLLM engine needed the device) the quantized model comes back from the cached decisions,
    with the same quantizers and weights, and at most `live_models` stay in memory. (The session's cache: its
    scores and decisions are reused; the models are this Workbench's own.)"""
    cache = workbench.context.cache.root
    bench = Workbench(model_spec, data_config, catalog, cache, tmp_path / "reports", live_models=1)
    top50, default = catalog.scheme("top50"), catalog.scheme("default")
    first = bench.schemes.model(top50)
    quantizers = enabled_quantizers(first, "")
    state = {name: tensor.clone() for name, tensor in first.state_dict().items()}
    bench.schemes.model(default)  # evicts top50 (live_models=1)
    bench.context.release()
    again = bench.schemes.model(top50)
    assert again is not first and enabled_quantizers(again, "") == quantizers
    assert all(torch.equal(state[name], tensor) for name, tensor in again.state_dict().items())
    assert bench.schemes.result(top50) is bench.schemes.result(top50)  # once per process


@pytest.mark.uses_schemes("default", "top50")
def test_small_models_stay_live_across_schemes_and_releases(tmp_path, workbench, model_spec, data_config, catalog):
    """By default models that are small together (the tiny one: a few MB each) are kept: another scheme's model
    or a release for a vLLM engine recalibrates nothing. A model of the 3B shape is alone above the limit."""
    from quantsuite.stages.scheme import SMALL_MODELS_BYTES, model_bytes

    bench = Workbench(model_spec, data_config, catalog, workbench.context.cache.root, tmp_path / "reports")
    top50, default = catalog.scheme("top50"), catalog.scheme("default")
    first = bench.schemes.model(top50)
    size = model_bytes(first)
    bench.schemes.model(default)
    bench.context.release()
    if 2 * size <= SMALL_MODELS_BYTES:
        assert bench.schemes.model(top50) is first
    else:
        assert bench.schemes.model(top50) is not first


@pytest.mark.uses_schemes("int8_sq", "int8_sq_image")
def test_the_calibration_choice_is_in_the_manifest_and_the_key(workbench, catalog):
    """int8_sq_image = int8_sq calibrated on image prompts: its manifest records the choice and the images, its
    decisions' cache key differs, and the text-calibrated scheme's key is what it was before the field existed."""
    import json

    text, image = catalog.scheme("int8_sq"), catalog.scheme("int8_sq_image")
    text_result, image_result = workbench.schemes.result(text), workbench.schemes.result(image)
    data = image_result.manifest["data"]
    assert data["calibration"] == "image_text" and data["images"] == workbench.context.image_source
    assert text_result.manifest["data"]["calibration"] == "text"
    assert text_result.artifact_dir != image_result.artifact_dir
    assert "calibration" not in json.loads(text.spec_hash_input()) and "image_text" in image.spec_hash_input()


def test_image_calibration_without_images_names_the_fix(tmp_path, model_spec, catalog):
    """A captions file without --images-dir is text only: a scheme asking for image calibration says what to pass."""
    import json as json_

    from quantsuite.data import CaptionDataError, DataConfig

    captions = tmp_path / "c.json"
    captions.write_text(json_.dumps({"annotations": [{"image_id": i // 5, "id": i, "caption": f"a dog {i}"}
                                                     for i in range(300)]}))  # fmt: skip
    bench = Workbench(model_spec, DataConfig(path=str(captions)), catalog, tmp_path / "cache", tmp_path / "reports")
    with pytest.raises(CaptionDataError, match=r"calibration: image_text needs images.*pass --images-dir"):
        bench.context.calibration_batches("calibration", 8, "image_text")
