"""HF checkpoint export of every scheme (-m export): files agree with the manifest; bad exports are caught."""

from __future__ import annotations

import json
import math

import pytest
import torch

from quantsuite.checkpoint import (
    EXPORT_INFO,
    PROCESSOR_FILES,
    ExportError,
    _excluded,
    check_export,
    effective_input_scale,
    export_rule_weights,
    fused_groups,
    hub_name,
    layer_tensors,
    linked_copy,
    load_export,
    predicted_bytes,
    read_tensors,
    tensor_index,
    verify_export,
)  # fmt: skip
from quantsuite.divergence import capture, compare
from quantsuite.formats import FORMATS
from quantsuite.models import indexed_device

pytestmark = pytest.mark.export


def test_export_matches_manifest(workbench, scheme, scheme_result, exported):
    """FP8 layers are float8_e4m3fn with scales, BF16 and vision tensors BF16, exclusions equal the manifest."""
    assert check_export(exported, scheme_result.manifest) == []


def test_export_size_matches_manifest(scheme_result, exported):
    actual = sum(entry["bytes"] for entry in tensor_index(exported).values())
    assert abs(actual - predicted_bytes(scheme_result.manifest)) <= 0.01 * predicted_bytes(scheme_result.manifest)


def test_export_carries_processor_and_provenance(workbench, scheme, scheme_result, exported):
    for name in PROCESSOR_FILES:
        if (workbench.context.source_dir / name).is_file():
            assert (exported / name).read_bytes() == (workbench.context.source_dir / name).read_bytes(), name
    assert json.loads((exported / EXPORT_INFO).read_text())["scheme"] == scheme.name
    pointer = json.loads(
        (workbench.context.reports_dir / "exports" / workbench.context.model_tag / f"{scheme.name}.json").read_text()
    )
    assert pointer["export_dir"] == str(exported)


def test_exclusion_wildcards_are_read_as_vllm_reads_them():
    """ModelOpt writes `model.layers.1*`, which vLLM splits into `model.layers.1` and `model.layers.1.*`; plain
    fnmatch would also exclude layers 10-19 (before: an imperative xfail whose failing branch could not happen)."""
    patterns = ["model.layers.1*", "lm_head", "visual*"]
    assert _excluded("model.layers.1.mlp.down_proj", patterns) and _excluded("model.layers.1", patterns)
    assert not _excluded("model.layers.10.mlp.down_proj", patterns), "read like fnmatch, not like vLLM"
    assert _excluded("lm_head", patterns) and _excluded("visual.blocks.0.attn.qkv", patterns)


@pytest.mark.uses_schemes("fp8_all_layers")
def test_fp8_lm_head_export_is_untied(workbench, catalog):
    """A tied model with an FP8 lm_head: ModelOpt keeps tie_word_embeddings=true (vLLM would then tie lm_head to
    the BF16 embeddings and ignore the FP8 one); the suite's export unties it and keeps both tensors."""
    scheme = catalog.scheme("fp8_all_layers")
    assert any(catalog.formats[f].lm_head for f in scheme.formats), "the premise: its format quantizes lm_head"
    export_dir = workbench.exports.path(scheme)
    config = json.loads((export_dir / "config.json").read_text())
    source = json.loads((workbench.context.source_dir / "config.json").read_text())
    assert source["tie_word_embeddings"], "the premise: the source model ties lm_head to the embeddings"
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    index = tensor_index(export_dir)
    assert index["lm_head.weight"]["dtype"] == "F8_E4M3" and index["model.embed_tokens.weight"]["dtype"] == "BF16"


@pytest.mark.uses_schemes("top50")
def test_check_export_catches_a_wrong_exclusion(tmp_path, workbench, catalog):
    scheme = catalog.scheme("top50")
    manifest = workbench.schemes.result(scheme).manifest
    broken = linked_copy(workbench.exports.path(scheme), tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["visual*"]  # too short: BF16 layers would be read as FP8
    (broken / "config.json").write_text(json.dumps(config))
    problems = check_export(broken, manifest)
    assert any("not excluded, but the manifest keeps it BF16" in line for line in problems)


@pytest.mark.uses_schemes("top50")
def test_a_tokenizer_saved_with_truncation_is_an_export_problem(tmp_path, workbench, catalog):
    """The bundled tokenizer was once saved with truncation at 64 tokens: every export carried it, and vLLM's
    processor cut each image prompt to 64 tokens (official vLLM 0.26 refused them all: image token count mismatch)."""
    scheme = catalog.scheme("top50")
    manifest = workbench.schemes.result(scheme).manifest
    broken = linked_copy(workbench.exports.path(scheme), tmp_path / "broken")
    tokenizer = json.loads((broken / "tokenizer.json").read_text())
    (broken / "tokenizer.json").write_text(json.dumps(tokenizer | {"truncation": {"max_length": 64}}))
    assert any("tokenizer.json: saved with truncation" in line for line in check_export(broken, manifest))
    assert not [line for line in check_export(workbench.exports.path(scheme), manifest) if "tokenizer" in line]


@pytest.mark.uses_schemes("top25", "top50")
def test_export_for_another_manifest_fails_naming_both(workbench, catalog):
    top25, top50 = catalog.scheme("top25"), catalog.scheme("top50")
    with pytest.raises(ExportError, match=r"exported from manifest \w+ \(scheme fp8_autoquant_top50\), but "
                                          r"manifest \w+ \(scheme fp8_autoquant_top25\)"):  # fmt: skip
        verify_export(workbench.exports.path(top50), workbench.schemes.result(top25).manifest)


@pytest.mark.uses_schemes("top50")
def test_plain_from_pretrained_misloads_and_our_loader_does_not(workbench, catalog):
    """Negative control: transformers skips the modelopt config and drops the scales; load_export applies them."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    scheme = catalog.scheme("top50")
    path, batches = workbench.exports.path(scheme), workbench.context.batches("evaluation")[:2]
    fake = capture(workbench.schemes.model(scheme), batches, workbench.context.device)
    ours = compare(fake, capture(load_export(path, workbench.context.device), batches, workbench.context.device))
    plain_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).to(
        workbench.context.device
    )
    plain = compare(fake, capture(plain_model, batches, workbench.context.device))
    assert plain["kl_mean"] > 100 * ours["kl_mean"], (plain["kl_mean"], ours["kl_mean"])
    assert plain["top1_agreement"] < ours["top1_agreement"]
    # the export's own verdicts (test_drift.py) judge our loader on the whole evaluation split, with bounds measured
    # on all of it; 16 captions are too few for them (reports/bounds/README.md, fresh clones of session 15)


def test_kv_cache_is_checked_in_the_export():
    """kv_cache_quant_algo and one k_scale / v_scale per LM k_proj / v_proj for an FP8 KV cache; neither for BF16."""
    from quantsuite.checkpoint import _kv_cache_problems

    layers = [{"name": f"model.language_model.layers.0.self_attn.{p}_proj", "role": "lm_linear"} for p in "qkv"]
    manifest = {"totals": {"kv_cache_format": "FP8"}, "modules": layers}
    quantization = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    index = {"model.layers.0.self_attn.k_proj.k_scale": {}, "model.layers.0.self_attn.v_proj.v_scale": {}}
    assert _kv_cache_problems(index, manifest, quantization) == []
    missing = _kv_cache_problems({"model.layers.0.self_attn.k_proj.k_scale": {}}, manifest, quantization)
    assert missing == ["model.layers.0.self_attn.v_proj.v_scale: missing, the manifest's KV cache is FP8"]
    assert _kv_cache_problems(index, manifest, {"quant_algo": "FP8"}) == [
        "hf_quant_config.json kv_cache_quant_algo None, the manifest's KV cache is FP8"]  # fmt: skip
    manifest["totals"]["kv_cache_format"] = "BF16"
    assert len(_kv_cache_problems(index, manifest, quantization)) == 3, "algo and scales stored for a BF16 KV cache"


@pytest.mark.uses_schemes("top50")
def test_reload_follows_a_device_map(workbench, catalog):
    """A model spread over devices (device_map="auto") reloads its export spread the same way: every module on
    the device its map names, same logits as the reload on one device. With two GPUs the map splits the decoder
    layers between cuda:0 and cuda:1 (the real case); elsewhere it maps everything to this device, which still
    runs accelerate's dispatch path."""
    from quantsuite.checkpoint import spread_device_map

    pytest.importorskip("accelerate", reason="a device_map reload needs accelerate (pip install accelerate)")
    # accelerate places what a map calls "cuda" on "cuda:0" (the map named plain "cuda" and failed on one H200, gpu-18)
    here = indexed_device(workbench.context.device)
    count = torch.cuda.device_count() if here.type == "cuda" else 0
    first, second = ("cuda:0", "cuda:1") if count >= 2 else (str(here),) * 2
    path = workbench.exports.path(catalog.scheme("top50"))
    single = load_export(path, first)
    layers = len(single.model.language_model.layers)
    # lm_head beside the embeddings: tied to them on the tiny and 3B models (accelerate keeps tied weights on one
    # device, as device_map="auto" does)
    device_map = {
        "model.visual": first,
        "model.language_model.embed_tokens": first,
        "lm_head": first,
        "model.language_model.rotary_emb": second,
        "model.language_model.norm": second,
    }
    device_map |= {f"model.language_model.layers.{i}": first if i < layers // 2 else second for i in range(layers)}
    spread = load_export(path, "cpu", device_map=device_map)
    for name, device in device_map.items():
        placed = {str(tensor.device) for tensor in spread.get_submodule(name).state_dict().values()}
        assert placed <= {device}, f"{name} is on {placed}, its map says {device}"
    batches = workbench.context.batches("evaluation")[:2]
    expected, actual = capture(single, batches, torch.device(first)), capture(spread, batches, torch.device(first))
    assert torch.equal(expected.logits, actual.logits)
    spread.hf_device_map = device_map
    assert spread_device_map(spread) == (device_map if first != second else None)
    assert spread_device_map(single) is None


def test_fused_groups_are_the_layers_that_read_one_input():
    block = "model.language_model.layers.0."
    names = [block + p for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]  # fmt: skip
    assert fused_groups(names) == [names[0:3], names[3:4], names[4:6], names[6:7], names[7:8]]


@pytest.mark.parametrize("name", ["int4_awq", "w4a8_awq"])
def test_the_export_rules_explain_an_awq_export(workbench, catalog, name):
    """The export of one block's q/k/v against the fake-quant layers: by the export's rules for fused layers (one mean
    AWQ factor, weights rescaled to it and requantized, one shared per-tensor amax) next to no code differs; with
    each layer keeping its own factor and scales, most do. The rules are what export_fidelity compares with."""
    import dataclasses

    scheme = catalog.scheme(name)
    model, export_dir = workbench.schemes.model(scheme), workbench.exports.path(scheme)
    tensors = read_tensors(export_dir)
    group = [n for n, _ in model.named_modules() if ".layers.0.self_attn." in n and n.endswith(("q_proj", "k_proj",
                                                                                                "v_proj"))]  # fmt: skip
    spec = FORMATS[_quant_algo(workbench, scheme)]
    folded = effective_input_scale(model, group[0], tensors, hub_name(group[0]))  # the AWQ factor in input_layernorm

    def differing(expected: list[torch.Tensor]) -> float:
        shares = []
        for layer, weight in zip(group, expected, strict=True):  # on the model's device, the export's on the CPU
            stored = layer_tensors(tensors, hub_name(layer), spec, weight.device)
            exported = spec.dequantize(stored) * folded.to(weight.device).reshape(1, -1)
            shares.append(float(((exported - weight).abs() > weight.abs() / 32 + 1e-12).float().mean()))
        return max(shares)

    with torch.no_grad():
        modules = [model.get_submodule(n) for n in group]
        by_rules = differing(export_rule_weights(modules, spec))
        unshared = differing(export_rule_weights(modules, dataclasses.replace(spec, fused_scales=False)))
    assert by_rules < 0.005 < 0.3 < unshared, (by_rules, unshared)


def _quant_algo(workbench, scheme) -> str:
    (algo,) = {m["quant_algo"] for m in workbench.schemes.result(scheme).manifest["modules"] if m["quant_algo"]}
    return algo


def test_a_code_shares_standard_error_counts_layers_not_weights():
    """The weights of one layer differ together (its factors and scales move them), so the share's standard error
    resamples layers, as the KLs' resample captions (`pooled_standard_error`): layers of equal shares have none,
    however few weights differ; two layers of shares 0 and 0.1 give the bootstrap's 0.05 / sqrt(2) (resamples of
    both layers: 0, 0.05 or 0.1), not the 0.015 of 200 weights sampled one by one."""
    from quantsuite.divergence import pooled_standard_error

    assert pooled_standard_error([2, 4, 1], [1000, 2000, 500]) == pytest.approx(0.0, abs=1e-15)
    assert pooled_standard_error([7], [1000]) == 0.0  # one layer: no spread to measure
    assert pooled_standard_error([0, 10], [100, 100]) == pytest.approx(0.05 / math.sqrt(2), rel=0.05)
