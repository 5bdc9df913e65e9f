"""What quantization did to the model, in plain PyTorch: logit drift and where error enters.

`capture(model, batches)` runs the held-out evaluation batches once and keeps, for every non-padding token,
the logits, and for every decoder block (and the final norm) the output hidden states. `compare(reference,
candidate)` then gives
- KL(ref || quant) per token: mean and p99 (nats); top-1 agreement; perplexity of both and its delta;
- the within-run spread of mean KL and top-1 agreement: their bootstrap standard errors over evaluation captions
  (`kl_mean_se`, `top1_agreement_se`; scipy.stats.bootstrap, captions resampled whole), and the KL summed per
  caption (`kl_by_caption`) for intervals and paired comparisons across schemes (`quantsuite.analysis`);
- logit SQNR in dB (10 log10 of signal power over error power; None when the two are identical);
- per block and for the final norm: SQNR (dB) and relative error ||h_q - h_ref|| / ||h_ref||, so error can
  be followed from the block where it enters to the logits.
`ClippingProbe` records, during the same forward passes, how much of each quantized layer's input lies beyond its
calibrated amax at image and at text positions.

    >>> reference = capture(bf16_model, batches, device)            # doctest: +SKIP
    >>> compare(reference, capture(fp8_model, batches, device))["kl_mean"]   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from quantsuite.data import IGNORE_INDEX, model_inputs
from quantsuite.models import language_model


@dataclass
class Capture:
    """Per-token logits and per-block hidden states of one model on the evaluation batches, in the model's own
    dtype (upcasting is exact, so they are kept as computed and upcast where they are compared) and on the device
    the model ran on (a GPU compares there: moving a 3B capture, GBs of logits, to the CPU cost more than the
    forward passes)."""

    logits: torch.Tensor  # (tokens, vocab) at non-padding positions
    next_tokens: torch.Tensor  # (tokens,) label of the next position, IGNORE_INDEX where there is none
    sequences: torch.Tensor  # (tokens,) index of the evaluation caption each token belongs to
    hidden: dict[str, torch.Tensor]  # "block.N" / "final_norm" -> (tokens, hidden)


class BatchMasks:
    """A batch's boolean masks (on the host) as per-layer hooks read them: each copied to a device once per batch.
    A copy from host memory in every layer's hook waited for the GPU each time, and a model spread over several
    GPUs asks for each of its devices."""

    def __init__(self, **masks: torch.Tensor) -> None:
        self.masks = masks
        self._copies: dict[tuple[str, torch.device], torch.Tensor] = {}

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._copies:
            self._copies[key] = self.masks[name].to(device)
        return self._copies[key]


@torch.no_grad()
def capture(model: torch.nn.Module, batches: list[dict], device: torch.device,
            before_batch: Callable[[dict], None] | None = None) -> Capture:  # fmt: skip
    """Logits and hidden states at each batch's `measure_mask` positions (image prompts: the caption's) or, without
    one, at every non-padding position, kept on `device` (the inputs' device). `before_batch(batch)` runs before
    each forward pass (a ClippingProbe's `observe`: its hooks record the same pass)."""
    decoder = language_model(model)
    stores: dict[str, list[torch.Tensor]] = {}
    rows_before = 0  # the batches' rows so far: captions are numbered across batches

    def hook(name: str):
        def record(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            stores.setdefault(name, []).append(tensor[current.on("measured", tensor.device)].to(device))

        return record

    handles = [layer.register_forward_hook(hook(f"block.{i}")) for i, layer in enumerate(decoder.layers)]
    handles.append(decoder.norm.register_forward_hook(hook("final_norm")))
    logits, next_tokens, sequences = [], [], []
    try:
        for batch in batches:
            mask = batch.get("measure_mask", batch["attention_mask"]).bool()
            current = BatchMasks(measured=mask)
            if before_batch is not None:
                before_batch(batch)
            output = model(**model_inputs(batch, device))
            logits.append(output.logits[current.on("measured", output.logits.device)].to(device))
            shifted = torch.full_like(batch["labels"], IGNORE_INDEX)
            shifted[:, :-1] = batch["labels"][:, 1:]
            next_tokens.append(shifted[mask])
            sequences.append(torch.arange(rows_before, rows_before + mask.shape[0]).unsqueeze(1).expand_as(mask)[mask])
            rows_before += mask.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    hidden = {k: torch.cat(v) for k, v in stores.items()}
    return Capture(torch.cat(logits), torch.cat(next_tokens), torch.cat(sequences), hidden)


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float | None:
    noise = float((reference.float() - candidate.float()).double().pow(2).sum())
    if noise == 0.0:
        return None
    return 10.0 * math.log10(float(reference.double().pow(2).sum()) / noise)


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((reference.float() - candidate.float()).double().norm() / reference.double().norm().clamp_min(1e-30))


def perplexity(capture_: Capture) -> float:
    valid = (capture_.next_tokens != IGNORE_INDEX).to(capture_.logits.device)
    losses = torch.nn.functional.cross_entropy(capture_.logits[valid].float(),
                                               capture_.next_tokens.to(valid.device)[valid])  # fmt: skip
    return math.exp(float(losses))


def _token_kl_and_top1(reference: torch.Tensor, candidate: torch.Tensor, device: torch.device, chunk: int = 256):
    """Per-token KL(ref || cand) in float64 and top-1 matches, chunked over tokens on `device`."""
    kl, top1 = [], []
    for start in range(0, reference.shape[0], chunk):
        p = reference[start : start + chunk].to(device, torch.float64)
        q = candidate[start : start + chunk].to(device, torch.float64)
        log_p, log_q = torch.log_softmax(p, dim=-1), torch.log_softmax(q, dim=-1)
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0).cpu())
        top1.append((p.argmax(-1) == q.argmax(-1)).cpu())  # per token: small, and what the statistics below read
    return torch.cat(kl), torch.cat(top1)


def per_caption(per_token: torch.Tensor, sequences: torch.Tensor) -> dict[str, list]:
    """`per_token` summed per evaluation caption, with each caption's token count (captions in order): what
    `quantsuite.analysis` resamples for intervals and paired differences between schemes."""
    counts = torch.bincount(sequences)
    sums = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, sequences, per_token.double())
    present = counts > 0
    return {"sums": sums[present].tolist(), "tokens": counts[present].tolist()}


def bootstrap_standard_error(per_token: torch.Tensor, sequences: torch.Tensor, resamples: int = 2000) -> float:
    """Standard error of the mean of `per_token` over tokens when whole captions are resampled (a caption's tokens
    are not independent): `pooled_standard_error` with the captions as the groups."""
    by_caption = per_caption(per_token, sequences)
    return pooled_standard_error(by_caption["sums"], by_caption["tokens"], resamples)


def pooled_standard_error(sums: list[float], counts: list[float], resamples: int = 2000) -> float:
    """Standard error of sum(sums) / sum(counts) when whole groups are resampled (a group's members are not
    independent: a caption's tokens, a layer's weights): scipy's bootstrap over the groups, paired, fixed seed; 0
    below two groups."""
    from scipy.stats import bootstrap

    sums, counts = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    if sums.size < 2:
        return 0.0
    result = bootstrap((sums, counts), lambda s, n, axis=-1: s.sum(axis) / n.sum(axis), paired=True,
                       vectorized=True, n_resamples=resamples, method="percentile", rng=0)  # fmt: skip
    return float(result.standard_error)


def compare(reference: Capture, candidate: Capture, device: torch.device | str = "cpu") -> dict:
    """Drift metrics of `candidate` against `reference` (see module docstring); plain JSON-able floats."""
    kl, top1 = _token_kl_and_top1(reference.logits, candidate.logits, torch.device(device))
    reference_ppl, candidate_ppl = perplexity(reference), perplexity(candidate)
    layers = []
    for name, hidden in reference.hidden.items():
        other = candidate.hidden[name]
        layers.append(
            {"layer": name, "sqnr_db": sqnr_db(hidden, other), "relative_error": relative_error(hidden, other)}
        )
    return {
        "tokens": int(kl.numel()),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl.float(), 0.99)),
        "top1_agreement": float(top1.float().mean()),
        "kl_mean_se": bootstrap_standard_error(kl, reference.sequences),
        "kl_by_caption": per_caption(kl, reference.sequences),
        "top1_agreement_se": bootstrap_standard_error(top1.double(), reference.sequences),
        "perplexity_reference": reference_ppl,
        "perplexity": candidate_ppl,
        "perplexity_delta": candidate_ppl - reference_ppl,
        "logit_sqnr_db": sqnr_db(reference.logits, candidate.logits),
        "max_abs_logit_difference": float((reference.logits.float() - candidate.logits.float()).abs().max()),
        "layers": layers,
    }


def first_degraded_layer(drift: dict, threshold_db: float) -> str | None:
    """Where error 'enters': the first block (or final norm) whose SQNR falls below `threshold_db`."""
    for layer in drift["layers"]:
        if layer["sqnr_db"] is not None and layer["sqnr_db"] < threshold_db:
            return layer["layer"]
    return None


class ClippingProbe:
    """Per LM layer with a static per-tensor input amax (FP8, INT8, W4A8, NVFP4's global one): the largest |input|
    at image positions and at text positions (after any AWQ / SmoothQuant factor), against the calibrated amax, and
    the share of values beyond it at each (which the quantizer clips). Only batches of image prompts count.

    Its hooks record whatever forward passes run while it is entered; `observe(batch)` before each one names the
    batch's image and text positions, so the pass that captures the image prompts' logits measures the clipping too:

    >>> with ClippingProbe(model, image_token_id) as probe:                      # doctest: +SKIP
    ...     images = capture(model, batches, device, before_batch=probe.observe)
    >>> probe.rows()                                                              # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, image_token_id: int) -> None:
        self.model, self.image_token_id = model, image_token_id
        self.stats: dict[str, dict] = {}
        self._positions = BatchMasks()  # this batch's image and text positions, (batch, sequence)
        self._handles: list = []

    def observe(self, batch: dict) -> None:
        ids = batch["input_ids"]
        self._positions = BatchMasks(image=ids == self.image_token_id,
                                     text=batch["attention_mask"].bool() & (ids != self.image_token_id))  # fmt: skip

    def _hook(self, name: str, quantizer):
        @torch.no_grad()
        def record(_module, inputs):
            x = inputs[0].detach().float()
            factor = getattr(quantizer, "_pre_quant_scale", None)
            x = (x * factor.float() if factor is not None else x).abs()
            entry = self.stats.get(name)
            if entry is None:  # running figures kept as tensors on the layer's device: no sync per layer and batch
                entry = self.stats[name] = {"layer": name, "amax": quantizer.amax.detach().float().reshape(())}
                for where in ("image", "text"):
                    entry[f"{where}_max"] = torch.zeros((), device=x.device)
                    entry[f"{where}_clipped"] = torch.zeros((), dtype=torch.int64, device=x.device)
                    entry[f"{where}_values"] = torch.zeros((), dtype=torch.int64, device=x.device)
            for where in ("image", "text"):
                mask = self._positions.on(where, x.device).unsqueeze(-1)  # against (batch, sequence, features)
                entry[f"{where}_max"] = torch.maximum(entry[f"{where}_max"], torch.where(mask, x, 0.0).amax())
                entry[f"{where}_clipped"] += ((x > entry["amax"]) & mask).sum()
                entry[f"{where}_values"] += mask.sum() * x.shape[-1]

        return record

    def __enter__(self) -> ClippingProbe:
        for name, module in language_model(self.model).named_modules():
            quantizer = getattr(module, "input_quantizer", None)
            amax = getattr(quantizer, "amax", None) if quantizer is not None and quantizer.is_enabled else None
            if amax is not None and amax.numel() == 1 and isinstance(module, torch.nn.Linear):
                self._handles.append(module.register_forward_pre_hook(self._hook(name, quantizer)))
        return self

    def __exit__(self, *_) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def rows(self) -> list[dict]:
        rows = []
        for entry in self.stats.values():
            figures = {key: value.item() for key, value in entry.items() if key != "layer"}
            rows.append({"layer": entry["layer"], "amax": figures["amax"], "image_max": figures["image_max"],
                         "text_max": figures["text_max"],
                         "image_clipped_share": figures["image_clipped"] / max(figures["image_values"], 1),
                         "text_clipped_share": figures["text_clipped"] / max(figures["text_values"], 1)})
        return rows


@torch.no_grad()
def activation_clipping(model: torch.nn.Module, batches: list[dict], device: torch.device,
                        image_token_id: int) -> list[dict]:  # fmt: skip
    """ClippingProbe's rows for a pass of its own over `batches`."""
    with ClippingProbe(model, image_token_id) as probe:
        for batch in batches:
            probe.observe(batch)
            model(**model_inputs(batch, device))
    return probe.rows()
