"""What each ModelOpt export format stores for a quantized linear layer, and what that layer computes.

One `ExportFormat` per ModelOpt `quant_algo` the suite carries end to end. Each says which tensors a layer of
shape (out, in) holds in the Hugging Face export (name suffix -> safetensors dtype and shape), how many bits per
weight that storage costs (codes, block scales and per-tensor scales), and how to compute with it in plain
PyTorch: `dequantize` the weight from its codes and scales, `quantize_input` the activation as the format
prescribes. These decoders are written from the formats' definitions (OCP MX, NVFP4, AWQ / SmoothQuant), not
from ModelOpt's code, so comparing them with ModelOpt's fake quantization checks ModelOpt's export:

- FP8: e4m3 codes x one fp32 weight_scale; input fake-quantized to e4m3 with the static input_scale.
- FP8_PER_CHANNEL_PER_TOKEN: one weight_scale per output row; each token's input scaled by its own amax / 448.
- W4A16_AWQ (INT4_AWQ_CFG): signed int4 codes, two output rows per byte (row 2r low nibble, 2r+1 high), one fp32
  scale per (row, 128 inputs); the input is multiplied by the AWQ pre_quant_scale, not quantized.
- W4A8_AWQ: W4A16_AWQ's codes and scales, the dequantized weight then rounded to e4m3 in units of the fp32
  weight_scale_2 (the kernel runs the GEMM in FP8); input x pre_quant_scale then static e4m3 with input_scale.
- W8A8_SQ_PER_CHANNEL (INT8_SMOOTHQUANT_CFG): int8 codes x per-row scale; input x pre_quant_scale then static
  int8 (round, clamp to [-128, 127]) with input_scale.
- NVFP4: e2m1 codes, two inputs per byte (element 2j low nibble), an e4m3 scale per 16 inputs times the fp32
  weight_scale_2; the input is quantized the same way per 16 values at run time, its global scale input_scale.
- W4A16_NVFP4: NVFP4's weight, BF16 input.
- MXFP8: e4m3 codes with one power-of-two (E8M0, biased by 127) scale per 32 inputs; inputs the same at run time.

    >>> FORMATS["NVFP4"].storage_bits(128, 256)   # 4-bit codes + an 8-bit scale per 16 + one fp32 per tensor
    4.500976...
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1 magnitudes by 3-bit code
OPTIONAL_TENSORS = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")  # present in some formats
DTYPE_BYTES = {"F8_E4M3": 1, "U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4}


@functools.cache
def fp4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grid, midpoints, ties_up) of e2m1 on `device`, made once per device: an NVFP4 layer's input is rounded in
    every forward, and copying these from host memory there each time stalled the GPU (a blocking copy waits for
    every kernel queued before it) several times per layer."""
    grid = torch.tensor(FP4_GRID)
    midpoints = (grid[1:] + grid[:-1]) / 2
    # round half to even: a midpoint goes up when the upper neighbour's code is even (0.75 -> 1, 1.75 -> 2, 3.5 -> 4)
    ties_up = torch.tensor([code % 2 == 0 for code in range(1, 8)])
    return grid.to(device), midpoints.to(device), ties_up.to(device)


def round_to_fp4(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value (ties to even code), saturating at +-6."""
    grid, midpoints, ties_up = fp4_tables(x.device)
    magnitude = x.abs().clamp(max=FP4_MAX).float()
    index = torch.bucketize(magnitude, midpoints)  # midpoint itself -> lower code
    below = index.clamp(max=6)
    tie = (index < 7) & (magnitude == midpoints[below])
    index = index + (tie & ties_up[below]).long()
    return grid[index] * torch.sign(x.float())


def fp4_values(packed: torch.Tensor) -> torch.Tensor:
    """e2m1 values of a uint8 tensor holding two codes per byte along the last dimension (low nibble first)."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).long()
    magnitude = fp4_tables(packed.device)[0][codes & 0x7]
    return torch.where(codes >= 8, -magnitude, magnitude)


def int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes of a uint8 tensor packing two output rows per byte (row 2r low nibble, 2r+1 high)."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=1).flatten(0, 1).to(torch.int16)  # (out, in)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).float()


def blockwise(scale: torch.Tensor, block: int) -> torch.Tensor:
    """A (rows, in / block) scale expanded to (rows, in)."""
    return scale.float().repeat_interleave(block, dim=-1)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes of x / scale (computed in float32, saturated at +-448)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return to_fp8(x, scale).float() * scale


def per_token_scale(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 activation scale, as vLLM computes it: amax(|x|) / 448 per token, floored at
    1 / (448 * 512)."""
    return (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1 / (FP8_MAX * 512))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the block size {block}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def powers_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """float32 2^k for integer-valued k in [-127, 127] (E8M0's range), built from the bits: exact on every device,
    where exp2 is only as exact as the device's math library."""
    k = exponent.to(torch.int32)
    bits = torch.where(k > -127, (k + 127) << 23, torch.full_like(k, 1 << 22))  # 2^-127 is a float32 subnormal
    return bits.view(torch.float32)


def fake_mxfp8(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """MXFP8 at run time: per block of 32, scale 2^ceil(log2(amax / 448)) (E8M0, exponent in [-127, 127])."""
    blocks = _blocks(x, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / FP8_MAX)), torch.full_like(amax, -127.0))
    scale = powers_of_two(exponent.clamp(-127, 127))
    return ((blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale).reshape(x.shape)


def fake_nvfp4(x: torch.Tensor, global_scale: torch.Tensor, block: int = 16) -> torch.Tensor:
    """NVFP4 at run time: per block of 16, an e4m3 scale of amax / 6 in units of `global_scale`, e2m1 values."""
    blocks = _blocks(x, block)
    global_scale = global_scale.float()
    block_scale = (blocks.abs().amax(dim=-1, keepdim=True) / FP4_MAX / global_scale).clamp(max=FP8_MAX).to(FP8)
    scale = block_scale.float() * global_scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (round_to_fp4(blocks / safe) * scale).reshape(x.shape)


def fake_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).round().clamp(-128, 127) * scale


@dataclass(frozen=True)
class ExportFormat:
    """One ModelOpt quant_algo: the tensors of a quantized linear in the export and what they compute.

    >>> sorted(FORMATS["W4A16_AWQ"].tensors(64, 256))
    ['pre_quant_scale', 'weight', 'weight_scale']
    """

    quant_algo: str
    weight: str  # fp8 | int8 | int4_rows (two output rows per byte) | fp4 (two inputs per byte)
    weight_scale: str  # tensor | channel | block
    scale_dtype: str  # safetensors dtype of weight_scale: F32, F8_E4M3, U8 (E8M0)
    activation: str  # none | fp8 | fp8_per_token | int8 | nvfp4 | mxfp8
    block_size: int | None = None  # inputs per weight scale (block formats)
    weight_scale_2: str | None = None  # a second, per-tensor fp32 weight scale: "multiply" (NVFP4: block scales
    # are in its units) or "fp8_grid" (W4A8: the dequantized weight is rounded to e4m3 in its units)
    pre_quant_scale: bool = False  # AWQ / SmoothQuant: input x a per-input BF16 vector (or folded into the norm)
    fused_scales: bool = True  # layers that read one input (q/k/v, gate/up) share their scales in the export:
    # one mean AWQ / SmoothQuant factor, one (the largest) per-tensor weight amax; per-tensor FP8 keeps its own

    @property
    def input_scale(self) -> bool:
        """A static per-tensor fp32 input_scale is stored (NVFP4: the global scale of its run-time blocks)."""
        return self.activation in ("fp8", "int8", "nvfp4")

    def tensors(self, out_features: int, in_features: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Export tensors of one layer: name suffix -> (safetensors dtype, shape)."""
        weight = {"fp8": ("F8_E4M3", (out_features, in_features)), "int8": ("I8", (out_features, in_features)),
                  "int4_rows": ("U8", (out_features // 2, in_features)),
                  "fp4": ("U8", (out_features, in_features // 2))}[self.weight]  # fmt: skip
        scale_shape = {"tensor": (), "channel": (out_features,),
                       "block": (out_features, in_features // (self.block_size or 1))}[self.weight_scale]  # fmt: skip
        tensors = {"weight": weight, "weight_scale": (self.scale_dtype, scale_shape)}
        if self.weight_scale_2:
            tensors["weight_scale_2"] = ("F32", ())
        if self.input_scale:
            tensors["input_scale"] = ("F32", ())
        if self.pre_quant_scale:
            tensors["pre_quant_scale"] = ("BF16", (in_features,))
        return tensors

    def tensor_name_problems(self, present: set[str]) -> tuple[list[str], list[str]]:
        """(missing, unexpected) tensor suffixes of one layer whose stored suffixes are `present`. A missing
        pre_quant_scale is fine: ModelOpt folds it into the preceding norm for q/k/v and gate/up."""
        expected = self.tensors(1, 1)
        missing = [suffix for suffix in expected if suffix not in present and suffix != "pre_quant_scale"]
        return missing, [suffix for suffix in OPTIONAL_TENSORS if suffix not in expected and suffix in present]

    def storage_bits(self, out_features: int, in_features: int) -> float:
        """Bits per weight the export spends on the weight: codes, block / channel scales and per-tensor scales."""
        weight_side = ("weight", "weight_scale", "weight_scale_2")
        total = sum(
            8 * DTYPE_BYTES[dtype] * math.prod(shape)
            for name, (dtype, shape) in self.tensors(out_features, in_features).items()
            if name in weight_side
        )
        return total / (out_features * in_features)  # fmt: skip

    def tensor_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of every tensor of the layer in the export (bias and the like excluded)."""
        return sum(DTYPE_BYTES[dtype] * math.prod(shape)
                   for dtype, shape in self.tensors(out_features, in_features).values())  # fmt: skip

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight (out, in) the stored codes and scales mean."""
        weight, scale = tensors["weight"], tensors["weight_scale"]
        if self.weight == "fp8" or self.weight == "int8":
            codes = weight.float()
        elif self.weight == "int4_rows":
            codes = int4_rows(weight)
        else:
            codes = fp4_values(weight)
        if self.scale_dtype == "U8":  # E8M0: a power of two, exponent biased by 127
            scale = powers_of_two(scale.float() - 127)
        scale = scale.float()
        if self.weight_scale == "block":
            scale = blockwise(scale, self.block_size or 1)
        elif self.weight_scale == "channel":
            scale = scale.reshape(-1, 1)
        if self.weight_scale_2 == "multiply":
            scale = scale * tensors["weight_scale_2"].float()
        weight = codes * scale
        if self.weight_scale_2 == "fp8_grid":
            weight = fake_fp8(weight, tensors["weight_scale_2"].float())
        return weight

    def quantize_input(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The activation as the layer consumes it (same dtype as x)."""
        if "pre_quant_scale" in tensors:  # absent: ModelOpt folded it into the preceding norm's weight
            x = x * tensors["pre_quant_scale"].to(x.dtype)
        if self.activation == "none":
            return x
        if self.activation == "fp8":
            quantized = fake_fp8(x, tensors["input_scale"].float())
        elif self.activation == "fp8_per_token":
            quantized = fake_fp8(x, per_token_scale(x))
        elif self.activation == "int8":
            quantized = fake_int8(x, tensors["input_scale"].float())
        elif self.activation == "nvfp4":
            quantized = fake_nvfp4(x, tensors["input_scale"], self.block_size or 16)
        else:
            quantized = fake_mxfp8(x, self.block_size or 32)
        return quantized.to(x.dtype)


FORMATS = {
    spec.quant_algo: spec
    for spec in (
        ExportFormat("FP8", "fp8", "tensor", "F32", "fp8", fused_scales=False),
        ExportFormat("FP8_PER_CHANNEL_PER_TOKEN", "fp8", "channel", "F32", "fp8_per_token"),
        ExportFormat("W4A16_AWQ", "int4_rows", "block", "F32", "none", 128, pre_quant_scale=True),
        ExportFormat("W4A8_AWQ", "int4_rows", "block", "F32", "fp8", 128, "fp8_grid", pre_quant_scale=True),
        ExportFormat("W8A8_SQ_PER_CHANNEL", "int8", "channel", "F32", "int8", pre_quant_scale=True),
        ExportFormat("NVFP4", "fp4", "block", "F8_E4M3", "nvfp4", 16, "multiply"),
        ExportFormat("W4A16_NVFP4", "fp4", "block", "F8_E4M3", "none", 16, "multiply"),
        ExportFormat("MXFP8", "fp8", "block", "U8", "mxfp8", 32),
    )
}


class QuantLinear(torch.nn.Module):
    """A linear layer of an export computed as its format means: y = quantize_input(x) @ dequantize(W)^T + bias.

    The dequantized weight is computed once (float32, then the compute dtype); the raw tensors that the input
    path needs (input_scale, pre_quant_scale) stay as buffers.
    """

    def __init__(self, spec: ExportFormat, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:  # fmt: skip
        super().__init__()
        self.spec = spec
        weight = spec.dequantize(tensors)
        self.register_buffer("weight", weight.to(dtype))
        self.input_tensors = {name: tensors[name] for name in ("input_scale", "pre_quant_scale") if name in tensors}
        for name, tensor in self.input_tensors.items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(dtype), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = {name: getattr(self, name) for name in self.input_tensors}
        return torch.nn.functional.linear(self.spec.quantize_input(x, inputs), self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.spec.quant_algo}, in_features={self.in_features}, out_features={self.out_features}"
