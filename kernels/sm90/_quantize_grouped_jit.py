"""Triton bodies of kernels.sm90.quantize_grouped (imported lazily by its _compile).

The te math per 16-element block is the one of _quantize_nvfp4_1x16_jit (same helpers from
_te_math); what differs is where a row comes from and which global scale it takes: the grid
runs over the rows of the padded-per-expert scale buffer, so every byte of that buffer
(padding included) is written exactly once and the buffer can come from torch.empty.
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
def expert_of_padded_rows(p, off_ptr, E, E_PAD: tl.constexpr):
    """For padded rows p [BM] (int32) of the grouped scale layout: (expert e in [0, E], the
    row's index inside its expert, that expert's first row in the unpadded order, its row
    count). e == E: p lies past the last expert's padded tiles (count 0, first row = off[E])."""
    ei = tl.arange(0, E_PAD)
    in_e = ei < E
    lo = tl.load(off_ptr + ei, mask=in_e, other=0)
    hi = tl.load(off_ptr + ei + 1, mask=in_e, other=0)
    cnt = hi - lo
    pcnt = (cnt + 127) // 128 * 128
    pend = tl.cumsum(pcnt, axis=0)
    pstart = pend - pcnt
    e = tl.sum(((pend[None, :] <= p[:, None]) & in_e[None, :]).to(tl.int32), axis=1)  # experts ending <= p
    sel = ei[None, :] == e[:, None]
    total = tl.sum(pcnt, axis=0)
    start = tl.where(e < E, tl.sum(tl.where(sel, pstart[None, :], 0), axis=1), total)
    first = tl.where(e < E, tl.sum(tl.where(sel, lo[None, :], 0), axis=1), tl.load(off_ptr + E))
    count = tl.sum(tl.where(sel, cnt[None, :], 0), axis=1)
    return e, p - start, first, count


@triton.jit
def grouped_quantize_te_kernel(
    x_ptr, stride_xm, row_map_ptr, off_ptr, scale_ptr, packed_ptr, sf_i32_ptr,
    R_CAP, K, CP4, E,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
    GATHER: tl.constexpr, STATIC: tl.constexpr, ONE_SIXTH: tl.constexpr, FMAX: tl.constexpr,
):
    # program (pid_m, pid_k): BLOCK_M padded rows x BLOCK_K columns. Row p of the padded layout
    # holds unpadded row r = first[e] + local (local < count[e]) or padding (zero bytes).
    NB: tl.constexpr = BLOCK_K // 16
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    e, local, first, count = expert_of_padded_rows(p, off_ptr, E, E_PAD)
    r = first + local
    valid = (e < E) & (local < count)
    # rows past the last expert's rows (capacity rows) get zero codes: written by the padded rows
    # past the last expert's tiles, which map one to one onto them
    tail = (e == E) & (r < R_CAP)
    if GATHER:
        src = tl.load(row_map_ptr + r, mask=valid, other=0).to(tl.int64)
    else:
        src = r.to(tl.int64)
    if STATIC:
        d = tl.load(scale_ptr + e, mask=e < E, other=1.0)
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
    pmask = (valid | tail)[:, None, None] & col_ok[None, :, None]
    tl.store(packed_ptr + poff, p0, mask=pmask)
    tl.store(packed_ptr + poff + 4, p1, mask=pmask)
    # padding rows / columns and rows of no expert: zero scale bytes (never NaN, whatever S is)
    sf_u8 = tl.where(valid[:, None] & col_ok[None, :], sf_u8, 0)
    sf4 = tl.reshape(sf_u8, (BLOCK_M, NB // 4, 4))
    words = tl.sum(sf4 << (tl.arange(0, 4) * 8)[None, None, :], axis=2)
    c4 = pid_k * (NB // 4) + tl.arange(0, NB // 4)
    woff = (((p // 128) * CP4)[:, None] + c4[None, :]).to(tl.int64) * 128 + ((p % 32) * 4 + (p // 32) % 4)[:, None]
    tl.store(sf_i32_ptr + woff, words, mask=(c4 < CP4)[None, :] & (p >= 0)[:, None])


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
