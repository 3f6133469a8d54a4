"""MXFP4 weights (OCP MX: E2M1 elements, one E8M0 scale per 32 along K), bit-accurate, and their GEMM.

DeepSeek-V4 keeps the MTP block's routed experts (`mtp.{j}.ffn.experts.{e}.w1|w3|w2`) in MXFP4 even in
NVIDIA's NVFP4 export (NVFP4_FACTS 5): `.weight` I8 [N, K/2] packed E2M1 (element 2i in the LOW nibble,
as NVFP4), `.scale` F8_E8M0 [N, K/32]; W[n, k] = e2m1(code[n, k]) * 2^(scale[n, k // 32] - 127). There
is no global scale and no input_scale.

Decoding is integer arithmetic on the bits (no float multiply, no table of values): an E2M1 code
s|ee|m is built into the float64 bits of its value (exponent e-1, mantissa m; e = 0: 0 or 0.5), and
the E8M0 byte b is then ADDED to that exponent field (b - 127), which is exact for every byte 0..254
(float64 spans 2^-1022..2^1023; 6 * 2^127 does not fit float32, so decoding goes to float64). 0xFF is
E8M0's NaN and is refused (ValueError naming the tensor), never decoded. ml_dtypes' float4_e2m1fn and
float8_e8m0fnu are the oracles (verify/tests/test_mxfp4_codec.py).

Activations (the W4A8 decision, see references.mtp): the MTP experts have no NVFP4 input_scale and sit
in DeepSeek's FP8 path, so their activations are DeepSeek's act_quant: FP8 E4M3 per token in 1x128
groups, scale rounded UP to a power of two (references.fp8_act.FP8_ACT_UE8M0). An E4M3 value (4
significant bits) times an E2M1 value (2 bits) times two powers of two is exact in float64, so the
emulated product is exact and only the accumulation rounds (one final rounding to bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from references.fp8_act import Fp8Act1x128

__all__ = ["MXFP4_BLOCK", "E8M0_NAN_BYTE", "e2m1_codes_to_f64_bits", "e8m0_exponent_i64", "decode_mxfp4_f64",
           "check_mxfp4_scale_has_no_nan", "Mxfp4Weight", "mxfp4_gemm_f64", "mxfp4_abs_dot_f64"]

MXFP4_BLOCK = 32
E8M0_NAN_BYTE = 0xFF
_F64_BIAS = 1023
_F64_MANT_BITS = 52


def _as_u8(t: Tensor, name: str) -> Tensor:
    """uint8 bytes of t (uint8, int8 as stored by DeepSeek's `.weight`, or float8_e8m0fnu), viewed, never cast."""
    if t.dtype == torch.uint8:
        return t
    if t.dtype == torch.int8 or str(t.dtype) == "torch.float8_e8m0fnu":
        return t.view(torch.uint8)
    raise TypeError(f"{name}: expected uint8 / int8 / float8_e8m0fnu bytes, got {t.dtype}")


def e2m1_codes_to_f64_bits(codes_u8: Tensor) -> Tensor:
    """E2M1 codes 0..15 -> the int64 bits of their float64 values: sign bit 3, exponent bits 2..1 (bias 1),
    mantissa bit 0. e > 0: 2^(e-1) * (1 + m/2); e = 0, m = 1: 0.5 (the subnormal); code 0 / 8: +0 / -0."""
    c = codes_u8.to(torch.int64)
    sign, e, m = (c >> 3) & 1, (c >> 1) & 3, c & 1
    normal = ((e - 1 + _F64_BIAS) << _F64_MANT_BITS) | (m << (_F64_MANT_BITS - 1))
    half = torch.full_like(c, (_F64_BIAS - 1) << _F64_MANT_BITS)  # 0.5
    mag = torch.where(e > 0, normal, torch.where(m == 1, half, torch.zeros_like(c)))
    return (sign << 63) | mag


def check_mxfp4_scale_has_no_nan(scale: Tensor, *, name: str) -> None:
    """E8M0 byte 0xFF is NaN: a block scale must never be it (ValueError naming the tensor and the count)."""
    b = _as_u8(scale, name)
    nan = int((b == E8M0_NAN_BYTE).sum())
    if nan:
        raise ValueError(f"{name}: {nan} NaN E8M0 scale bytes (0xFF) of {b.numel()}")


def e8m0_exponent_i64(scale: Tensor, *, name: str = "scale") -> Tensor:
    """E8M0 bytes -> their unbiased exponents b - 127 (int64); 0xFF (NaN) refused."""
    check_mxfp4_scale_has_no_nan(scale, name=name)
    return _as_u8(scale, name).to(torch.int64) - 127


def decode_mxfp4_f64(packed: Tensor, scale: Tensor, *, name: str = "mxfp4") -> Tensor:
    """packed [..., N, K/2] (element 2i in the low nibble) and E8M0 scale [..., N, K/32] -> float64 [..., N, K],
    exact: the scale's exponent is added to each nonzero value's exponent field (zeros keep their sign)."""
    p = _as_u8(packed, f"{name}.weight")
    s = e8m0_exponent_i64(scale, name=f"{name}.scale")
    k = p.shape[-1] * 2
    if k % MXFP4_BLOCK or tuple(s.shape) != (*p.shape[:-1], k // MXFP4_BLOCK):
        raise ValueError(f"{name}.scale: shape {tuple(s.shape)} does not match weight {tuple(p.shape)} "
                         f"(expected [..., N, K/32] = {(*p.shape[:-1], k // MXFP4_BLOCK)}, K={k})")
    codes = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*p.shape[:-1], k)
    bits = e2m1_codes_to_f64_bits(codes)
    nonzero = (bits & 0x7FFFFFFFFFFFFFFF) != 0
    shift = s.repeat_interleave(MXFP4_BLOCK, dim=-1) << _F64_MANT_BITS
    return torch.where(nonzero, bits + shift, bits).view(torch.float64)


@dataclass(frozen=True)
class Mxfp4Weight:
    """An MXFP4 linear or a stack of E of them: packed_u8 [..., N, K/2] (low nibble first), scale_u8
    [..., N, K/32] E8M0 bytes. Validated on construction (shapes, no NaN scale byte)."""

    packed_u8: Tensor
    scale_u8: Tensor
    name: str = "mxfp4"

    def __post_init__(self) -> None:
        object.__setattr__(self, "packed_u8", _as_u8(self.packed_u8, f"{self.name}.weight"))
        object.__setattr__(self, "scale_u8", _as_u8(self.scale_u8, f"{self.name}.scale"))
        k = self.packed_u8.shape[-1] * 2
        if k % MXFP4_BLOCK or tuple(self.scale_u8.shape) != (*self.packed_u8.shape[:-1], k // MXFP4_BLOCK):
            raise ValueError(f"{self.name}.scale: shape {tuple(self.scale_u8.shape)} does not match weight "
                             f"{tuple(self.packed_u8.shape)} (expected [..., N, K/32])")
        check_mxfp4_scale_has_no_nan(self.scale_u8, name=f"{self.name}.scale")

    @property
    def n(self) -> int:
        return self.packed_u8.shape[-2]

    @property
    def k(self) -> int:
        return self.packed_u8.shape[-1] * 2

    @property
    def num_experts(self) -> int:
        return self.packed_u8.shape[0]

    def expert(self, e: int) -> "Mxfp4Weight":
        return Mxfp4Weight(self.packed_u8[e], self.scale_u8[e], f"{self.name}[{e}]")

    def decode_f64(self) -> Tensor:
        return decode_mxfp4_f64(self.packed_u8, self.scale_u8, name=self.name)


def mxfp4_gemm_f64(act: Fp8Act1x128, w: Mxfp4Weight) -> Tensor:
    """The exact-product GEMM of FP8 1x128 activations [M, K] and one MXFP4 weight [N, K]: float64 [M, N]
    (every product exact; the float64 sum is what a faithful kernel computes up to its accumulator)."""
    return act.decode_f64() @ w.decode_f64().T


def mxfp4_abs_dot_f64(act: Fp8Act1x128, w: Mxfp4Weight) -> Tensor:
    """sum_k |a_k w_k| [M, N] (float64): the accumulation error bound's scale."""
    return act.decode_f64().abs() @ w.decode_f64().abs().T
