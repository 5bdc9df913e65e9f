"""The run's settings, checked and built once per process at pytest_configure, the CPU threads of each xdist
worker, and the loaded heap kept out of the garbage collector once the stages start. Everything else of the
pytest layer reads `settings(config)`."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from quantsuite.bench import benchmark_shape
from quantsuite.cache import keep_toolchain_caches
from quantsuite.catalog import Catalog, load_catalog
from quantsuite.data import DataConfig
from quantsuite.models import ModelSpec
from quantsuite.stages.research import ResearchSettings


@dataclass(frozen=True)
class RunSettings:
    """What the options ask for, validated: the model on this worker's device, the data, the catalog, vLLM."""

    model_spec: ModelSpec
    data_config: DataConfig
    catalog: Catalog
    vllm_python: Path | None
    research: ResearchSettings
    shard: tuple[int, int] | None = None  # (K, N) of --shard K/N


SETTINGS = pytest.StashKey[RunSettings]()
WORKBENCH = pytest.StashKey[object]()  # the session's Workbench, for the end-of-run summary
WANT_REPORT = pytest.StashKey[bool]()  # the run exercised schemes: write reports/<run-id>/ at the end


def settings(config: pytest.Config) -> RunSettings:
    return config.stash[SETTINGS]


def pytest_configure(config: pytest.Config) -> None:
    """Refuse bad input once, before any work, as a usage error naming the fix: --scheme, --model, --device,
    --dtype, --calib-data, --images-dir (every image the splits use is opened), --vllm-python (or
    $QUANTSUITE_VLLM_PYTHON), schemes.yaml."""
    from quantsuite.catalog import SchemeError
    from quantsuite.data import CaptionDataError, load_image_splits, load_splits, require_samples
    from quantsuite.models import ModelSourceError
    from quantsuite.vllm.service import VllmSetupError, resolve_vllm_python

    option = config.getoption
    # first: the CUDA driver reads CUDA_CACHE_PATH once, when something initializes CUDA (--device auto asks)
    keep_toolchain_caches(Path(option("--cache-dir")))
    requested = ModelSpec(option("--model"), option("--device"), option("--dtype"), option("--model-seed"))
    if option("--run-id") is None:  # one id per run: the controller sets it, xdist workers inherit the options
        config.option.run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{requested.tag}"
    try:  # the catalog last: validating its preset names imports ModelOpt (6 s), which the other checks do not need
        requested.validate()
        data_config = DataConfig(
            path=option("--calib-data"), images_dir=option("--images-dir"), image_size=option("--image-size"),
            seed=option("--data-seed"), batch_size=option("--batch-size"),
            sequence_length=option("--seq-len"), calibration_samples=option("--calib-samples"),
            scoring_samples=option("--score-samples"), evaluation_samples=option("--eval-samples"),
        )  # fmt: skip
        splits = load_splits(data_config)  # the file, its captions and the sample counts against them
        load_image_splits(data_config)  # and every image the splits use
        vllm_python = resolve_vllm_python(option("--vllm-python"))
        catalog = load_catalog()
        chosen = catalog.select(option("--scheme"))
        for scheme in chosen:
            check_sample_overrides(scheme, splits)
        selected = tuple(s.name for s in chosen) if option("--scheme") else ()
        research = ResearchSettings(tuple(_listed(option("--research-studies"))),
                                    _integers(option("--research-score-sizes"), "--research-score-sizes", 1),
                                    _integers(option("--research-draws"), "--research-draws", 0),
                                    schemes=selected)  # fmt: skip
        require_samples("scoring + training", max(research.score_sizes), len(splits.scoring + splits.training),
                        "--research-score-sizes")  # fmt: skip
        shard = parse_shard(option("--shard"))
        benchmark_shape(os.environ)  # read again by tests/test_bench.py, which would fail to import
    except (SchemeError, ModelSourceError, CaptionDataError, VllmSetupError, ValueError) as error:
        raise pytest.UsageError(str(error)) from None
    model_spec = replace(requested, device=worker_device(requested.device))
    config.stash[SETTINGS] = RunSettings(model_spec, data_config, catalog, vllm_python, research, shard)
    share_cpu_threads()


def freeze_loaded_heap() -> None:
    """Keep what is loaded when the stages start (torch, transformers, ModelOpt: hundreds of thousands of objects)
    out of the cyclic garbage collector (gc.freeze): every full collection walked it, and `free_memory` collects
    after each export measured (what that cost: reports/profile-cpu-2core/README.md, session 22). The stages import
    ModelOpt and Qwen2.5-VL's modeling lazily; they are imported first, so that they are kept out too, and what is
    garbage by then is collected once before. Objects made later are collected as before. Called by the workbench
    fixture: a run without stages (unit tests alone) pays nothing."""
    import modelopt.torch.export  # imported for what they load, like the stages do later
    import modelopt.torch.quantization  # noqa: F401
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401

    gc.collect()
    gc.freeze()


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """--shard K/N -> (K, N), 1 <= K <= N."""
    if value is None:
        return None
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise ValueError(f"--shard {value!r}: expected K/N with 1 <= K <= N, e.g. --shard 1/2")
    return int(index), int(count)


def _listed(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _integers(value: str, option: str, minimum: int) -> tuple[int, ...]:
    try:
        numbers = tuple(int(item) for item in _listed(value))
    except ValueError:
        raise ValueError(f"{option} {value!r}: expected comma-separated whole numbers, e.g. 8,16,32") from None
    if any(number < minimum for number in numbers):
        raise ValueError(f"{option} {value!r}: each must be at least {minimum}")
    return numbers


def check_sample_overrides(scheme, splits) -> None:
    """A scheme's own calibration_samples / score_samples must fit the split the options made (else the scheme's
    first test would fail after minutes of other schemes' work)."""
    from quantsuite.data import require_samples

    for field, split in (("calibration_samples", "calibration"), ("score_samples", "scoring")):
        wanted = getattr(scheme, field)
        if wanted is not None:
            require_samples(split, wanted, len(getattr(splits, split)), f"schemes.yaml: {scheme.name}.{field}")


def worker_threads() -> int | None:
    """torch threads for this pytest-xdist worker: its equal share of the cores this process may use; None outside
    xdist or with fewer cores than workers (torch's default then). QUANTSUITE_TORCH_THREADS overrides."""
    if os.environ.get("QUANTSUITE_TORCH_THREADS"):
        return int(os.environ["QUANTSUITE_TORCH_THREADS"])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return (len(os.sched_getaffinity(0)) // workers or None) if workers > 1 else None


def share_cpu_threads() -> None:
    """Under pytest-xdist, torch in each worker uses its share of the cores (torch's default is every core per
    process: N workers would oversubscribe the CPU N times; reports/profile-cpu-2core/README.md)."""
    threads = worker_threads()
    if threads:
        import torch

        torch.set_num_threads(threads)
        # and the processes this worker starts (the vLLM server, the machinery tests' pytest runs), unless set
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def vllm_engine_share(share: float = 0.3) -> float:
    """The GPU share each vLLM engine of this process asks for: `share`, divided among the xdist workers that share
    one GPU (each keeps two engines: the BF16 reference's and its scheme's; two workers on one H200 at 0.3 each
    would ask for 1.2 of the card)."""
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    gpus = torch.cuda.device_count()
    return share / max(1, -(-workers // gpus)) if gpus else share


def catalog_readers_drop_exports(config: pytest.Config) -> bool:
    """Whether a reader of the whole catalog's drift (the research studies, the nested-scheme check) deletes an
    export it built for a drift alone: under --drop-exports, unless xdist workers run beside it. Each worker runs
    whole schemes (`scheduling_group`), which is what keeps --drop-exports from deleting an export another worker
    reads; a catalog reader builds other schemes' exports, which their own worker may be reading."""
    return bool(config.getoption("--drop-exports")) and "PYTEST_XDIST_WORKER" not in os.environ


def worker_device(device: str) -> str:
    """Several GPUs + pytest-xdist: worker gwN takes cuda:(N mod GPUs), so schemes spread over the GPUs."""
    import torch

    from quantsuite.models import device_for_worker

    return device_for_worker(device, os.environ.get("PYTEST_XDIST_WORKER", ""), torch.cuda.device_count())
