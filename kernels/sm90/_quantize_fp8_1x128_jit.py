"""Triton body of kernels.sm90.quantize_fp8_1x128 (imported lazily by its _compile).

Every step is integer or correctly rounded float32 arithmetic (tl.div_rn, never the default `/`,
which is div.full.f32 on the GPU), so the bytes do not depend on Triton's float8 casts or on an
approximate division.
"""

import triton
import triton.language as tl

from kernels.sm90._te_math import e4m3_rne_satfinite_u8


@triton.jit
def f32_to_e4m3_sat_u8(y_f32):
    """float32 (already clamped to +-448, or NaN) -> E4M3 byte, RNE; the sign from the sign bit (so
    -0.0 -> 0x80); every NaN -> the canonical 0x7F."""
    sign = (y_f32.to(tl.int32, bitcast=True) >> 24) & 0x80
    mag = e4m3_rne_satfinite_u8(tl.abs(y_f32))
    return tl.where(y_f32 != y_f32, 0x7F, mag | sign)


@triton.jit
def quantize_fp8_1x128_kernel(
    x_ptr, stride_xm, codes_ptr, scale_ptr,
    M, K, G,
    BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, SCALE_UE8M0: tl.constexpr, ENCODE_RECIP: tl.constexpr,
    NAN_PROPAGATE: tl.constexpr, AMAX_FLOOR: tl.constexpr,
):
    # The tile is [BLOCK_M rows, GROUPS groups, 128]: the group max is a reduction over the last axis,
    # the scale math runs once per group.
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    grp = pid_g * GROUPS + tl.arange(0, GROUPS)
    col = (grp * 128)[None, :, None] + tl.arange(0, 128)[None, None, :]
    mask = (rows < M)[:, None, None] & (col < K)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None, None] * stride_xm + col, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(x)
    # NaN is handled explicitly (tl.max is maxnum on the GPU but not in the interpreter): "ignore"
    # drops NaN elements from the max (fmaxf); "propagate" makes the group's amax NaN (torch.amax).
    amax = tl.max(tl.where(a == a, a, 0.0), axis=2)
    if NAN_PROPAGATE:
        has_nan = tl.max((a != a).to(tl.int32), axis=2) > 0
        amax = tl.where(has_nan, float("nan"), amax)
    s = tl.div_rn(tl.where(amax != amax, amax, tl.maximum(amax, AMAX_FLOOR)), 448.0)
    if SCALE_UE8M0:
        # smallest power of two >= s on the bits: exponent + (mantissa != 0); s >= floor/448 is normal and
        # below 2^120, so the byte is 1..253 unless s is Inf or NaN (byte 0xFF, a NaN scale)
        sb = s.to(tl.int32, bitcast=True)
        byte = (sb >> 23) + ((sb & 0x7FFFFF) != 0).to(tl.int32)
        byte = tl.where((s == s) & (s != float("inf")), byte, 0xFF)
        # 1/scale = 2^(127 - (byte - 127)) exactly, so x * inv is the correctly rounded x / scale
        inv = ((254 - byte) << 23).to(tl.float32, bitcast=True)
        inv = tl.where(byte == 0xFF, float("nan"), inv)
        y = x * inv[:, :, None]
    elif ENCODE_RECIP:
        y = x * tl.div_rn(1.0, s)[:, :, None]
    else:
        y = tl.div_rn(x, s[:, :, None])
    y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -448.0), 448.0))
    codes = f32_to_e4m3_sat_u8(y).to(tl.uint8)
    tl.store(codes_ptr + rows.to(tl.int64)[:, None, None] * K + col, codes, mask=mask)
    soff = rows.to(tl.int64)[:, None] * G + grp[None, :]
    smask = (rows < M)[:, None] & (grp < G)[None, :]
    if SCALE_UE8M0:
        tl.store(scale_ptr + soff, byte.to(tl.uint8), mask=smask)
    else:
        tl.store(scale_ptr + soff, s, mask=smask)


@triton.jit
def quantize_rows_1x128(x, SCALE_UE8M0: tl.constexpr, ENCODE_RECIP: tl.constexpr, NAN_PROPAGATE: tl.constexpr,
                        AMAX_FLOOR: tl.constexpr):
    """One 128-group of rows, float32 [R, 128] (zeros past K) -> (E4M3 codes u8 [R, 128], the stored scale
    [R] (UE8M0 byte u8, or float32), its float32 value [R]): the operations of quantize_fp8_1x128_kernel
    step for step on a 2-d tile (the fused GEMM prologue of kernels.sm90.gemm_fp8_block; its bytes are
    tested equal to the quantizer's)."""
    a = tl.abs(x)
    amax = tl.max(tl.where(a == a, a, 0.0), axis=1)
    if NAN_PROPAGATE:
        has_nan = tl.max((a != a).to(tl.int32), axis=1) > 0
        amax = tl.where(has_nan, float("nan"), amax)
    s = tl.div_rn(tl.where(amax != amax, amax, tl.maximum(amax, AMAX_FLOOR)), 448.0)
    if SCALE_UE8M0:
        sb = s.to(tl.int32, bitcast=True)
        byte = (sb >> 23) + ((sb & 0x7FFFFF) != 0).to(tl.int32)
        byte = tl.where((s == s) & (s != float("inf")), byte, 0xFF)
        inv = ((254 - byte) << 23).to(tl.float32, bitcast=True)
        inv = tl.where(byte == 0xFF, float("nan"), inv)
        y = x * inv[:, None]
        stored = byte.to(tl.uint8)
        # the GEMM's decode of the stored byte (_gemm_fp8_block_jit.ue8m0_u8_to_f32): 2^(byte - 127), byte 0
        # the subnormal 2^-127, 0xFF NaN
        bits = tl.where(byte > 0, byte << 23, 0x00400000)
        dec = tl.where(byte == 0xFF, 0x7FC00000, bits).to(tl.float32, bitcast=True)
    elif ENCODE_RECIP:
        y = x * tl.div_rn(1.0, s)[:, None]
        stored = s
        dec = s
    else:
        y = tl.div_rn(x, s[:, None])
        stored = s
        dec = s
    y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -448.0), 448.0))
    codes = f32_to_e4m3_sat_u8(y).to(tl.uint8)
    return codes, stored, dec
