"""Triton bodies of kernels.sm90.quantize_grouped (imported lazily by its _compile).

The te math per 16-element block is the one of _quantize_nvfp4_1x16_jit (same helpers from
_te_math); what differs is where a row comes from and which global scale it takes. The grid
runs over the capacity rows (expert order), not over the padded scale rows: the work is
proportional to the routed rows, never to the E * 127 rows of per-expert padding (which the
caller's zero-filled scale buffer already holds).
"""

import triton
import triton.language as tl

from kernels.sm90._te_math import e2m1_code_lt_zero_bits, e4m3_rne_satfinite_u8, e4m3_u8_to_f32


@triton.jit
def _pack_e2m1x2_low_first(codes):
    """int32 codes [..., 8] (one half block) -> uint8 [..., 4]: element 2i in the low nibble."""
    lo, hi = tl.split(tl.reshape(codes, codes.shape[:-1] + (4, 2)))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def _enc_from_amax(amax, FMAX: tl.constexpr, NUM: tl.constexpr):
    s = tl.minimum(tl.div_rn(NUM, amax), FMAX)
    return tl.where((amax == 0.0) | (s == 0.0), 1.0, s)


@triton.jit
def padded_starts_kernel(off_ptr, pstart_ptr, E, E_PAD: tl.constexpr):
    """One program: pstart[e] = sum_{j<e} ceil(cnt_j / 128) * 128 for e in [0, E] (expert e's first row
    of the padded-per-expert scale layout; pstart[E] is the padded total)."""
    ei = tl.arange(0, E_PAD)
    in_e = ei < E
    lo = tl.load(off_ptr + ei, mask=in_e, other=0)
    hi = tl.load(off_ptr + ei + 1, mask=in_e, other=0)
    pcnt = (hi - lo + 127) // 128 * 128
    pend = tl.cumsum(pcnt, axis=0)
    tl.store(pstart_ptr + ei, pend - pcnt, mask=in_e)
    tl.store(pstart_ptr + E + tl.arange(0, 1), tl.zeros([1], tl.int32) + tl.sum(pcnt, axis=0))


@triton.jit
def grouped_quantize_te_kernel(
    x_ptr, stride_xm, row_map_ptr, off_ptr, pstart_ptr, scale_ptr, packed_ptr, sf_i32_ptr,
    R_CAP, K, CP4, E,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, LOG2_E: tl.constexpr,
    GATHER: tl.constexpr, STATIC: tl.constexpr, ONE_SIXTH: tl.constexpr, FMAX: tl.constexpr,
):
    # program (pid_m, pid_k): BLOCK_M rows of the capacity R_CAP (expert order) x BLOCK_K columns.
    # Row r < offsets[E] belongs to the expert e with offsets[e] <= r < offsets[e+1] (a binary search
    # over the offsets) and lands on padded scale row pstart[e] + r - offsets[e]; rows past offsets[E]
    # get zero codes and no scale bytes (the scale buffer arrives zeroed: padding stays zero).
    NB: tl.constexpr = BLOCK_K // 16
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_cap = r < R_CAP
    valid = in_cap & (r >= tl.load(off_ptr)) & (r < tl.load(off_ptr + E))
    lo = tl.zeros([BLOCK_M], tl.int32)
    hi = tl.zeros([BLOCK_M], tl.int32) + (E - 1)
    for _ in tl.static_range(LOG2_E + 1):  # largest e in [0, E-1] with offsets[e] <= r
        mid = (lo + hi + 1) // 2
        go = tl.load(off_ptr + mid, mask=valid, other=0) <= r
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    e = lo
    p = tl.load(pstart_ptr + e, mask=valid, other=0) + r - tl.load(off_ptr + e, mask=valid, other=0)
    if GATHER:
        src = tl.load(row_map_ptr + r, mask=valid, other=0).to(tl.int64)
    else:
        src = r.to(tl.int64)
    if STATIC:
        d = tl.load(scale_ptr + e, mask=valid, other=1.0)
        s_enc = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), d)  # S = 1/D, IEEE (as the emulator forms it)
    else:
        s_enc = tl.load(scale_ptr + tl.zeros([BLOCK_M], tl.int32))
    s_enc = s_enc[:, None]
    blk = pid_k * NB + tl.arange(0, NB)
    e8 = tl.arange(0, 8)
    col_ok = blk * 16 < K
    off0 = src[:, None, None] * stride_xm + (blk * 16)[None, :, None] + e8[None, None, :]
    mask = valid[:, None, None] & col_ok[None, :, None]
    x0 = tl.load(x_ptr + off0, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + off0 + 8, mask=mask, other=0.0).to(tl.float32)
    v = tl.maximum(tl.max(tl.abs(x0), axis=2), tl.max(tl.abs(x1), axis=2))
    v = tl.where(v == v, v, 0.0)  # fmaxf: NaN elements do not raise the block max
    scale_f32 = tl.minimum(v * (s_enc * ONE_SIXTH), FMAX, propagate_nan=tl.PropagateNan.ALL)
    sf_u8 = e4m3_rne_satfinite_u8(scale_f32)
    inv_s = tl.div_rn(tl.full([BLOCK_M, 1], 1.0, tl.float32), s_enc)
    enc = tl.div_rn(tl.full([BLOCK_M, NB], 1.0, tl.float32), e4m3_u8_to_f32(sf_u8) * inv_s)
    enc = tl.minimum(enc, FMAX, propagate_nan=tl.PropagateNan.ALL)[:, :, None]
    keep = valid[:, None, None] & col_ok[None, :, None]
    p0 = _pack_e2m1x2_low_first(tl.where(keep, e2m1_code_lt_zero_bits(x0 * enc), 0))
    p1 = _pack_e2m1x2_low_first(tl.where(keep, e2m1_code_lt_zero_bits(x1 * enc), 0))
    e4 = tl.arange(0, 4)
    poff = r.to(tl.int64)[:, None, None] * (K // 2) + (blk * 8)[None, :, None] + e4[None, None, :]
    pmask = in_cap[:, None, None] & col_ok[None, :, None]
    tl.store(packed_ptr + poff, p0, mask=pmask)
    tl.store(packed_ptr + poff + 4, p1, mask=pmask)
    # scale words of the valid rows (block columns past K/16 inside the last word are zero)
    sf_u8 = tl.where(valid[:, None] & col_ok[None, :], sf_u8, 0)
    sf4 = tl.reshape(sf_u8, (BLOCK_M, NB // 4, 4))
    words = tl.sum(sf4 << (tl.arange(0, 4) * 8)[None, None, :], axis=2)
    c4 = pid_k * (NB // 4) + tl.arange(0, NB // 4)
    woff = (((p // 128) * CP4)[:, None] + c4[None, :]).to(tl.int64) * 128 + ((p % 32) * 4 + (p // 32) % 4)[:, None]
    tl.store(sf_i32_ptr + woff, words, mask=(c4 < CP4)[None, :] & valid[:, None])


@triton.jit
def amax_partial_kernel(x_ptr, stride_xm, n_ptr, part_ptr, M_CAP, K, n_progs,
                        N_ITERS: tl.constexpr, K_TILES: tl.constexpr, HAS_N: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program pid: max |x| (NaN ignored) over the row tiles pid, pid + n_progs, ... of the capacity
    (N_ITERS of them) below n = min(M_CAP, *n_ptr) (HAS_N) or M_CAP. The trip counts are constexprs
    derived from the capacity shape, so the count n itself is only read on the device."""
    pid = tl.program_id(0)
    if HAS_N:
        n = tl.minimum(tl.load(n_ptr), M_CAP)
    else:
        n = M_CAP
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for i in range(N_ITERS):
        rows = (pid + i * n_progs) * BLOCK_M + tl.arange(0, BLOCK_M)
        for kt in range(K_TILES):
            cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :],
                        mask=(rows < n)[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
            ax = tl.abs(x)
            acc = tl.maximum(acc, tl.where(ax == ax, ax, 0.0))
    tl.store(part_ptr + pid, tl.max(tl.max(acc, axis=1), axis=0))


@triton.jit
def amax_final_kernel(part_ptr, n_parts, enc_ptr, dec_ptr, E,
                      BLOCK: tl.constexpr, E_PAD: tl.constexpr, FMAX: tl.constexpr, NUM: tl.constexpr):
    """S = te_global_enc_scale(max of the n_parts <= BLOCK partials) -> enc_ptr[0]; 1/S (IEEE) -> dec_ptr[:E]."""
    offs = tl.arange(0, BLOCK)
    s = _enc_from_amax(tl.max(tl.load(part_ptr + offs, mask=offs < n_parts, other=0.0), axis=0), FMAX, NUM)
    tl.store(enc_ptr + tl.arange(0, 1), tl.zeros([1], tl.float32) + s)
    ei = tl.arange(0, E_PAD)
    d = tl.div_rn(tl.full([E_PAD], 1.0, tl.float32), tl.zeros([E_PAD], tl.float32) + s)
    tl.store(dec_ptr + ei, d, mask=ei < E)
