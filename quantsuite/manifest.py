"""Scheme manifests: every LM layer decision with its sensitivity, per-block decisions, and totals.

One JSON per scheme (schema-versioned), built from the quantized model itself (which quantizers are enabled)
and cross-checked against the scheme's decisions, so the manifest describes the model that was measured.

Totals, with weights counted as `weight.numel()` and bits 16 (BF16) or the format's weight bits in ModelOpt's
AutoQuant cost model (FP8 8, INT4 AWQ 4, NVFP4 4.5), the unit of a scheme's target:
- `lm_effective_bits`: over LM decoder linear weights (the set a scheme's target refers to);
- `lm_effective_bits_with_lm_head`: the same plus lm_head;
- `model_effective_bits`: over every nn.Linear weight of the model, vision tower included;
- `lm_storage_bits`: what the export really spends per LM linear weight: codes plus block / channel / tensor
  scales (quantsuite.formats; FP8 per tensor ~8.0, MXFP8 8.25, NVFP4 4.5, INT4 AWQ 4.25);
- `coverage_by_weights`: share of LM decoder linear weights quantized (FP8 + BF16: (16 - lm_effective_bits) / 8),
  and `coverage_by_format` the same per format;
- `coverage_by_blocks`: share of decoder blocks whose linears all share one quantized format.

    >>> manifest = build_manifest(model, scheme, catalog, context)   # doctest: +SKIP
    >>> manifest["totals"]["coverage_by_weights"]                    # doctest: +SKIP
    0.5
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from quantsuite.autoquant import NO_QUANT, Resolution
from quantsuite.catalog import Catalog, SchemeSpec, block_index

SCHEMA_VERSION = 5  # 3: per-module weight_bits, shape; 4: selection.solver (both picks); 5: any preset (quant_algo,
# block_size, storage_bits per module; lm_storage_bits, coverage_by_format, quantized_layers in totals)
BF16 = "BF16"


class ManifestError(RuntimeError):
    """The quantized model and the scheme's decisions disagree."""


def _enabled(module: torch.nn.Module, attribute: str) -> bool:
    quantizer = getattr(module, attribute, None)
    return bool(quantizer is not None and quantizer.is_enabled)


def enabled_quantizers(model: torch.nn.Module, prefix_filter: str) -> list[str]:
    """Names of enabled TensorQuantizers whose module name contains `prefix_filter` (e.g. 'visual')."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [
        name for name, module in model.named_modules()
        if isinstance(module, TensorQuantizer) and prefix_filter in name and module.is_enabled
    ]  # fmt: skip


def linear_layers(model: torch.nn.Module) -> dict[str, tuple[str, int | None, torch.nn.Linear]]:
    """name -> (role, decoder block, module) for every nn.Linear; role is lm_linear, lm_head, vision or other."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            block = block_index(name)
            role = "lm_linear" if block is not None else "lm_head" if name.endswith("lm_head") else (
                "vision" if "visual" in name else "other")  # fmt: skip
            layers[name] = (role, block, module)
    return layers


def _tied(model: torch.nn.Module) -> bool:
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return bool(output is not None and output.weight is embedding.weight)


def build_manifest(
    model: torch.nn.Module,
    scheme: SchemeSpec,
    catalog: Catalog,
    context: dict,
    resolution: Resolution | None = None,
) -> dict:
    """Describe `model` (quantized with `scheme`) layer by layer; `context` carries model/data/version facts."""
    groups = resolution.groups if resolution else {}
    module_group = {module: hparam for hparam, group in groups.items() for module in group["modules"]}
    bits_of = {name: catalog.formats[name].weight_bits for name in scheme.formats}
    format_of = {name: catalog.formats[name].export_format for name in scheme.formats}
    format_by_preset = {catalog.formats[name].preset: name for name in scheme.formats}  # recipe -> catalog name
    modules, weights, bits, storage = [], Counter(), Counter(), Counter()
    quantized_layers = bf16_layers = 0
    for name, (role, block, module) in linear_layers(model).items():
        quantized = _enabled(module, "weight_quantizer")
        group = module_group.get(name)
        if resolution is not None and group in resolution.group_formats:
            fmt = resolution.group_formats[group]  # AutoQuant's recipe: a preset name, or NONE
            fmt = BF16 if fmt == NO_QUANT else format_by_preset.get(fmt, fmt)
        else:
            fmt = scheme.formats[0] if quantized and scheme.formats else BF16
        if quantized != (fmt != BF16):
            raise ManifestError(f"{scheme.name}: {name} decision {fmt} but weight quantizer enabled={quantized}")
        count = module.weight.numel()
        layer_bits = bits_of.get(fmt, 16.0)
        spec = format_of.get(fmt)
        layer_storage = spec.storage_bits(*module.weight.shape) if spec else 16.0
        weights[role] += count
        bits[role] += count * layer_bits
        storage[role] += count * layer_storage
        if fmt != BF16:
            weights[f"{role}_quantized"] += count
            weights[f"{role}:{fmt}"] += count
        if role in ("lm_linear", "lm_head"):
            quantized_layers, bf16_layers = quantized_layers + (fmt != BF16), bf16_layers + (fmt == BF16)
            modules.append({
                "name": name, "role": role, "block": block, "group": group, "format": fmt,
                "quant_algo": spec.quant_algo if spec else None, "block_size": spec.block_size if spec else None,
                "input_quantized": _enabled(module, "input_quantizer"), "weight_count": count,
                "shape": list(module.weight.shape), "weight_bits": layer_bits, "storage_bits": layer_storage,
                "sensitivity": {(BF16 if k == NO_QUANT else k): v for k, v in groups[group]["scores"].items()}
                if group in groups else {},
            })  # fmt: skip

    blocks = {}
    sensitivity = resolution.block_sensitivity if resolution else {}
    ranking = {block: rank for rank, block in enumerate(sorted(sensitivity, key=lambda b: (sensitivity[b], b)))}
    for entry in modules:
        if entry["block"] is None:
            continue
        block = blocks.setdefault(entry["block"], {"index": entry["block"], "formats": Counter()})
        block["formats"][entry["format"]] += 1
    block_list = []
    for index in sorted(blocks):
        formats = blocks[index]["formats"]
        decision = next(iter(formats)) if len(formats) == 1 else "mixed"
        block_list.append({
            "index": index, "decision": decision, "layer_formats": dict(sorted(formats.items())),
            "sensitivity": sensitivity.get(index), "sensitivity_rank": ranking.get(index),
        })  # fmt: skip

    lm_weights = weights["lm_linear"]
    lm_bits = bits["lm_linear"]
    all_weights = sum(weights[role] for role in ("lm_linear", "lm_head", "vision", "other"))
    all_bits = sum(bits[role] for role in ("lm_linear", "lm_head", "vision", "other"))
    lm_head_format = next((m["format"] for m in modules if m["role"] == "lm_head"), "tied-or-absent")
    totals = {
        "lm_linear_weights": lm_weights,
        "lm_head_weights": weights["lm_head"],
        "vision_linear_weights": weights["vision"],
        "lm_effective_bits": lm_bits / lm_weights,
        "lm_storage_bits": storage["lm_linear"] / lm_weights,
        "lm_effective_bits_with_lm_head": (lm_bits + bits["lm_head"]) / (lm_weights + weights["lm_head"]),
        "model_effective_bits": all_bits / all_weights,
        "coverage_by_weights": weights["lm_linear_quantized"] / lm_weights,
        "coverage_by_format": {name: weights[f"lm_linear:{name}"] / lm_weights for name in scheme.formats},
        "coverage_by_blocks": sum(b["decision"] not in (BF16, "mixed") for b in block_list) / max(len(block_list), 1),
        "quantized_layers": quantized_layers,
        "bf16_layers": bf16_layers,
        "lm_head_format": lm_head_format,
        "embedding_format": BF16 if not enabled_quantizers(model, "embed_tokens") else "quantized",
        "kv_cache_format": "FP8" if any("language_model" in n for n in enabled_quantizers(model, "_bmm_quantizer"))
        else BF16,
        "vision_enabled_quantizers": len(enabled_quantizers(model, "visual")),
        "unique_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "tied_lm_head": _tied(model),
    }  # fmt: skip
    selection = {"coverage_mode": scheme.coverage_mode, "chosen_blocks": None, "reason": ""}
    if resolution is not None and resolution.chosen_blocks is not None:
        chosen, blocks = len(resolution.chosen_blocks), len(sensitivity)
        selection["chosen_blocks"] = list(resolution.chosen_blocks)
        # whole blocks: the target coverage rounds to the nearest block count, and the bits are those blocks' bits
        selection["reached_coverage"] = chosen / blocks
        selection["reason"] = (
            f"the {chosen} of {blocks} decoder blocks with the lowest summed {scheme.method} score cost (quantized "
            f"score - BF16 score over the block's layer groups): target coverage {scheme.target_coverage} "
            f"({scheme.target_effective_bits:g} bits) reaches {chosen}/{blocks} = {chosen / blocks:.4g} of the "
            f"blocks ({totals['lm_effective_bits']:.4g} bits), the nearest whole number of blocks"
        )
    elif scheme.mode == "autoquant":
        solve = "ModelOpt AutoQuant LP solve" if scheme.solver == "modelopt" else "exact 0/1 solve (scipy MILP)"
        selection["reason"] = (f"{solve} ({scheme.method} scores) at {scheme.target_effective_bits} effective bits "
                               "over LM linear weights")  # fmt: skip
    else:
        selection["reason"] = f"mode {scheme.mode}: " + ("no quantization" if scheme.mode == "none" else
                                                         f"mtq.quantize with {scheme.formats[0]}")  # fmt: skip
    if resolution is not None and resolution.solver is not None:
        selection["solver"] = resolution.solver  # both picks' objectives, the groups where they differ
    return {
        "schema_version": SCHEMA_VERSION,
        "scheme": scheme.model_dump(mode="json"),
        **context,
        "selection": selection,
        "totals": totals,
        "blocks": block_list,
        "modules": modules,
    }


# Layers vLLM fuses into one (qkv_proj, gate_up_proj): their shards must share a precision there
FUSED_GROUPS = {"qkv": re.compile(r"^(.*)\.self_attn\.[qkv]_proj$"),
                "gate_up": re.compile(r"^(.*)\.mlp\.(gate|up)_proj$")}  # fmt: skip


def split_fused_groups(manifest: dict) -> list[str]:
    """The fused layer groups (`<block>.qkv`, `<block>.gate_up`) whose layers the manifest gives different formats:
    a per_linear pick may; vLLM refuses to load such a checkpoint."""
    formats: dict[str, set[str]] = {}
    for entry in manifest["modules"]:
        for group, pattern in FUSED_GROUPS.items():
            found = pattern.match(entry["name"])
            if found:
                formats.setdefault(f"{found.group(1)}.{group}", set()).add(entry["format"])
    return sorted(name for name, taken in formats.items() if len(taken) > 1)


def decisions(manifest: dict) -> dict[str, str]:
    """Sorted module name -> format: the discrete facts a snapshot records."""
    return {entry["name"]: entry["format"] for entry in sorted(manifest["modules"], key=lambda e: e["name"])}
