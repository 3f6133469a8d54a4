"""Triton body of kernels.sm90.quantize_nvfp4_1x16 (imported lazily by its _compile)."""

import triton
import triton.language as tl

from kernels.sm90._te_math import e2m1_code_lt_zero_bits, e4m3_rne_satfinite_u8, e4m3_u8_to_f32


@triton.jit
def _pack_e2m1x2_low_first(codes):
    """int32 codes [..., 8] (one half block) -> uint8 [..., 4]: element 2i in the low nibble."""
    lo, hi = tl.split(tl.reshape(codes, codes.shape[:-1] + (4, 2)))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def quantize_nvfp4_1x16_te_kernel(
    x_ptr, stride_xm, enc_ptr, packed_ptr, sf_i32_ptr, sat_ptr,
    M, K, CP4,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, COUNT_SAT: tl.constexpr,
    ONE_SIXTH: tl.constexpr, FMAX: tl.constexpr,
):
    # The tile is [BLOCK_M rows, NB = BLOCK_K/16 blocks] and each block is loaded as two
    # halves of 8 elements (16 bytes each) in two tensors of one layout: every thread then
    # holds whole blocks, so the block max needs no shuffle and the per-block scale math
    # (two IEEE divisions) runs once per block, not once per thread holding a part of it.
    NB: tl.constexpr = BLOCK_K // 16
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    blk = pid_k * NB + tl.arange(0, NB)
    row_ok = rows < M
    e8 = tl.arange(0, 8)
    off0 = rows.to(tl.int64)[:, None, None] * stride_xm + (blk * 16)[None, :, None] + e8[None, None, :]
    mask = row_ok[:, None, None] & (blk * 16 < K)[None, :, None]
    x0 = tl.load(x_ptr + off0, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + off0 + 8, mask=mask, other=0.0).to(tl.float32)
    s_enc = tl.load(enc_ptr)
    # tl.max combines with maxnum (fmaxf): NaN elements do not raise the block max; an
    # all-NaN block gives NaN, mapped to 0 as fmaxf's chain from 0 would
    v = tl.maximum(tl.max(tl.abs(x0), axis=2), tl.max(tl.abs(x1), axis=2))
    v = tl.where(v == v, v, 0.0)
    scale_f32 = tl.minimum(v * (s_enc * ONE_SIXTH), FMAX, propagate_nan=tl.PropagateNan.ALL)
    sf_u8 = e4m3_rne_satfinite_u8(scale_f32)
    inv_s = tl.div_rn(1.0, s_enc)
    enc = tl.div_rn(1.0, e4m3_u8_to_f32(sf_u8) * inv_s)
    enc = tl.minimum(enc, FMAX, propagate_nan=tl.PropagateNan.ALL)[:, :, None]
    p0 = _pack_e2m1x2_low_first(e2m1_code_lt_zero_bits(x0 * enc))
    p1 = _pack_e2m1x2_low_first(e2m1_code_lt_zero_bits(x1 * enc))
    e4 = tl.arange(0, 4)
    poff = rows.to(tl.int64)[:, None, None] * (K // 2) + (blk * 8)[None, :, None] + e4[None, None, :]
    tl.store(packed_ptr + poff, p0, mask=mask)
    tl.store(packed_ptr + poff + 4, p1, mask=mask)
    # four scale bytes of one row (c % 4 = 0..3) form one little-endian int32 word
    sf4 = tl.reshape(sf_u8, (BLOCK_M, NB // 4, 4))
    words = tl.sum(sf4 << (tl.arange(0, 4) * 8)[None, None, :], axis=2)
    c4 = pid_k * (NB // 4) + tl.arange(0, NB // 4)
    woff = (((rows // 128) * CP4)[:, None] + c4[None, :]) * 128 + ((rows % 32) * 4 + (rows // 32) % 4)[:, None]
    tl.store(sf_i32_ptr + woff, words, mask=(c4 < CP4)[None, :] & (rows >= 0)[:, None])
    if COUNT_SAT:
        sat = (v * (s_enc * ONE_SIXTH) > 448.0) & row_ok[:, None]
        tl.atomic_add(sat_ptr, tl.sum(tl.sum(sat.to(tl.int32), axis=1), axis=0))
