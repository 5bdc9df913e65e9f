"""vLLM stage: does vLLM compute what each export means (teacher-forced against the PyTorch reference of the same
checkpoint, judged against the BF16 export's noise floor), and how fast it runs it as users run vLLM (paired with
BF16). vLLM itself runs in its own environment (quantsuite/vllm/: the service client, the verdict, the speed
measurement, the worker).

    >>> checks = VllmChecks(context, schemes, exports)
    >>> checks.verdict(context.catalog.scheme("top50"), "cuda", service)["failures"]  # doctest: +SKIP
    []
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from filelock import FileLock

from quantsuite import checkpoint, formats
from quantsuite.bounds import VLLM_IMAGE_RATIO, VLLM_RATIO
from quantsuite.cache import code_hash
from quantsuite.catalog import SchemeSpec, VllmOutcome
from quantsuite.checkpoint import load_export
from quantsuite.data import prompt_image
from quantsuite.manifest import split_fused_groups
from quantsuite.stages.context import RunContext, free_memory
from quantsuite.stages.export import Exports
from quantsuite.stages.scheme import Schemes
from quantsuite.vllm import cpu_fp8_compat, worker
from quantsuite.vllm import service as vllm_service
from quantsuite.vllm import speed as vllm_speed
from quantsuite.vllm import verdict as vllm_verdict

SPEED_LOCK = "vllm-speed"  # cache.exclusive name held by every vLLM speed measurement and every engine load
IMAGE_PROMPTS = 8  # the evaluation split's image prompts each load is also scored on (where the data has images)


class TransientVllmFailure(RuntimeError):
    """A vLLM run that ended without a result (timeout, crash, out of memory): reported, never cached."""


class VllmUnsupportedHere(RuntimeError):
    """This machine's hardware cannot run the check in vLLM (e.g. FP8 KV cache on a CPU without AVX-512):
    the test skips with the reason; nothing is cached (another machine can run it)."""


class VllmChecks:
    """Checks under `vllm/<key>` (key: the export's key + check + vLLM version + code + token inputs), verdicts and
    speed merged per scheme into reports/vllm/<model>/<scheme>.json (one run's results only).

    Every load of a scheme's export runs as users run vLLM (`load_options`), so one engine serves the scheme's
    verdict and its speed pair: an engine that loaded is kept, one for the BF16 reference (noise floor, speed
    baseline) and one for the scheme in hand, until another export or settings need its place, a PyTorch reference
    needs the device (`reference`: the scheme's closes), `close_engines` (the scheme's tests are done) or the service
    ends. `engine_share`: the card share each engine asks for (two
    per process; the pytest layer divides it among the processes sharing a GPU)."""

    def __init__(self, context: RunContext, schemes: Schemes, exports: Exports, engine_share: float = 0.3) -> None:
        self.context = context
        self.schemes = schemes
        self.exports = exports
        self.engine_share = engine_share
        self._kept: dict[str, KeptEngine] = {}  # role ("reference", "scheme") -> its open engine

    @functools.cached_property
    def token_inputs(self) -> tuple[list[list[int]], list[list[int]]]:
        """(teacher-forced sequences of the evaluation captions, greedy prompts): tokenized once per run, read by
        every check's key, its run and the PyTorch reference."""
        captions = [caption.text for caption in self.context.splits.evaluation]
        sequences = vllm_verdict.teacher_forced_sequences(self.context.tokenizer, captions,
                                                         self.context.data_config.sequence_length)  # fmt: skip
        return sequences, vllm_verdict.prompt_token_ids(self.context.tokenizer)

    @functools.cached_property
    def image_inputs(self) -> dict | None:
        """The first IMAGE_PROMPTS image prompts of the evaluation split as a load is scored on them (None where the
        data is text only): `batches` (the reference's), and as vLLM gets them: `sequences` (token ids, the image's
        tokens expanded), `images` (each prepared as the processor gets it, a PNG under the cache), `masks` (the
        caption's positions, where they are compared) and `image_token`."""
        context = self.context
        if context.image_splits is None:
            return None
        count = min(IMAGE_PROMPTS, len(context.image_splits.evaluation))
        batches = context.batches("evaluation", count, images=True)
        size = context.data_config.image_size
        folder = context.cache.root / "vllm-images" / context.image_splits.fingerprint[:20] / str(size)
        folder.mkdir(parents=True, exist_ok=True)
        sequences, masks, images = [], [], []
        for index, caption in enumerate(context.image_splits.evaluation[:count]):
            batch, row = batches[index // context.data_config.batch_size], index % context.data_config.batch_size
            length = int(batch["attention_mask"][row].sum())
            sequences.append(batch["input_ids"][row, :length].tolist())
            masks.append(batch["measure_mask"][row, : length - 1].tolist())
            path = folder / f"{index}.png"
            if not path.is_file():  # written whole, then renamed: another worker may be writing the same file
                temporary = folder / f".{index}.{os.getpid()}.png"
                prompt_image(caption.image, size).save(temporary)
                os.replace(temporary, path)
            images.append(str(path))
        token = context.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        return {"batches": batches, "sequences": sequences, "masks": masks, "images": images, "image_token": token}

    def _image_key(self) -> dict:
        images = self.image_inputs
        return {} if images is None else {"image_prompts": images["sequences"],
                                          "images": self.context.image_splits.fingerprint}  # fmt: skip

    def check(self, scheme: SchemeSpec, check: str, service) -> dict:
        """One vLLM check of the scheme's export: `model_free`, or a `cpu` / `cpu_patched` / `cuda` load scored
        teacher-forced (and greedily) against the PyTorch reference of the same checkpoint. Cached per (export,
        check, vLLM version, code); transient failures (timeout, crash, out of memory) raise and are not cached."""
        manifest = self.schemes.result(scheme).manifest
        sequences, prompts = self.token_inputs

        code = code_hash(vllm_service, vllm_verdict, worker, cpu_fp8_compat, sys.modules[__name__])
        key = self.context.cache.key({"export": self.exports.export_key(scheme), "check": check, "code": code,
                                      "vllm": vllm_service.vllm_version(service.python), "sequences": sequences,
                                      "prompts": prompts, "tokens": vllm_verdict.GREEDY_TOKENS}
                                     | self._image_key())  # fmt: skip

        def build(directory: Path) -> None:
            export_dir = self.exports.path(scheme)
            if check == "model_free":
                result = vllm_verdict.model_free_verdict(service, export_dir, manifest)
            else:
                expected_to_load = self.expected_failure(scheme, check) is None
                result = self.run(service, export_dir, check, self.exports.export_key(scheme), expected_to_load)
            if vllm_service.is_unsupported_here(result.get("error")):
                raise VllmUnsupportedHere(f"{scheme.name} {check}: {vllm_service.error_text(result['error'])}")
            if vllm_service.is_transient(result.get("error")):
                raise TransientVllmFailure(f"{scheme.name} {check}: {vllm_service.error_text(result['error'])} "
                                           f"(not cached; vLLM log: {service.log_path})")  # fmt: skip
            (directory / "result.json").write_text(json.dumps(result | {"check": check, "scheme": scheme.name}))

        path, _ = self.context.cache.get_or_build("vllm", key, build, f"{scheme.name} {check}")
        return json.loads((path / "result.json").read_text())

    def run(self, service, export_dir: Path, check: str, export_key: str | None = None, reference_first: bool = True,
            reference_dir: Path | None = None) -> dict:  # fmt: skip
        """Load `export_dir` in a vLLM engine (`check` = cpu, cpu_patched or cuda), score the evaluation captions
        teacher-forced and decode the greedy prompts, then compare with the PyTorch reference of the export
        (`reference`: computed once per export key and shared by every check of it). The reference is computed
        before the engine takes the device, or with `reference_first` False (a load expected to fail) only once the
        load has scored. `reference_dir`: judge against another checkpoint's reference instead (the planted fault
        of a verdict fed the wrong export)."""
        sequences, prompts = self.token_inputs
        images = self.image_inputs
        patch = check == "cpu_patched"

        def pytorch_reference() -> dict:
            return self.reference(export_dir, export_key) if reference_dir is None else self.reference(reference_dir)

        expected = pytorch_reference() if reference_first else None
        with contextlib.ExitStack() as stack:  # a scheme's export: its kept engine; anything else: one of its own
            if export_key is not None and reference_dir is None:
                engine = self.engine(service, export_dir, patch)
            else:
                engine = stack.enter_context(self._open(service, export_dir, patch))
            result = {key: engine.opened.get(key) for key in ("loaded", "error", "kernels", "patches",
                                                               "load_seconds", "vllm_version")}  # fmt: skip
            result["options"] = engine.options
            if engine.error:
                return result
            scores = engine.call("score", prompts=sequences)
            greedy = engine.call("generate", prompts=prompts, max_tokens=vllm_verdict.GREEDY_TOKENS)
            image_scores = engine.call("score", prompts=images["sequences"], images=images["images"],
                                       image_token=images["image_token"]) if images else {}  # fmt: skip
        for answer in (scores, greedy, image_scores):
            if answer.get("error"):
                return result | {"error": answer["error"]}
        if expected is None:
            expected = pytorch_reference()
        per_shard, fused = expected["per_shard"], expected["fused"]
        result |= {"teacher_forced": vllm_verdict.teacher_forced(fused, scores),
                   "teacher_forced_per_shard": vllm_verdict.teacher_forced(per_shard, scores),
                   "fusion_effect": vllm_verdict.teacher_forced(per_shard, fused),
                   "fused_groups": expected["fused_groups"],
                   "greedy": vllm_verdict.agreement(expected["greedy"], greedy["outputs"]),
                   "greedy_outputs": greedy["outputs"]}  # fmt: skip
        if images:  # the caption's positions after the image, against the reference with vLLM's fused scales
            result["images"] = vllm_verdict.teacher_forced(expected["images"],
                                                           vllm_verdict.at_positions(image_scores, images["masks"]))
        return result

    def reference(self, export_dir: Path, export_key: str | None = None) -> dict:
        """What the export means, computed in PyTorch on the reloaded checkpoint: teacher-forced scores per shard
        and with vLLM's fused-layer scales (`fused`, the one a load is judged against), and greedy outputs. With
        `export_key`, built once under `vllm-reference/<key>` and shared by the cpu, cpu_patched and cuda checks
        (reports/profile-cpu-2core/README.md). Computing it takes the device as an engine does: this process's
        models released and the scheme's kept engine closed (the BF16 reference's stays). On an 80 GiB H100 at 7B
        (run gpu-43) the reload ran out of memory beside the two engines a speed pair had kept open."""
        sequences, prompts = self.token_inputs
        device = self.context.device

        def compute() -> dict:
            self.close_engines("scheme")  # loaded again when next needed
            self.context.release()
            reloaded = load_export(export_dir, device)
            per_shard = vllm_verdict.reference_scores(reloaded, sequences, device)
            fused_groups = vllm_verdict.fuse_like_vllm(reloaded)  # what vLLM must compute: one scale per fused GEMM
            fused = vllm_verdict.reference_scores(reloaded, sequences, device) if fused_groups else per_shard
            greedy = vllm_verdict.reference_generate(reloaded, prompts, vllm_verdict.GREEDY_TOKENS, device)
            images = self.image_inputs
            image_scores = vllm_verdict.reference_image_scores(reloaded, images["batches"], device) if images else None
            del reloaded
            free_memory()
            return {"per_shard": per_shard, "fused": fused, "fused_groups": fused_groups, "greedy": greedy,
                    "images": image_scores}  # fmt: skip

        if export_key is None:
            return compute()
        code = code_hash(vllm_verdict, checkpoint, formats, sys.modules[__name__])
        key = self.context.cache.key({"export": export_key, "code": code, "sequences": sequences,
                                      "prompts": prompts, "tokens": vllm_verdict.GREEDY_TOKENS,
                                      "device": str(device)} | self._image_key())  # fmt: skip

        def build(directory: Path) -> None:
            (directory / "reference.json").write_text(json.dumps(compute()))

        path, _ = self.context.cache.get_or_build("vllm-reference", key, build, export_dir.name)
        return json.loads((path / "reference.json").read_text())

    def verdict(self, scheme: SchemeSpec, check: str, service) -> dict:
        """The check's result with its decision: model_free by its problems; a load by its teacher-forced error
        against the BF16 export's (the noise floor, measured with the same vLLM in this run). Written to
        reports/vllm/<model>/<scheme>.json."""
        result = self.check(scheme, check, service)
        if check == "model_free":
            failures = result["problems"]
        elif result.get("error"):
            failures = [f"vLLM {vllm_service.error_text(result['error'])}"]
        else:
            decision, floor = self.decide(scheme, result["teacher_forced"], check, service)
            result["decision"] = _decision_record(decision, floor)
            failures = [] if decision.compatible else [f"vLLM computes something else: {decision.text}"]
            if result.get("images") is not None:
                image, image_floor = self.decide(scheme, result["images"], check, service, part="images")
                result["image_decision"] = _decision_record(image, image_floor)
                failures += [] if image.compatible else [f"vLLM computes something else on image prompts: {image.text}"]
        result["failures"] = failures
        keys = ("failures", "problems", "loaded", "error", "decision", "teacher_forced", "teacher_forced_per_shard",
                "fusion_effect", "fused_groups", "greedy", "images", "image_decision", "kernels", "patches",
                "load_seconds", "vllm_version")  # fmt: skip
        self.context.publish_part("vllm", scheme.name, check, {k: result[k] for k in keys if result.get(k) is not None})
        return result

    def bound(self, scheme: SchemeSpec, part: str = "teacher_forced") -> tuple[float, str]:
        """The scheme's bound on vLLM's error on the prompts of `part` (captions, or `images`: image prompts) as a
        multiple of the floor, and where from: its record's on this device class (quantsuite.bounds), else
        NOISE_FACTOR for every scheme."""
        figure = VLLM_IMAGE_RATIO if part == "images" else VLLM_RATIO
        limits, where = self.context.verdict_limits(scheme)
        if figure in limits:
            return limits[figure].bound, where
        fallback = f"NOISE_FACTOR, no recorded {figure} bound for {scheme.name} on {self.context.device_class}"
        return vllm_verdict.NOISE_FACTOR, fallback

    def decide(self, scheme: SchemeSpec, metrics: dict, check: str, service, part: str = "teacher_forced"):
        """(`metrics`, vLLM's agreement with a reference on the prompts of `part`, judged against `scheme`'s bound
        (`bound`) x the BF16 export's floor measured by the same check on the same prompts; the floor)."""
        floor = self.check(self.context.reference_scheme(), check, service).get(part)
        if floor is None:
            raise TransientVllmFailure(f"the BF16 reference has no {part} scores in vLLM ({check}), so there is no "
                                       "noise floor to judge against; see its own test")  # fmt: skip
        return vllm_verdict.decide(metrics, floor, *self.bound(scheme, part)), floor

    def picked_formats(self, scheme: SchemeSpec) -> set[str]:
        """The catalog formats the scheme's pick has layers of (coverage above zero)."""
        coverage = self.schemes.result(scheme).manifest["totals"].get("coverage_by_format", {})
        return {name for name, share in coverage.items() if share > 0}

    def split_fused(self, scheme: SchemeSpec) -> list[str]:
        """The groups vLLM fuses (q/k/v, gate/up) that the scheme's pick gives different formats."""
        return split_fused_groups(self.schemes.result(scheme).manifest)

    def expected_failure(self, scheme: SchemeSpec, check: str) -> VllmOutcome | None:
        """The recorded failure `check` gives for the scheme's pick (`Catalog.vllm_expectation`: its own, else its
        formats'; one `when_format` F only where the pick has F layers), or None: it must load and pass."""
        expectation, _ = self.context.catalog.vllm_expectation(scheme, check, self.picked_formats(scheme),
                                                               self.split_fused(scheme))  # fmt: skip
        if expectation is None or expectation.outcome != "fail":
            return None
        if expectation.when_format and expectation.when_format not in self.picked_formats(scheme):
            return None
        return expectation

    @staticmethod
    def backend(vllm_python: Path) -> str:
        """The check a real load runs with this vLLM: `cpu_patched` on the CPU build, `cuda` otherwise."""
        return "cpu_patched" if vllm_service.is_cpu_build(vllm_python) else "cuda"

    def error_ratios(self, schemes: list[SchemeSpec], vllm_python: Path, log_dir: Path) -> dict[str, dict]:
        """Each scheme's vLLM error ratio and its within-run standard error, on captions and (where the data has
        images) on image prompts, where this machine's vLLM loads it and computes without error (what
        quantsuite.bounds records); the BF16 reference is the floor itself."""
        check = self.backend(vllm_python)
        ratios = {}
        environment = vllm_service.pinned_environment(self.context.device)
        with vllm_service.VllmService(vllm_python, log_dir, environment) as service, self.engines_closed():
            for scheme in schemes:
                if scheme.name == self.context.reference_scheme().name or self.expected_failure(scheme, check):
                    continue  # the floor itself; a recorded failure is judged against its own range
                try:
                    result = self.check(scheme, check, service)
                except VllmUnsupportedHere:
                    continue
                if result.get("error") or not result.get("teacher_forced"):
                    continue
                decision, _ = self.decide(scheme, result["teacher_forced"], check, service)
                ratios[scheme.name] = {"error_ratio": decision.error_ratio, "error_ratio_se": decision.error_ratio_se,
                                       "check": check}  # fmt: skip
                if result.get("images"):
                    image, _ = self.decide(scheme, result["images"], check, service, part="images")
                    ratios[scheme.name] |= {"image_error_ratio": image.error_ratio,
                                            "image_error_ratio_se": image.error_ratio_se}  # fmt: skip
        return ratios

    @functools.cached_property
    def speed_lock(self) -> FileLock:
        """The host-wide SPEED_LOCK (a FileLock), one object per process: re-entrant, so the loads inside a speed
        measurement that holds it take it again (another object on the same file would wait for itself)."""
        return self.context.cache.exclusive(SPEED_LOCK)

    @contextlib.contextmanager
    def speed_engine(self, scheme: SchemeSpec, service, hold: bool = False) -> Iterator:
        """The scheme's engine (`engine`: kept from its checks, or loaded now) and, with `hold`, the host-wide
        SPEED_LOCK held until the block ends. The engine's `error` says why it did not load."""
        with self.speed_lock if hold else contextlib.nullcontext():
            yield self.engine(service, self.exports.path(scheme), self.context.device.type != "cuda")

    def load_options(self, fit_memory: bool = True) -> dict:
        """The arguments of every engine that loads an export (vllm.service.engine_options), as users run vLLM (CUDA
        graphs, the engine core in its own process on a GPU), with one image per prompt where the data has images.
        `fit_memory`: with the GPU share fitted to what is free now (only just before the engine opens)."""
        options = vllm_service.engine_options(self.context.device, "speed", self.engine_share, fit_memory)
        return options | ({"images_per_prompt": 1} if self.image_inputs else {})

    def engine(self, service, export_dir: Path, patch: bool):
        """The engine of `export_dir` with `load_options` (and the CPU build's compatibility patch where `patch`):
        the kept one when it still runs in this service, else loaded now and kept in its role's place (the BF16
        reference's, or the scheme's, whose engine it closes first). An engine that did not load is not kept."""
        settings = self.load_options(fit_memory=False)  # which engine; what is free is not asked before it must be
        wanted = (str(export_dir), json.dumps(settings, sort_keys=True), patch)
        reference_key = self.exports.export_key(self.context.reference_scheme())
        role = "reference" if Path(export_dir).name == reference_key else "scheme"
        kept = self._kept.get(role)
        if kept is not None and kept.server != _server(service):
            del self._kept[role]  # another service, or its server ended (a restart): that engine is gone with it
        elif kept is not None and kept.wanted == wanted:
            return kept.engine
        self.close_engines(role)  # first: its memory is free when the new engine's share is fitted
        stack = contextlib.ExitStack()
        engine = stack.enter_context(self._open(service, export_dir, patch))
        if engine.error:
            stack.close()
        else:
            self._kept[role] = KeptEngine(_server(service), wanted, stack, engine)
        return engine

    @contextlib.contextmanager
    def _open(self, service, export_dir: Path, patch: bool) -> Iterator:
        """`service.engine` of `export_dir`: this process's models released first, then the engine's GPU share
        fitted to what is free (`load_options`), so the fit counts none of our memory. It loads under the host-wide
        SPEED_LOCK: a load beside another worker's timed rounds would disturb them (the engine a scheme's speed pair
        uses is the one its checks loaded)."""
        self.context.release()  # the engine gets the device: nothing of ours stays on it
        with contextlib.ExitStack() as stack:
            with self.speed_lock:
                engine = stack.enter_context(service.engine(export_dir, self.load_options(), patch))
            yield engine

    @contextlib.contextmanager
    def engines_closed(self) -> Iterator[None]:
        """Close every kept engine when the block ends (before its service does)."""
        try:
            yield
        finally:
            self.close_engines()

    def close_engines(self, role: str | None = None) -> None:
        """Close the kept engine of `role` ("reference", "scheme"), or all."""
        for name in [role] if role else list(self._kept):
            kept = self._kept.pop(name, None)
            if kept is not None:
                kept.stack.close()

    @contextlib.contextmanager
    def speed_session(self, scheme: SchemeSpec, service) -> Iterator[Callable[..., dict]]:
        """Everything a speed measurement of the scheme needs, ready before it starts: its engine and the BF16
        reference's (`engine`: kept, or loaded now), with the host-wide SPEED_LOCK held throughout (one measurement
        at a time per host: work beside the rounds moves the ratios, reports/bounds/README.md). Raises
        VllmUnsupportedHere (this hardware) or RuntimeError (no load) on entry; yields `measure(rounds, batches=True)`
        (`batches`: time the large-batch and image workloads too, `_measure`)."""
        with self.speed_engine(scheme, service, hold=True) as engine:
            if vllm_service.is_unsupported_here(engine.error):
                raise VllmUnsupportedHere(f"{scheme.name}: {vllm_service.error_text(engine.error)}")
            if engine.error:
                raise RuntimeError(f"{scheme.name}: the speed engine did not load: "
                                   f"{vllm_service.error_text(engine.error)}")  # fmt: skip
            reference = self.exports.path(self.context.reference_scheme())
            baseline = self.engine(service, reference, engine.patch)  # loaded as the scheme's is
            if baseline.error:
                raise RuntimeError("the BF16 export does not load in vLLM for the speed runs: "
                                   f"{vllm_service.error_text(baseline.error)}")  # fmt: skip
            yield lambda rounds, batches=True: self._measure(scheme, engine, engine.options, baseline, rounds, batches)

    def _measure(self, scheme: SchemeSpec, engine, options: dict, baseline, rounds: int, batches: bool) -> dict:
        """Paired with the BF16 export's engine `baseline` (already open): per workload the median per-round
        ratio, the weight-bytes bound (BF16 checkpoint bytes / the scheme's) and the share of the bound's gain
        realized, (ratio - 1) / (bound - 1); without `batches` batch 1 alone (vllm.speed.timed_workloads), the
        others named under `untimed_workloads`. Never cached; merged into the scheme's reports/vllm JSON."""
        reference_bytes = self.exports.tensor_bytes(self.context.reference_scheme())
        scheme_bytes = self.exports.tensor_bytes(scheme)
        captions = [caption.text for caption in self.context.splits.evaluation]
        result: dict = {"device": self.context.device_name, "options": options, "rounds": rounds, "workloads": {},
                        "checkpoint_bytes": scheme_bytes, "bf16_checkpoint_bytes": reference_bytes,
                        "weight_bytes_bound": reference_bytes / scheme_bytes}  # fmt: skip
        cuda = self.context.device.type == "cuda"
        workloads, untimed = vllm_speed.timed_workloads(self.context.tokenizer, captions, self.image_inputs, cuda,
                                                        batches)  # fmt: skip
        result["untimed_workloads"] = untimed
        for workload in workloads:
            paired = vllm_speed.paired_speed(baseline, engine, workload, rounds)
            if paired.get("error"):
                raise TransientVllmFailure(f"{scheme.name} {workload.name}: "
                                           f"{vllm_service.error_text(paired['error'])}")  # fmt: skip
            bound = result["weight_bytes_bound"]
            decode = not workload.images  # prefill (image prompts) is compute-bound: no weight-bytes bound
            paired["bound_share"] = (paired["ratio"] - 1) / (bound - 1) if decode and abs(bound - 1) > 1e-3 else None
            result["workloads"][workload.name] = paired
        self.context.publish_part("vllm", scheme.name, "speed", result)
        return result

    def publish_control(self, name: str, record: dict) -> None:
        """A negative control's figures (a garbage load, a verdict fed the wrong reference) under
        reports/vllm/<model>/controls/<name>.json, which the report reads."""
        self.context.publish("vllm", f"controls/{name}", record)


class KeptEngine(NamedTuple):
    """An engine `VllmChecks` keeps open: the server it runs in (`_server`), what it loaded (export, settings,
    patch), the stack that closes it, and the engine."""

    server: tuple | None
    wanted: tuple[str, str, bool]
    stack: contextlib.ExitStack
    engine: object


def _server(service) -> tuple | None:
    """Which server of which service runs now (None: none does; the next request starts one, without engines)."""
    running = service.process is not None and service.process.poll() is None
    return (id(service), service.starts) if running else None


def _decision_record(decision, floor: dict) -> dict:
    """What reports/vllm keeps of a decision (text or image prompts): its verdict, ratio, bound and the floor."""
    return {"compatible": decision.compatible, "error_ratio": decision.error_ratio,
            "error_ratio_se": decision.error_ratio_se, "bound": decision.bound, "text": decision.text,
            "floor": floor}  # fmt: skip
