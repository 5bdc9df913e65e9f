"""Verdict bounds from measured spread: the records, how a bound is derived, and which limits a verdict uses.

A verdict compares a measured figure (KL, top-1 agreement, differing export codes, vLLM's error as a multiple of
the BF16 noise floor) with a bound. The bound is not typed by hand: `quantsuite.measure_bounds` measures every
runnable scheme under several conditions and `derive` makes each bound from the spread it saw:
- within a run: the bootstrap standard error over evaluation captions (quantsuite.divergence, quantsuite.vllm.verdict);
- across machines' numerics: the same run under other CPU kernel sets (or, on a GPU, repeated runs);
- across data seeds: the same run on other caption splits (`--data-seed`).

At a measured seed the captions are fixed and only the numerics move: a `max` figure's bound there is its worst
value at that seed + k sigma_kernels (a `min` figure's: worst - k sigma). At another seed the `any_seed` bound
holds: the worst value of all + k sqrt(within^2 + kernels^2 + seeds^2). Each figure records the values it came
from and the smallest regression its seed-0 bound catches. `verdict_limits` decides which limits a test asserts.
Records: reports/bounds/<model>.json (CPU), <model>.cuda-sm90.json (GPUs of compute capability 9.0).
"""

from __future__ import annotations

import functools
import json
import math
import platform
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quantsuite import REPORTS_DIR
from quantsuite.catalog import Catalog, DriftBounds, SchemeSpec
from quantsuite.data import DataConfig

BOUNDS_DIR = REPORTS_DIR / "bounds"
K_SIGMA = 3.0
# a GPU record's condition run on another machine, named by its card (measure_bounds --fill), for the schemes run there
CARD = "kernels=card-"
LOOSER = {"max": max, "min": min}  # the looser of two bounds of a figure of that kind

# the environment variables that choose a CPU's kernels (ATen's dispatch, oneDNN's and MKL's ISA limits): records
# are measured under several (quantsuite.measure_bounds), and cache keys include those in force (stages.context)
CPU_KERNEL_ENV_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# CPU features under one ATen capability (AVX512) that give oneDNN's BF16 GEMMs other kernels: an AVX-512 BF16 box
# and an AMX one compute different figures (reports/bounds/README.md, 2026-12-05)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")
# the GPU's: cuBLAS's workspace (none: no split-K algorithms), cuBLASLt preferred for GEMMs, TF32 off (convolutions)
CUDA_KERNEL_ENV_VARS = ("CUBLAS_WORKSPACE_CONFIG", "TORCH_BLAS_PREFER_CUBLASLT", "NVIDIA_TF32_OVERRIDE")
KERNEL_ENV_VARS = CPU_KERNEL_ENV_VARS + CUDA_KERNEL_ENV_VARS
VLLM_RATIO = "vllm.error_ratio"  # vLLM's teacher-forced error / the BF16 export's (quantsuite.vllm.verdict.decide)
VLLM_IMAGE_RATIO = "vllm.image_error_ratio"  # the same on image prompts, against the BF16 export's image floor
VLLM_FIGURES = (VLLM_RATIO, VLLM_IMAGE_RATIO)
IMAGE_KL, IMAGE_TOP1 = "image_prompts.fake_quant.kl_mean", "image_prompts.fake_quant.top1_agreement"
IMAGE_FIGURES = (IMAGE_KL, IMAGE_TOP1, VLLM_IMAGE_RATIO)  # measured where the data has images

# figure -> (direction of a regression's bound, its within-run standard error in drift.json or None)
FIGURES: dict[str, tuple[Literal["max", "min"], str | None]] = {
    "fake_quant.kl_mean": ("max", "fake_quant.kl_mean_se"),
    "fake_quant.top1_agreement": ("min", "fake_quant.top1_agreement_se"),
    "export.kl_mean": ("max", "export.kl_mean_se"),
    "fake_vs_export.kl_mean": ("max", "fake_vs_export.kl_mean_se"),
    "fake_vs_export.top1_agreement": ("min", "fake_vs_export.top1_agreement_se"),
    "export_fidelity.differing_code_share": ("max", "export_fidelity.differing_code_share_se"),
    IMAGE_KL: ("max", "image_prompts.fake_quant.kl_mean_se"),
    IMAGE_TOP1: ("min", "image_prompts.fake_quant.top1_agreement_se"),
    VLLM_RATIO: ("max", "vllm.error_ratio_se"),
    VLLM_IMAGE_RATIO: ("max", "vllm.image_error_ratio_se"),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Limit:
    """What a verdict (drift or vLLM) asserts of one figure."""

    kind: Literal["max", "min"]
    bound: float
    basis: str = ""  # how the bound was made, for a failing verdict's message (FigureBound.basis)

    def holds(self, value: float) -> bool:
        return value <= self.bound if self.kind == "max" else value >= self.bound


class FigureBound(Strict):
    """One figure's bounds and the measurements they came from.

    At a measured data seed the captions are fixed and the figure moves only with the machine's numerics: its bound
    is the worst value at that seed + k sigma_kernels (at least k of the figure's resolution: one token of top-1
    agreement, one weight of a code share). At any other seed the captions, calibration and picks change too: the
    `any_seed` bound is the worst value of all + k sqrt(within^2 + kernels^2 + seeds^2)."""

    kind: Literal["max", "min"] = Field(description="max: the figure must stay <= bound; min: >= bound")
    values: dict[str, float] = Field(description="Condition ('kernels=avx2 seed=0') -> measured value")
    sigma_within: float = Field(ge=0, description="RMS of the runs' bootstrap standard errors over captions")
    sigma_kernels: float = Field(ge=0, description="Std across kernel sets (or repeated runs) at seed 0, at least the "
                                 "figure's resolution; with one run at seed 0, its within-run standard error")
    sigma_seeds: float = Field(ge=0, description="Std across data seeds (native kernels)")
    seed_bounds: dict[int, float] = Field(description="Data seed -> bound there (worst at the seed + k sigma_kernels)")
    any_seed: float = Field(description="Bound at a seed not measured (worst of all + k sigma_all)")
    catches: str = Field(description="At seed 0: the smallest regression from the median value that crosses the bound")

    @property
    def sigma_all(self) -> float:
        return math.sqrt(self.sigma_within**2 + self.sigma_kernels**2 + self.sigma_seeds**2)

    def worst(self, seed: int | None = None) -> float:
        values = [v for c, v in self.values.items() if seed is None or c.endswith(f" seed={seed}")]
        return max(values) if self.kind == "max" else min(values)

    def limit(self, seed: int) -> Limit:
        return Limit(self.kind, self.seed_bounds.get(seed, self.any_seed), self.basis(seed))

    def basis(self, seed: int) -> str:
        """How the bound at `seed` was made, and so how far to trust it on this machine: the worst value, k and the
        sigma, and where the sigma came from (`derive`): the spread of the runs at seed 0, the within-run standard
        error (fewer than three runs), or the figure's resolution (one token, one weight). Where fewer than three
        runs carry no within-run error (a record measured before its figure had one), nothing measured how far
        another machine of the device class may move the figure, and the text says how to add one's run."""
        sign = "+" if self.kind == "max" else "-"

        def k(bound: float, worst: float, sigma: float) -> str:
            return f"{abs(bound - worst) / sigma:.3g}" if sigma else "0"

        if self.sigma_all == 0.0:
            return "exact in every run"
        if seed not in self.seed_bounds:
            return (f"data seed {seed} not measured: worst of {len(self.values)} runs {self.worst():.4g} {sign} "
                    f"{k(self.any_seed, self.worst(), self.sigma_all)} x {self.sigma_all:.2g} (within-run, kernel "
                    "and seed spread together)")  # fmt: skip
        at_zero = [value for condition, value in self.values.items() if condition.endswith(" seed=0")]
        spread = _std(at_zero)
        if spread == self.sigma_kernels:
            source = f"the spread of {len(at_zero)} runs at seed 0"
        elif self.sigma_within == self.sigma_kernels:
            source = f"the within-run standard error ({len(at_zero)} run(s) at seed 0, too few for a spread)"
        else:
            source = f"the figure's resolution, above the spread of {len(at_zero)} run(s) at seed 0 ({spread:.2g})"
            if len(at_zero) < 3 and self.sigma_within == 0.0:
                source += ("; no within-run error was measured (runs from before the figure had one), so another "
                           "machine of this device class may compute beyond it: its run, added with `python -m "
                           "quantsuite.measure_bounds ... --fill`, widens the bound by the spread it finds")
        worst = self.worst(seed)
        return (f"{worst:.4g} {sign} {k(self.seed_bounds[seed], worst, self.sigma_kernels)} x "
                f"{self.sigma_kernels:.2g}, sigma from {source}")  # fmt: skip

    def margins_sigma(self) -> dict[str, float]:
        """Each bound's distance from the worst value it covers, in units of its sigma (inf: zero spread, zero gap;
        and a lower bound derive clipped at 0, the loosest a share can have: a nearly broken scheme's top-1)."""

        def ratio(gap: float, sigma: float, bound: float) -> float:
            if self.kind == "min" and bound == 0.0:
                return math.inf
            return gap / sigma if sigma else (math.inf if gap == 0 else gap * math.inf)

        margins = {f"seed={seed}": ratio(abs(bound - self.worst(seed)), self.sigma_kernels, bound)
                   for seed, bound in self.seed_bounds.items()}  # fmt: skip
        return margins | {"any seed": ratio(abs(self.any_seed - self.worst()), self.sigma_all, self.any_seed)}


class BoundsRecord(Strict):
    """reports/bounds/<model>.json (<model>.cuda-sm90.json): every runnable scheme's verdict bounds on one model."""

    model: str
    device: str = Field("cpu", pattern=r"^(cpu|cuda sm_\d+)$",
                        description="Where it was measured and where it holds: cpu, or cuda sm_<capability>")
    k_sigma: float = Field(description="Margin of every bound over its worst measured value, in sigma")
    command: str = Field(description="The command that wrote this record")
    measured: dict[str, str] = Field(description="When, on what CPU, with which versions")
    conditions: tuple[str, ...] = Field(description="The conditions measured")
    schemes: dict[str, dict[str, FigureBound]] = Field(description="Scheme -> figure -> bounds")

    @property
    def seeds(self) -> set[int]:
        """The data seeds measured (each has bounds of its own)."""
        return {int(condition.rpartition("seed=")[2]) for condition in self.conditions}


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo (Linux; "" elsewhere or where it lacks the field)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.partition(":")[2].strip() for line in lines if line.split(":")[0].strip() == field), "")


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; none where it has none)."""
    return set(_cpuinfo("flags").split())


def cpu_model() -> str:
    """This CPU's model name (/proc/cpuinfo, else the machine type), with AMX named where it has the tiles."""
    return (_cpuinfo("model name") or platform.machine()) + (" with AMX" if "amx_tile" in cpu_flags() else "")


def record_path(model_tag: str, device_class: str = "cpu", directory: Path = BOUNDS_DIR) -> Path:
    """<model>.json on CPU, <model>.cuda-sm90.json for GPUs of compute capability 9.0."""
    suffix = "" if device_class == "cpu" else "." + device_class.replace(" ", "-").replace("_", "")
    return Path(directory) / f"{model_tag}{suffix}.json"


def load_record(model_tag: str, device_class: str = "cpu", directory: Path = BOUNDS_DIR) -> BoundsRecord | None:
    """The record of `model_tag` measured on `device_class` (quantsuite.stages.context.device_class), if any."""
    path = record_path(model_tag, device_class, directory)
    return BoundsRecord.model_validate_json(path.read_text()) if path.is_file() else None


def figure_value(measurement: dict, figure: str) -> float:
    value: object = measurement
    for part in figure.split("."):
        value = value[part]
    return float(value)


def has_figure(measurement: dict, figure: str) -> bool:
    try:
        figure_value(measurement, figure)
    except (KeyError, TypeError):
        return False
    return True


def resolution(measurement: dict, figure: str) -> float | None:
    """The smallest step a figure can take: one token of an agreement, one weight of a code share, 0 for a KL; None
    where the measurement lacks the count (a recorded value standing in for a run, measure_bounds.filled)."""
    try:
        if figure.endswith("top1_agreement"):
            return 1.0 / figure_value(measurement, figure.rpartition(".")[0] + ".tokens")
        if figure.endswith("differing_code_share"):
            return 1.0 / max(measurement["export_fidelity"]["quantized_weights"], 1)
    except KeyError:
        return None
    return 0.0


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _catches(figure: str, median: float, bound: float) -> str:
    if figure.endswith("top1_agreement"):
        disagreement = 1.0 - median
        needed = (median - bound) / disagreement if disagreement > 0 else math.inf
        return f"top-1 disagreement {disagreement:.4f} -> {1 - bound:.4f} (+{needed:.0%})"
    if median > 0:
        return f"{median:.3g} -> {bound:.3g} (+{(bound - median) / median:.0%})"
    return f"0 -> {bound:.3g} (any change above it)"


def derive(figure: str, runs: dict[tuple[str, int], dict], k: float = K_SIGMA) -> FigureBound:
    """The bounds of `figure` from one scheme's drift measurements under each (kernel set, seed)."""
    kind, se_figure = FIGURES[figure]
    values = {f"kernels={kernels} seed={seed}": figure_value(m, figure) for (kernels, seed), m in runs.items()}
    # a run measured before its figure had a standard error (a code share before session 47) counts 0, as it did
    errors = [figure_value(m, se_figure) if has_figure(m, se_figure) else 0.0 for m in runs.values()] if se_figure \
        else [0.0]
    within = math.sqrt(sum(e * e for e in errors) / len(errors))
    identity = 0.0 if kind == "max" else 1.0  # no drift at all (the BF16 reference): nothing may drift, then
    if all(value == identity for value in values.values()):
        seeds_seen = sorted({seed for _, seed in runs})
        return FigureBound(kind=kind, values=values, sigma_within=0.0, sigma_kernels=0.0, sigma_seeds=0.0,
                           seed_bounds=dict.fromkeys(seeds_seen, identity), any_seed=identity,
                           catches="any drift (exact in every run)")  # fmt: skip
    quantum = max((step for m in runs.values() if (step := resolution(m, figure)) is not None), default=0.0)
    at_seed_zero = [figure_value(m, figure) for (_, seed), m in runs.items() if seed == 0]
    # one run of numerics at seed 0 (a GPU record without --repeats) has no spread of its own, and two (a repeat, a
    # second card) may agree to the bit: below three runs the within-run standard error is the least spread, so
    # that no bound sits exactly on the value it was measured at
    kernels = max(_std(at_seed_zero), within if len(at_seed_zero) < 3 else 0.0, quantum)
    seeds = _std([figure_value(m, figure) for (kernel, _), m in runs.items() if kernel == "native"])
    sign, worst = (1.0, max) if kind == "max" else (-1.0, min)

    def clip(bound: float) -> float:
        return max(bound, 0.0) if kind == "min" else bound

    per_seed = {seed: worst(figure_value(m, figure) for (_, s), m in runs.items() if s == seed)
                for seed in sorted({seed for _, seed in runs})}  # fmt: skip
    seed_bounds = {seed: clip(value + sign * k * kernels) for seed, value in per_seed.items()}
    sigma_all = math.sqrt(within**2 + kernels**2 + seeds**2)
    any_seed = clip(worst(values.values()) + sign * k * sigma_all)
    at_zero = sorted(figure_value(m, figure) for (_, seed), m in runs.items() if seed == 0)
    return FigureBound(kind=kind, values=values, sigma_within=within, sigma_kernels=kernels, sigma_seeds=seeds,
                       seed_bounds=seed_bounds, any_seed=any_seed,
                       catches=_catches(figure, at_zero[len(at_zero) // 2], seed_bounds[0]))  # fmt: skip


def hand_set_limits(bounds: DriftBounds) -> dict[str, Limit]:
    """schemes.yaml's DriftBounds (expect.drift.<model>, drift_default) as limits of drift.json's figures."""
    return {"fake_quant.kl_mean": Limit("max", bounds.kl_mean_max),
            "fake_quant.top1_agreement": Limit("min", bounds.top1_agreement_min),
            "fake_vs_export.top1_agreement": Limit("min", bounds.export_top1_agreement_min),
            "export_fidelity.differing_code_share": Limit("max", bounds.export_code_mismatch_max)}  # fmt: skip


def loosest(limit_sets: list[dict[str, Limit]]) -> dict[str, Limit]:
    """Per figure, the loosest of several limit sets (the highest max, the lowest min)."""
    figures = {figure: limits[figure].kind for limits in limit_sets for figure in limits}
    return {figure: Limit(kind, LOOSER[kind](limits[figure].bound for limits in limit_sets if figure in limits))
            for figure, kind in figures.items()}  # fmt: skip


def record_applies(record: BoundsRecord | None, device_class: str, data_config: DataConfig) -> bool:
    """A record was measured on one device class (CPU, or GPUs of one compute capability: their kernels differ)
    with the default data settings: it holds there, at any seed if it measured several (their spread is in its
    any-seed bounds), else at its one seed only."""
    return (record is not None and device_class == record.device and replace(data_config, seed=0) == DataConfig()
            and (len(record.seeds) > 1 or data_config.seed in record.seeds))  # fmt: skip


def signature(catalog: Catalog, scheme: SchemeSpec) -> set[str]:
    """What a scheme's drift comes from, for finding its peers: its format families, plus "kv" with an FP8 KV cache
    (which adds its own error on top: INT4 AWQ + KV measured above every AWQ scheme's bound on tiny), plus its
    calibration data where it is not text (INT8 SmoothQuant calibrated on image prompts drifted 27x more on text
    than calibrated on captions, tiny): bounds measured under one calibration do not carry over to another."""
    kv = catalog.kv_cache(scheme)
    calibration = {f"calibration:{scheme.calibration}"} if scheme.calibration != "text" else set()
    return catalog.families(scheme) | ({"kv"} if kv else set()) | calibration


def _peers(candidates: dict[str, set[str]], families: set[str]) -> list[str]:
    """The candidates (name -> signature) made only of `families` (a signature) that between them cover all of it;
    none if they do not. A scheme of no family (BF16) has BF16 peers only."""
    peers = [name for name, theirs in candidates.items() if theirs <= families and (theirs or not families)]
    return peers if set().union(*(candidates[name] for name in peers)) == families else []


def verdict_limits(catalog: Catalog, scheme: SchemeSpec, model_tag: str, device_class: str,
                   data_config: DataConfig, record: BoundsRecord | None) -> tuple[dict[str, Limit], str]:  # fmt: skip
    """The limits of `scheme`'s drift (and vLLM) figures, and where they came from, first that applies:
    1. the generated record of `model_tag` on this device class (reports/bounds/), for a scheme it measured;
    2. the scheme's hand-set expect.drift.<model> in schemes.yaml (3B/7B shapes, runs on a GPU): its own figures
       come before its peers' (MXFP8, a peer of the FP8 schemes by family, drifts 1% past the loosest FP8 record on
       the 3B shape and within its own measured bound: reports/bounds/hand-set.md);
    3. for a scheme without either, the loosest record of the schemes of its format families (and KV cache), drift
       figures only;
    4. else the loosest expect.drift.<model> of the catalog schemes of its families (and KV);
    5. drift_default of schemes.yaml: the loosest of the scheme's format families (fp8, int8, awq, nvfp4).
    1-4 hold on the bundled captions only (a captions file of the user's goes to 5: every bound of 1-4 was measured on
    the bundled ones). Only a record holds vLLM limits: without one, `VllmChecks.bound` falls back to one bound for
    every scheme."""
    applies = record is not None and record_applies(record, device_class, data_config)
    where = ""
    if applies:
        seed = data_config.seed
        where = f"reports/bounds/{record_path(model_tag, record.device).name} at data seed {seed}" + (
            "" if seed in record.seeds else " (not measured: the any-seed bounds)")
        if scheme.name in record.schemes:
            return {figure: b.limit(seed) for figure, b in record.schemes[scheme.name].items()}, where
    chosen = sorted(catalog.families(scheme)) or sorted(catalog.drift_default)
    if data_config.path is not None:  # every record and hand-set bound was measured on the bundled captions
        limits = loosest([hand_set_limits(catalog.drift_default[family]) for family in chosen])
        return limits, (f"drift_default ({', '.join(chosen)}): the recorded and hand-set bounds were measured on the "
                        f"bundled captions, not on {data_config.source.name}")  # fmt: skip
    if model_tag in scheme.expect.drift:
        return hand_set_limits(scheme.expect.drift[model_tag]), f"expect.drift.{model_tag} of {scheme.name}"
    if applies:
        measured = {name: {f: b.limit(data_config.seed) for f, b in figures.items()}
                    for name, figures in record.schemes.items() if name in catalog.names()}  # fmt: skip
        borrowed = borrow(catalog, scheme, measured)
        if borrowed:
            # vLLM's ratio grows with what a scheme quantizes (H200: top50 1.78x, default 7.29x), so a peer's does not
            # carry over to another pick: without a record of its own, VllmChecks.bound's one bound holds
            drift_only = {figure: limit for figure, limit in borrowed[0].items() if figure not in VLLM_FIGURES}
            return drift_only, (f"{borrowed[1]} in {where}: {scheme.name} has no record of its own (record it: "
                                f"{record.command})")  # fmt: skip
    hand_set = {s.name: hand_set_limits(s.expect.drift[model_tag]) for s in catalog.schemes
                if model_tag in s.expect.drift}  # fmt: skip
    borrowed = borrow(catalog, scheme, hand_set)
    if borrowed:
        return borrowed[0], (f"{borrowed[1]} in schemes.yaml's expect.drift.{model_tag}: {scheme.name} has none of "
                             "its own")  # fmt: skip
    limits = loosest([hand_set_limits(catalog.drift_default[family]) for family in chosen])
    return limits, f"drift_default ({', '.join(chosen)}): {scheme.name} has no bounds of its own for {model_tag}"


def _without_kv(scheme: SchemeSpec) -> str:
    return json.dumps(scheme.model_dump(exclude={"name", "alias", "description", "expect", "kv_cache"}), sort_keys=True)


def borrow(catalog: Catalog, scheme: SchemeSpec, available: dict[str, dict[str, Limit]]) -> tuple[dict, str] | None:
    """Limits for a scheme without its own, from those of catalog schemes (`available`) and where from:
    - the loosest of its peers (schemes of its format families, with a KV cache if it has one); else,
    - with a KV cache and no peer that has one: the loosest of its peers without a KV cache, moved by the largest
      change the KV cache alone made in the catalog (pairs of schemes equal but for `kv_cache`: default and
      default_kv, top50 and top50_kv), since its error adds to the layers' (INT4 AWQ + KV measured KL 0.0104 on
      tiny, above every AWQ scheme's bound, 0.00996); else None."""
    own = signature(catalog, scheme)
    signatures = {name: signature(catalog, catalog.scheme(name)) for name in available}
    peers = _peers(signatures, own)
    if peers:
        return loosest([available[name] for name in peers]), f"loosest of {', '.join(peers)}"
    if "kv" not in own:
        return None
    plain = {name: sig for name, sig in signatures.items() if "kv" not in sig}
    peers = _peers(plain, own - {"kv"})
    pairs = [(p, k) for k in available if "kv" in signatures[k] for p in plain
             if _without_kv(catalog.scheme(p)) == _without_kv(catalog.scheme(k))]  # fmt: skip
    if not peers or not pairs:
        return None
    base = loosest([available[name] for name in peers])
    moved = {}
    for figure, limit in base.items():
        shifts = [available[k][figure].bound - available[p][figure].bound for p, k in pairs
                  if figure in available[k] and figure in available[p]]  # fmt: skip
        shift = LOOSER[limit.kind]([0.0, *shifts])
        moved[figure] = Limit(limit.kind, max(limit.bound + shift, 0.0))
    kv_pairs = ", ".join(f"{p} -> {k}" for p, k in pairs)
    return moved, f"loosest of {', '.join(peers)} moved by the KV cache's largest change ({kv_pairs})"


def markdown(record: BoundsRecord) -> str:
    """The record as a table: values, spreads, the seed-0 bound and what it catches, and the any-seed bound."""
    where = record.measured.get("gpu") or f"CPU {record.measured['cpu']}"
    lines = [f"# Verdict bounds: {record.model} ({record.device})", "", f"Written by `{record.command}` "
             f"({record.measured['date']}, {where}, native ATen capability {record.measured['cpu_capability']}"
             + (f", {record.measured['vllm']}" if "vllm" in record.measured else "") + ")"
             + "".join(f"; {done} {record.measured[done]}" for done in ("updated", "filled") if done in record.measured)
             + f". k = {record.k_sigma:g}. "
             "Conditions: " + ", ".join(record.conditions) + ".", "",
             "| scheme | figure | values (min .. max) | within | kernels | seeds | seed 0 bound | catches | any seed |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for scheme, figures in record.schemes.items():
        for figure, b in figures.items():
            low, high = min(b.values.values()), max(b.values.values())
            lines.append(f"| {scheme} | {figure} | {low:.4g} .. {high:.4g} | {b.sigma_within:.2g} | "
                         f"{b.sigma_kernels:.2g} | {b.sigma_seeds:.2g} | {b.kind} {b.seed_bounds[0]:.4g} | "
                         f"{b.catches} | {b.any_seed:.4g} |")  # fmt: skip
    return "\n".join(lines) + "\n"
