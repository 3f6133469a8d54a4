"""Triton body of kernels.sm90.grouped_gemm_nvfp4 (imported lazily by its _compile).

One kernel serves the three grouped GEMMs of the MoE block (EPI constexpr):
  EPI 0  y[r, n] = bf16(alpha_e * sum_k a[r, k] w_e[n, k])                      (L2, or any grouped GEMM)
  EPI 1  gate[r, i], up[r, i] float32 from the row-interleaved gate/up stack      (L1, unfused)
  EPI 2  h = silu(min(gate, L)) * clamp(up, -L, L) rounded to bf16, then NVFP4 (te, static
         global scale S_e = 1 / input_scale_e) into packed E2M1 + grouped 128x4 scales   (L1, fused)

Tile schedule, on the device and in every program (no schedule kernel, no host sync): from the
offsets [E+1] each program computes tiles_e = ceil(cnt_e / BT), their inclusive cumsum, and finds
its expert e (the first whose cumsum exceeds its tile index t) and row tile t - start_e; programs
past the expert tiles zero the capacity rows [off[E], Rcap) (BT rows per tile), programs past
those exit. The grid is static: Rcap // BT + min(E, Rcap) + 1 row tiles (a bound on expert tiles
plus zero tiles) times ceil(N / BN) column tiles, N-tile fastest (an activation tile is reused from
L2 by all N tiles while it is hot; the row tiles of one expert run together, so its weights come
from DRAM about once).

Math per tile ("swap AB": the weight rows are the MMA's M side, BN = 64 or 128 of them, the BT tokens its
N side): weight and activation K tiles (128 elements) decoded to fp16 in registers by the dense
kernel's helpers (_gemm_nvfp4_jit._load_decoded: e2m1 * e4m3 * 2^-7, exact), two fp16 MMAs per K
tile (even / odd k) with fp32 accumulation, in a fixed K order; 2^14 (exact) and alpha = a_dec[e] *
w_dec[e] (one float32 product, as the reference forms it) in the epilogue. The K order and the
per-element MMA sequence do not depend on BT, Rcap or the other experts, so an expert's rows give
the same bits alone or among others. No atomics: deterministic.

Rows of expert e: activation rows off[e] .. off[e+1] (packed [Rcap, K/2]); its scale rows start at
pad_e = sum_{j<e} ceil(cnt_j/128)*128 of the grouped 128x4 buffer. Masked loads never touch other
experts' rows or any scale padding.

Weights in the fragment order (Sm90GroupedWeight.fragment_order, W_FRAG: the layout the register-fed Gluon
kernels decode in fewer instructions) are turned back into the checkpoint's bytes right after their load
(_from_fragment_order, integer ops on the tile), so this kernel's arithmetic is the same for either order.
"""

import triton
import triton.language as tl

from kernels.sm90._e2m1_ptx import FRAGMENT_MAG_SHIFTS, FRAGMENT_SIGN_BITS
from kernels.sm90._gemm_nvfp4_jit import DECODE_UNSCALE, _decode, _load_decoded, _load_raw
from kernels.sm90._te_math import e2m1_code_lt_zero_bits, e4m3_rne_satfinite_u8, e4m3_u8_to_f32

# field j of a fragment-order half: sign at bit _FS<j> (moved to bit 3 of the code), magnitude at bits _FM<j> .. + 2
_FS0, _FS1, _FS2, _FS3 = (tl.constexpr(b - 3) for b in FRAGMENT_SIGN_BITS)
_FM0, _FM1, _FM2, _FM3 = (tl.constexpr(b) for b in FRAGMENT_MAG_SHIFTS)


@triton.jit
def _from_fragment_order(b, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed weight bytes [ROWS, BLOCK_K / 2] (int) in the fragment order -> the checkpoint's bytes (uint8, element
    2i in the low nibble). Per 16-byte unit of a row: checkpoint half hx = 4 ch0 + c holds bytes (y = 0, 1) of
    nibbles (n = 0, 1); the fragment-order half 4 y + c holds, as field j = ch0 + 2 n, nibble n of byte y of
    checkpoint half 4 ch0 + c (kernels/sm90/host_prepare_experts.to_fragment_order writes it)."""
    v = tl.reshape(b.to(tl.int32), (ROWS, BLOCK_K // 32, 2, 4, 2))  # (row, unit, y, c, byte of the half)
    lo, hi = tl.split(v)
    h = lo | (hi << 8)
    f0 = ((h >> _FS0) & 8) | ((h >> _FM0) & 7)
    f1 = ((h >> _FS1) & 8) | ((h >> _FM1) & 7)
    f2 = ((h >> _FS2) & 8) | ((h >> _FM2) & 7)
    f3 = ((h >> _FS3) & 8) | ((h >> _FM3) & 7)
    byte = tl.join(f0 | (f2 << 4), f1 | (f3 << 4))  # (row, unit, y, c, ch0)
    return tl.reshape(tl.permute(byte, (0, 1, 4, 3, 2)), (ROWS, BLOCK_K // 2)).to(tl.uint8)


@triton.jit
def _load_weight_tile(w_e, wsf_e, wr, N, kb, HALF_K, CP4, BN: tl.constexpr, BLOCK_K: tl.constexpr,
                      USE_ASM: tl.constexpr, W_FRAG: tl.constexpr):
    """_load_decoded of a weight K tile, in either byte order (W_FRAG: the fragment order)."""
    b, s = _load_raw(w_e, wsf_e, wr, N, kb, HALF_K, CP4, BLOCK_K)
    if W_FRAG:
        b = _from_fragment_order(b, BN, BLOCK_K)
    return _decode(b, s, BN, BLOCK_K, USE_ASM)


@triton.jit
def _round_to_bf16_f32(y):
    """float32 -> the float32 value of its bf16 rounding (RNE on the bit pattern; Inf and NaN stay), so
    the later .to(tl.bfloat16) is exact: the same bits on the GPU and in the interpreter (whose own
    float32 -> bf16 cast truncates)."""
    b = y.to(tl.uint32, bitcast=True)
    r = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
    r = tl.where(y != y, b | 0x00400000, r)  # NaN: keep it a (quiet) NaN
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _pick(vec, idx, e):
    """vec[e] for a scalar e (vec a 1-d tensor indexed by idx)."""
    return tl.sum(tl.where(idx == e, vec, 0), axis=0)


@triton.jit
def _schedule(off_ptr, t, E, BT: tl.constexpr, E_P: tl.constexpr):
    """Tile t -> (is_expert_tile, e, row0 (first local row), cnt_e, off_e, pad_e, off_E, z (zero-tile index))."""
    idx = tl.arange(0, E_P)
    lo = tl.load(off_ptr + idx, mask=idx < E, other=0)
    hi = tl.load(off_ptr + idx + 1, mask=idx < E, other=0)
    cnt = tl.maximum(hi - lo, 0)
    tiles = (cnt + BT - 1) // BT
    cum = tl.cumsum(tiles, axis=0)                 # inclusive
    pads = (cnt + 127) // 128 * 128
    pcum = tl.cumsum(pads, axis=0)
    total = tl.sum(tiles, axis=0)
    off_end = tl.load(off_ptr + E)
    e = tl.sum((cum <= t).to(tl.int32), axis=0)    # first expert whose cumsum exceeds t
    e = tl.minimum(e, E - 1)
    cum_e = _pick(cum, idx, e)
    tiles_e = _pick(tiles, idx, e)
    row0 = (t - (cum_e - tiles_e)) * BT
    cnt_e = _pick(cnt, idx, e)
    off_e = _pick(lo, idx, e)
    pad_e = _pick(pcum, idx, e) - _pick(pads, idx, e)
    return t < total, e, row0, cnt_e, off_e, pad_e, off_end, t - total


@triton.jit
def _split_gate_up(acc, BN: tl.constexpr, BT: tl.constexpr):
    """acc [BN, BT] over row-interleaved weights (row 2i gate i, row 2i+1 up i) -> gate, up [BN/2, BT]."""
    a = tl.permute(tl.reshape(acc, (BN // 2, 2, BT)), (0, 2, 1))
    return tl.split(a)


@triton.jit
def _store_tile(acc, e64, pid_n, loc, off_e, pad_e, cnt_e, wr, adec_ptr, wdec_ptr, out_ptr, out2_ptr, hsf_ptr,
                hdec_ptr, N, adec_stride, hdec_stride, limit, OUT_CP,
                EPI: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, CLAMP: tl.constexpr,
                ONE_SIXTH: tl.constexpr, FMAX: tl.constexpr):
    """acc [BN, BT] (decode scale undone) of expert e's local rows `loc` -> the EPI output (see the module
    docstring: bf16 L2 / gate, up float32 / fused SwiGLU + te requant); both grouped kernels end here."""
    adec = tl.load(adec_ptr + e64 * adec_stride)
    rows = off_e + loc                         # global activation rows
    row_ok = loc < cnt_e
    if EPI == 0:
        alpha = adec * tl.load(wdec_ptr + e64)
        o = rows.to(tl.int64)[None, :] * N + wr[:, None]
        tl.store(out_ptr + o, _round_to_bf16_f32(acc * alpha).to(tl.bfloat16), mask=(wr < N)[:, None] & row_ok[None, :])
    else:
        g, u = _split_gate_up(acc, BN, BT)
        g = g * (adec * tl.load(wdec_ptr + e64 * 2))
        u = u * (adec * tl.load(wdec_ptr + e64 * 2 + 1))
        I = N // 2
        ic = pid_n * (BN // 2) + tl.arange(0, BN // 2)   # intermediate columns
        if EPI == 1:
            o = rows.to(tl.int64)[None, :] * I + ic[:, None]
            m = (ic < I)[:, None] & row_ok[None, :]
            tl.store(out_ptr + o, g, mask=m)
            tl.store(out2_ptr + o, u, mask=m)
        else:
            if CLAMP:
                u = tl.minimum(tl.maximum(u, -limit), limit)
                g = tl.minimum(g, limit)
            h = (g / (1.0 + tl.exp(-g))) * u
            h = _round_to_bf16_f32(h)   # h is bf16 at the stage boundary (as the unfused path)
            # NVFP4 te, static: S = 1 / input_scale (float32 division), per 16 columns of a row
            s_enc = tl.div_rn(1.0, tl.load(hdec_ptr + e64 * hdec_stride))
            NB: tl.constexpr = BN // 32
            hb = tl.reshape(h, (NB, 16, BT))
            v = tl.max(tl.abs(hb), axis=1)        # maxnum: NaN elements ignored
            v = tl.where(v == v, v, 0.0)
            scale_f32 = tl.minimum(v * (s_enc * ONE_SIXTH), FMAX, propagate_nan=tl.PropagateNan.ALL)
            sf_u8 = e4m3_rne_satfinite_u8(scale_f32)           # [NB, BT]
            inv_s = tl.div_rn(1.0, s_enc)
            enc = tl.div_rn(1.0, e4m3_u8_to_f32(sf_u8) * inv_s)
            enc = tl.minimum(enc, FMAX, propagate_nan=tl.PropagateNan.ALL)
            codes = e2m1_code_lt_zero_bits(hb * enc[:, None, :])  # [NB, 16, BT]
            lo, hi = tl.split(tl.permute(tl.reshape(codes, (NB, 8, 2, BT)), (0, 1, 3, 2)))
            byte = (lo | (hi << 4)).to(tl.uint8)                 # [NB, 8, BT]
            blk = pid_n * NB + tl.arange(0, NB)
            col = blk[:, None] * 8 + tl.arange(0, 8)[None, :]   # byte column of h_packed
            po = rows.to(tl.int64)[None, None, :] * (I // 2) + col[:, :, None]
            tl.store(out_ptr + po, byte, mask=(col < I // 2)[:, :, None] & row_ok[None, None, :])
            srow = pad_e + loc
            so = ((((srow // 128) * (OUT_CP // 4))[None, :] + (blk // 4)[:, None]) * 512
                  + ((srow % 32) * 16 + ((srow // 32) % 4) * 4)[None, :] + (blk % 4)[:, None])
            tl.store(hsf_ptr + so.to(tl.int64), sf_u8.to(tl.uint8),
                     mask=(blk < I // 16)[:, None] & row_ok[None, :])


@triton.jit
def _store_zero_tile(z, off_end, pid_n, wr, out_ptr, out2_ptr, N, RCAP,
                     EPI: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr):
    """Capacity rows past off[E]: zeros (BT rows of this column tile for zero tile z)."""
    zr = off_end + z * BT + tl.arange(0, BT)
    zok = (zr < RCAP) & (z * BT < RCAP - off_end)
    if EPI == 0:
        zo = zr.to(tl.int64)[None, :] * N + wr[:, None]
        tl.store(out_ptr + zo, tl.zeros((BN, BT), dtype=tl.bfloat16), mask=(wr < N)[:, None] & zok[None, :])
    elif EPI == 1:
        zic = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        zo = zr.to(tl.int64)[None, :] * (N // 2) + zic[:, None]
        zm = (zic < N // 2)[:, None] & zok[None, :]
        tl.store(out_ptr + zo, tl.zeros((BN // 2, BT), dtype=tl.float32), mask=zm)
        tl.store(out2_ptr + zo, tl.zeros((BN // 2, BT), dtype=tl.float32), mask=zm)
    else:
        zcol = pid_n * (BN // 4) + tl.arange(0, BN // 4)
        zo = zr.to(tl.int64)[None, :] * (N // 4) + zcol[:, None]
        tl.store(out_ptr + zo, tl.zeros((BN // 4, BT), dtype=tl.uint8), mask=(zcol < N // 4)[:, None] & zok[None, :])


@triton.jit(do_not_specialize=["RCAP", "adec_stride", "hdec_stride", "limit", "PLANE"])
def grouped_gemm_nvfp4_kernel(
    w_ptr, wsf_ptr, x_ptr, xsf_ptr, adec_ptr, wdec_ptr, off_ptr,
    out_ptr, out2_ptr, hsf_ptr, hdec_ptr, planes_ptr,
    E, N, HALF_K, CP4, RCAP, NP, adec_stride, hdec_stride, limit, OUT_CP, PLANE,
    K_ITERS: tl.constexpr, X_F16: tl.constexpr, EPI: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, BLOCK_K: tl.constexpr, E_P: tl.constexpr,
    USE_ASM: tl.constexpr, CLAMP: tl.constexpr, ONE_SIXTH: tl.constexpr, FMAX: tl.constexpr, W_FRAG: tl.constexpr,
):
    NT = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    pid_n = pid % NT
    t = pid // NT
    is_tile, e, row0, cnt_e, off_e, pad_e, off_end, z = _schedule(off_ptr, t, E, BT, E_P)
    e64 = e.to(tl.int64)
    loc = row0 + tl.arange(0, BT)                  # local rows of expert e
    wr = pid_n * BN + tl.arange(0, BN)             # weight rows (output columns) of this tile
    if is_tile:
        w_e = w_ptr + e64 * N * HALF_K
        wsf_e = wsf_ptr + e64 * NP * CP4
        x_e = x_ptr + off_e.to(tl.int64) * HALF_K
        xsf_e = xsf_ptr + pad_e.to(tl.int64) * CP4
        acc = tl.zeros((BN, BT), dtype=tl.float32)
        for it in range(0, K_ITERS):
            kb = it * BLOCK_K
            w_lo, w_hi = _load_weight_tile(w_e, wsf_e, wr, N, kb, HALF_K, CP4, BN, BLOCK_K, USE_ASM, W_FRAG)
            if X_F16:  # the same fp16 values, decoded once per GEMM (grouped_act_decode_planes_kernel)
                xo = (off_e + loc).to(tl.int64)[:, None] * (K_ITERS * BLOCK_K // 2) + (kb // 2 + tl.arange(0, BLOCK_K // 2))[None, :]
                x_lo = tl.load(planes_ptr + xo, mask=(loc < cnt_e)[:, None], other=0.0)
                x_hi = tl.load(planes_ptr + PLANE + xo, mask=(loc < cnt_e)[:, None], other=0.0)
            else:
                x_lo, x_hi = _load_decoded(x_e, xsf_e, loc, cnt_e, kb, HALF_K, CP4, BT, BLOCK_K, USE_ASM)
            acc = tl.dot(w_lo, tl.trans(x_lo), acc)
            acc = tl.dot(w_hi, tl.trans(x_hi), acc)
        acc = acc * DECODE_UNSCALE  # exact
        _store_tile(acc, e64, pid_n, loc, off_e, pad_e, cnt_e, wr, adec_ptr, wdec_ptr, out_ptr, out2_ptr, hsf_ptr,
                    hdec_ptr, N, adec_stride, hdec_stride, limit, OUT_CP, EPI, BN, BT, CLAMP, ONE_SIXTH, FMAX)
    else:
        _store_zero_tile(z, off_end, pid_n, wr, out_ptr, out2_ptr, N, RCAP, EPI, BN, BT)


@triton.jit(do_not_specialize=["PLANE"])
def grouped_act_decode_planes_kernel(x_ptr, xsf_ptr, off_ptr, planes_ptr, E, HALF_K, CP4, PLANE,
                                     K_ITERS: tl.constexpr, BLOCK_R: tl.constexpr, E_P: tl.constexpr,
                                     USE_ASM: tl.constexpr, TILE128: tl.constexpr = False, KT_PER: tl.constexpr = 1):
    """Large-count path, step 1: the grouped activations [Rcap, K] -> two fp16 planes [Rcap, K_ITERS*64]
    (even k, odd k of each 128-wide K tile) of e2m1 * e4m3 * 2^-7 (exact), exactly the values the GEMM
    would decode per tile, so X_F16 gives the same bits. Row r of expert e (off[e] <= r < off[e+1]) reads
    its scales at row pad_e + r - off[e]; rows past off[E] and K past the end are zero.
    TILE128 (the large-token path's k128 variant): one tensor [Rcap, K_ITERS*128] instead, K tile i at
    columns 128 i .. 128 i + 127, its 64 even k then its 64 odd k (PLANE unused).
    A program decodes BLOCK_R rows x KT_PER K tiles (tiles KT_PER * pid1 ..; past K_ITERS nothing): the rows'
    expert lookup (a scan and three reductions over the E_P offsets, most of the instructions of a 16 x 128 tile)
    is done once for its KT_PER tiles."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    idx = tl.arange(0, E_P)
    lo = tl.load(off_ptr + idx, mask=idx < E, other=0)
    hi = tl.load(off_ptr + idx + 1, mask=idx < E, other=0)
    cnt = tl.maximum(hi - lo, 0)
    pads = (cnt + 127) // 128 * 128
    pstart = tl.cumsum(pads, axis=0) - pads
    off_end = tl.load(off_ptr + E)
    # expert of each row: the number of experts whose rows end at or before it
    e_r = tl.sum(((hi[None, :] <= rows[:, None]) & (idx < E)[None, :]).to(tl.int32), axis=1)
    sel = idx[None, :] == e_r[:, None]
    off_r = tl.sum(tl.where(sel, lo[None, :], 0), axis=1)
    pad_r = tl.sum(tl.where(sel, pstart[None, :], 0), axis=1)
    ok = rows < off_end
    srow = tl.where(ok, pad_r + rows - off_r, 0)
    xrow = rows.to(tl.int64)[:, None] * HALF_K
    srow_off = ((srow // 128) * CP4)[:, None] * 128 + ((srow % 32) * 4 + (srow // 32) % 4)[:, None]
    if TILE128:
        orow = rows.to(tl.int64)[:, None] * (K_ITERS * 128)
    else:
        orow = rows.to(tl.int64)[:, None] * (K_ITERS * 64)
    for j in tl.static_range(KT_PER):
        kt = tl.program_id(1) * KT_PER + j
        if kt < K_ITERS:
            kb = kt * 128
            pcols = kb // 2 + tl.arange(0, 64)
            b = tl.load(x_ptr + xrow + pcols[None, :], mask=ok[:, None] & (pcols < HALF_K)[None, :], other=0)
            c4 = kb // 64 + tl.arange(0, 2)
            w = tl.load(xsf_ptr + srow_off + c4[None, :] * 128, mask=ok[:, None] & (c4 < CP4)[None, :], other=0)
            sc = (w[:, :, None] >> (tl.arange(0, 4) * 8)[None, None, :]) & 0xFF
            sc = tl.reshape(sc, (BLOCK_R, 8))
            c = kb // 16 + tl.arange(0, 8)
            sc = tl.where((c < HALF_K // 8)[None, :], sc, 0)
            x_lo, x_hi = _decode(b, sc, BLOCK_R, 128, USE_ASM)
            if TILE128:
                o = orow + (kb + tl.arange(0, 64))[None, :]
                tl.store(planes_ptr + o, x_lo)
                tl.store(planes_ptr + 64 + o, x_hi)
            else:
                o = orow + (kb // 2 + tl.arange(0, 64))[None, :]
                tl.store(planes_ptr + o, x_lo)
                tl.store(planes_ptr + PLANE + o, x_hi)
