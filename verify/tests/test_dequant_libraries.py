"""references.nvfp4.dequantize_nvfp4 follows each library's float32 operation order bit for bit, and the
exactly rounded order the verdicts use differs from them on some elements (issue 14, item 4).

Transcription tests: each library's dequantize is restated here in the torch operations its source uses
(file and function cited per test), on the same bytes and global scale, and compared bit for bit with
dequantize_nvfp4(order=...), which computes each step as an exact float64 product rounded once
(independent of torch's float32 kernels). Oracle test: torchao's own NVFP4Tensor.dequantize where
torchao is importable (it is not a dependency; the test skips with the reason otherwise).
"""

from __future__ import annotations

import pytest
import torch

from references.codecs import e2m1_codes_to_f32, e4m3_bytes_to_f32
from references.nvfp4 import (
    DEQUANT_ORDERS, Nvfp4Quantized, dequantize_nvfp4, global_dec_scale_from_amax, quantize_nvfp4,
    te_global_enc_scale, unpack_e2m1x2_low_first,
)
from references.recipes import MODELOPT, TORCHAO, VLLM
from verify.assertions import assert_bits_equal

# amax values whose global scales have long mantissas (the orders differ only there) and short ones
AMAXES = (1.0, 3.0, 0.0137, 7.31e-3, 951.7, 2.0**-7 * 1.37, 12345.678)


def _data(seed: int, amax: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 128, generator=g) * torch.exp(torch.randn(64, 1, generator=g) * 2)
    return (x * (amax / x.abs().max())).to(torch.float32)


def _quantized(recipe, amax: float, seed: int = 0) -> Nvfp4Quantized:
    x = _data(seed, amax)
    a = x.abs().max()
    if recipe.global_convention == "enc":
        return quantize_nvfp4(x, recipe=recipe, global_enc_scale_f32=te_global_enc_scale(a))
    return quantize_nvfp4(x, recipe=recipe, global_dec_scale_f32=global_dec_scale_from_amax(a))


def _codes_f32(q: Nvfp4Quantized) -> torch.Tensor:
    """The E2M1 values as float32, [..., K/16, 16] (what every library's unpack + lookup yields)."""
    return e2m1_codes_to_f32(unpack_e2m1x2_low_first(q.packed_u8)).reshape(*q.sf_u8.shape, 16)


def _scales_f32(q: Nvfp4Quantized) -> torch.Tensor:
    return e4m3_bytes_to_f32(q.sf_u8)


# ============================================================================= transcriptions


def torchao_transcribed(q: Nvfp4Quantized, dtype: torch.dtype) -> torch.Tensor:
    """torchao 0.18, torchao/prototype/mx_formats/nvfp4_tensor.py, NVFP4Tensor.dequantize with
    get_hp_scales: `per_tensor_scale * scale_e4m3.to(torch.float)`, then
    `data_f32 * scale.to(torch.float32)`, then `.to(output_dtype)`."""
    hp_scales = q.global_dec_scale_f32 * _scales_f32(q)
    return (_codes_f32(q) * hp_scales.unsqueeze(-1).to(torch.float32)).reshape(q.packed_u8.shape[0], -1).to(dtype)


def modelopt_transcribed(q: Nvfp4Quantized, dtype: torch.dtype) -> torch.Tensor:
    """ModelOpt, modelopt/torch/quantization/qtensor/nvfp4_tensor.py, NVFP4QTensor.dequantize (fast=False):
    `per_block_scale = scale.to(torch.float32) * double_scale`, then
    `deq_data.view(..., -1, block_size) * per_block_scale.unsqueeze(-1)`, then `.to(dtype)`."""
    per_block_scale = _scales_f32(q) * q.global_dec_scale_f32
    return (_codes_f32(q) * per_block_scale.unsqueeze(-1)).reshape(q.packed_u8.shape[0], -1).to(dtype)


def vllm_transcribed(q: Nvfp4Quantized, dtype: torch.dtype) -> torch.Tensor:
    """vLLM, tests/kernels/quantization/nvfp4_utils.py, dequantize_nvfp4_to_dtype:
    `tensor_sf.to(torch.float32) / global_scale` (the ENCODE scale), then
    `tensor_f32 * tensor_sf_dtype.unsqueeze(-1)` (codes from break_fp4_bytes in `dtype`, promoted to
    float32), then `.to(dtype)`."""
    tensor_sf_dtype = _scales_f32(q) / q.global_enc_scale_f32.reshape(1)
    codes = _codes_f32(q).to(dtype)  # break_fp4_bytes(tensor_fp4, dtype): E2M1 values are exact in bf16
    return (codes * tensor_sf_dtype.unsqueeze(-1)).reshape(q.packed_u8.shape[0], -1).to(dtype)


CASES = [("torchao", TORCHAO, torchao_transcribed), ("modelopt", MODELOPT, modelopt_transcribed),
         ("vllm", VLLM, vllm_transcribed)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("amax", AMAXES, ids=lambda a: f"amax{a:g}")
@pytest.mark.parametrize("order,recipe,transcribed", CASES, ids=[c[0] for c in CASES])
def test_dequantize_follows_the_librarys_order_bit_for_bit(order, recipe, transcribed, amax, dtype):
    q = _quantized(recipe, amax)
    assert_bits_equal(dequantize_nvfp4(q, dtype=dtype, order=order), transcribed(q, dtype),
                      label=f"dequantize order={order} vs {order}'s transcribed formula ({dtype})")


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32) != b.view(torch.int32)).sum())


@pytest.mark.parametrize("order,recipe", [("torchao", TORCHAO), ("modelopt", MODELOPT), ("vllm", VLLM)],
                         ids=["torchao", "modelopt", "vllm"])
def test_library_orders_differ_from_the_exactly_rounded_order(order, recipe):
    """Over the amax sweep some elements differ by an ulp (two roundings vs one); an implementation that
    ignored `order` would pass the transcription test only by accident, so this pins the difference."""
    diffs = 0
    for amax in AMAXES:
        q = _quantized(recipe, amax, seed=1)
        lib, exact = dequantize_nvfp4(q, order=order), dequantize_nvfp4(q, order="exact")
        diffs += _differing(lib, exact)
        ulps = (lib.double() - exact.double()).abs() / torch.where(exact == 0, 1.0, exact.abs().double() * 2**-23)
        assert float(ulps.max()) <= 2.0, f"{order} vs exact (amax {amax}): {float(ulps.max())} ulps apart"
    assert diffs > 0, f"order={order}: no element differs from the exactly rounded order on the amax sweep"


def test_exact_order_is_one_rounding_of_the_exact_product():
    q = _quantized(MODELOPT, 0.0137, seed=2)
    exact64 = _codes_f32(q).double() * _scales_f32(q).double().unsqueeze(-1) * q.global_dec_scale_f32.double()
    assert_bits_equal(dequantize_nvfp4(q), exact64.reshape(64, 128).to(torch.float32),
                      label="exact order vs float64 product rounded once")


def test_torchao_and_modelopt_orders_agree_in_float32():
    """D * s and s * D are the same float32 product: the two libraries' orders coincide (documented)."""
    q = _quantized(MODELOPT, 7.31e-3, seed=3)
    assert_bits_equal(dequantize_nvfp4(q, order="torchao"), dequantize_nvfp4(q, order="modelopt"),
                      label="torchao vs modelopt order")


def test_a_scale_of_the_wrong_direction_is_refused():
    with pytest.raises(ValueError, match="order='vllm' divides by the ENCODE scale"):
        dequantize_nvfp4(_quantized(MODELOPT, 1.0), order="vllm")
    with pytest.raises(ValueError, match="order='torchao' multiplies by the DECODE scale"):
        dequantize_nvfp4(_quantized(VLLM, 1.0), order="torchao")
    with pytest.raises(ValueError, match="order='te'"):
        dequantize_nvfp4(_quantized(VLLM, 1.0), order="te")
    assert set(DEQUANT_ORDERS) == {"exact", "torchao", "modelopt", "vllm"}


# ============================================================================= oracle


@pytest.mark.parametrize("amax", AMAXES, ids=lambda a: f"amax{a:g}")
def test_torchao_oracle(amax):
    """torchao's own NVFP4Tensor.dequantize on our bytes (where torchao is importable)."""
    nvfp4 = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor",
                                reason="torchao is not installed (an optional oracle, never a dependency)")
    q = _quantized(TORCHAO, amax, seed=4)
    t = nvfp4.NVFP4Tensor(q.packed_u8, q.sf_u8.view(torch.float8_e4m3fn), 16, torch.float32,
                          per_tensor_scale=q.global_dec_scale_f32)
    assert_bits_equal(dequantize_nvfp4(q, order="torchao"), t.dequantize(torch.float32),
                      label=f"dequantize order=torchao vs torchao NVFP4Tensor.dequantize (amax {amax})")
