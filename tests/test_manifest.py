"""Manifest structure and totals, built from a real quantized model (fast: plain schemes, no scoring)."""

from __future__ import annotations

import pytest

from quantsuite.autoquant import Resolution, group_scores
from quantsuite.manifest import BF16, SCHEMA_VERSION, ManifestError, build_manifest, decisions


@pytest.fixture(scope="module")
def mlp_only(workbench):
    scheme = workbench.context.catalog.scheme("mlp_only")
    return scheme, workbench.schemes.result(scheme).manifest, workbench.schemes.model(scheme)


def test_schema_and_context(mlp_only):
    _, manifest, _ = mlp_only
    assert manifest["schema_version"] == SCHEMA_VERSION
    for key in ("scheme", "model", "data", "versions", "device", "selection", "totals", "blocks", "modules"):
        assert key in manifest, key
    assert manifest["data"]["fingerprint"] and manifest["model"]["fingerprint"]
    assert manifest["versions"]["nvidia-modelopt"].startswith("0.47")


def test_totals_agree_with_modules(mlp_only):
    _, manifest, _ = mlp_only
    totals, modules = manifest["totals"], manifest["modules"]
    lm = [m for m in modules if m["role"] == "lm_linear"]
    fp8_weights = sum(m["weight_count"] for m in lm if m["format"] != BF16)
    assert totals["coverage_by_weights"] == pytest.approx(fp8_weights / totals["lm_linear_weights"])
    assert totals["lm_effective_bits"] == pytest.approx(16 - 8 * totals["coverage_by_weights"])
    assert totals["quantized_layers"] + totals["bf16_layers"] == len(modules)
    assert all((m["format"] != BF16) == ("mlp" in m["name"]) for m in lm)
    assert totals["coverage_by_blocks"] == 1.0 or all(b["decision"] == "mixed" for b in manifest["blocks"])
    assert all(b["decision"] == "mixed" for b in manifest["blocks"])  # MLP FP8, attention BF16 in every block


def test_decisions_are_sorted_names(mlp_only):
    names = list(decisions(mlp_only[1]))
    assert names == sorted(names) and len(names) == len(mlp_only[1]["modules"])


def test_disagreement_between_decisions_and_model_fails(workbench, mlp_only):
    scheme, _, model = mlp_only
    group = "model.language_model.layers.0.mlp.down_proj.quant_recipe"
    state = {
        "candidate_stats": {
            group: {
                "formats": ["NONE(effective-bits: 16.0)"],
                "scores": [0.0],
                "costs": [1.0],
                "module_names": ["model.language_model.layers.0.mlp.down_proj"],
            }
        }
    }
    # says BF16 while the model quantizes down_proj
    lying = Resolution({}, {group: "NONE"}, {}, None, groups=group_scores(state))
    with pytest.raises(ManifestError, match=r"layers\.0\.mlp\.down_proj decision BF16 but weight quantizer enabled"):
        build_manifest(model, scheme, workbench.context.catalog, {}, lying)
