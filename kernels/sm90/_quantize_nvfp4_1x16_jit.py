"""Triton body of kernels.sm90.quantize_nvfp4_1x16 (imported lazily by its _compile)."""

import triton
import triton.language as tl

from kernels.sm90._te_math import e2m1_code_lt_zero, e4m3_rne_satfinite_u8, e4m3_u8_to_f32


@triton.jit
def quantize_nvfp4_1x16_te_kernel(
    x_ptr, stride_xm, enc_ptr, packed_ptr, sf_i32_ptr, sat_ptr,
    M, K, CP4,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, COUNT_SAT: tl.constexpr,
    ONE_SIXTH: tl.constexpr, FMAX: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :],
                mask=row_ok[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
    s_enc = tl.load(enc_ptr)
    xb = tl.reshape(x, (BLOCK_M, BLOCK_K // 16, 16))
    ax = tl.abs(xb)
    ax = tl.where(ax == ax, ax, 0.0)  # NaN elements do not raise the block max (fmaxf)
    v = tl.max(ax, axis=2)
    scale_f32 = tl.minimum(v * (s_enc * ONE_SIXTH), FMAX, propagate_nan=tl.PropagateNan.ALL)
    sf_u8 = e4m3_rne_satfinite_u8(scale_f32)
    inv_s = tl.div_rn(1.0, s_enc)
    enc = tl.div_rn(1.0, e4m3_u8_to_f32(sf_u8) * inv_s)
    enc = tl.minimum(enc, FMAX, propagate_nan=tl.PropagateNan.ALL)
    codes = e2m1_code_lt_zero(xb * enc[:, :, None])
    lo, hi = tl.split(tl.reshape(codes, (BLOCK_M, BLOCK_K // 2, 2)))
    packed = (lo | (hi << 4)).to(tl.uint8)
    pcols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    tl.store(packed_ptr + rows.to(tl.int64)[:, None] * (K // 2) + pcols[None, :], packed,
             mask=row_ok[:, None] & (pcols < K // 2)[None, :])
    # four scale bytes of one row (c % 4 = 0..3) form one little-endian int32 word
    sf4 = tl.reshape(sf_u8, (BLOCK_M, BLOCK_K // 64, 4))
    shifts = tl.arange(0, 4) * 8
    words = tl.sum(sf4 << shifts[None, None, :], axis=2)
    c4 = pid_k * (BLOCK_K // 64) + tl.arange(0, BLOCK_K // 64)
    woff = (((rows // 128) * CP4)[:, None] + c4[None, :]) * 128 + ((rows % 32) * 4 + (rows // 32) % 4)[:, None]
    tl.store(sf_i32_ptr + woff, words, mask=(c4 < CP4)[None, :] & (rows >= 0)[:, None])
    if COUNT_SAT:
        sat = (v * (s_enc * ONE_SIXTH) > 448.0) & row_ok[:, None]
        tl.atomic_add(sat_ptr, tl.sum(tl.sum(sat.to(tl.int32), axis=1), axis=0))
