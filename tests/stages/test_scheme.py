"""Scheme stage (quantsuite/stages/scheme.py): decisions once per scheme; quantized models rebuilt from them."""

from __future__ import annotations

import pytest
import torch

from quantsuite.manifest import enabled_quantizers
from quantsuite.pipeline import Workbench

pytestmark = pytest.mark.autoquant


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
