"""Drift against the BF16 reference (-m drift), for the fake-quant model (a) and the reloaded export (b)."""

from __future__ import annotations

import pytest

from quantsuite.formats import FORMATS
from quantsuite.manifest import BF16
from quantsuite.plugin.session import catalog_readers_drop_exports

pytestmark = pytest.mark.drift


def _limits(workbench, scheme) -> tuple[dict, str]:
    """The scheme's limits for this model, device and data (quantsuite.bounds.verdict_limits says where from)."""
    return workbench.context.verdict_limits(scheme)


def _violations(limits: dict, measurement: dict, prefixes: tuple[str, ...], source: str) -> list[str]:
    from quantsuite.bounds import figure_value

    return [f"{figure} {figure_value(measurement, figure):.4g} not {limit.kind} {limit.bound:.4g} ({source}"
            + (f"; bound = {limit.basis})" if limit.basis else ")")
            for figure, limit in limits.items() if figure.startswith(prefixes)
            and not limit.holds(figure_value(measurement, figure))]  # fmt: skip


def test_drift_within_bounds(workbench, scheme, measurement):
    """The fake-quant model's KL and top-1 agreement against BF16, within the scheme's limits."""
    limits, source = _limits(workbench, scheme)
    assert not _violations(limits, measurement, ("fake_quant.",), source)


def test_image_prompt_drift_within_bounds(workbench, scheme, measurement):
    """The fake-quant model's KL and top-1 agreement against BF16 on image prompts (at the captions' positions),
    within the scheme's limits where its record measured them (quantsuite.bounds.IMAGE_FIGURES)."""
    limits, source = _limits(workbench, scheme)
    if not any(figure.startswith("image_prompts.") for figure in limits):
        pytest.skip(f"no image-prompt drift bounds for {scheme.name} here ({source}); the figures are reported")
    assert not _violations(limits, measurement, ("image_prompts.fake_quant.",), source)


def test_fake_quant_and_export_agree(workbench, scheme, scheme_result, measurement):
    """(a) and (b) agree: the export's KL, its agreement with the fake-quant model and its differing codes within the
    limits. Where the limits have no bound of the export's own KL (hand-set ones), the export must add no more error
    than quantization did.

    AWQ / SmoothQuant formats: ModelOpt's export gives q/k/v and gate/up one shared pre_quant_scale (folded into
    the norm) and requantizes their weights, a second rounding as large as the first (export_fidelity compares with
    that requantization). There the hand-set check is that the export is no further from BF16 than the fake-quant
    model (measured 0.98x; bound 1.25x)."""
    limits, source = _limits(workbench, scheme)
    assert not _violations(limits, measurement, ("export.", "fake_vs_export.", "export_fidelity."), source)
    if "export.kl_mean" not in limits:
        fake_kl = measurement["fake_quant"]["kl_mean"]
        modules = scheme_result.manifest["modules"]
        if any(m["quant_algo"] and FORMATS[m["quant_algo"]].pre_quant_scale for m in modules):
            assert measurement["export"]["kl_mean"] <= 1.25 * fake_kl + 1e-4
        else:
            assert measurement["fake_vs_export"]["kl_mean"] <= fake_kl + 1e-4


@pytest.mark.scheme_modes("none")
def test_bf16_reference_has_zero_drift(scheme, measurement):
    for part in (measurement, measurement["image_prompts"]):
        for form in ("fake_quant", "export", "fake_vs_export"):
            assert part[form]["kl_mean"] == 0.0 and part[form]["max_abs_logit_difference"] == 0.0, form
            assert all(layer["relative_error"] == 0.0 for layer in part[form]["layers"]), form
    assert measurement["image_prompts"]["clipping"] == []  # nothing quantized, nothing clipped


def test_image_prompts_are_measured_apart_from_text(workbench, scheme, measurement):
    """The bundled scenes' image prompts (or --images-dir's): the same figures over the captions' positions after
    the image, reported beside the text ones, and per layer with a static input amax its clipping at image and text
    positions. Report only: no bound yet (the tiny model's vision tower is untrained)."""
    images = measurement["image_prompts"]
    assert images["source"] == workbench.context.image_source
    assert images["fake_quant"]["tokens"] > 0
    for form in ("fake_quant", "export", "fake_vs_export"):
        assert images[form]["kl_mean"] >= 0 and 0 <= images[form]["top1_agreement"] <= 1
    for row in images["clipping"]:
        assert row["amax"] > 0 and 0 <= row["image_clipped_share"] <= 1 and 0 <= row["text_clipped_share"] <= 1
        assert (row["image_clipped_share"] > 0) == (row["image_max"] > row["amax"]), row


@pytest.mark.uses_schemes("top50")
def test_clipping_at_image_positions_follows_the_calibrated_amax(workbench, catalog):
    """One layer's input amax halved in a copy of top50's fake-quant model: that layer clips more at image
    positions (the clipping figure reads the amax the quantizer uses). Drift measures it during the pass that
    captures the image prompts' logits: the same rows as a pass of its own, and the same logits as without it."""
    import copy

    import torch

    from quantsuite.divergence import ClippingProbe, activation_clipping, capture

    model = copy.deepcopy(workbench.schemes.model(catalog.scheme("top50")))
    batches = workbench.context.batches("evaluation", images=True)
    image_token = workbench.context.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    clean = {r["layer"]: r for r in activation_clipping(model, batches, workbench.context.device, image_token)}
    layer = next(name for name in clean if name.endswith("q_proj"))
    quantizer = model.get_submodule("model.language_model." + layer).input_quantizer
    quantizer.amax = quantizer.amax / 2
    halved = {r["layer"]: r for r in activation_clipping(model, batches, workbench.context.device, image_token)}
    assert halved[layer]["image_clipped_share"] > max(clean[layer]["image_clipped_share"], 0.001), halved[layer]
    assert halved[layer]["amax"] == pytest.approx(clean[layer]["amax"] / 2)
    with ClippingProbe(model, image_token) as probe:
        images = capture(model, batches, workbench.context.device, before_batch=probe.observe)
    assert probe.rows() == list(halved.values())
    assert torch.equal(images.logits, capture(model, batches, workbench.context.device).logits)


def test_error_localized_to_quantized_blocks(scheme, scheme_result, measurement):
    """Blocks before the first quantized block are exact; the first one shows error; all blocks are reported. An
    FP8 KV cache quantizes every block's attention, so its error starts at block 0 even in a BF16 block
    (top50_kv, tiny: block 0 BF16, relative error 0.013)."""
    manifest = scheme_result.manifest
    layers = measurement["fake_quant"]["layers"]
    assert [layer["layer"] for layer in layers] == [f"block.{b['index']}" for b in manifest["blocks"]] + ["final_norm"]
    kv = manifest["totals"]["kv_cache_format"] != BF16
    quantized = [b["index"] for b in manifest["blocks"] if b["decision"] != BF16 or kv]
    first = min(quantized, default=None)
    for block in manifest["blocks"]:
        error = layers[block["index"]]["relative_error"]
        if first is None or block["index"] < first:
            assert error == 0.0, f"block {block['index']} precedes every FP8 layer but drifted"
        elif block["index"] == first:
            assert error > 0.0 or kv


@pytest.mark.catalog
def test_more_fp8_never_means_less_drift(workbench, catalog, request):
    """Where scheme B quantizes a superset of scheme A's layers in the same format, KL(B) >= KL(A) within a noise
    margin of 10% + 2e-5 nats (measured tiny gaps between nested schemes: >= 40% apart)."""
    wanted = request.config.getoption("--scheme")
    runs_here = workbench.context.device.type == "cuda"
    schemes = [s for s in catalog.select(wanted) if runs_here or not catalog.cuda_only(s)]
    fp8 = {s.name: {(m["name"], m["format"]) for m in workbench.schemes.result(s).manifest["modules"]
                    if m["format"] != BF16} for s in schemes}  # fmt: skip
    keep = not catalog_readers_drop_exports(request.config)  # a cache without their drift: one export per scheme
    kl = {s.name: workbench.drift.measure(s, keep)["fake_quant"]["kl_mean"] for s in schemes}
    kv = {s.name: workbench.schemes.result(s).manifest["totals"]["kv_cache_format"] for s in schemes}
    pairs = [(a, b) for a in fp8 for b in fp8 if a != b and fp8[a] < fp8[b] and kv[a] == kv[b] == BF16]
    if not pairs:
        pytest.skip("no nested pair of schemes selected")
    violations = [f"{b} ({kl[b]:.2e}) < {a} ({kl[a]:.2e})" for a, b in pairs if kl[b] < 0.9 * kl[a] - 2e-5]
    assert not violations, violations


# Planted faults: each drift check must fail on the fault it exists for. They are measured against the generated
# records (reports/bounds/<model>.json on CPU, <model>.cuda-sm90.json on an H100/H200), which apply with the default
# data settings; hand-set bounds elsewhere catch a broken scheme only.


def _record_limits(workbench, scheme) -> dict:
    """The scheme's limits from a generated record (its own, or its format peers'); skips where none applies."""
    limits, source = _limits(workbench, scheme)
    if "reports/bounds/" not in source:
        pytest.skip(f"planted faults are checked against generated bounds (reports/bounds/, default data settings); "
                    f"here {scheme.name}'s come from {source}")  # fmt: skip
    return limits


def _with_layer_scale_errors(model, size: float):
    """A copy of `model` whose quantized LM layers compute with their scale off by +-`size` (alternating signs): the
    weight each applies becomes ~(1 +- size) x what it was."""
    import copy

    import torch

    planted = copy.deepcopy(model)
    with torch.no_grad():
        layers = [m for n, m in planted.named_modules() if "language_model" in n
                  and getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)]  # fmt: skip
        for index, module in enumerate(layers):
            module.weight.mul_(1 + size * (-1) ** index)
    return planted


@pytest.mark.parametrize("name", ["top50", "fp8_modelopt_default", "int4_awq", "w4a8_awq", "int8_smoothquant"])
def test_a_planted_30_percent_kl_regression_fails_the_drift_bounds(workbench, catalog, name):
    """Layer scales perturbed until the fake-quant KL is 30-50% above its measured value: the KL bound fails it.
    (KL moves in steps with the perturbation: under the scalar kernel set fp8_modelopt_default jumps from below 1.30x
    to 1.47x, so the window is 1.30-1.50x.)"""
    from quantsuite.divergence import capture, compare

    scheme = catalog.scheme(name)
    limits = _record_limits(workbench, scheme)
    model, reference = workbench.schemes.model(scheme), workbench.drift.reference()
    batches, device = workbench.context.batches("evaluation"), workbench.context.device
    measured = workbench.drift.measure(scheme)["fake_quant"]["kl_mean"]
    assert limits["fake_quant.kl_mean"].holds(measured)

    def planted_kl(size: float) -> float:
        return compare(reference, capture(_with_layer_scale_errors(model, size), batches, device))["kl_mean"]

    low, high = 0.0, 0.2
    # a 4-bit scheme's KL on the 3B shape's random weights is already large, and 20% scale errors did not raise it by
    # 30% on a GPU (reports/bounds/README.md, session 47): the upper end doubles until it does
    while high < 0.8 and planted_kl(high) < 1.30 * measured:
        low, high = high, 2 * high
    for _ in range(14):  # bisect the scale error for a KL 1.30-1.50x the measured one
        size = (low + high) / 2
        kl = planted_kl(size)
        if kl < 1.30 * measured:
            low = size
        elif kl > 1.50 * measured:
            high = size
        else:
            break
    assert 1.30 * measured <= kl <= 1.50 * measured, (size, kl / measured)
    assert not limits["fake_quant.kl_mean"].holds(kl), f"KL {kl:.3g} ({kl / measured:.2f}x) passed"


def _planted_export(workbench, scheme, tmp_path, edit):
    """A copy of the scheme's export whose tensors `edit(tensors)` changed in place; its drift measured afresh."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    planted = tmp_path / "export"
    shutil.copytree(workbench.exports.path(scheme), planted)
    (file,) = planted.glob("*.safetensors")
    with safe_open(str(file), "pt") as handle:
        tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(file), metadata=metadata)
    return workbench.drift.measure_export(scheme, workbench.schemes.model(scheme), planted)


# one layer's stored scale x 1.1: scheme -> (the scale's name suffix, figure prefixes each of which must catch it)
SCALE_FAULTS = {
    # (the KL figures catch it in 11 of top50's 28 FP8 layers, not in the first: reports/bounds/README.md)
    "top50": ("proj.weight_scale", (("export_fidelity.differing_code_share",),)),
    # the AWQ factor ModelOpt folds into the norm before q/k/v (one shared factor for the fused group)
    "int4_awq": ("input_layernorm.weight", (("export_fidelity.differing_code_share",),)),
    # W4A8's FP8-stage scale, shared by the fused group
    "w4a8_awq": (".weight_scale_2", (("export_fidelity.differing_code_share",),)),
    # NVFP4's global scale; ModelOpt 0.47 runs NVFP4 on CUDA only, so it runs where a GPU record covers the scheme
    "fp8_nvfp4_eb7": (".weight_scale_2", (("export.", "fake_vs_export.", "export_fidelity."),)),
}  # fmt: skip


@pytest.mark.parametrize("name", SCALE_FAULTS)
def test_one_exported_layer_scale_off_by_10_percent_fails_the_export_checks(workbench, catalog, tmp_path, name):
    """One quantized layer's stored scale x 1.1 in a copy of the scheme's export (an FP8 weight_scale; an AWQ factor
    folded into a norm; a W4A8 or NVFP4 global scale): every weight it scales moves by 10%, beyond a code step, and
    the export checks fail."""
    scheme = catalog.scheme(name)
    limits = _record_limits(workbench, scheme)
    suffix, catchers = SCALE_FAULTS[name]

    def off_by_10_percent(tensors: dict) -> None:
        layer = next(k for k in sorted(tensors) if k.startswith("model.layers.") and k.endswith(suffix))
        tensors[layer] = tensors[layer] * 1.1

    measurement = _planted_export(workbench, scheme, tmp_path, off_by_10_percent)
    caught = _violations(limits, measurement, ("export.", "fake_vs_export.", "export_fidelity."), "planted")
    for prefixes in catchers:
        assert any(v.startswith(prefixes) for v in caught), (prefixes, caught)
    clean = workbench.drift.measure_export(scheme, workbench.schemes.model(scheme), workbench.exports.path(scheme))
    assert not _violations(limits, clean, ("export.", "fake_vs_export.", "export_fidelity."), "clean")
    fidelity = clean["export_fidelity"]  # the share's error over layers reaches the measurement the bounds derive from
    assert fidelity["differing_code_share"] == 0 or fidelity["differing_code_share_se"] > 0, fidelity


@pytest.mark.uses_schemes("top50_kv")
def test_a_wrong_kv_scale_fails_the_export_checks(workbench, catalog, tmp_path):
    """Every k_scale of top50_kv's export / 8 (calibrated on other data; FP8 shrugs off a scale too large, but one too
    small saturates keys at 448): the export's KL fails."""
    scheme = catalog.scheme("top50_kv")
    limits = _record_limits(workbench, scheme)

    def wrong_k_scales(tensors: dict) -> None:
        scales = [k for k in tensors if k.endswith(".k_scale")]
        assert scales
        for key in scales:
            tensors[key] = tensors[key] / 8

    measurement = _planted_export(workbench, scheme, tmp_path, wrong_k_scales)
    caught = _violations(limits, measurement, ("export.", "fake_vs_export."), "planted")
    assert any(v.startswith(("export.kl_mean", "fake_vs_export.kl_mean")) for v in caught), caught
