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

The k128 variant (K128 True, CompileKey.k128; the same kernel, one constexpr): one K = 128 MMA per K tile, the same
per-element MMA sequence in one tl.dot: the weight tile [BN, 128] is the decoded even-k half then the odd-k half
(columns 0..63 k = kb + 2j, 64..127 k = kb + 2j + 1), the token tile [BT, 128] one TMA load of the tile-interleaved
activations (grouped_act_decode_planes_kernel with TILE128: the same 64 even k then 64 odd k per K tile). Triton
issues the K = 128 dot as 8 wgmma k16 steps in column order: steps 0-3 over the even k, 4-7 over the odd k, one fp32
accumulator chain: exactly the two-dot sequence, so the same bits. With one dot per tile the MMA is no longer waited
on between the halves (only the async wgmma of tile i is in flight while tile i + 1 decodes).

The epilogue (_store_tile / _store_zero_tile) is grouped_gemm_nvfp4_kernel's own (one function in
_grouped_gemm_nvfp4_jit for both kernels); the bit-identity tests (interpreter and GPU) pin the two paths to the
same bytes.
"""

import triton
import triton.language as tl

from kernels.sm90._gemm_nvfp4_jit import DECODE_UNSCALE
from kernels.sm90._grouped_gemm_nvfp4_jit import _load_weight_tile, _schedule, _store_tile, _store_zero_tile


@triton.jit
def _cat_k(lo, hi, ROWS: tl.constexpr):
    """[ROWS, 64] even-k and odd-k halves -> [ROWS, 128]: columns 0..63 lo, 64..127 hi."""
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (ROWS, 128))


@triton.jit(do_not_specialize=["RCAP", "adec_stride", "hdec_stride", "limit"])
def grouped_gemm_nvfp4_big_kernel(
    w_ptr, wsf_ptr, x_desc, xhi_desc, adec_ptr, wdec_ptr, off_ptr,
    out_ptr, out2_ptr, hsf_ptr, hdec_ptr,
    E, N, HALF_K, CP4, RCAP, NP, adec_stride, hdec_stride, limit, OUT_CP,
    K_ITERS: tl.constexpr, EPI: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, E_P: tl.constexpr,
    USE_ASM: tl.constexpr, CLAMP: tl.constexpr, ONE_SIXTH: tl.constexpr, FMAX: tl.constexpr, K128: tl.constexpr,
    W_FRAG: tl.constexpr,
):
    """K128 False (two MMAs a K tile): x_desc / xhi_desc are tensor descriptors of the even-k / odd-k fp16 planes
    [RP, K_ITERS * 64], blocks [BT, 64]. K128 True (CompileKey.k128, one MMA a K tile): x_desc is the descriptor of
    the tile-interleaved fp16 activations [RP, K_ITERS * 128], block [BT, 128], and xhi_desc None. Everything else as
    grouped_gemm_nvfp4_kernel (BLOCK_K 128)."""
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
            w_lo, w_hi = _load_weight_tile(w_e, wsf_e, wr, N, it * 128, HALF_K, CP4, BN, 128, USE_ASM, W_FRAG)
            if K128:
                x = x_desc.load([r0, it * 128])
                acc = tl.dot(_cat_k(w_lo, w_hi, BN), tl.trans(x), acc)
            else:
                x_lo = x_desc.load([r0, it * 64])
                x_hi = xhi_desc.load([r0, it * 64])
                acc = tl.dot(w_lo, tl.trans(x_lo), acc)
                acc = tl.dot(w_hi, tl.trans(x_hi), acc)
        acc = acc * DECODE_UNSCALE  # exact
        _store_tile(acc, e64, pid_n, loc, off_e, pad_e, cnt_e, wr, adec_ptr, wdec_ptr, out_ptr, out2_ptr, hsf_ptr,
                    hdec_ptr, N, adec_stride, hdec_stride, limit, OUT_CP, EPI, BN, BT, CLAMP, ONE_SIXTH, FMAX)
    else:
        _store_zero_tile(z, off_end, pid_n, wr, out_ptr, out2_ptr, N, RCAP, EPI, BN, BT)
