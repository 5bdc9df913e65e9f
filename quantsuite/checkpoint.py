"""Export a scheme as a Hugging Face checkpoint, check it against its manifest, and load it back exactly.

- `export_model` runs ModelOpt's `export_hf_checkpoint` on the quantized model (it mutates the model, so the
  caller passes a copy) and adds the tokenizer / processor files and `quantsuite_export.json`, which records
  the manifest the export was made from.
- `check_export` reads the files back and lists every disagreement with the manifest: FP8 layers must be
  `float8_e4m3fn` with `weight_scale` / `input_scale`, BF16 and vision tensors BF16, the exclusion lists of
  `config.json` and `hf_quant_config.json` must match the manifest exactly (prefix wildcards `X*` expanded as
  vLLM does: `X` itself or `X.*`), and the tensor bytes must be within 1% of the size the manifest predicts.
- `load_export` loads an export for PyTorch inference *with* its scales: FP8 layers become `Fp8Linear`
  (weight = fp8 code x weight_scale; input fake-quantized to FP8 with input_scale). Plain
  `from_pretrained(export_dir)` silently drops the scales (transformers skips the modelopt config).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from quantsuite.divergence import pooled_standard_error
from quantsuite.formats import (
    FORMATS,
    FP8,
    FP8_MAX,
    OPTIONAL_TENSORS,
    ExportFormat,
    QuantLinear,
    per_token_scale,
    to_fp8,
)
from quantsuite.models import SafetensorsHeaderError, read_safetensors_header
from quantsuite.timing import STAGE_TIMES

EXPORT_INFO = "quantsuite_export.json"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json")  # fmt: skip
HUB_TO_MEMORY = (  # exported (hub) names -> in-memory Qwen2_5_VLForConditionalGeneration names
    (re.compile(r"^model\.(layers|embed_tokens|norm)\b"), r"model.language_model.\1"),
    (re.compile(r"^visual\."), "model.visual."),
)


class ExportError(RuntimeError):
    """An export directory that is incomplete, corrupt, or made from another manifest."""


def memory_name(hub_name: str) -> str:
    for pattern, replacement in HUB_TO_MEMORY:
        if pattern.search(hub_name):
            return pattern.sub(replacement, hub_name)
    return hub_name


def hub_name(memory: str) -> str:
    return memory.replace("model.language_model.", "model.").replace("model.visual.", "visual.")


def manifest_fingerprint(manifest: dict) -> str:
    """Identity of the decisions an export must carry (scheme, model, per-layer formats)."""
    facts = {"scheme": manifest["scheme"]["name"], "model": manifest["model"]["fingerprint"],
             "modules": [(m["name"], m["format"]) for m in manifest["modules"]]}  # fmt: skip
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def export_model(model: torch.nn.Module, manifest: dict, source_dir: Path, export_dir: Path) -> None:
    """Write the HF checkpoint of `model` (mutated by ModelOpt: pass a copy) plus processor files."""
    from modelopt.torch.export import export_hf_checkpoint

    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=export_dir)
    untie_quantized_lm_head(export_dir)
    for name in PROCESSOR_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, export_dir / name)
    info = {"scheme": manifest["scheme"]["name"], "manifest_fingerprint": manifest_fingerprint(manifest)}
    (export_dir / EXPORT_INFO).write_text(json.dumps(info, indent=1))


def untie_quantized_lm_head(export_dir: Path) -> bool:
    """A tied model whose lm_head was quantized: ModelOpt writes an FP8 `lm_head.weight` but keeps
    `tie_word_embeddings: true`, so vLLM would tie lm_head to the BF16 embeddings and skip the FP8 one. Untie
    in config.json (the BF16 embeddings stay in the checkpoint), so the checkpoint means what was quantized."""
    index = tensor_index(export_dir)
    lm_head = index.get("lm_head.weight")
    if lm_head is None or lm_head["dtype"] != "F8_E4M3":
        return False
    if "model.embed_tokens.weight" not in index and "model.language_model.embed_tokens.weight" not in index:
        raise ExportError(f"{export_dir}: FP8 lm_head but no BF16 embed_tokens in the checkpoint; cannot untie")
    path = Path(export_dir) / "config.json"
    config = json.loads(path.read_text())
    for section in (config, config.get("text_config") or {}):
        if "tie_word_embeddings" in section:
            section["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2))
    return True


def tensor_files(export_dir: Path) -> list[Path]:
    files = sorted(Path(export_dir).glob("*.safetensors"))
    if not files:
        raise ExportError(f"{export_dir}: no *.safetensors file; the export is incomplete (delete it to rebuild)")
    return files


def read_header(path: Path) -> dict[str, dict]:
    """name -> {"dtype", "shape"} from a safetensors header, validating the file's length (ExportError if not)."""
    try:
        return read_safetensors_header(path)
    except SafetensorsHeaderError as error:
        raise ExportError(str(error)) from error


def tensor_index(export_dir: Path) -> dict[str, dict]:
    index = {}
    for path in tensor_files(export_dir):
        for name, entry in read_header(path).items():
            index[name] = entry | {"file": path.name, "bytes": entry["data_offsets"][1] - entry["data_offsets"][0]}
    return index


def verify_export(export_dir: Path, manifest: dict) -> dict:
    """Raise ExportError unless `export_dir` is complete and was made from `manifest`; return its info."""
    export_dir = Path(export_dir)
    info_path = export_dir / EXPORT_INFO
    if not (export_dir / "config.json").is_file() or not info_path.is_file():
        raise ExportError(f"{export_dir}: config.json or {EXPORT_INFO} missing; the export is incomplete")
    info = json.loads(info_path.read_text())
    expected = manifest_fingerprint(manifest)
    if info.get("manifest_fingerprint") != expected:
        raise ExportError(
            f"{export_dir} was exported from manifest {info.get('manifest_fingerprint')} (scheme "
            f"{info.get('scheme')}), but manifest {expected} (scheme {manifest['scheme']['name']}) was given"
        )
    tensor_index(export_dir)  # headers parse and file lengths match
    return info


def _excluded(name: str, patterns: list[str]) -> bool:
    """vLLM's reading of ModelOpt exclusions: `X*` means X or X.*; other patterns fnmatch."""
    for pattern in patterns:
        if pattern.endswith("*") and not any(c in pattern[:-1] for c in "*?["):
            prefix = pattern[:-1]
            if name == prefix.rstrip(".") or name.startswith(prefix.rstrip(".") + "."):
                return True
        elif fnmatch.fnmatch(name, pattern) or name == pattern:
            return True
    return False


QUANTIZED_DTYPES = ("F8_E4M3", "U8", "I8")  # safetensors dtypes of quantized weights (codes)
# the norm whose output q/k/v and gate/up read (ModelOpt folds their shared pre_quant_scale into it); o_proj and
# down_proj read no norm
FOLDED_NORMS = {f"self_attn.{p}_proj": "input_layernorm" for p in "qkv"} | {
    f"mlp.{p}_proj": "post_attention_layernorm" for p in ("gate", "up")}  # fmt: skip


def module_format(module: dict) -> ExportFormat | None:
    """The export format of a manifest module (None: BF16)."""
    return FORMATS[module["quant_algo"]] if module.get("quant_algo") else None


def export_algorithm(manifest: dict) -> str | None:
    """The quant_algo the export of `manifest` must declare: its one format's, MIXED_PRECISION for several."""
    algorithms = {m["quant_algo"] for m in manifest["modules"] if m.get("quant_algo")}
    return None if not algorithms else algorithms.pop() if len(algorithms) == 1 else "MIXED_PRECISION"


def predicted_bytes(manifest: dict) -> int:
    """Tensor bytes the export should hold: BF16 parameters, quantized layers at their format's tensor bytes."""
    totals = manifest["totals"]
    size = 2 * totals["unique_parameters"]
    for module in manifest["modules"]:
        spec = module_format(module)
        if spec is not None:
            extra_copy = module["role"] == "lm_head" and totals["tied_lm_head"]  # quantized lm_head + BF16 embedding
            size += spec.tensor_bytes(*module["shape"]) - (0 if extra_copy else 2 * module["weight_count"])
    return size


def _layer_problems(name: str, module: dict, index: dict[str, dict]) -> list[str]:
    """A quantized layer's tensors against its format: each present with the format's dtype and size, none extra.
    A missing pre_quant_scale is allowed: ModelOpt folds it into the preceding norm for q/k/v and gate/up."""
    spec = module_format(module)
    missing, unexpected = spec.tensor_name_problems(stored_suffixes(index, name, spec))
    problems = [f"{name}: {module['format']} layer ({spec.quant_algo}) without {suffix}" for suffix in missing]
    for suffix, (dtype, shape) in spec.tensors(*module["shape"]).items():
        entry = index.get(f"{name}.{suffix}")
        if entry is not None and (entry["dtype"] != dtype or math.prod(entry["shape"]) != math.prod(shape)):
            problems.append(f"{name}.{suffix}: {entry['dtype']} {entry['shape']} stored, the manifest's "
                            f"{spec.quant_algo} layer needs {dtype} {list(shape)}")  # fmt: skip
    why = " (its activations are quantized per token)" if spec.activation == "fp8_per_token" else ""
    return problems + [f"{name}: {suffix} stored, the manifest's {spec.quant_algo} layer has none{why}"
                       for suffix in unexpected]  # fmt: skip


def stored_suffixes(stored: dict, layer: str, spec: ExportFormat) -> set[str]:
    """Which of the format's tensors and of the optional ones (scales, pre_quant_scale) `layer` has in `stored`
    (tensor names -> anything)."""
    return {suffix for suffix in (*spec.tensors(1, 1), *OPTIONAL_TENSORS) if f"{layer}.{suffix}" in stored}


def tokenizer_problems(export_dir: Path) -> list[str]:
    """A tokenizer.json saved with truncation or padding settings applies them to every encoding that does not say
    otherwise: vLLM's processor then cuts a prompt (an image prompt's image tokens no longer match the image)."""
    path = export_dir / "tokenizer.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    return [f"{path.name}: saved with {key} {saved[key]} (every prompt vLLM's processor encodes gets it); remove it "
            f"from the source model's tokenizer.json" for key in ("truncation", "padding") if saved.get(key)]


def check_export(export_dir: Path, manifest: dict) -> list[str]:
    """Every disagreement between the export and the manifest, as readable lines (empty: consistent)."""
    problems = []
    index = tensor_index(export_dir)
    config = json.loads((Path(export_dir) / "config.json").read_text())
    quant = config.get("quantization_config")
    quantized = {hub_name(m["name"]): m for m in manifest["modules"] if m.get("quant_algo")}
    for module in manifest["modules"]:
        name = hub_name(module["name"])
        weight = index.get(f"{name}.weight")
        if weight is None:
            if not (module["role"] == "lm_head" and manifest["totals"]["tied_lm_head"] and name not in quantized):
                problems.append(f"{name}: weight missing from the export")
            continue
        if name in quantized:
            problems += _layer_problems(name, module, index)
        elif weight["dtype"] != "BF16" or f"{name}.weight_scale" in index:
            problems.append(f"{name}: manifest says BF16, export stores {weight['dtype']} (scales present: "
                            f"{f'{name}.weight_scale' in index})")  # fmt: skip
    problems += tokenizer_problems(Path(export_dir))
    for name, entry in index.items():
        if name.startswith("visual.") and entry["dtype"] != "BF16":
            problems.append(f"{name}: vision tensor stored as {entry['dtype']}")
    linear_names = {hub_name(m["name"]) for m in manifest["modules"]}
    hf_quant_path = Path(export_dir) / "hf_quant_config.json"
    hf_quantization = json.loads(hf_quant_path.read_text())["quantization"] if hf_quant_path.is_file() else None
    algorithm = export_algorithm(manifest)
    for source, section in (("config.json quantization_config", quant),
                            ("hf_quant_config.json quantization", hf_quantization)):  # fmt: skip
        if section is not None and section.get("quant_algo") != algorithm:
            problems.append(f"{source}: quant_algo {section.get('quant_algo')!r}, the manifest's layers need "
                            f"{algorithm!r}")  # fmt: skip
    if algorithm == "MIXED_PRECISION":  # vLLM reads each layer's format from quantized_layers, not the exclusions
        problems += _mixed_precision_problems(quantized, (hf_quantization or {}).get("quantized_layers") or {})
    exclusion_lists = {}
    if quant is not None and algorithm != "MIXED_PRECISION":
        exclusion_lists["config.json quantization_config.ignore"] = quant.get("ignore", [])
    if hf_quantization is not None and algorithm != "MIXED_PRECISION":
        exclusion_lists["hf_quant_config.json exclude_modules"] = hf_quantization.get("exclude_modules") or []
    if quantized and quant is None:
        problems.append("quantized layers in the manifest but no quantization_config in config.json")
    for source, patterns in exclusion_lists.items():
        treated_quantized = {name for name in linear_names if not _excluded(name, patterns)}
        for name in sorted(treated_quantized - set(quantized)):
            problems.append(f"{source}: {name} not excluded, but the manifest keeps it BF16")
        for name in sorted(set(quantized) - treated_quantized):
            problems.append(f"{source}: {name} excluded, but the manifest quantizes it")
        vision = [name for name in index if name.startswith("visual.") and name.endswith(".weight")]
        for name in vision:
            if not _excluded(name.rsplit(".", 1)[0], patterns):
                problems.append(f"{source}: vision module {name.rsplit('.', 1)[0]} not excluded")
                break
    problems += _kv_cache_problems(index, manifest, hf_quantization or {})
    actual, expected = sum(entry["bytes"] for entry in index.values()), predicted_bytes(manifest)
    if abs(actual - expected) > 0.01 * expected:
        problems.append(f"tensor bytes {actual} differ from the manifest's prediction {expected} by more than 1%")
    return problems


def _mixed_precision_problems(quantized: dict[str, dict], quantized_layers: dict[str, dict]) -> list[str]:
    """A MIXED_PRECISION export's hf_quant_config.json quantized_layers against the manifest: the same layers, each
    with the manifest's quant_algo."""
    problems = [f"hf_quant_config.json quantized_layers: {name} missing, the manifest quantizes it "
                f"({module['quant_algo']})" for name, module in sorted(quantized.items())
                if name not in quantized_layers]  # fmt: skip
    for name, entry in sorted(quantized_layers.items()):
        wanted = quantized[name]["quant_algo"] if name in quantized else "BF16"
        if entry.get("quant_algo") != wanted:
            problems.append(f"hf_quant_config.json quantized_layers: {name} is {entry.get('quant_algo')}, the "
                            f"manifest says {wanted}")  # fmt: skip
    return problems


def _kv_cache_problems(index: dict[str, dict], manifest: dict, hf_quantization: dict) -> list[str]:
    """The manifest's KV cache against the export (`hf_quantization`: hf_quant_config.json's `quantization`):
    `kv_cache_quant_algo` and one k_scale / v_scale per LM k_proj / v_proj (what vLLM's fp8 KV cache reads), or
    neither for a BF16 cache."""
    wanted = manifest["totals"]["kv_cache_format"]
    algorithm = hf_quantization.get("kv_cache_quant_algo")
    stored = {name for name in index if name.endswith((".k_scale", ".v_scale"))}
    problems = []
    if (algorithm or "BF16") != wanted:
        problems.append(f"hf_quant_config.json kv_cache_quant_algo {algorithm!r}, the manifest's KV cache is {wanted}")
    if wanted == "BF16":
        return problems + [f"{name}: KV-cache scale stored, the manifest's KV cache is BF16" for name in sorted(stored)]
    needed = {f"{hub_name(m['name'])}.{m['name'].rsplit('.', 1)[1][0]}_scale" for m in manifest["modules"]
              if m["role"] == "lm_linear" and m["name"].endswith(("self_attn.k_proj", "self_attn.v_proj"))}  # fmt: skip
    return problems + [f"{name}: missing, the manifest's KV cache is {wanted}" for name in sorted(needed - stored)]


class Fp8Linear(torch.nn.Module):
    """y = fakequant_fp8(x / s_x) * s_x @ (w_fp8 * weight_scale)^T + bias, where s_x is the stored static
    input_scale or, without one (FP8_PER_CHANNEL_PER_TOKEN), each token's own scale; weight_scale is one value or
    one per output row."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
                 bias=None):  # fmt: skip
        super().__init__()
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1) if weight_scale.numel() > 1
                             else weight_scale.float())  # fmt: skip
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float())
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight_fp8.float() * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = per_token_scale(x) if self.input_scale is None else self.input_scale
        x_quantized = (to_fp8(x, scale).float() * scale).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x_quantized, self.dequantized_weight(x.dtype), bias)


class Fp8Output(torch.nn.Module):
    """Wraps k_proj / v_proj of an FP8-KV-cache export: outputs fake-quantized to FP8 with k_scale / v_scale.

    An approximation of the FP8 KV cache in plain PyTorch: ModelOpt quantizes K after RoPE, this quantizes
    the projection output (RoPE is applied afterwards); V is the same point in both.
    """

    def __init__(self, inner: torch.nn.Module, scale: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("scale", scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return (to_fp8(y, self.scale).float() * self.scale).to(y.dtype)


def linked_copy(export_dir: Path, target: Path, hard: bool = False) -> Path:
    """A copy of an export whose safetensors are links (GBs on the 3B shape) and other files real copies; hard
    links (same file system) keep the tensors alive when the original export is deleted."""
    target.mkdir(parents=True)
    for file in Path(export_dir).iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, target)
        elif hard:
            os.link(file, target / file.name)
        else:
            (target / file.name).symlink_to(file)
    return target


def read_tensors(export_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export, on the CPU."""
    tensors = {}
    for path in tensor_files(export_dir):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return tensors


def layer_tensors(tensors: dict[str, torch.Tensor], layer: str, spec: ExportFormat,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The format's tensors of one exported layer (suffix -> tensor), those present; on `device` if given (decoded
    where the model runs: on a GPU, not on the host's cores, reports/profile-gpu-h200-nightly, gpu-51)."""
    return {suffix: tensors[f"{layer}.{suffix}"].to(device) for suffix in spec.tensors(1, 1)
            if f"{layer}.{suffix}" in tensors}  # fmt: skip


def layer_algorithms(export_dir: Path, tensors: dict) -> dict[str, str]:
    """Exported layer name -> quant_algo, for every layer whose weight is stored quantized: the export's one
    quant_algo, or per layer from hf_quant_config.json's quantized_layers under MIXED_PRECISION."""
    config = json.loads((Path(export_dir) / "config.json").read_text())
    algorithm = (config.get("quantization_config") or {}).get("quant_algo")
    per_layer = {}
    hf_quant_path = Path(export_dir) / "hf_quant_config.json"
    if algorithm == "MIXED_PRECISION" and hf_quant_path.is_file():
        layers = json.loads(hf_quant_path.read_text())["quantization"].get("quantized_layers") or {}
        per_layer = {name: entry["quant_algo"] for name, entry in layers.items()}
    layers = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight") and tensor.dtype in (FP8, torch.uint8, torch.int8):
            layer = name[: -len(".weight")]
            layers[layer] = per_layer.get(layer, algorithm)
            if layers[layer] not in FORMATS:
                raise ExportError(f"{export_dir}: layer {layer} is stored quantized with quant_algo "
                                  f"{layers[layer]!r}; quantsuite reads {sorted(FORMATS)}")  # fmt: skip
    return layers


FP8_LINEAR_ALGORITHMS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN")  # reloaded as Fp8Linear; the others as QuantLinear


def _quantized_module(spec: ExportFormat, tensors: dict[str, torch.Tensor], bias, dtype) -> torch.nn.Module:
    """FP8 layers as Fp8Linear (the FP8 codes kept: the real-FP8 benchmark and vLLM's fused-shard emulation use
    them), every other format as QuantLinear (weight dequantized once)."""
    if spec.quant_algo in FP8_LINEAR_ALGORITHMS:
        return Fp8Linear(tensors["weight"], tensors["weight_scale"], tensors.get("input_scale"), bias)
    return QuantLinear(spec, tensors, bias, dtype)


def load_export(export_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                device_map: dict[str, int | str | torch.device] | None = None):  # fmt: skip
    """Qwen2.5-VL from an export, quantized layers computed as their format means (strict: every tensor used).

    `device_map` (module name -> device, as transformers' `hf_device_map` of a model loaded with
    `device_map="auto"`): the reload is built on the CPU and dispatched over those devices (accelerate), so a model
    too large for one GPU is never put on a single one; `device` is then ignored. See `spread_device_map`."""
    with STAGE_TIMES.measure("reload an export in PyTorch"):
        if not device_map:
            return _load_export(Path(export_dir), device, dtype)
        from accelerate import dispatch_model

        return dispatch_model(_load_export(Path(export_dir), "cpu", dtype), device_map=device_map)


def spread_device_map(model: torch.nn.Module) -> dict[str, int | str | torch.device] | None:
    """The model's `hf_device_map` when it spans several devices (loaded with `device_map="auto"` and too large
    for one), else None: a reload of its export must be spread the same way."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return dict(device_map) if len({str(device) for device in device_map.values()}) > 1 else None


def _load_export(export_dir: Path, device: torch.device | str, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    config_dict = json.loads((export_dir / "config.json").read_text())
    config_dict.pop("quantization_config", None)
    config = Qwen2_5_VLConfig.from_dict(config_dict)
    tensors = read_tensors(export_dir)
    # no random init: every parameter comes from the checkpoint (strict below), and initializing was most of a reload
    # (3B shape on the CPU: 68 s of init, 0.04 s without); buffers computed in __init__ (rotary inv_freq) are kept
    with torch.device(device), no_init_weights():
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    algorithms = layer_algorithms(export_dir, tensors)
    used = set()
    for layer, algorithm in sorted(algorithms.items()):
        spec = FORMATS[algorithm]
        parent_name, _, child = memory_name(layer).rpartition(".")
        parent = model.get_submodule(parent_name)
        present = layer_tensors(tensors, layer, spec, device)
        missing, unexpected = spec.tensor_name_problems(stored_suffixes(tensors, layer, spec))
        if missing:
            raise ExportError(f"{export_dir}: {algorithm} layer {layer} lacks {missing}")
        if unexpected:
            raise ExportError(f"{export_dir}: {layer} stores {unexpected}, which quant_algo {algorithm} does not "
                              "have")  # fmt: skip
        bias = tensors.get(f"{layer}.bias")
        module = _quantized_module(spec, present, None if bias is None else bias.to(device, dtype), dtype)
        setattr(parent, child, module)
        used.update(f"{layer}.{suffix}" for suffix in present)
        used.update([f"{layer}.bias"] if bias is not None else [])
    kv_scales = sorted(name for name in tensors if name.endswith((".k_scale", ".v_scale")))
    used.update(kv_scales)
    if "lm_head" in algorithms:
        model.config.tie_word_embeddings = False  # the checkpoint holds a separate quantized lm_head
    state = {memory_name(name): tensor for name, tensor in tensors.items() if name not in used}
    result = model.load_state_dict(state, strict=False)
    tied_ok = {"lm_head.weight"} if config.tie_word_embeddings and "lm_head" not in algorithms else set()
    missing = [key for key in result.missing_keys if key not in tied_ok]
    missing = [key for key in missing if not any(key.startswith(memory_name(layer) + ".") for layer in algorithms)]
    if missing or result.unexpected_keys:
        raise ExportError(f"{export_dir}: parameters not in the checkpoint {missing[:5]}, "
                          f"checkpoint tensors not in the model {result.unexpected_keys[:5]}")  # fmt: skip
    if tied_ok:
        model.tie_weights()
    for name in kv_scales:  # FP8 KV cache scales, stored on k_proj / v_proj
        parent_name, _, child = memory_name(name.rsplit(".", 1)[0]).rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fp8Output(getattr(parent, child), tensors[name].to(device)))
    return model.to(device).eval()


def effective_input_scale(model: torch.nn.Module, name: str, tensors: dict, hub: str) -> torch.Tensor | None:
    """The per-input factor an export layer applies before its weight: its stored pre_quant_scale, or, where
    ModelOpt folded it into the preceding norm (q/k/v, gate/up), that norm's exported weight / the model's."""
    if f"{hub}.pre_quant_scale" in tensors:
        return tensors[f"{hub}.pre_quant_scale"].float()
    block, _, rest = name.rpartition(".layers.")[2].partition(".")
    norm = FOLDED_NORMS.get(rest)
    prefix = name[: name.rindex(".layers.")]
    norm_hub = hub_name(f"{prefix}.layers.{block}.{norm}.weight") if norm else None
    if norm_hub is None or norm_hub not in tensors:
        return None
    original = model.get_submodule(f"{prefix}.layers.{block}.{norm}").weight.float().cpu()
    return tensors[norm_hub].float() / original


def fused_groups(names: list[str]) -> list[list[str]]:
    """Layers of `names` that read one input, in the export's sense: q/k/v of a block (after its input_layernorm),
    gate/up (after its post_attention_layernorm); every other layer alone."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        head, _, rest = name.rpartition(".layers.")
        block, _, layer = rest.partition(".")
        norm = FOLDED_NORMS.get(layer) if head else None
        groups.setdefault((f"{head}.layers.{block}", norm) if norm else (name, ""), []).append(name)
    return list(groups.values())


def _recollect_amax(quantizer: torch.nn.Module, weight: torch.Tensor) -> None:
    from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection

    quantizer.reset_amax()
    enable_stats_collection(quantizer)
    quantizer(weight)
    finish_stats_collection(quantizer)


def _quantize_as_exported(quantizer: torch.nn.Module, weight: torch.Tensor, spec: ExportFormat) -> torch.Tensor:
    """`weight` fake-quantized the way the export computes its codes. Per-tensor FP8 divides the weight by a 0-dim
    fp32 scale, which PyTorch does in the weight's own dtype: the quotient is rounded to BF16 before FP8 (ModelOpt's
    fake quantization divides in float32). The other formats' exports quantize in float32, as written here."""
    if spec.weight == "fp8" and spec.weight_scale == "tensor":
        scale = torch.tensor(float(quantizer.amax) / FP8_MAX, device=weight.device)
        return (weight / scale).to(FP8).float() * scale
    return quantizer(weight.float())


def export_rule_weights(modules: list[torch.nn.Module], spec: ExportFormat) -> list[torch.Tensor]:
    """The effective weights W' x diag(s) that the export of one fused group (`fused_groups`, one format) should
    store, computed from the fake-quant layers by the export's rules. Where the format's `fused_scales`: the AWQ /
    SmoothQuant factors s_i are replaced by their mean s, each weight becomes W_i s_i / s with its amax collected
    again (max), then the group shares the largest per-tensor weight amax (NVFP4's global scale, W4A8's FP8 stage).
    Otherwise, or for a single layer, each fake-quant weight x its own factor. Codes as `_quantize_as_exported`."""
    from modelopt.torch.quantization.nn import SequentialQuantizer

    factors = [getattr(m.input_quantizer, "_pre_quant_scale", None) for m in modules]
    quantizers = [m.weight_quantizer for m in modules]
    weights = [m.weight for m in modules]
    shared = None
    if spec.fused_scales and len(modules) > 1:
        quantizers = [copy.deepcopy(q) for q in quantizers]
        if all(f is not None for f in factors):
            shared = torch.stack(factors).mean(dim=0)
            for index, factor in enumerate(factors):
                if not torch.equal(factor, shared):
                    weight = weights[index].float() * factor.float() / shared.float()
                    weights[index] = weight.to(weights[index].dtype)
                    _recollect_amax(quantizers[index], weights[index])
            factors = [shared] * len(modules)
        last = [q[-1] if isinstance(q, SequentialQuantizer) else q for q in quantizers]
        amaxes = [q.amax for q in last]
        if all(q.is_enabled for q in last) and all(a is not None and a.numel() == 1 for a in amaxes):
            largest = torch.stack(amaxes).max()
            for quantizer in last:
                quantizer.amax = largest
    return [_quantize_as_exported(q, w, spec) * (1.0 if f is None else f.float().reshape(1, -1))
            for q, w, f in zip(quantizers, weights, factors, strict=True)]  # fmt: skip


def export_fidelity(model: torch.nn.Module, export_dir: Path) -> dict:
    """How exactly the export stores what the fake-quantized `model` computes under the export's rules, per
    quantized layer.

    Both sides as the effective weight a layer applies, W x diag(s) with s the AWQ / SmoothQuant input factor:
    the export's dequantized weight times its own factor (stored, or folded into the preceding norm, as ModelOpt
    does for q/k/v and gate/up), against `export_rule_weights` of the model (fused layers share their factor and
    per-tensor amax). A correct export of any format then differs only where bf16 rounding ties fall.
    `differing_code_share`: share of weights differing by more than 1/32 of their magnitude (one code step of
    FP8 is >= 1/16, of int4 / fp4 more; bf16 rounding of the fake-quant output <= 1/256);
    `differing_code_share_se`: its standard error with the layers resampled (`divergence.pooled_standard_error`: a
    layer's factors and scales move its weights together), its within-run spread in the verdict bounds;
    `weight_relative_error_max`: the largest per-layer ||E - F|| / ||F||.
    """
    tensors = read_tensors(export_dir)
    algorithms = layer_algorithms(export_dir, tensors)
    quantized = [name for name, module in model.named_modules()
                 if getattr(module, "weight_quantizer", None) is not None and module.weight_quantizer.is_enabled
                 and hub_name(name) in algorithms]  # fmt: skip
    differing: list[int] = []  # per layer: its weights that differ, and its weights
    weights: list[int] = []
    worst, worst_layer = 0.0, None
    with torch.no_grad():
        for group in fused_groups(quantized):
            specs = {FORMATS[algorithms[hub_name(name)]] for name in group}
            if len(specs) > 1:  # ModelOpt's export refuses a fused group of mixed formats
                raise ExportError(f"{export_dir}: layers reading one input have different formats: {group}")
            layer_spec = specs.pop()
            expected = export_rule_weights([model.get_submodule(name) for name in group], layer_spec)
            for name, fake in zip(group, expected, strict=True):
                hub = hub_name(name)
                stored = layer_tensors(tensors, hub, layer_spec, fake.device)
                exported = layer_spec.dequantize(stored)  # on the model's device: a GPU compares 3B weights in ~1 s
                factor = effective_input_scale(model, name, tensors, hub) if layer_spec.pre_quant_scale else None
                exported = exported if factor is None else exported * factor.to(fake.device).reshape(1, -1)
                differing.append(int(((exported - fake).abs() > fake.abs() / 32 + 1e-12).sum()))
                weights.append(fake.numel())
                error = float((exported - fake).norm() / fake.norm().clamp_min(1e-30))
                if error >= worst:
                    worst, worst_layer = error, hub
    total = sum(weights)
    return {"differing_code_share": sum(differing) / total if total else 0.0,
            "differing_code_share_se": pooled_standard_error(differing, weights), "quantized_weights": total,
            "weight_relative_error_max": worst, "worst_layer": worst_layer}  # fmt: skip

