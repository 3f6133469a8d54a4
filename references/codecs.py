"""Bit-level codecs for E2M1, E4M3 (float8_e4m3fn) and UE8M0 (float8_e8m0fnu).

Every encoder works on the IEEE-754 binary32 bit pattern with integer operations
(shifts, masks, adds, compares); no float8 cast of torch is used. Decoders build
their value from the code's fields with integer ops as well. torch's casts,
ml_dtypes and the hardware are the oracles these are tested against
(verify/tests/test_codecs_exhaustive.py).

NaN / Inf policy, per codec (the reason is in each function's docstring):

| codec          | +-Inf input                   | NaN input            | overflow (finite)       |
|----------------|-------------------------------|----------------------|-------------------------|
| E2M1           | +-6 (code 0x7 / 0xF)          | +6 (code 0x7)        | saturates to +-6        |
| E4M3 saturate  | +-448 (0x7E / 0xFE)           | 0x7F (sign kept)     | saturates to +-448      |
| E4M3 nonsat    | NaN (0x7F / 0xFF)             | 0x7F (sign kept)     | NaN once RNE passes 448 |
| UE8M0          | 0xFF (NaN)                    | 0xFF                 | 0xFF (NaN)              |

All functions are vectorized, device-agnostic (CPU or CUDA tensors) and pure.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = [
    "E2M1_MAX",
    "E4M3_MAX",
    "E4M3_NAN_BYTE",
    "UE8M0_NAN_BYTE",
    "f32_bits",
    "bits_to_f32",
    "f32_to_e2m1_codes",
    "e2m1_codes_to_f32",
    "f32_to_e4m3_bytes",
    "e4m3_bytes_to_f32",
    "f32_to_ue8m0_bytes",
    "ue8m0_bytes_to_f32",
    "round_f32_to_minifloat_magnitude",
    "f64_to_f32_round_to_odd",
    "round_f64_to",
]

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MAX_BYTE = 0x7E
E4M3_NAN_BYTE = 0x7F
UE8M0_NAN_BYTE = 0xFF

_ABS_MASK = 0x7FFFFFFF
_F32_INF_BITS = 0x7F800000
_F32_MANT_BITS = 23


def f32_bits(x_f32: Tensor) -> Tensor:
    """float32 tensor -> its int32 bit patterns (a view-copy; never a value cast)."""
    if x_f32.dtype != torch.float32:
        raise TypeError(f"x_f32: expected torch.float32, got {x_f32.dtype}")
    return x_f32.contiguous().view(torch.int32)


def bits_to_f32(bits_i32: Tensor) -> Tensor:
    """int32 bit patterns -> float32 tensor with those bits."""
    if bits_i32.dtype != torch.int32:
        raise TypeError(f"bits_i32: expected torch.int32, got {bits_i32.dtype}")
    return bits_i32.contiguous().view(torch.float32)


def f64_to_f32_round_to_odd(x_f64: Tensor) -> Tensor:
    """float64 -> float32 rounded to odd: truncate toward zero, then set the last mantissa bit
    if anything was lost. Rounding that result once more to a format with at least 2 fewer
    significand bits (bf16: 8, fp16: 11; float32 has 24) is the correctly rounded (RNE)
    float64 -> that format (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums:
    proved algorithms using rounding to odd", IEEE TC 2008). Subnormals: float32's subnormal
    grid is 2^16 finer than bf16's. Past FLT_MAX it gives FLT_MAX with the sticky bit (which
    then rounds to inf in bf16, as the exact value does); +-inf, NaN and signed zeros pass through.
    """
    if x_f64.dtype != torch.float64:
        raise TypeError(f"x_f64: expected torch.float64, got {x_f64.dtype}")
    t = x_f64.to(torch.float32)  # RNE; stepped back toward zero below where it rounded up in magnitude
    t = torch.where(t.double().abs() > x_f64.abs(), torch.nextafter(t, torch.zeros_like(t)), t)
    sticky = (t.double() != x_f64) & ~torch.isnan(x_f64)
    return bits_to_f32(f32_bits(t) | sticky.to(torch.int32))


def round_f64_to(x_f64: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 -> dtype with ONE round-to-nearest-even. torch's float64 -> bfloat16 cast goes
    through float32 and rounds twice (1 + 2^-8 + 2^-30 gives 1.0 instead of 1 + 2^-7)."""
    if dtype == torch.float64:
        return x_f64
    if dtype == torch.float32:
        return x_f64.to(torch.float32)
    if dtype in (torch.bfloat16, torch.float16):
        return f64_to_f32_round_to_odd(x_f64).to(dtype)
    raise ValueError(f"dtype={dtype}: expected float64, float32, bfloat16 or float16")


def round_f32_to_minifloat_magnitude(abs_bits_i32: Tensor, *, mant_bits: int, bias: int) -> Tensor:
    """Round |x| (given as non-negative float32 bit patterns) to a minifloat code, RNE.

    The minifloat has `mant_bits` mantissa bits, exponent bias `bias`, subnormals,
    and an unbounded exponent here: codes past the format's maximum are returned
    as they are, so the caller decides between saturation and NaN. Inf and NaN
    inputs must be handled by the caller (their result here is meaningless).

    Method: with f32 exponent field E and significand m (implicit bit included),
    |x| = m * 2^(E-150). The target quantum is 2^(max(E-127, emin) - mant_bits)
    with emin = 1 - bias, so the significand is shifted right by
    s = 23 - mant_bits + max(emin - (E-127), 0) with round-to-nearest-even on the
    shifted-out bits. The code is q + (max(E-127 + bias - 1, 0) << mant_bits):
    a carry out of the mantissa increments the exponent field, which is exactly
    the next binade's first code. Returns int32 codes.
    """
    a = abs_bits_i32
    exp_field = a >> _F32_MANT_BITS
    frac = a & ((1 << _F32_MANT_BITS) - 1)
    is_normal = exp_field > 0
    sig = torch.where(is_normal, frac | (1 << _F32_MANT_BITS), frac)
    unbiased = torch.where(is_normal, exp_field, torch.ones_like(exp_field)) - 127
    emin = 1 - bias
    # shift >= 25 already rounds every 24-bit significand to 0; cap keeps shifts in int32 range.
    shift = (_F32_MANT_BITS - mant_bits + torch.clamp(emin - unbiased, min=0)).clamp(max=30)
    q = sig >> shift
    rem = sig - (q << shift)
    half = (1 << shift) >> 1
    round_up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    q = q + round_up.to(torch.int32)
    return q + (torch.clamp(unbiased + bias - 1, min=0) << mant_bits)


# ----------------------------------------------------------------------------- E2M1


def f32_to_e2m1_codes(x_f32: Tensor, *, sign_rule: str = "signbit") -> Tensor:
    """float32 -> E2M1 codes (uint8 in 0..15), round to nearest, ties to even code.

    Code layout: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa;
    magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. |x| > 6 saturates to 6 (the ties
    5 -> 4, 3.5 -> 4, 2.5 -> 2 follow RNE).
    sign_rule: "signbit" keeps the input's sign bit (-0.0 and small negatives
    give 0x8, as ml_dtypes and torchao do); "lt_zero" takes the sign from
    x < 0, so -0.0 gives +0 (0x0) while small negatives still give 0x8
    (TE, vLLM, ModelOpt).

    Policy (E2M1 has no Inf or NaN): +-Inf saturates to +-6 like any overflow;
    NaN gives +6 (code 0x7) under both rules, the documented result of PTX
    `cvt.rn.satfinite.e2m1x2.f32` for a NaN input (ml_dtypes gives 0x8: the
    exhaustive test asserts that difference).
    """
    if sign_rule not in ("signbit", "lt_zero"):
        raise ValueError(f"sign_rule={sign_rule!r}: expected 'signbit' or 'lt_zero'")
    bits = f32_bits(x_f32)
    a = bits & _ABS_MASK
    # Inf's code lands far past 7, so the clamp is the saturation.
    mag = torch.clamp(round_f32_to_minifloat_magnitude(a, mant_bits=1, bias=1), max=0x7)
    is_nan = a > _F32_INF_BITS
    negative = bits < 0
    if sign_rule == "lt_zero":
        negative = negative & (a != 0)
    negative = negative & ~is_nan
    mag = torch.where(is_nan, torch.full_like(mag, 0x7), mag)
    return (mag | (negative.to(torch.int32) << 3)).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _e2m1_table_f32(device: torch.device) -> Tensor:
    """The 16 E2M1 values, built from the code fields with integer ops (once per device: callers only index it)."""
    code = torch.arange(16, dtype=torch.int32, device=device)
    sign = (code >> 3) << 31
    exp = (code >> 1) & 0x3
    man = code & 0x1
    # normal: 2^(exp-1) * (1 + man/2) -> f32 exponent exp-1+127, mantissa msb = man
    normal = ((exp + 126) << _F32_MANT_BITS) | (man << (_F32_MANT_BITS - 1))
    # subnormal (exp == 0): man * 0.5 -> 0.5 is f32 exponent 126, mantissa 0
    subnormal = man * (126 << _F32_MANT_BITS)
    return bits_to_f32(sign | torch.where(exp > 0, normal, subnormal))


def e2m1_codes_to_f32(codes_u8: Tensor) -> Tensor:
    """E2M1 codes (uint8, low 4 bits used; higher bits must be 0) -> float32 values."""
    if codes_u8.dtype != torch.uint8:
        raise TypeError(f"codes_u8: expected torch.uint8, got {codes_u8.dtype}")
    table = _e2m1_table_f32(codes_u8.device)
    return table[(codes_u8 & 0xF).long()]


# ----------------------------------------------------------------------------- E4M3


def f32_to_e4m3_bytes(x_f32: Tensor, *, saturate: bool) -> Tensor:
    """float32 -> float8_e4m3fn bytes (uint8), round to nearest even.

    saturate=True is the hardware conversion (`cvt.rn.satfinite.e4m3x2.f32`,
    `__NV_SATFINITE`): finite and infinite magnitudes past 448 give +-448
    (0x7E / 0xFE). saturate=False is torch's eager cast and ml_dtypes: a value
    whose RNE result passes 448 (i.e. |x| > 464, the midpoint to the missing
    480) and +-Inf give NaN (0x7F / 0xFF). NaN gives 0x7F with the input's sign
    bit in both modes. Zero keeps its sign (-0.0 -> 0x80).
    """
    bits = f32_bits(x_f32)
    sign = ((bits >> 31) & 1).to(torch.uint8) << 7
    a = bits & _ABS_MASK
    mag = round_f32_to_minifloat_magnitude(a, mant_bits=3, bias=7)
    is_nan = a > _F32_INF_BITS
    if saturate:
        mag = torch.where(is_nan, E4M3_NAN_BYTE, torch.clamp(mag, max=E4M3_MAX_BYTE))
    else:
        mag = torch.where(is_nan | (a == _F32_INF_BITS), E4M3_NAN_BYTE, torch.clamp(mag, max=E4M3_NAN_BYTE))
    return sign | mag.to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _e4m3_table_f32(device: torch.device) -> Tensor:
    """The 256 E4M3 values (0x7F/0xFF NaN), built from the byte fields with integer ops (once per device: callers
    only index it)."""
    byte = torch.arange(256, dtype=torch.int32, device=device)
    sign = (byte >> 7) << 31
    exp = (byte >> 3) & 0xF
    man = byte & 0x7
    normal = ((exp + 120) << _F32_MANT_BITS) | (man << (_F32_MANT_BITS - 3))
    # subnormal: man * 2^-9. Normalise: p = floor(log2(man)), value 2^(p-9) * (man / 2^p)
    p = (man >= 2).to(torch.int32) + (man >= 4).to(torch.int32)
    sub = ((118 + p) << _F32_MANT_BITS) | ((man - (1 << p)) << (_F32_MANT_BITS - p))
    sub = torch.where(man > 0, sub, torch.zeros_like(sub))
    bits = sign | torch.where(exp > 0, normal, sub)
    bits = torch.where((exp == 0xF) & (man == 0x7), sign | 0x7FC00000, bits)
    return bits_to_f32(bits)


def e4m3_bytes_to_f32(b_u8: Tensor) -> Tensor:
    """float8_e4m3fn bytes (uint8 or a float8_e4m3fn tensor, read as bytes) -> float32.

    0x7F and 0xFF decode to NaN. Exact: every E4M3 value is a float32.
    """
    if b_u8.dtype == torch.float8_e4m3fn:
        b_u8 = b_u8.view(torch.uint8)
    if b_u8.dtype != torch.uint8:
        raise TypeError(f"b_u8: expected torch.uint8 (or float8_e4m3fn bytes), got {b_u8.dtype}")
    return _e4m3_table_f32(b_u8.device)[b_u8.long()]


# ----------------------------------------------------------------------------- UE8M0


def f32_to_ue8m0_bytes(x_f32: Tensor, *, rounding: str = "rne") -> Tensor:
    """float32 -> UE8M0 (float8_e8m0fnu) bytes: value 2^(byte-127), 0xFF is NaN.

    rounding:
      "rne"      nearest power of two, ties (1.5 * 2^e) to the even exponent
                 field (ml_dtypes' rule);
      "cast"     what torch's and ml_dtypes' casts do: guard/round/
                 sticky on the f32 bits with the implicit bit as LSB, so normal
                 ties round up; applied to f32 subnormals as bits too;
      "ceil"     smallest power of two >= |x| (DeepSeek / MX scale rounding);
      "floor"    largest power of two <= |x| (OCP MX floor(log2)).
    Below 2^-127 (byte 0, the smallest value) everything gives byte 0, except
    where the rule rounds up to 2^-126 (byte 1).
    Policy: NaN, +-Inf and results past 2^127 give 0xFF (NaN). Negative
    nonzero values give 0xFF: a scale has no sign (torch ignores the sign
    instead; the exhaustive test asserts that difference). -0.0 counts as +0.
    """
    if rounding not in ("rne", "cast", "ceil", "floor"):
        raise ValueError(f"rounding={rounding!r}: expected 'rne', 'cast', 'ceil' or 'floor'")
    bits = f32_bits(x_f32)
    a = bits & _ABS_MASK
    exp_field = a >> _F32_MANT_BITS
    frac = a & ((1 << _F32_MANT_BITS) - 1)
    subnormal = exp_field == 0  # value frac * 2^-149, below 2^-126
    if rounding == "floor":
        up = torch.zeros_like(frac, dtype=torch.bool)
        sub_up = up
    elif rounding == "ceil":
        up = frac != 0
        sub_up = frac > 0x400000  # above 2^-127
    elif rounding == "rne":
        guard = (frac >> 22) & 1
        up = (guard == 1) & (((frac & 0x3FFFFF) != 0) | ((exp_field & 1) == 1))
        sub_up = frac > 0x600000  # above 1.5 * 2^-127; the tie goes to the even byte 0
    else:  # cast
        guard = (frac >> 22) & 1
        up = (guard == 1) & (((frac & 0x3FFFFF) != 0) | ~subnormal)
        sub_up = up
    code = torch.where(subnormal, sub_up.to(torch.int32), exp_field + up.to(torch.int32))
    invalid = ((bits < 0) & (a != 0)) | (a >= _F32_INF_BITS) | (code >= 0xFF)
    return torch.where(invalid, UE8M0_NAN_BYTE, code).to(torch.uint8)


def ue8m0_bytes_to_f32(b_u8: Tensor) -> Tensor:
    """UE8M0 bytes -> float32 2^(byte-127); byte 0 is the f32 subnormal 2^-127; 0xFF is NaN."""
    if b_u8.dtype != torch.uint8:
        if str(b_u8.dtype) == "torch.float8_e8m0fnu":
            b_u8 = b_u8.view(torch.uint8)
        else:
            raise TypeError(f"b_u8: expected torch.uint8 (or float8_e8m0fnu bytes), got {b_u8.dtype}")
    e = b_u8.to(torch.int32)
    bits = torch.where(e > 0, e << _F32_MANT_BITS, torch.full_like(e, 0x00400000))
    bits = torch.where(e == 0xFF, torch.full_like(e, 0x7FC00000), bits)
    return bits_to_f32(bits)
