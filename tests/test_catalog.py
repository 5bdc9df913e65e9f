"""schemes.yaml schema: every entry validates and round-trips; each bad input fails naming its field."""

from __future__ import annotations

import copy

import pytest
import yaml

from quantsuite.catalog import CATALOG_PATH, SchemeError, dump_catalog, load_catalog, parse_catalog, vision_tower_off


@pytest.fixture
def document() -> dict:
    return yaml.safe_load(CATALOG_PATH.read_text())


def test_catalog_validates_and_round_trips():
    catalog = load_catalog()
    assert parse_catalog(yaml.safe_load(dump_catalog(catalog))) == catalog
    for scheme in catalog.schemes:
        alone = {"formats": catalog.formats, "schemes": [scheme.model_dump()], "drift_default": catalog.drift_default}
        assert parse_catalog(alone).schemes == (scheme,)


def test_initial_catalog_present():
    names = {scheme.name for scheme in load_catalog().schemes}
    assert {"fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full", "fp8_modelopt_default",
            "fp8_all_layers", "fp8_mlp_only", "fp8_attn_only", "bf16"} <= names  # fmt: skip
    assert {"FP8_ALL_LAYERS", "FP8_MLP_ONLY", "FP8_ATTN_ONLY", "FP8_KV_CACHE"} <= set(load_catalog().formats)


def test_coverage_effective_bits_mapping():
    catalog = load_catalog()
    assert catalog.scheme("top50").target_effective_bits == 12.0
    assert catalog.scheme("full").target_coverage == pytest.approx(0.875)
    assert catalog.scheme("eb13").target_coverage == pytest.approx(0.375)


def test_select_by_alias_and_several():
    catalog = load_catalog()
    assert [s.name for s in catalog.select(["top50", "fp8_autoquant_top25"])] == [
        "fp8_autoquant_top25", "fp8_autoquant_top50"]  # fmt: skip
    assert len(catalog.select([])) == len(catalog.schemes)


def test_unknown_scheme_lists_valid_ones():
    with pytest.raises(SchemeError, match=r"--scheme top99: unknown; valid schemes .*fp8_autoquant_top50 \(top50\)"):
        load_catalog().select(["top99"])


def _scheme(document: dict, name: str) -> dict:
    return next(s for s in document["schemes"] if s["name"] == name)


BAD_INPUTS = [
    ("effective_bits", lambda d: _scheme(d, "fp8_autoquant_full").update(effective_bits=7.5),
     r"schemes\.yaml: \(top level\).*schemes\[\d+\] \(fp8_autoquant_full\)\.effective_bits: 7\.5 is outside \[8, 16\]"),
    ("effective_bits high", lambda d: _scheme(d, "fp8_autoquant_full").update(effective_bits=17),
     r"fp8_autoquant_full\)\.effective_bits: 17.* outside \[8, 16\]"),
    ("coverage zero", lambda d: _scheme(d, "fp8_autoquant_top50").update(coverage=0.0),
     r"schemes\.\d+: Value error, coverage 0\.0 must lie in \(0, 1\]"),
    ("coverage above one", lambda d: _scheme(d, "fp8_autoquant_top50").update(coverage=1.5),
     r"coverage 1\.5 must lie in \(0, 1\]"),
    ("unknown format", lambda d: _scheme(d, "fp8_mlp_only").update(formats=["FP8_NOPE"]),
     r"\(fp8_mlp_only\)\.formats\[0\]: unknown format 'FP8_NOPE'; defined formats: \['FP8_ALL_LAYERS'"),
    ("top_k without a search", lambda d: _scheme(d, "fp8_mlp_only").update(coverage_mode="top_k_blocks"),
     r"coverage_mode top_k_blocks needs mode: autoquant"),
    ("unknown key", lambda d: _scheme(d, "fp8_mlp_only").update(covrage=0.5),
     r"schemes\.\d+\.covrage: Extra inputs are not permitted"),
    ("both targets", lambda d: _scheme(d, "fp8_autoquant_top50").update(effective_bits=12),
     r"exactly one of `coverage` or `effective_bits`"),
    ("exact solver with top_k", lambda d: _scheme(d, "fp8_autoquant_top50").update(solver="exact"),
     r"schemes\.\d+: Value error, solver exact needs mode: autoquant with coverage_mode: auto"),
    ("unknown solver", lambda d: _scheme(d, "fp8_autoquant_eb11").update(solver="cplex"),
     r"schemes\.\d+\.solver: Input should be 'modelopt' or 'exact'"),
    ("kv toggle preset not handled", lambda d: _scheme(d, "fp8_autoquant_top50").update(kv_cache="NVFP4_KV_CFG"),
     r"schemes\.\d+\.kv_cache: Value error, ModelOpt preset 'NVFP4_KV_CFG' is not handled end to end yet.*"
     r"accepted here: \['FP8_KV_CFG'\]"),
    ("kv toggle on BF16", lambda d: _scheme(d, "bf16").update(kv_cache="FP8_KV_CFG"),
     r"schemes\.\d+: Value error, kv_cache needs a quantized scheme"),
    ("bad method", lambda d: _scheme(d, "fp8_autoquant_top50").update(method="hessian"),
     r"schemes\.\d+\.method: Input should be 'gradient' or 'kl_div'"),
    ("unknown preset", lambda d: d["formats"]["FP8_MLP_ONLY"].update(preset="FP9_CFG"),
     r"formats\.FP8_MLP_ONLY\.preset: Value error, unknown ModelOpt preset 'FP9_CFG'; accepted: \["),
    ("preset not handled yet", lambda d: d["formats"]["FP8_MLP_ONLY"].update(preset="NVFP4_AWQ_LITE_CFG"),
     r"formats\.FP8_MLP_ONLY\.preset: Value error, ModelOpt preset 'NVFP4_AWQ_LITE_CFG' is not handled end to end "
     r"yet.*accepted here: \['FP8_DEFAULT_CFG', 'FP8_PER_CHANNEL_PER_TOKEN_CFG', 'INT4_AWQ_CFG', "
     r"'INT8_SMOOTHQUANT_CFG', 'MXFP8_DEFAULT_CFG', 'NVFP4_DEFAULT_CFG', 'W4A16_NVFP4_CFG', 'W4A8_AWQ_BETA_CFG'\]"),
    ("kv preset not handled yet", lambda d: d["formats"]["FP8_KV_CACHE"].update(kv_cache="NVFP4_KV_CFG"),
     r"formats\.FP8_KV_CACHE\.kv_cache: .*'NVFP4_KV_CFG' is not handled end to end yet"),
    ("duplicate alias", lambda d: _scheme(d, "fp8_mlp_only").update(alias="top50"),
     r"name or alias 'top50' already used by fp8_autoquant_top50"),
    ("plain with two formats", lambda d: _scheme(d, "fp8_mlp_only").update(formats=["FP8_MLP_ONLY", "FP8_ATTN_ONLY"]),
     r"schemes\.\d+: Value error, mode plain takes exactly one format"),
    ("BF16 with a format", lambda d: _scheme(d, "bf16").update(formats=["FP8_MLP_ONLY"]),
     r"schemes\.\d+: Value error, mode none takes no format"),
    ("plain with a target", lambda d: _scheme(d, "fp8_mlp_only").update(coverage=0.5),
     r"mode plain takes no `coverage`"),
    ("unknown drift model", lambda d: _scheme(d, "fp8_mlp_only")["expect"]["drift"].update(tinny={
        "kl_mean_max": 1, "top1_agreement_min": 0, "export_top1_agreement_min": 0, "export_code_mismatch_max": 1}),
     r"expect\.drift: Value error, unknown model \['tinny'\] in expect\.drift; accepted: \['tiny'"),
    ("expected failure without match", lambda d: _scheme(d, "fp8_mlp_only")["expect"]["vllm"].update(
        cuda={"outcome": "fail", "reason": "x"}), r"expect\.vllm\.cuda: .*needs `match`"),
    ("match not a regex", lambda d: _scheme(d, "fp8_mlp_only")["expect"]["vllm"].update(
        cuda={"outcome": "fail", "reason": "x", "match": "("}), r"match '\(' is not a regular expression"),
]  # fmt: skip


@pytest.mark.parametrize("mutate,message", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_fails_with_field_path(document, mutate, message):
    broken = copy.deepcopy(document)
    mutate(broken)
    with pytest.raises(SchemeError, match=message):
        parse_catalog(broken)


def test_format_quant_config_keeps_vision_disabled_last():
    catalog = load_catalog()
    for name, spec in catalog.formats.items():
        entries = spec.quant_config()["quant_cfg"]
        assert entries[-1] == vision_tower_off() and not entries[-1]["enable"], name
    mlp_only = catalog.formats["FP8_MLP_ONLY"].quant_config()["quant_cfg"]
    assert {"quantizer_name": "*self_attn*quantizer", "enable": False} in mlp_only
    kv = catalog.formats["FP8_KV_CACHE"].quant_config()["quant_cfg"]
    assert any(entry["quantizer_name"] == "*[kv]_bmm_quantizer" for entry in kv)


def test_every_format_config_changes_nothing_but_what_it_quantizes(workbench, catalog):
    """Each format's config, and AutoQuant's for each preset picked in every layer group the search offered it
    (ModelOpt's `get_auto_quantize_config` replaying top50's search state, as `resolve_config` builds a scheme's;
    NVFP4 picks, eb7's, are scored on CUDA only), applied to the tiny model (quantizers inserted, nothing
    calibrated: no CUDA needed):
    - as configured, the vision tower's output on random patches (4 attention windows) is the BF16 model's bit for
      bit, no vision quantizer is on or holds a block format, and no vision Conv3d takes ModelOpt's NVFP4
      implicit-GEMM kernel. It took that kernel under the NVFP4 preset with its quantizers off: the patch embedding
      then differed from the BF16 model's on CUDA, and a fresh machine compiled the kernel on its first image prompt
      (run gpu-50);
    - with every quantizer off, ModelOpt's wrapped model gives the BF16 model's logits bit for bit on a text batch
      and an image-prompt batch: what the drift figures measure is quantization, not the wrappers.
    Planted (session 42): AutoQuant's config with the vision tower's quantizers off but holding NVFP4 fails for every
    preset, naming the patch embedding; NVFP4 picked in the vision tower's groups fails naming its kernel."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.quantization.algorithms import QuantRecipe

    from quantsuite.autoquant import NO_QUANT, group_scores, picks_config
    from quantsuite.catalog import PRESET_ALGORITHMS
    from quantsuite.divergence import capture

    context = workbench.context
    configs = {name: spec.quant_config() for name, spec in catalog.formats.items()}
    state, _ = workbench.scores.state(workbench.scores.plan(catalog.scheme("top50")))
    groups = group_scores(state)
    for preset in PRESET_ALGORITHMS:  # picked where the search offered a format (not the vision tower, not lm_head)
        picks = {hparam: QuantRecipe(preset) if set(group["recipes"]) != {NO_QUANT} else group["recipes"][NO_QUANT]
                 for hparam, group in groups.items()}  # fmt: skip
        configs[f"AutoQuant {preset}"] = picks_config(state, picks)
    bf16 = context.load().model
    batches = context.batches("evaluation")[:1] + context.batches("evaluation", images=True)[:1]
    vision = bf16.model.visual.config
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    patches = torch.randn(256, patch, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    grid = torch.tensor([[1, 16, 16]])

    def vision_output(model) -> torch.Tensor:
        with torch.no_grad():
            return model.model.visual(patches, grid_thw=grid).pooler_output

    expected_vision, expected = vision_output(bf16), capture(bf16, batches, context.device)
    formatted, implicit_gemm, vision_moved, logits_moved = {}, {}, [], []
    for name, config in configs.items():
        config = config | {"algorithm": None}  # the quantizers as configured, none calibrated
        model = mtq.quantize(copy.deepcopy(bf16), config, forward_loop=None)
        modules = {n: m for n, m in model.named_modules() if n.startswith("model.visual.")}
        quantizers = {n: m for n, m in modules.items() if isinstance(m, mtq.nn.TensorQuantizer)}
        assert quantizers, name  # the vision tower's layers were wrapped: the check looks at something
        formatted[name] = [n for n, q in quantizers.items() if q.is_enabled or q.block_sizes]
        implicit_gemm[name] = [n for n, m in modules.items() if getattr(m, "_should_use_implicit_gemm", bool)()]
        if implicit_gemm[name] or formatted[name]:
            continue  # fails below; its Conv3d or its vision quantizers' block formats may need CUDA
        if not torch.equal(vision_output(model), expected_vision):
            vision_moved.append(name)
        mtq.disable_quantizer(model, "*")
        if not torch.equal(capture(model, batches, context.device).logits, expected.logits):
            logits_moved.append(name)
    assert not {name: layers for name, layers in implicit_gemm.items() if layers}
    assert not {name: len(layers) for name, layers in formatted.items() if layers}
    assert not vision_moved
    assert not logits_moved


def test_every_handled_preset_is_a_preset_of_the_installed_modelopt():
    """The catalog accepts the names in HANDLED_PRESETS without importing ModelOpt; this is where a ModelOpt that
    renamed or dropped one of them is caught."""
    import modelopt.torch.quantization as mtq

    from quantsuite.catalog import HANDLED_PRESETS

    missing = {name for names in HANDLED_PRESETS.values() for name in names} - set(mtq.config.choices)
    assert not missing, f"not presets of the installed ModelOpt: {sorted(missing)}"


def test_weight_bits_are_modelopts_cost_model():
    """The catalog's bits per weight (the unit of effective-bits targets, kept so the catalog validates without
    importing ModelOpt) are what ModelOpt's AutoQuant charges for each preset."""
    from modelopt.torch.quantization.algorithms import QuantRecipe

    from quantsuite.catalog import PRESET_ALGORITHMS, PRESET_WEIGHT_BITS

    assert set(PRESET_WEIGHT_BITS) == set(PRESET_ALGORITHMS)
    assert {preset: 16.0 * QuantRecipe(preset).compression for preset in PRESET_WEIGHT_BITS} == PRESET_WEIGHT_BITS


def test_every_preset_has_a_family_and_drift_default_covers_every_family():
    from quantsuite.catalog import FAMILIES, PRESET_ALGORITHMS, PRESET_FAMILIES

    assert set(PRESET_FAMILIES) == set(PRESET_ALGORITHMS) and set(PRESET_FAMILIES.values()) == set(FAMILIES)
    catalog = load_catalog()
    assert set(catalog.drift_default) == set(FAMILIES)
    assert catalog.families(catalog.scheme("mixed_fp8_int4_awq_eb10")) == {"fp8", "awq"}
    assert catalog.families(catalog.scheme("bf16")) == set()
