"""What every stage shares: the model, the data, the catalog, the cache, reports/ and the device.

>>> context = RunContext(ModelSpec("tiny"), DataConfig(), load_catalog(), Path(".quantsuite-cache"))
>>> context.publish("manifests", "top50", {"totals": {}})  # reports/manifests/tiny/top50.json  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import gc
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

from quantsuite import REPORTS_DIR, data, models
from quantsuite.bounds import (
    CPU_BF16_FLAGS,
    CPU_KERNEL_ENV_VARS,
    CUDA_KERNEL_ENV_VARS,
    BoundsRecord,
    Limit,
    cpu_flags,
    load_record,
    verdict_limits,
)
from quantsuite.cache import ArtifactCache, code_hash, package_versions, write_atomic
from quantsuite.catalog import Catalog, SchemeSpec
from quantsuite.data import CaptionSplits, DataConfig, load_image_splits, load_splits, split_batches
from quantsuite.models import LoadedModel, ModelSpec, load_image_processor, load_model, load_tokenizer


class CudaRequired(RuntimeError):
    """What a stage would run needs CUDA here (ModelOpt 0.47 runs NVFP4 / MXFP8 fake quantization on CUDA only)."""


class RunContext:
    """The inputs of one run (see module docstring); stages read it and never write to each other through it."""

    def __init__(self, model_spec: ModelSpec, data_config: DataConfig, catalog: Catalog, cache_root: Path,
                 reports_dir: Path = REPORTS_DIR, run_id: str = "adhoc") -> None:  # fmt: skip
        self.model_spec = model_spec
        self.data_config = data_config
        self.catalog = catalog
        self.cache = ArtifactCache(Path(cache_root))
        self.reports_dir = Path(reports_dir)
        self.run_id = run_id  # stamped on every JSON a stage writes under reports/; the report joins one run
        self.device = model_spec.torch_device()
        self.source_dir = model_spec.source_dir()
        self.tokenizer = load_tokenizer(self.source_dir)
        self.splits = load_splits(data_config)
        self.image_splits: CaptionSplits | None = load_image_splits(data_config)  # None: text only
        self.model_fingerprint = model_spec.fingerprint()
        self.versions = package_versions()
        self._holders: list[Callable[[], None]] = []  # stages' "drop what you keep on the device" hooks
        self._image_batches: dict[tuple[str, int | None], list[dict]] = {}

    @property
    def model_tag(self) -> str:
        return self.model_spec.tag

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    @property
    def device_class(self) -> str:
        """What a bounds record is measured on and holds for: `cpu`, or `cuda sm_<capability>`."""
        if self.device.type != "cuda":
            return "cpu"
        major, minor = torch.cuda.get_device_capability(self.device)
        return f"cuda sm_{major}{minor}"

    @functools.cached_property
    def bounds_record(self) -> BoundsRecord | None:
        """This model's bounds record on this device class, read once (every drift and vLLM verdict consults it)."""
        return load_record(self.model_tag, self.device_class)

    def verdict_limits(self, scheme: SchemeSpec) -> tuple[dict[str, Limit], str]:
        """The limits of the scheme's drift and vLLM figures here, and where from (quantsuite.bounds)."""
        return verdict_limits(self.catalog, scheme, self.model_tag, self.device_class, self.data_config,
                              self.bounds_record)  # fmt: skip

    def base_key(self) -> dict:
        """The inputs every artifact depends on: the model (weights; shape definitions and loading code: models.py),
        the data (captions; splitting and tokenizing code: data.py), package versions, the device as far as it
        changes results (GPU name, CPU kernel set) and the dtype."""
        return {
            "model": self.model_fingerprint, "data": self.splits.fingerprint, "versions": self.versions,
            "device": device_identity(self.device), "dtype": self.model_spec.dtype,
            "model_and_data_code": code_hash(models, data),  # not "code": each stage adds its own
        }  # fmt: skip

    def report_path(self, kind: str, name: str) -> Path:
        return self.reports_dir / kind / self.model_tag / f"{name}.json"

    def publish(self, kind: str, name: str, document: dict) -> Path:
        """Write a stage's result to reports/<kind>/<model>/<name>.json, stamped with this run's id. Each kind has
        one stage that publishes it (tests/stages/test_context.py checks it)."""
        path = self.report_path(kind, name)
        write_atomic(path, json.dumps(document | {"run_id": self.run_id}, indent=1, sort_keys=True) + "\n")
        return path

    def publish_part(self, kind: str, name: str, part: str, document: dict) -> Path:
        """Set `part` of reports/<kind>/<model>/<name>.json to `document`, keeping the parts other processes of this
        run wrote (under the file's lock); a file of another run is replaced."""
        path = self.report_path(kind, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            merged = json.loads(path.read_text()) if path.is_file() else {}
            if merged.get("run_id") != self.run_id:
                merged = {}  # another run's results
            return self.publish(kind, name, merged | {part: document})

    @functools.cached_property
    def image_processor(self):
        return load_image_processor(self.source_dir)

    def batches(self, split: str, samples: int | None = None, images: bool = False) -> list[dict]:
        """`samples` captions of `split` (all for None) as text batches, or with `images` as image prompts ([] where
        the data is text only; built once per split and count)."""
        if not images:
            return split_batches(self.splits, split, samples, self.tokenizer, self.data_config)
        if self.image_splits is None:
            return []
        if (split, samples) not in self._image_batches:
            self._image_batches[split, samples] = split_batches(self.image_splits, split, samples, self.tokenizer,
                                                                self.data_config, self.image_processor)  # fmt: skip
        return self._image_batches[split, samples]

    def drawn_batches(self, samples: int, seed: int) -> list[dict]:
        """Text batches of `samples` captions drawn by `seed` from the scoring and training splits."""
        captions = data.drawn_captions(self.splits, samples, seed)
        return data.tokenize_batches(captions, self.tokenizer, self.data_config.batch_size,
                                     self.data_config.sequence_length)  # fmt: skip

    @property
    def image_source(self) -> str:
        """Where the image prompts come from, in words (the report says it)."""
        source = self.data_config.image_source
        if source is None:
            return f"none: {self.data_config.source.name} without --images-dir is text only"
        return f"{source[0].name} with the images of {source[1]}"

    def stage_key(self, inputs: dict, calibration: str = "text") -> str:
        """The cache key of an artifact made from this run's model and data (`base_key`), fed `calibration` data
        (text adds nothing, so earlier keys hold; image prompts add their fingerprint), and the stage's own `inputs`
        (its code among them)."""
        fed = {} if calibration == "text" else {
            "calibration": calibration, "images": self.image_splits.fingerprint if self.image_splits else None}
        return self.cache.key(self.base_key() | fed | inputs)

    def provenance(self, calibration: str, samples: dict[str, int]) -> dict:
        """Where an artifact came from (a manifest's model, data, versions and device): `samples` per split it used,
        fed `calibration` data."""
        data = self.data_config
        return {
            "model": {"name": self.model_tag, "fingerprint": self.model_fingerprint, "dtype": self.model_spec.dtype,
                      "seed": self.model_spec.seed},
            "data": {"source": str(data.source), "fingerprint": self.splits.fingerprint, "seed": data.seed, **samples,
                     "calibration": calibration, "images": self.image_source if calibration != "text" else None,
                     "batch_size": data.batch_size, "sequence_length": data.sequence_length},
            "versions": self.versions,
            "device": self.device_name,
        }  # fmt: skip

    def calibration_batches(self, split: str, samples: int, calibration: str) -> list[dict]:
        """What calibration or scoring feeds the model (SchemeSpec.calibration): `samples` captions of `split`, as
        text, or as image prompts (image_text)."""
        if calibration != "text" and self.image_splits is None:
            raise data.CaptionDataError(f"calibration: {calibration} needs images, and {self.image_source}; pass "
                                        "--images-dir with --calib-data, or use the bundled data")  # fmt: skip
        return self.batches(split, samples, images=calibration != "text")

    def load(self) -> LoadedModel:
        return load_model(self.model_spec)

    def reference_scheme(self) -> SchemeSpec:
        """The catalog's BF16 reference (mode `none`): the vLLM noise floor and the speed baseline."""
        references = [s for s in self.catalog.schemes if s.mode == "none"]
        if not references:
            raise ValueError("schemes.yaml has no scheme with `mode: none`; the vLLM verdict needs the BF16 "
                             "reference to measure the noise floor")  # fmt: skip
        return references[0]

    def require_cuda(self, needs: str | None, what: str) -> None:
        """Raise CudaRequired, naming what and the fix, when `needs` (a CUDA-only part) cannot run on this device."""
        if needs and self.device.type != "cuda":
            raise CudaRequired(f"{what}: {needs} runs on CUDA only in ModelOpt 0.47 (on CPU it raises); run it with "
                               "--device cuda on a GPU")  # fmt: skip

    def holds_device_memory(self, release: Callable[[], None]) -> None:
        """A stage that keeps models registers how to drop them; `release()` calls every such hook."""
        self._holders.append(release)

    def release(self) -> None:
        """Free every model a stage keeps (before another process, a vLLM engine, needs the device)."""
        for release in self._holders:
            release()
        free_memory()


def device_identity(device: torch.device) -> str:
    """What of the device changes a result: a GPU's name and compute capability (an H100 and an H200 compute
    differently) and the cuBLAS / TF32 settings forced (measure_bounds' GPU kernel sets), or the CPU kernel set ATen
    dispatches to and the oneDNN / MKL limits in force (one box's AVX-512 BF16 kernels moved a top-1 figure 1.3
    points from another's)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        forced = " ".join(f"{name}={os.environ[name]}" for name in CUDA_KERNEL_ENV_VARS if os.environ.get(name))
        return f"cuda {torch.cuda.get_device_name(device)} sm{major}{minor}" + (f" {forced}" if forced else "")
    limits = ",".join(f"{name}={os.environ.get(name, '')}" for name in CPU_KERNEL_ENV_VARS
                      if name != "ATEN_CPU_CAPABILITY")  # ATen's own: the capability it dispatches to, below
    features = "+".join(flag for flag in CPU_BF16_FLAGS if flag in cpu_flags())  # oneDNN's BF16 kernels
    return f"{device.type} {torch.backends.cpu.get_cpu_capability()} {features} {limits}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
