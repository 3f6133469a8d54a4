"""Triton device helpers for the `te` recipe (shared by the sm90 quantize and amax kernels).

This module imports triton at the top: only the `_compile` functions of the public
kernel modules import it (lazily), so `import kernels.sm90.<kernel>` needs torch alone. Everything here is integer or
correctly-rounded float32 arithmetic, written so that the bytes do not depend on
Triton's float8 casts or on its default (approximate) division:

  e4m3_rne_satfinite_u8(y_f32)   y >= 0 (or NaN) -> E4M3 byte, RNE, saturating at 448 (0x7E);
                                 NaN -> 0x7F (torch's float8 NaN byte, as the emulator gives)
  e4m3_u8_to_f32(b_i32)          E4M3 byte 0..0x7F -> float32 (exact; 0x7F -> NaN)
  e2m1_code_lt_zero(y_f32)       float32 -> E2M1 code 0..15, RNE ties to even, saturating at 6;
                                 sign from y < 0 (so -0.0 -> 0x0), NaN -> 0x7 (+6)
  e2m1_code_lt_zero_bits(y_f32)  the same codes from integer arithmetic on the float32 bits
                                 (fewer instructions; equal for all 2^32 inputs, checked on the CPU)
"""


from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e4m3_rne_satfinite_u8(y_f32):
    # Normal range: round the float32 mantissa to 3 bits (RNE) on the bit pattern;
    # a carry into the exponent is the correct result. Re-bias 127 -> 7.
    bits = y_f32.to(tl.int32, bitcast=True)
    rounded = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = (rounded >> 20) - (120 << 3)
    normal = tl.minimum(normal, 0x7E)  # satfinite: 464 and above round to 480 -> clamp to 448
    # Subnormal range (y < 2^-6): multiples of 2^-9, RNE to an integer 0..8 (8 is 0x08 = 2^-6).
    # (t + 2^23) - 2^23 rounds t in [0, 2^22) to an integer, ties to even, in float32.
    sub = ((y_f32 * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    out = tl.where(y_f32 < 0.015625, sub, normal)
    return tl.where(y_f32 != y_f32, 0x7F, out)


@triton.jit
def e4m3_u8_to_f32(b_i32):
    e = b_i32 >> 3
    m = b_i32 & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    out = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where((b_i32 & 0x7F) == 0x7F, float("nan"), out)  # only from a NaN global scale


@triton.jit
def e2m1_code_lt_zero(y_f32):
    a = tl.abs(y_f32)
    # nearest, ties to the even code: 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2, 2.5->2, 3.5->4, 5->4
    mag = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
           + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
           + (a > 5.0).to(tl.int32))
    code = mag | tl.where(y_f32 < 0, 8, 0)
    return tl.where(y_f32 != y_f32, 7, code)


@triton.jit
def e2m1_code_lt_zero_bits(y_f32):
    # |y| < 1: the E2M1 grid is 0, 0.5, 1 (codes 0, 1, 2): code = round_half_even(2|y|),
    #   read from the bits of fma(|y|, 2, 2^23) (one rounding, at the integer).
    # |y| >= 1: E2M1 is a float with one mantissa bit and exponent 0..2; round the float32
    #   mantissa to one bit (RNE on the bit pattern; a carry into the exponent is right),
    #   then code = (biased exponent, mantissa bit) - (127, 0) + 2, saturating at 7 (6.0).
    #   Inf and NaN bit patterns land above 7 and saturate to 7 as well.
    a = tl.abs(y_f32)
    lo = tl.fma(a, 2.0, 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    b = a.to(tl.uint32, bitcast=True)
    hi = (b + (0x1FFFFF + ((b >> 22) & 1))) >> 22
    hi = tl.minimum(hi, 259).to(tl.int32) - 252
    mag = tl.where(a < 1.0, lo, hi)
    return mag | tl.where(y_f32 < 0, 8, 0)
