"""The export-format decoders (quantsuite/formats.py) on hand-made codes: packing order, rounding, scales, bits.

Whether they decode ModelOpt's real exports is checked per scheme by the drift tests (export_fidelity and the
reloaded export's logits against the fake-quant model) and, for every format, by test_layer_problems below.
"""

from __future__ import annotations

import re

import pytest
import torch

from quantsuite.checkpoint import _layer_problems
from quantsuite.formats import (
    FORMATS,
    QuantLinear,
    fake_mxfp8,
    fake_nvfp4,
    fp4_values,
    int4_rows,
    powers_of_two,
    round_to_fp4,
)


def test_fp4_codes_low_nibble_first():
    # byte 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) element 1; 0xF8: -0.0 then -6
    values = fp4_values(torch.tensor([[0x21, 0xF8]], dtype=torch.uint8))
    assert values.tolist() == [[0.5, 1.0, -0.0, -6.0]]


def test_fp4_rounding_is_nearest_ties_to_even_and_saturates():
    x = torch.tensor([0.2, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -2.6])
    assert round_to_fp4(x).tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -3.0]


def test_nvfp4_input_rounding_makes_no_tensor_from_host_data_per_call(monkeypatch):
    """An NVFP4 layer rounds its input in every forward; the e2m1 tables it rounds with are made once per device
    (`fp4_tables`). Made per call, each was a copy from host memory, which on a GPU waits for every queued kernel,
    several times per layer. Planted: the tables built inside `round_to_fp4` again fail it (three tensors per call)."""
    x, global_scale = torch.randn(2, 32), torch.tensor(0.01)
    expected = fake_nvfp4(x, global_scale)  # the first call on this device makes the tables
    made = []
    make = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: made.append(args) or make(*args, **kwargs))
    assert torch.equal(fake_nvfp4(x, global_scale), expected)
    assert made == [], f"tensors made from host data in a call: {made}"


def test_int4_two_output_rows_per_byte():
    codes = torch.tensor([[-8, 7, 0], [1, -1, 3]], dtype=torch.int16)  # (out=2, in=3)
    packed = ((codes[0] & 0xF) | ((codes[1] & 0xF) << 4)).to(torch.uint8)[None]  # row 0 low, row 1 high
    assert int4_rows(packed).tolist() == codes.float().tolist()


def test_mxfp8_scale_is_a_power_of_two_per_block():
    weight = {"weight": torch.full((1, 32), 2.0).to(torch.float8_e4m3fn), "weight_scale": torch.tensor([[130]],
              dtype=torch.uint8)}  # fmt: skip
    assert FORMATS["MXFP8"].dequantize(weight).unique().tolist() == [16.0]  # 2 x 2^(130 - 127)
    block = torch.linspace(-3, 3, 32) * 1000
    fake = fake_mxfp8(block[None])
    scale = 2.0 ** torch.ceil(torch.log2(block.abs().max() / 448))
    assert torch.equal(fake, (block / scale).to(torch.float8_e4m3fn).float()[None] * scale)


def test_e8m0_scales_are_exact_powers_of_two():
    """MXFP8's E8M0 scales decode to 2^k exactly, subnormal 2^-127 included (built from the bits, not exp2)."""
    k = torch.arange(-127, 128, dtype=torch.float32)
    mantissa, exponent = torch.frexp(powers_of_two(k))
    assert torch.equal(mantissa, torch.full_like(k, 0.5)) and torch.equal(exponent, k.int() + 1)


def _random_layer(spec, out_features: int, in_features: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer's export tensors of `spec` with random codes and positive scales (E8M0 exponents near 2^0)."""
    tensors = {}
    for name, (dtype, shape) in spec.tensors(out_features, in_features).items():
        if dtype == "U8":
            low, high = (120, 135) if name == "weight_scale" else (0, 256)
            tensors[name] = torch.randint(low, high, shape, dtype=torch.uint8, generator=generator)
        elif dtype == "I8":
            tensors[name] = torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
        else:
            value = torch.rand(shape, generator=generator) + 0.01
            value = value * 448 * torch.sign(torch.randn(shape, generator=generator)) if name == "weight" else value
            torch_dtype = {"F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32, "BF16": torch.bfloat16}[dtype]
            tensors[name] = value.to(torch_dtype)
    return tensors


@pytest.mark.export
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compares its decoding with the CPU's")
@pytest.mark.parametrize("algorithm", sorted(FORMATS))
def test_a_gpu_dequantizes_every_format_to_the_cpus_bits(algorithm):
    """An export's reload dequantizes on the model's device (checkpoint._load_export): a GPU must read the same
    weights as the CPU did, bit for bit, in float32 and after the cast to bf16."""
    spec = FORMATS[algorithm]
    tensors = _random_layer(spec, 256, 512, torch.Generator().manual_seed(0))
    cpu = spec.dequantize(tensors)
    gpu = spec.dequantize({name: tensor.cuda() for name, tensor in tensors.items()}).cpu()
    assert torch.equal(cpu.view(torch.int32), gpu.view(torch.int32)), (cpu != gpu).sum()
    assert torch.equal(cpu.bfloat16().view(torch.int16), gpu.bfloat16().view(torch.int16))


def test_nvfp4_block_scale_in_units_of_the_global_scale():
    x = torch.tensor([[6.0] + [0.0] * 15 + [1.5] + [0.0] * 15])
    fake = fake_nvfp4(x, torch.tensor(1 / 64))  # block scales 64 and 16: exact in e4m3
    assert fake[0, 0] == 6.0 and fake[0, 16] == 1.5
    # global 0.01: block scale 6 / 6 / 0.01 = 100 is stored as e4m3 96, so 6 -> 6.25 steps -> 6 x 0.96
    assert float(fake_nvfp4(x, torch.tensor(0.01))[0, 0]) == pytest.approx(5.76, rel=1e-6)
    weight = {
        "weight": torch.tensor([[0x72] * 8], dtype=torch.uint8),  # codes 2 (1.0) then 7 (6.0)
        "weight_scale": torch.tensor([[2.0]]).to(torch.float8_e4m3fn),
        "weight_scale_2": torch.tensor(0.5),
    }
    assert FORMATS["NVFP4"].dequantize(weight)[0, :2].tolist() == [1.0, 6.0]  # x 2 x 0.5


def test_w4a8_weight_is_rounded_to_fp8_in_units_of_its_second_scale():
    packed = torch.tensor([[0x77]], dtype=torch.uint8)  # rows 0 and 1: code 7
    tensors = {"weight": packed.repeat(1, 128), "weight_scale": torch.full((2, 1), 0.3),
               "weight_scale_2": torch.tensor(0.001)}  # fmt: skip
    weight = FORMATS["W4A8_AWQ"].dequantize(tensors)
    expected = (torch.tensor(2.1) / 0.001).to(torch.float8_e4m3fn).float() * 0.001  # 2.1 is no e4m3 multiple
    assert weight.unique().tolist() == [pytest.approx(float(expected))] and float(expected) != pytest.approx(2.1)


@pytest.mark.parametrize(("algorithm", "bits"), [("FP8", 8.0), ("MXFP8", 8.25), ("NVFP4", 4.5), ("W4A16_NVFP4", 4.5),
                                                 ("W4A16_AWQ", 4.25), ("W4A8_AWQ", 4.25),
                                                 ("W8A8_SQ_PER_CHANNEL", 8.0625)])  # fmt: skip
def test_storage_bits_count_scales(algorithm, bits):
    assert FORMATS[algorithm].storage_bits(512, 512) == pytest.approx(bits, abs=0.002)


def test_quant_linear_applies_pre_quant_scale_then_int8():
    spec = FORMATS["W8A8_SQ_PER_CHANNEL"]
    tensors = {"weight": torch.eye(4, dtype=torch.int8), "weight_scale": torch.ones(4),
               "input_scale": torch.tensor(0.5), "pre_quant_scale": torch.tensor([1.0, 2.0, 1.0, 1.0])}  # fmt: skip
    layer = QuantLinear(spec, tensors, None, torch.float32)
    out = layer(torch.tensor([[0.6, 0.6, 100.0, -0.2]]))
    assert out.tolist() == [[0.5, 1.0, 63.5, -0.0]]  # 0.6 -> 1 step; 1.2 -> 2 steps; 200 clamps at 127


def _index(spec_name: str, shape=(64, 128), **overrides) -> tuple[dict, dict]:
    spec = FORMATS[spec_name]
    index = {f"layer.{suffix}": {"dtype": dtype, "shape": list(tensor_shape)}
             for suffix, (dtype, tensor_shape) in spec.tensors(*shape).items()}  # fmt: skip
    for key, value in overrides.items():
        if value is None:
            index.pop(f"layer.{key}")
        else:
            index[f"layer.{key}"] = value
    return index, {"format": spec_name, "quant_algo": spec_name, "shape": list(shape)}


@pytest.mark.parametrize("algorithm", sorted(FORMATS))
def test_layer_problems_clean_layer(algorithm):
    index, module = _index(algorithm)
    assert _layer_problems("layer", module, index) == []


@pytest.mark.parametrize(("algorithm", "override", "message"), [
    ("NVFP4", {"weight_scale": {"dtype": "F32", "shape": [64, 8]}}, r"weight_scale: F32 .* needs F8_E4M3"),
    ("NVFP4", {"weight_scale_2": None}, r"without weight_scale_2"),
    ("W4A16_NVFP4", {"input_scale": {"dtype": "F32", "shape": []}}, r"input_scale stored, .* has none"),
    ("W4A16_AWQ", {"weight_scale": {"dtype": "F32", "shape": [64, 2]}}, r"weight_scale: F32 \[64, 2\] .* \[64, 1\]"),
    ("MXFP8", {"weight": {"dtype": "BF16", "shape": [64, 128]}}, r"weight: BF16 .* needs F8_E4M3"),
    ("FP8_PER_CHANNEL_PER_TOKEN", {"input_scale": {"dtype": "F32", "shape": []}}, r"quantized per token"),
])  # fmt: skip
def test_layer_problems_name_the_tensor(algorithm, override, message):
    index, module = _index(algorithm, **override)
    problems = _layer_problems("layer", module, index)
    assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_missing_pre_quant_scale_is_allowed_folded_into_the_norm():
    index, module = _index("W4A16_AWQ", pre_quant_scale=None)
    assert _layer_problems("layer", module, index) == []
