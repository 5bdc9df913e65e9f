"""Scheme stage: a scheme's decisions (quant config) and manifest, cached per scheme; the quantized model
(calibrated, fake-quant) built from the stored config on demand.

    >>> result = Schemes(context, Scores(context)).result(context.catalog.scheme("top50"))  # doctest: +SKIP
    >>> result.manifest["totals"]["coverage_by_weights"]                                    # doctest: +SKIP
    0.5
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantsuite import autoquant, formats, manifest
from quantsuite.autoquant import Resolution, apply_config, calibrate_kv_cache, resolve_config
from quantsuite.cache import code_hash
from quantsuite.catalog import SchemeSpec
from quantsuite.manifest import SCHEMA_VERSION, build_manifest
from quantsuite.stages.context import RunContext, free_memory
from quantsuite.stages.scores import Scores
from quantsuite.timing import STAGE_TIMES


@dataclass
class SchemeResult:
    scheme: SchemeSpec
    manifest: dict
    manifest_path: Path
    artifact_dir: Path  # the scheme's cache directory; its name keys the later stages
    reused: bool
    resolution: Resolution | None
    timings: dict[str, float] = field(default_factory=dict)


SMALL_MODELS_BYTES = 1 << 30  # quantized models kept together below this are small (tiny: a few MB each)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (quantizer state included)."""
    return sum(
        tensor.numel() * tensor.element_size() for tensor in itertools.chain(model.parameters(), model.buffers())
    )


class Schemes:
    """Decisions per scheme (`schemes/<key>`, key: base inputs + scheme spec + scores key + quant config + code),
    published as reports/manifests/<model>/<scheme>.json. Quantized models are kept for reuse: at most
    `live_models`, or by default as many as stay below SMALL_MODELS_BYTES together (one at a time for the 3B
    shape); small ones survive `context.release()` too (why: reports/profile-cpu-2core/README.md)."""

    def __init__(self, context: RunContext, scores: Scores, live_models: int | None = None) -> None:
        self.context = context
        self.scores = scores
        self.live_models = live_models
        self._results: dict[str, SchemeResult] = {}
        self._configs: dict[str, tuple[dict | None, int]] = {}
        self._models: OrderedDict[str, torch.nn.Module] = OrderedDict()
        context.holds_device_memory(self._release)

    def _held_bytes(self) -> int:
        return sum(map(model_bytes, self._models.values()))

    def _room_for_another(self) -> bool:
        if self.live_models is not None:
            return len(self._models) < self.live_models
        held = self._held_bytes()
        return held + held / len(self._models) <= SMALL_MODELS_BYTES

    def _release(self) -> None:
        """A vLLM engine or a timed run needs the device: drop the kept models unless they are small."""
        if self.live_models is not None or self._held_bytes() > SMALL_MODELS_BYTES:
            self._models.clear()

    def result(self, scheme: SchemeSpec) -> SchemeResult:
        """Produce `scheme` once per process (and once per cache key across runs)."""
        if scheme.name in self._results:
            return self._results[scheme.name]
        context = self.context
        timings: dict[str, float] = {}
        calibration = scheme.calibration_samples or context.data_config.calibration_samples
        started = time.perf_counter()
        state = scores_key = resolution = None
        if scheme.mode == "autoquant":
            plan = self.scores.plan(scheme)
            state, scores_key = self.scores.state(plan)
            timings["scoring_s"] = time.perf_counter() - started
            resolution = resolve_config(state, scheme)
            timings["resolve_s"] = time.perf_counter() - started - timings["scoring_s"]
            quant_config = resolution.quant_config
        elif scheme.mode == "plain":
            quant_config = context.catalog.formats[scheme.formats[0]].quant_config()
        else:
            quant_config = None
        key = context.stage_key({
            "scheme": scheme.spec_hash_input(), "scores": scores_key, "calibration_samples": calibration,
            "quant_config": quant_config, "manifest": SCHEMA_VERSION,
            "formats": {name: context.catalog.formats[name].model_dump(mode="json") for name in scheme.formats},
            "code": code_hash(autoquant, manifest, formats, sys.modules[__name__]),
        }, scheme.calibration)  # fmt: skip
        build = functools.partial(self._build, scheme, quant_config, calibration, resolution, scores_key)
        artifact_dir, reused = context.cache.get_or_build("schemes", key, build, scheme.name)
        document = json.loads((artifact_dir / "manifest.json").read_text())
        manifest_path = context.publish("manifests", scheme.name, document)
        timings["total_s"] = time.perf_counter() - started
        result = SchemeResult(scheme, document, manifest_path, artifact_dir, reused, resolution, timings)
        self._results[scheme.name] = result
        self._configs[scheme.name] = (quant_config, calibration)
        return result

    def _build(self, scheme: SchemeSpec, quant_config: dict | None, calibration: int, resolution: Resolution | None,
               scores_key: str | None, directory: Path) -> None:  # fmt: skip
        """Quantize the model with `scheme`'s decisions and write its manifest into the artifact `directory`."""
        model = self._quantize(scheme, quant_config, calibration)
        samples = {"calibration_samples": calibration,
                   "score_samples": scheme.score_samples or self.context.data_config.scoring_samples}
        provenance = self.context.provenance(scheme.calibration, samples) | {"scores_key": scores_key}
        document = build_manifest(model, scheme, self.context.catalog, provenance, resolution)
        (directory / "manifest.json").write_text(json.dumps(document, indent=1, sort_keys=True))

    def model(self, scheme: SchemeSpec) -> torch.nn.Module:
        """The model quantized with `scheme` (calibrated from the stored decisions; kept for reuse)."""
        if scheme.name not in self._models:
            self.result(scheme)  # may build it on the way (a fresh decision needs the model for its manifest)
        if scheme.name not in self._models:
            self._quantize(scheme, *self._configs[scheme.name])
        self._models.move_to_end(scheme.name)
        return self._models[scheme.name]

    def _quantize(self, scheme: SchemeSpec, quant_config: dict | None, calibration: int) -> torch.nn.Module:
        while self._models and not self._room_for_another():
            self._models.popitem(last=False)
            free_memory()
        model = self.context.load().model
        if quant_config is not None:
            with STAGE_TIMES.measure("calibrate + fake-quantize a scheme"):
                batches = self.context.calibration_batches("calibration", calibration, scheme.calibration)
                apply_config(model, quant_config, batches, self.context.device)
                if scheme.kv_cache:
                    calibrate_kv_cache(model, scheme.kv_cache, batches, self.context.device)
        self._models[scheme.name] = model
        return model
