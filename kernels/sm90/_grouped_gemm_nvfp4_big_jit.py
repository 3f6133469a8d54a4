"""Triton body of the large-token path of kernels.sm90.grouped_gemm_nvfp4 (CompileKey.big; imported lazily).

Step 1 (_grouped_gemm_nvfp4_jit.grouped_act_decode_planes_kernel, unchanged): the grouped NVFP4
activations are decoded ONCE per GEMM into two fp16 planes [RP, K_ITERS * 64] (RP = Rcap rounded up to
16): plane 0 holds the even k, plane 1 the odd k of every 128-wide K tile, each value e2m1 * e4m3 * 2^-7
(exact), i.e. the very fp16 values (and the k permutation) the per-tile decode of the present kernel
feeds to its MMA. Rows past off[E] and K past the end are zeros; scale padding is never read.

Step 2 (grouped_gemm_nvfp4_big_kernel): the same device-side tile schedule, swap AB and epilogues as
grouped_gemm_nvfp4_kernel, but only the weights are decoded per 128-K tile; the activation tile of each
plane comes by a tensor-descriptor (TMA) load of [BT, 64] fp16 at row off_e + row0 (rows past the plane
are zero-filled; rows of the next expert inside the tile land in token columns the epilogue masks: an
MMA output element depends only on its own weight row and token column). Per K tile the two MMAs are
the present kernel's, in the same order: acc += w_even @ x_even^T, then acc += w_odd @ x_odd^T, fp16
operands of the same values, fp32 accumulation; so every output element sees the same per-element MMA
sequence and the bits equal the present path's at any BT (the token tile is the MMA's N side). Larger
token tiles (BT 128 / 256) let one decoded weight tile feed more MMA work.

The epilogue (_store_tile / _store_zero_tile) is the text of grouped_gemm_nvfp4_kernel's epilogue,
moved into functions; the bit-identity tests (interpreter and GPU) pin the two paths to the same bytes.
"""

import triton
import triton.language as tl

from kernels.sm90._gemm_nvfp4_jit import DECODE_UNSCALE, _load_decoded
from kernels.sm90._grouped_gemm_nvfp4_jit import _round_to_bf16_f32, _schedule, _split_gate_up
from kernels.sm90._te_math import e2m1_code_lt_zero_bits, e4m3_rne_satfinite_u8, e4m3_u8_to_f32


@triton.jit
def _store_tile(acc, e64, pid_n, loc, off_e, pad_e, cnt_e, wr, adec_ptr, wdec_ptr, out_ptr, out2_ptr, hsf_ptr,
                hdec_ptr, N, adec_stride, hdec_stride, limit, OUT_CP,
                EPI: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, CLAMP: tl.constexpr,
                ONE_SIXTH: tl.constexpr, FMAX: tl.constexpr):
    """acc [BN, BT] (decode scale undone) of expert e's local rows `loc` -> the EPI output (see the module
    docstring of _grouped_gemm_nvfp4_jit: bf16 L2 / gate, up float32 / fused SwiGLU + te requant)."""
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


@triton.jit(do_not_specialize=["RCAP", "adec_stride", "hdec_stride", "limit"])
def grouped_gemm_nvfp4_big_kernel(
    w_ptr, wsf_ptr, xlo_desc, xhi_desc, adec_ptr, wdec_ptr, off_ptr,
    out_ptr, out2_ptr, hsf_ptr, hdec_ptr,
    E, N, HALF_K, CP4, RCAP, NP, adec_stride, hdec_stride, limit, OUT_CP,
    K_ITERS: tl.constexpr, EPI: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, E_P: tl.constexpr,
    USE_ASM: tl.constexpr, CLAMP: tl.constexpr, ONE_SIXTH: tl.constexpr, FMAX: tl.constexpr,
):
    """xlo_desc / xhi_desc: tensor descriptors of the even-k / odd-k fp16 planes [RP, K_ITERS * 64], blocks
    [BT, 64]. Everything else as grouped_gemm_nvfp4_kernel (BLOCK_K 128)."""
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
        r0 = off_e + row0                          # first global row of the token tile
        acc = tl.zeros((BN, BT), dtype=tl.float32)
        for it in range(0, K_ITERS):
            w_lo, w_hi = _load_decoded(w_e, wsf_e, wr, N, it * 128, HALF_K, CP4, BN, 128, USE_ASM)
            x_lo = xlo_desc.load([r0, it * 64])
            x_hi = xhi_desc.load([r0, it * 64])
            acc = tl.dot(w_lo, tl.trans(x_lo), acc)
            acc = tl.dot(w_hi, tl.trans(x_hi), acc)
        acc = acc * DECODE_UNSCALE  # exact
        _store_tile(acc, e64, pid_n, loc, off_e, pad_e, cnt_e, wr, adec_ptr, wdec_ptr, out_ptr, out2_ptr, hsf_ptr,
                    hdec_ptr, N, adec_stride, hdec_stride, limit, OUT_CP, EPI, BN, BT, CLAMP, ONE_SIXTH, FMAX)
    else:
        _store_zero_tile(z, off_end, pid_n, wr, out_ptr, out2_ptr, N, RCAP, EPI, BN, BT)
