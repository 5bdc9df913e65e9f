"""The workbench: one model + data + catalog + cache; produces each scheme once and remembers it.

    >>> bench = Workbench(ModelSpec("tiny"), DataConfig(), load_catalog(), cache_root=Path(".quantsuite-cache"))
    >>> result = bench.scheme(bench.catalog.scheme("top50"))   # scores (once), re-solve, calibrate, manifest
    >>> result.manifest["totals"]["coverage_by_weights"]         # doctest: +SKIP
    0.5

Scores live in the cache under `scores/<key>` (key: model fingerprint, data fingerprint, scoring plan,
device, package versions); each scheme's decisions (quant config + manifest) under `schemes/<key>`, whose
key includes the scores key. A second run reuses both and only re-applies the stored config (calibration).
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from filelock import FileLock

from quantsuite import autoquant as autoquant_module
from quantsuite import manifest as manifest_module
from quantsuite.autoquant import (
    Resolution,
    ScoringPlan,
    apply_config,
    load_search_state,
    picked_effective_bits,
    resolve_config,
    run_scoring,
    save_search_state,
)
from quantsuite.cache import ArtifactCache, code_hash, package_versions, write_atomic
from quantsuite.data import CaptionDataError, DataConfig, load_splits, tokenize_batches
from quantsuite.drift import Capture, capture, compare
from quantsuite.export import ExportError, export_fidelity, export_model, load_export, tensor_index, verify_export
from quantsuite.manifest import SCHEMA_VERSION, build_manifest
from quantsuite.models import LoadedModel, ModelSpec, load_model, load_tokenizer
from quantsuite.schemes import Catalog, SchemeSpec

REPORTS_DIR = Path(__file__).resolve().parents[1] / "reports"
SPEED_LOCK = "vllm-speed"  # cache.exclusive name held by every vLLM speed measurement and speed-engine load


@dataclass
class SchemeResult:
    scheme: SchemeSpec
    manifest: dict
    manifest_path: Path
    artifact_dir: Path  # the scheme's cache directory (later stages add the export here)
    reused: bool
    resolution: Resolution | None
    timings: dict[str, float] = field(default_factory=dict)


class TransientVllmFailure(RuntimeError):
    """A vLLM run that ended without a result (timeout, crash, out of memory): reported, never cached."""


class VllmUnsupportedHere(RuntimeError):
    """This machine's hardware cannot run the check in vLLM (e.g. FP8 KV cache on a CPU without AVX-512):
    the test skips with the reason; nothing is cached (another machine can run it)."""


class Workbench:
    """Produces schemes for one model and one data configuration (see module docstring)."""

    def __init__(
        self,
        model_spec: ModelSpec,
        data_config: DataConfig,
        catalog: Catalog,
        cache_root: Path,
        reports_dir: Path = REPORTS_DIR,
        live_models: int = 1,
        run_id: str = "adhoc",
    ) -> None:
        self.model_spec = model_spec
        self.data_config = data_config
        self.catalog = catalog
        self.cache = ArtifactCache(Path(cache_root))
        self.reports_dir = Path(reports_dir)
        self.run_id = run_id  # stamped on every JSON this workbench writes under reports/; the report joins one run
        self.live_models = live_models
        self.device = model_spec.torch_device()
        self.source_dir = model_spec.source_dir()
        self.tokenizer = load_tokenizer(self.source_dir)
        self.splits = load_splits(data_config)
        self.model_fingerprint = model_spec.fingerprint()
        self.versions = package_versions()
        self.scoring_runs = 0  # how many times AutoQuant scoring actually ran in this process
        self._states: dict[str, dict] = {}
        self._results: dict[str, SchemeResult] = {}
        self._models: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self._configs: dict[str, tuple[dict | None, int]] = {}
        self._exports: dict[str, Path] = {}
        self._measurements: dict[str, dict] = {}
        self._reference: Capture | None = None

    # -- inputs -------------------------------------------------------------------------------------------
    @property
    def model_tag(self) -> str:
        return self.model_spec.tag

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def publish(self, kind: str, name: str, document: dict) -> Path:
        """Write a stage's result to reports/<kind>/<model>/<name>.json, stamped with this run's id."""
        path = self.reports_dir / kind / self.model_tag / f"{name}.json"
        write_atomic(path, json.dumps(document | {"run_id": self.run_id}, indent=1, sort_keys=True) + "\n")
        return path

    def batches(self, split: str, samples: int | None = None) -> list[dict]:
        captions = getattr(self.splits, split)
        if samples is not None:
            if samples > len(captions):
                option = {"calibration": "--calib-samples", "scoring": "--score-samples"}.get(split, split)
                raise CaptionDataError(f"a scheme asks for {samples} {split} samples but the split holds "
                                       f"{len(captions)}; raise {option}")  # fmt: skip
            captions = captions[:samples]
        return tokenize_batches(captions, self.tokenizer, self.data_config.batch_size, self.data_config.sequence_length)

    def load(self) -> LoadedModel:
        return load_model(self.model_spec)

    def _base_key(self) -> dict:
        return {
            "model": self.model_fingerprint, "data": self.splits.fingerprint, "versions": self.versions,
            "device": self.device.type, "dtype": self.model_spec.dtype,
        }  # fmt: skip

    # -- scoring --------------------------------------------------------------------------------------------
    def scoring_plan(self, scheme: SchemeSpec) -> ScoringPlan:
        return ScoringPlan.for_scheme(scheme, self.catalog, self.data_config.scoring_samples)

    def scoring_key(self, plan: ScoringPlan) -> str:
        return self.cache.key(self._base_key() | {"plan": asdict(plan), "code": code_hash(autoquant_module)})

    def scoring_state(self, plan: ScoringPlan) -> tuple[dict, str]:
        """The AutoQuant search state for `plan`: from memory, the disk cache, or one scoring run."""
        key = self.scoring_key(plan)
        if key not in self._states:

            def build(directory: Path) -> None:
                loaded = self.load()
                started = time.perf_counter()
                state = run_scoring(loaded.model, plan, self.batches("scoring", plan.score_samples), loaded.device)
                self.scoring_runs += 1
                save_search_state(state, directory / "search_state.pt")
                (directory / "plan.json").write_text(json.dumps(asdict(plan) | {"seconds": time.perf_counter()
                                                                                 - started}, indent=1))  # fmt: skip
                del loaded
                self._release_memory()

            path, _ = self.cache.get_or_build("scores", key, build, f"({plan.method}, {'+'.join(plan.presets)})")
            self._states[key] = load_search_state(path / "search_state.pt")
        return self._states[key], key

    # -- schemes --------------------------------------------------------------------------------------------
    def scheme(self, scheme: SchemeSpec) -> SchemeResult:
        """Produce `scheme` once per process (and once per cache key across runs)."""
        if scheme.name in self._results:
            return self._results[scheme.name]
        timings: dict[str, float] = {}
        calibration = scheme.calibration_samples or self.data_config.calibration_samples
        started = time.perf_counter()
        state = scores_key = resolution = None
        if scheme.mode == "autoquant":
            state, scores_key = self.scoring_state(self.scoring_plan(scheme))
            timings["scoring_s"] = time.perf_counter() - started
            resolution = resolve_config(state, scheme)
            timings["resolve_s"] = time.perf_counter() - started - timings["scoring_s"]
            quant_config = resolution.quant_config
        elif scheme.mode == "plain":
            quant_config = self.catalog.formats[scheme.formats[0]].quant_config()
        else:
            quant_config = None
        key = self.cache.key(self._base_key() | {
            "scheme": scheme.spec_hash_input(), "scores": scores_key, "calibration_samples": calibration,
            "quant_config": json.dumps(quant_config, sort_keys=True, default=str), "manifest": SCHEMA_VERSION,
            "formats": {name: self.catalog.formats[name].model_dump(mode="json") for name in scheme.formats},
            "code": code_hash(autoquant_module, manifest_module),
        })  # fmt: skip

        def build(directory: Path) -> None:
            model = self.quantized_model(scheme, quant_config, calibration)
            context = self.context(scheme, calibration, scores_key)
            manifest = build_manifest(model, scheme, self.catalog, context, state, resolution)
            (directory / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
            torch.save(quant_config, directory / "quant_config.pt")

        artifact_dir, reused = self.cache.get_or_build("schemes", key, build, scheme.name)
        manifest = json.loads((artifact_dir / "manifest.json").read_text())
        manifest_path = self.publish("manifests", scheme.name, manifest)
        timings["total_s"] = time.perf_counter() - started
        result = SchemeResult(scheme, manifest, manifest_path, artifact_dir, reused, resolution, timings)
        self._results[scheme.name] = result
        self._configs[scheme.name] = (quant_config, calibration)
        return result

    def context(self, scheme: SchemeSpec, calibration: int, scores_key: str | None) -> dict:
        return {
            "model": {"name": self.model_tag, "fingerprint": self.model_fingerprint, "dtype": self.model_spec.dtype,
                      "seed": self.model_spec.seed},
            "data": {"source": str(self.data_config.source), "fingerprint": self.splits.fingerprint,
                     "seed": self.data_config.seed, "calibration_samples": calibration,
                     "score_samples": scheme.score_samples or self.data_config.scoring_samples,
                     "batch_size": self.data_config.batch_size, "sequence_length": self.data_config.sequence_length},
            "scores_key": scores_key,
            "versions": self.versions,
            "device": self.device_name,
        }  # fmt: skip

    def quantized_model(
        self, scheme: SchemeSpec, quant_config: dict | None = None, calibration: int | None = None
    ) -> torch.nn.Module:
        """The model quantized with `scheme` (kept for reuse; at most `live_models` stay in memory)."""
        if scheme.name in self._models:
            self._models.move_to_end(scheme.name)
            return self._models[scheme.name]
        if quant_config is None and calibration is None:
            self.scheme(scheme)
            if scheme.name in self._models:
                return self._models[scheme.name]
            quant_config, calibration = self._configs[scheme.name]
        while len(self._models) >= self.live_models:
            self._models.popitem(last=False)
            self._release_memory()
        model = self.load().model
        if quant_config is not None:
            apply_config(model, quant_config, self.batches("calibration", calibration), self.device)
        self._models[scheme.name] = model
        return model

    def release_models(self) -> None:
        """Free the quantized models kept for reuse (before a measurement that should not share the device)."""
        self._models.clear()
        self._release_memory()

    @staticmethod
    def _release_memory() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- export ---------------------------------------------------------------------------------------------
    def export_key(self, scheme: SchemeSpec) -> str:
        """Cache key of the scheme's export (known without building it: later stages key on it)."""
        result = self.scheme(scheme)
        from quantsuite import export

        return self.cache.key({"scheme": result.artifact_dir.name, "versions": self.versions, "stage": "export",
                               "code": code_hash(export)})  # fmt: skip

    def export(self, scheme: SchemeSpec) -> Path:
        """The scheme's HF checkpoint (built once; a corrupt cached export is deleted and rebuilt, never loaded)."""
        if scheme.name in self._exports:
            return self._exports[scheme.name]
        result = self.scheme(scheme)
        key = self.export_key(scheme)

        def build(directory: Path) -> None:
            started = time.perf_counter()
            export_model(copy.deepcopy(self.quantized_model(scheme)), result.manifest, self.source_dir, directory)
            (directory / "timing.json").write_text(json.dumps({"export_s": time.perf_counter() - started}))

        path, reused = self.cache.get_or_build("exports", key, build, scheme.name)
        try:
            verify_export(path, result.manifest)
        except ExportError as error:
            if not reused:
                raise
            self.cache.events.append(f"rebuilt exports/{key} {scheme.name}: {error}")
            shutil.rmtree(path)
            path, _ = self.cache.get_or_build("exports", key, build, scheme.name)
            verify_export(path, result.manifest)
        size = sum(entry["bytes"] for entry in tensor_index(path).values())
        pointer = {"scheme": scheme.name, "export_dir": str(path), "tensor_bytes": size,
                   "files_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}  # fmt: skip
        self.publish("exports", scheme.name, pointer)
        self._exports[scheme.name] = path
        return path

    def drop_export(self, scheme: SchemeSpec) -> None:
        """Delete the scheme's export from the cache (measurements stay); a later export() rebuilds it."""
        if scheme.mode == "none":
            return  # the BF16 reference is loaded by every worker (vLLM noise floor, speed baseline): kept
        path = self._exports.pop(scheme.name, None)
        if path is not None and path.exists():
            shutil.rmtree(path)
            self.cache.events.append(f"dropped {path.parent.name}/{path.name} {scheme.name}")

    # -- drift ----------------------------------------------------------------------------------------------
    def evaluation_batches(self) -> list[dict]:
        return self.batches("evaluation")

    def reference(self) -> Capture:
        """BF16 logits and block outputs on the evaluation split, computed once per session."""
        if self._reference is None:
            model = self.load().model
            self._reference = capture(model, self.evaluation_batches(), self.device)
            del model
            self._release_memory()
        return self._reference

    def measure(self, scheme: SchemeSpec) -> dict:
        """Drift of (a) the fake-quantized model and (b) the reloaded export against BF16, and (a) vs (b)."""
        if scheme.name in self._measurements:
            return self._measurements[scheme.name]
        from quantsuite import drift

        key = self.cache.key({"export": self.export_key(scheme), "evaluation": self.splits.fingerprint,
                              "stage": "drift", "code": code_hash(drift)})  # fmt: skip

        def build(directory: Path) -> None:
            export_dir = self.export(scheme)  # only when the drift is not cached (an export is GBs at 3B)
            batches = self.evaluation_batches()
            quantized = self.quantized_model(scheme)
            fake = capture(quantized, batches, self.device)  # (a): measured before anything touches the export
            fidelity = export_fidelity(quantized, export_dir)
            reloaded = load_export(export_dir, self.device)
            exported = capture(reloaded, batches, self.device)  # (b)
            del reloaded
            self._release_memory()
            measurement = {
                "scheme": scheme.name, "model": self.model_tag, "export_dir": str(export_dir),
                "fake_quant": compare(self.reference(), fake, self.device),
                "export": compare(self.reference(), exported, self.device),
                "fake_vs_export": compare(fake, exported, self.device), "export_fidelity": fidelity,
            }  # fmt: skip
            (directory / "drift.json").write_text(json.dumps(measurement, indent=1))

        path, _ = self.cache.get_or_build("drift", key, build, scheme.name)
        measurement = json.loads((path / "drift.json").read_text())
        self.publish("drift", scheme.name, measurement)
        self._measurements[scheme.name] = measurement
        return measurement

    # -- vLLM ----------------------------------------------------------------------------------------------
    def teacher_forced_sequences(self) -> list[list[int]]:
        from quantsuite.vllm_compat import teacher_forced_sequences

        captions = [caption.text for caption in self.splits.evaluation]
        return teacher_forced_sequences(self.tokenizer, captions, self.data_config.sequence_length)

    def reference_scheme(self) -> SchemeSpec:
        """The catalog's BF16 reference (mode `none`): its export gives the vLLM noise floor."""
        references = [s for s in self.catalog.schemes if s.mode == "none"]
        if not references:
            raise ValueError("schemes.yaml has no scheme with `mode: none`; the vLLM verdict needs the BF16 "
                             "reference to measure the noise floor")  # fmt: skip
        return references[0]

    def vllm_check(self, scheme: SchemeSpec, check: str, service) -> dict:
        """One vLLM check of the scheme's export: `model_free`, or a `cpu` / `cpu_patched` / `cuda` load scored
        teacher-forced (and greedily) against the PyTorch reference of the same checkpoint. Cached per (export,
        check, vLLM version, code); transient failures (timeout, crash, out of memory) raise and are not cached."""
        from quantsuite import vllm_compat

        manifest = self.scheme(scheme).manifest
        sequences = self.teacher_forced_sequences()
        prompts = vllm_compat.prompt_token_ids(self.tokenizer)
        from quantsuite import vllm_cpu_fp8_compat, vllm_worker

        code = code_hash(vllm_compat, vllm_worker, vllm_cpu_fp8_compat)
        key = self.cache.key({"export": self.export_key(scheme), "check": check, "code": code,
                              "vllm": vllm_compat.vllm_version(service.python), "sequences": sequences,
                              "prompts": prompts, "tokens": vllm_compat.GREEDY_TOKENS})  # fmt: skip

        def build(directory: Path) -> None:
            export_dir = self.export(scheme)
            if check == "model_free":
                result = vllm_compat.model_free_verdict(service, export_dir, manifest)
            else:
                result = self.vllm_run(service, export_dir, check)
            if vllm_compat.is_unsupported_here(result.get("error")):
                raise VllmUnsupportedHere(f"{scheme.name} {check}: {vllm_compat.error_text(result['error'])}")
            if vllm_compat.is_transient(result.get("error")):
                raise TransientVllmFailure(f"{scheme.name} {check}: {vllm_compat.error_text(result['error'])} "
                                           f"(not cached; vLLM log: {service.log_path})")  # fmt: skip
            (directory / "result.json").write_text(json.dumps(result | {"check": check, "scheme": scheme.name}))

        path, _ = self.cache.get_or_build("vllm", key, build, f"{scheme.name} {check}")
        return json.loads((path / "result.json").read_text())

    def vllm_run(self, service, export_dir: Path, check: str) -> dict:
        """Load `export_dir` in a vLLM engine (`check` = cpu, cpu_patched or cuda), score the evaluation captions
        teacher-forced and decode the greedy prompts, then the same with the PyTorch reference of the export."""
        from quantsuite import vllm_compat

        sequences, prompts = self.teacher_forced_sequences(), vllm_compat.prompt_token_ids(self.tokenizer)
        self.release_models()  # the engine gets the device: nothing of ours stays on it
        options = vllm_compat.engine_options(self.device, "check", share=0.35)
        with service.engine(export_dir, options, patch=check == "cpu_patched") as engine:
            result = {key: engine.opened.get(key) for key in ("loaded", "error", "kernels", "patches",
                                                               "load_seconds", "vllm_version")}  # fmt: skip
            result["options"] = options
            if engine.error:
                return result
            scores = engine.call("score", prompts=sequences)
            greedy = engine.call("generate", prompts=prompts, max_tokens=vllm_compat.GREEDY_TOKENS)
        for answer in (scores, greedy):
            if answer.get("error"):
                return result | {"error": answer["error"]}
        reloaded = load_export(export_dir, self.device)
        per_shard = vllm_compat.reference_scores(reloaded, sequences, self.device)
        fused_groups = vllm_compat.fuse_like_vllm(reloaded)  # what vLLM must compute: one scale per fused GEMM
        reference = vllm_compat.reference_scores(reloaded, sequences, self.device) if fused_groups else per_shard
        greedy_reference = vllm_compat.reference_generate(reloaded, prompts, vllm_compat.GREEDY_TOKENS, self.device)
        del reloaded
        self._release_memory()
        return result | {"teacher_forced": vllm_compat.teacher_forced(reference, scores),
                         "teacher_forced_per_shard": vllm_compat.teacher_forced(per_shard, scores),
                         "fusion_effect": vllm_compat.teacher_forced(per_shard, reference),
                         "fused_groups": fused_groups,
                         "greedy": vllm_compat.agreement(greedy_reference, greedy["outputs"]),
                         "greedy_outputs": greedy["outputs"]}  # fmt: skip

    def vllm_verdict(self, scheme: SchemeSpec, check: str, service) -> dict:
        """The check's result with its decision: model_free by its problems; a load by its teacher-forced error
        against the BF16 export's (the noise floor, measured with the same vLLM in this run). Written to
        reports/vllm/<model>/<scheme>.json."""
        from quantsuite import vllm_compat

        result = self.vllm_check(scheme, check, service)
        if check == "model_free":
            failures = result["problems"]
        elif result.get("error"):
            failures = [f"vLLM {vllm_compat.error_text(result['error'])}"]
        else:
            floor = self.vllm_check(self.reference_scheme(), check, service).get("teacher_forced")
            if floor is None:
                raise TransientVllmFailure(f"the BF16 reference did not run in vLLM ({check}), so there is no "
                                           "noise floor to judge against; see its own test")  # fmt: skip
            decision = vllm_compat.decide(result["teacher_forced"], floor)
            result["decision"] = {"compatible": decision.compatible, "error_ratio": decision.error_ratio,
                                  "bound": decision.bound, "text": decision.text, "floor": floor}  # fmt: skip
            failures = [] if decision.compatible else [f"vLLM computes something else: {decision.text}"]
        result["failures"] = failures
        keys = ("failures", "problems", "loaded", "error", "decision", "teacher_forced", "teacher_forced_per_shard",
                "fusion_effect", "fused_groups", "greedy", "kernels", "patches", "load_seconds",
                "vllm_version")  # fmt: skip
        self._merge_vllm_report(scheme, check, {k: result[k] for k in keys if result.get(k) is not None})
        return result

    def vllm_speed(self, scheme: SchemeSpec, service, baseline, rounds: int) -> dict:
        """vLLM speed of the scheme's export as users run it, paired with the BF16 export's engine `baseline`
        (already open): per workload the median per-round ratio, the weight-bytes bound (BF16 checkpoint bytes /
        the scheme's) and the share of the bound's gain realized, (ratio - 1) / (bound - 1). Never cached. One
        measurement at a time per host (SPEED_LOCK): another worker's exports or engine loads beside the rounds
        moved batch-256 ratios by up to 35% between identical runs on a 2 x H200 host."""
        with self.cache.exclusive(SPEED_LOCK):  # export, load and rounds: no other worker's work beside them
            return self._vllm_speed(scheme, service, baseline, rounds)

    def _vllm_speed(self, scheme: SchemeSpec, service, baseline, rounds: int) -> dict:
        from quantsuite import vllm_compat

        export_dir = self.export(scheme)
        reference_bytes = self.export_bytes(self.reference_scheme())
        scheme_bytes = self.export_bytes(scheme)
        self.release_models()
        cuda = self.device.type == "cuda"
        captions = [caption.text for caption in self.splits.evaluation]
        options = vllm_compat.engine_options(self.device, "speed", share=0.3)
        result: dict = {"device": self.device_name, "options": options, "rounds": rounds, "workloads": {},
                        "checkpoint_bytes": scheme_bytes, "bf16_checkpoint_bytes": reference_bytes,
                        "weight_bytes_bound": reference_bytes / scheme_bytes}  # fmt: skip
        with service.engine(export_dir, options, patch=not cuda) as engine:
            if vllm_compat.is_unsupported_here(engine.error):
                raise VllmUnsupportedHere(f"{scheme.name}: {vllm_compat.error_text(engine.error)}")
            if engine.error:
                raise RuntimeError(f"{scheme.name}: the speed engine did not load: "
                                   f"{vllm_compat.error_text(engine.error)}")  # fmt: skip
            for workload in vllm_compat.workloads(self.tokenizer, captions, cuda):
                paired = vllm_compat.paired_speed(baseline, engine, workload, rounds)
                if paired.get("error"):
                    raise TransientVllmFailure(f"{scheme.name} {workload.name}: "
                                               f"{vllm_compat.error_text(paired['error'])}")  # fmt: skip
                bound = result["weight_bytes_bound"]
                paired["bound_share"] = (paired["ratio"] - 1) / (bound - 1) if abs(bound - 1) > 1e-3 else None
                result["workloads"][workload.name] = paired
        self._merge_vllm_report(scheme, "speed", result)
        return result

    def export_bytes(self, scheme: SchemeSpec) -> int:
        """Tensor bytes of the scheme's checkpoint (from its reports/ pointer, else from the export)."""
        pointer = self.reports_dir / "exports" / self.model_tag / f"{scheme.name}.json"
        if not pointer.is_file() or Path(json.loads(pointer.read_text())["export_dir"]).name != self.export_key(scheme):
            self.export(scheme)  # writes the pointer
        return json.loads(pointer.read_text())["tensor_bytes"]

    def _merge_vllm_report(self, scheme: SchemeSpec, key: str, value: dict) -> None:
        report_path = self.reports_dir / "vllm" / self.model_tag / f"{scheme.name}.json"
        with FileLock(str(report_path) + ".lock"):
            merged = json.loads(report_path.read_text()) if report_path.is_file() else {}
            if merged.get("run_id") != self.run_id:
                merged = {}  # another run's checks: not this run's results
            self.publish("vllm", scheme.name, merged | {key: value})

    # -- research -------------------------------------------------------------------------------------------
    SWEEP_TARGETS = (15.0, 14.0, 13.0, 12.0, 11.0, 10.0, 9.0, 8.5)

    def research(self) -> dict:
        """Method comparison, Pareto sweep (re-solved from one scoring pass) and solver optimality gap."""
        from quantsuite import research

        searches = [s for s in self.catalog.schemes if s.mode == "autoquant"]
        plans = {}
        for scheme in searches:
            plans.setdefault(scheme.method, (scheme, self.scoring_plan(scheme)))
        if "gradient" not in plans:
            raise ValueError("research needs a gradient autoquant scheme in schemes.yaml")
        states = {method: self.scoring_state(plan) for method, (_, plan) in plans.items()}
        base = plans["gradient"][0]
        key = self.cache.key({"scores": {m: k for m, (_, k) in states.items()}, "evaluation": self.splits.fingerprint,
                              "targets": self.SWEEP_TARGETS, "stage": "research"})  # fmt: skip

        def factory(bits: float) -> SchemeSpec:
            return base.model_copy(update={"name": f"sweep_eb{bits:g}", "coverage": None, "effective_bits": bits,
                                           "coverage_mode": "auto"})  # fmt: skip

        def build(directory: Path) -> None:
            state = states["gradient"][0]
            sweep = []
            for bits in self.SWEEP_TARGETS:
                resolution = resolve_config(state, factory(bits))
                model = self.load().model
                apply_config(model, resolution.quant_config, self.batches("calibration"), self.device)
                drift = compare(self.reference(), capture(model, self.evaluation_batches(), self.device), self.device)
                del model
                self._release_memory()
                lm_bits = picked_effective_bits(state, resolution.group_formats)
                sweep.append({"target_effective_bits": bits, "lm_effective_bits": lm_bits,
                              "kl_mean": drift["kl_mean"], "top1_agreement": drift["top1_agreement"],
                              "perplexity_delta": drift["perplexity_delta"]})  # fmt: skip
            result = {
                "sensitivity": research.block_sensitivities({m: s for m, (s, _) in states.items()}),
                "sweep": sweep,
                "optimality_gap": research.optimality_gap(state, factory, list(self.SWEEP_TARGETS)),
            }
            (directory / "research.json").write_text(json.dumps(result, indent=1))

        path, _ = self.cache.get_or_build("research", key, build, "research")
        result = json.loads((path / "research.json").read_text())
        write_atomic(self.reports_dir / "research" / f"{self.model_tag}.json",
                     json.dumps(result | {"run_id": self.run_id}, indent=1))  # fmt: skip
        return result
