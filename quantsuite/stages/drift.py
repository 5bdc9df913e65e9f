"""Drift stage: what quantization did, in plain PyTorch, on the evaluation split: (a) the fake-quantized model
and (b) the reloaded export against BF16, and (a) against (b); the same over image prompts where the data has
images (`image_prompts`, measured at the captions' positions), with the fake-quant model's clipping of the
activations it reads at image positions.

    >>> drift = Drift(context, schemes, exports)
    >>> drift.measure(context.catalog.scheme("top50"))["fake_quant"]["kl_mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from quantsuite import divergence
from quantsuite.cache import code_hash
from quantsuite.catalog import SchemeSpec
from quantsuite.checkpoint import export_fidelity, load_export, spread_device_map
from quantsuite.divergence import Capture, ClippingProbe, capture, compare
from quantsuite.stages.context import RunContext, free_memory
from quantsuite.stages.export import Exports
from quantsuite.stages.scheme import Schemes
from quantsuite.timing import STAGE_TIMES


class Drift:
    """Measurements under `drift/<key>` (key: the export's key + evaluation data + code), published as
    reports/drift/<model>/<scheme>.json. The BF16 capture is computed once per process."""

    def __init__(self, context: RunContext, schemes: Schemes, exports: Exports) -> None:
        self.context = context
        self.schemes = schemes
        self.exports = exports
        self._reference: Capture | None = None
        self._image_reference: Capture | None = None
        self._measurements: dict[str, dict] = {}

    def reference(self) -> Capture:
        """BF16 logits and block outputs on the evaluation split."""
        if self._reference is None:
            self._reference = self._bf16_capture(self.context.batches("evaluation"))
        return self._reference

    def image_reference(self) -> Capture:
        """BF16 logits and block outputs on the image prompts of the evaluation split."""
        if self._image_reference is None:
            self._image_reference = self._bf16_capture(self.context.batches("evaluation", images=True))
        return self._image_reference

    def _bf16_capture(self, batches: list[dict]) -> Capture:
        model = self.context.load().model
        with STAGE_TIMES.measure("drift: forward passes, BF16 reference"):
            result = capture(model, batches, self.context.device)
        del model
        free_memory()
        return result

    def require_runnable(self, scheme: SchemeSpec) -> None:
        """Raise CudaRequired, naming what and the fix, when the fake-quant model cannot run on this device."""
        self.context.require_cuda(self.context.catalog.cuda_only(scheme), f"{scheme.name} (drift)")

    def measure_export(self, scheme: SchemeSpec, quantized, export_dir: Path) -> dict:
        """(a) the fake-quant model `quantized`, (b) the export in `export_dir` reloaded, each against BF16, and (a)
        against (b), with the export's fidelity to (a); nothing cached (the planted-fault tests feed it faults)."""
        context = self.context
        batches, device = context.batches("evaluation"), context.device
        images = context.batches("evaluation", images=True)
        with STAGE_TIMES.measure("drift: forward passes, fake quant"):
            fake = capture(quantized, batches, device)  # (a): measured before anything touches the export
        fake_images, clipping = None, []
        if images:  # one pass gives the image prompts' logits and the clipping at their image positions
            with STAGE_TIMES.measure("drift: forward passes, fake quant, image prompts + clipping"):
                with ClippingProbe(quantized, context.tokenizer.convert_tokens_to_ids("<|image_pad|>")) as probe:
                    fake_images = capture(quantized, images, device, before_batch=probe.observe)
                clipping = probe.rows()
        with STAGE_TIMES.measure("drift: export fidelity"):
            fidelity = export_fidelity(quantized, export_dir)
        # a model spread over several GPUs (device_map="auto") is reloaded spread the same way
        reloaded = load_export(export_dir, device, device_map=spread_device_map(quantized))
        with STAGE_TIMES.measure("drift: forward passes, export"):
            exported = capture(reloaded, batches, device)  # (b)
            exported_images = capture(reloaded, images, device) if images else None
        del reloaded
        free_memory()
        with STAGE_TIMES.measure("drift: compare (KL, top-1, per block)"):
            image_prompts: dict = {"source": context.image_source}
            if fake_images is not None:
                reference = self.image_reference()
                image_prompts |= {"fake_quant": compare(reference, fake_images, device),
                                  "export": compare(reference, exported_images, device),
                                  "fake_vs_export": compare(fake_images, exported_images, device),
                                  "clipping": clipping}  # fmt: skip
            return {
                "scheme": scheme.name, "model": context.model_tag, "export_dir": str(export_dir),
                "fake_quant": compare(self.reference(), fake, device),
                "export": compare(self.reference(), exported, device),
                "fake_vs_export": compare(fake, exported, device), "export_fidelity": fidelity,
                "image_prompts": image_prompts,
            }  # fmt: skip

    def measure(self, scheme: SchemeSpec, keep_export: bool = True) -> dict:
        """The scheme's drift (cached). Where it is built, so is the export if it was not there; `keep_export=False`
        deletes an export built for this measurement alone once it is measured: what a reader of the whole catalog
        (the research studies, nested-scheme checks) asks for under --drop-exports, since on a cache that lacks a
        scheme's drift (another shard's scheme, a fresh runner) it builds one 4-6 GiB export per scheme at 3B."""
        if scheme.name in self._measurements:
            return self._measurements[scheme.name]
        context = self.context
        images = context.image_splits.fingerprint if context.image_splits else None
        key = context.cache.key({"export": self.exports.export_key(scheme), "evaluation": context.splits.fingerprint,
                                 "images": images, "stage": "drift",
                                 "code": code_hash(divergence, sys.modules[__name__])})  # fmt: skip

        def build(directory: Path) -> None:
            self.require_runnable(scheme)
            built_here = not self.exports.is_built(scheme)
            export_dir = self.exports.path(scheme)  # only when the drift is not cached (an export is GBs at 3B)
            measurement = self.measure_export(scheme, self.schemes.model(scheme), export_dir)
            (directory / "drift.json").write_text(json.dumps(measurement, indent=1))
            if built_here and not keep_export:
                self.exports.drop(scheme)

        path, _ = context.cache.get_or_build("drift", key, build, scheme.name)
        measurement = json.loads((path / "drift.json").read_text())
        context.publish("drift", scheme.name, measurement)
        self._measurements[scheme.name] = measurement
        return measurement
