"""Triton bodies of kernels.sm90.gemm_nvfp4 (imported lazily by its _compile).

The kernel computes C[rx, ry] = sum_k X[rx, k] * Y[ry, k] for two NVFP4 operands in the
same layout (packed [rows, K/2], element 2i in the low nibble; E4M3 block scales 128x4
swizzled). X feeds the MMA's M side, Y its N side: X = A, Y = B normally; X = B, Y = A
for small M ("swap-AB"), where the output is written transposed through its strides.

Decode in registers: each byte's low nibble is element 2j, high nibble element 2j+1.
Instead of interleaving them, the kernel runs two MMAs per K tile, one over the even
and one over the odd elements (the same permutation of k on both operands, so only
the accumulation order changes). Values are decoded to fp16 as e2m1 * e4m3 * 2^-7
(exact in fp16: at most 6 significant bits, magnitudes 2^-17 .. 21), fp16 MMA with
fp32 accumulation, 2^14 (exact) and alpha (a GPU scalar) in the epilogue.
"""

import triton
import triton.language as tl

from kernels.sm90._consts import DECODE_UNSCALE as _DECODE_UNSCALE
from kernels.sm90._e2m1_ptx import block_to_f16x2_ptx, bytes_to_f16x2_ptx

# Decode (exact, in fp16): the E2M1 code's 3 magnitude bits go to fp16 bits 9-11 and its
# sign to bit 15, which reads as e2m1 * 2^-14 (0.5 lands on the fp16 subnormal 2^-15);
# the E4M3 scale is converted to fp16 as scale * 2^7 (<= 57344). Their product is
# e2m1 * scale * 2^-7, exact (at most 6 significant bits, 2^-17 .. 21), so a product of
# two operands is the true product * 2^-14 and the fp32 accumulator is the true sum *
# 2^-14, with the same roundings (a power-of-2 factor far from under/overflow): the
# epilogue multiplies by 2^14, exactly, before alpha.
DECODE_UNSCALE = tl.constexpr(_DECODE_UNSCALE)


@triton.jit
def _e2m1_nibbles_to_f16_arith(b_u8):
    """(low nibble, high nibble) of each byte -> two fp16 tensors of e2m1 * 2^-14 (portable path)."""
    b = b_u8.to(tl.int32)
    lo = ((b & 7) << 9) | ((b & 8) << 12)
    hi = ((b & 0x70) << 5) | ((b & 0x80) << 8)
    return lo.to(tl.int16).to(tl.float16, bitcast=True), hi.to(tl.int16).to(tl.float16, bitcast=True)


_BYTES_TO_F16X2_ASM = tl.constexpr(bytes_to_f16x2_ptx())


@triton.jit
def _e2m1_nibbles_to_f16_asm(b_u8):
    """Same values as the arithmetic path, 4 bytes per instance, both nibbles in one asm
    block (kernels/sm90/_e2m1_ptx.bytes_to_f16x2_ptx: prmt puts byte 2j in bits 8-15 and
    byte 2j+1 in bits 24-31, then each nibble at the top of an fp16 half becomes e2m1 * 2^-14)."""
    return tl.inline_asm_elementwise(
        asm=_BYTES_TO_F16X2_ASM,
        constraints="=r,=r,=r,=r,r",
        args=[b_u8],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _e4m3_u8_to_f16_x128(s):
    """E4M3 byte (int32 0..255) -> fp16 equal to its value * 2^7 (exact, <= 57344); 0x7F/0xFF -> NaN.
    The byte shifted into fp16's exponent/mantissa fields reads as value * 2^-8
    (subnormals included); the multiply by 2^15 is exact."""
    h = ((s & 0x80) << 8) | ((s & 0x7F) << 7)
    f = h.to(tl.int16).to(tl.float16, bitcast=True) * 32768.0
    return tl.where((s & 0x7F) == 0x7F, float("nan"), f)


@triton.jit
def _load_raw(p_ptr, sf_ptr, rows, R, kb, HALF_K, CP4, BLOCK_K: tl.constexpr):
    """Packed bytes [ROWS, BLOCK_K/2] and scale bytes [ROWS, BLOCK_K/16] (int32) of a K tile
    (masked: 0). HALF_K (= K/2, the row stride) is an argument so that Triton sees its
    divisibility and loads 16 bytes per access; scales are loaded as the little-endian
    int32 words of four consecutive blocks of a row (the 128x4 layout keeps c % 4 in the
    low two address bits), one word per 64 elements. BLOCK_K is a multiple of 64."""
    pcols = kb // 2 + tl.arange(0, BLOCK_K // 2)
    row_ok = rows < R
    b = tl.load(p_ptr + rows.to(tl.int64)[:, None] * HALF_K + pcols[None, :],
                mask=row_ok[:, None] & (pcols < HALF_K)[None, :], other=0)
    c4 = kb // 64 + tl.arange(0, BLOCK_K // 64)
    woff = (((rows // 128) * CP4)[:, None] + c4[None, :]) * 128 + ((rows % 32) * 4 + (rows // 32) % 4)[:, None]
    w = tl.load(sf_ptr + woff, mask=row_ok[:, None] & (c4 < CP4)[None, :], other=0)
    s = (w[:, :, None] >> (tl.arange(0, 4) * 8)[None, None, :]) & 0xFF
    s = tl.reshape(s, (rows.shape[0], BLOCK_K // 16))
    c = kb // 16 + tl.arange(0, BLOCK_K // 16)
    s = tl.where((c < HALF_K // 8)[None, :], s, 0)  # blocks past K (scale padding): 0
    return b, s


@triton.jit
def _decode(b, s, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """-> (even-k, odd-k) fp16 [ROWS, BLOCK_K/2]: e2m1 value * e4m3 block scale * 2^-7, exact."""
    s16 = _e4m3_u8_to_f16_x128(s)
    s16 = tl.reshape(tl.broadcast_to(s16[:, :, None], (ROWS, BLOCK_K // 16, 8)), (ROWS, BLOCK_K // 2))
    if USE_ASM:
        lo, hi = _e2m1_nibbles_to_f16_asm(b)
    else:
        lo, hi = _e2m1_nibbles_to_f16_arith(b)
    return lo * s16, hi * s16


@triton.jit
def _load_decoded(p_ptr, sf_ptr, rows, R, kb, HALF_K, CP4,
                  ROWS: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    b, s = _load_raw(p_ptr, sf_ptr, rows, R, kb, HALF_K, CP4, BLOCK_K)
    return _decode(b, s, ROWS, BLOCK_K, USE_ASM)


@triton.jit
def _store_acc(acc, off, mask, split_off, alpha_ptr, out_ptr, ws_ptr, USE_WS: tl.constexpr):
    """Epilogue of every GEMM here: bf16(acc * alpha) into out, or, split over K, the fp32 partial
    into its workspace slice (split_off elements in), which splitk_reduce_kernel sums in a fixed order.
    acc has the decode scale already undone (exact: see _decode)."""
    if USE_WS:
        tl.store(ws_ptr + split_off + off, acc, mask=mask)
    else:
        alpha = tl.load(alpha_ptr)
        tl.store(out_ptr + off, (acc * alpha).to(tl.bfloat16), mask=mask)


@triton.jit
def gemm_nvfp4_kernel(
    x_ptr, xsf_ptr, y_ptr, ysf_ptr, alpha_ptr, out_ptr, ws_ptr,
    RX, RY, HALF_K, CP4, stride_ox, stride_oy, iters_per_split,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_WS: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    pid_s = tl.program_id(2)
    rx = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    ry = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)
    acc = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    K = HALF_K * 2
    k_iters = tl.cdiv(K, BLOCK_K)
    it0 = pid_s * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, k_iters)
    for it in range(it0, it1):
        # the packed bytes are 16-byte loads that Triton pipelines through shared memory
        # (cp.async, num_stages deep); decode in registers, two MMAs (even / odd k)
        kb = it * BLOCK_K
        x_lo, x_hi = _load_decoded(x_ptr, xsf_ptr, rx, RX, kb, HALF_K, CP4, BLOCK_X, BLOCK_K, USE_ASM)
        y_lo, y_hi = _load_decoded(y_ptr, ysf_ptr, ry, RY, kb, HALF_K, CP4, BLOCK_Y, BLOCK_K, USE_ASM)
        acc = tl.dot(x_lo, tl.trans(y_lo), acc)
        acc = tl.dot(x_hi, tl.trans(y_hi), acc)
    mask = (rx < RX)[:, None] & (ry < RY)[None, :]
    off = rx.to(tl.int64)[:, None] * stride_ox + ry.to(tl.int64)[None, :] * stride_oy
    _store_acc(acc * DECODE_UNSCALE, off, mask, pid_s.to(tl.int64) * RX * RY, alpha_ptr, out_ptr, ws_ptr, USE_WS)


@triton.jit
def decode_nvfp4_to_f16_planes_kernel(p_ptr, sf_ptr, out_ptr, R, HALF_K, CP4, PLANE, HALF_KP,
                                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Decode-size path, step 1: the activations [R, K] -> two fp16 planes [Rp, Kp/2] (even k,
    odd k) of e2m1 * e4m3 block scale * 2^-7 (exact), zero past R and K (the grid covers
    Rp x Kp, the padded sizes, so the GEMM loads them unmasked)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1) * BLOCK_K
    lo, hi = _load_decoded(p_ptr, sf_ptr, rows, R, kb, HALF_K, CP4, BLOCK_R, BLOCK_K, USE_ASM)
    off = rows.to(tl.int64)[:, None] * HALF_KP + (kb // 2 + tl.arange(0, BLOCK_K // 2))[None, :]
    tl.store(out_ptr + off, lo)
    tl.store(out_ptr + PLANE + off, hi)


@triton.jit
def gemm_nvfp4_f16act_kernel(
    w_ptr, wsf_ptr, xp_ptr, alpha_ptr, out_ptr, ws_ptr,
    N, M, HALF_K, CP4, PLANE, HALF_KP, stride_on, stride_om, iters_per_split,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_WS: tl.constexpr, USE_ASM: tl.constexpr,
):
    """Decode-size path, step 2 (swap-AB): acc[n, m] = sum_k W[n, k] * X[m, k], the weights
    decoded in registers per K tile (as in gemm_nvfp4_kernel), the activations read from the
    planes of decode_nvfp4_to_f16_planes_kernel (pipelined fp16 loads straight into the
    MMA's shared-memory operand: no per-CTA activation decode)."""
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    pid_s = tl.program_id(2)
    rx = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    ry = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)
    y_ptrs = xp_ptr + ry.to(tl.int64)[:, None] * HALF_KP + tl.arange(0, BLOCK_K // 2)[None, :]
    acc = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    K = HALF_K * 2
    k_iters = tl.cdiv(K, BLOCK_K)
    it0 = pid_s * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, k_iters)
    for it in range(it0, it1):
        kb = it * BLOCK_K
        x_lo, x_hi = _load_decoded(w_ptr, wsf_ptr, rx, N, kb, HALF_K, CP4, BLOCK_X, BLOCK_K, USE_ASM)
        y_lo = tl.load(y_ptrs + kb // 2)
        y_hi = tl.load(y_ptrs + PLANE + kb // 2)
        acc = tl.dot(x_lo, tl.trans(y_lo), acc)
        acc = tl.dot(x_hi, tl.trans(y_hi), acc)
    mask = (rx < N)[:, None] & (ry < M)[None, :]
    off = rx.to(tl.int64)[:, None] * stride_on + ry.to(tl.int64)[None, :] * stride_om
    _store_acc(acc * DECODE_UNSCALE, off, mask, pid_s.to(tl.int64) * N * M, alpha_ptr, out_ptr, ws_ptr, USE_WS)


@triton.jit
def splitk_reduce_kernel(ws_ptr, alpha_ptr, out_ptr, numel, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(ws_ptr + s * numel + offs, mask=mask, other=0.0)
    alpha = tl.load(alpha_ptr)
    tl.store(out_ptr + offs, (acc * alpha).to(tl.bfloat16), mask=mask)


@triton.jit
def decode_nvfp4_to_f16_kernel(p_ptr, sf_ptr, out_ptr, R, HALF_K, CP4,
                               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Large-M path, step 1: e2m1 * e4m3 block scale * 2^-7 -> fp16 [R, K] (exact), natural k order."""
    _decode_rows_to_f16(p_ptr, sf_ptr, out_ptr, tl.program_id(0) * BLOCK_R, R, HALF_K, CP4, BLOCK_R, BLOCK_K, USE_ASM)


@triton.jit
def _decode_rows_to_f16(p_ptr, sf_ptr, out_ptr, r0, R, HALF_K, CP4,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_R of K tile program_id(1): e2m1 * e4m3 * 2^-7 -> fp16 in natural k order (exact)."""
    rows = r0 + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1) * BLOCK_K
    lo, hi = _load_decoded(p_ptr, sf_ptr, rows, R, kb, HALF_K, CP4, BLOCK_R, BLOCK_K, USE_ASM)
    K = HALF_K * 2
    vals = tl.reshape(tl.join(lo, hi), (BLOCK_R, BLOCK_K))
    cols = kb + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], vals,
             mask=(rows < R)[:, None] & (cols < K)[None, :])


@triton.jit
def decode_nvfp4_pair_to_f16_kernel(a_ptr, asf_ptr, a_out_ptr, RA, b_ptr, bsf_ptr, b_out_ptr, RB, HALF_K, CP4,
                                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Large-M path, step 1 in one launch for both operands: decode_nvfp4_to_f16_kernel's tiles of A (the first
    cdiv(RA, BLOCK_R) row tiles of the grid) then of B, each element decoded by the same code (same bytes)."""
    tiles_a = tl.cdiv(RA, BLOCK_R)
    pid = tl.program_id(0)
    if pid < tiles_a:
        p_ptr, sf_ptr, out_ptr, R, r0 = a_ptr, asf_ptr, a_out_ptr, RA, pid * BLOCK_R
    else:
        p_ptr, sf_ptr, out_ptr, R, r0 = b_ptr, bsf_ptr, b_out_ptr, RB, (pid - tiles_a) * BLOCK_R
    _decode_rows_to_f16(p_ptr, sf_ptr, out_ptr, r0, R, HALF_K, CP4, BLOCK_R, BLOCK_K, USE_ASM)


@triton.jit
def gemm_f16_alpha_kernel(a_ptr, b_ptr, alpha_ptr, out_ptr, M, N, K,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """Large-M path, step 2: out_bf16 = alpha * 2^14 * A16 @ B16^T, fp32 accumulation (wgmma);
    A16 and B16 are decoded operands (value * 2^-7 each, see _decode)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K, BLOCK_K):
        kmask = (kb + rk) < K
        a = tl.load(a_ptrs, mask=(rm < M)[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(rn < N)[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    acc = acc * DECODE_UNSCALE  # exact
    alpha = tl.load(alpha_ptr)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], (acc * alpha).to(tl.bfloat16),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


# ---------------------------------------------------------------------------------------
# CUDA-core path for M <= 4 tokens (GEMV-like): no tensor cores, no shared memory.
#
# Each 64-bit word of packed E2M1 is one 16-element block (one E4M3 scale). Its nibbles
# are decoded to 8 fp16 pairs (e2m1 * 2^-14, the same bit placement as above); the
# activation block is decoded the same way, times 2^14 (exact: e2m1 * 1). Eight packed
# fp16 FMAs give per lane the sum of 8 products e2m1_w * e2m1_x * 2^-14: every product
# is a multiple of 2^-16 (0.5 * 0.5 * 2^-14) of magnitude <= 36 * 2^-14 and every
# partial sum a multiple of 2^-16 below 288 * 2^-14 (at most 1152 units of 2^-16 < 2^11),
# so all of it is exact in fp16 (subnormals included; f16x2 FMA does not flush). The two
# lanes are added in fp32 (exact): the block's exact dot product of E2M1 codes, times
# 2^-14. Times the product of the two E4M3 scales (exact in fp32: 4 + 4 significant
# bits) it stays exact (<= 12 + 8 bits), so the one rounding per block is the fp32
# accumulation over K/16 block terms: within gamma(K, 2^-24) * sum |a_k b_k|.
# ---------------------------------------------------------------------------------------

_E2M1_BLOCK_TO_F16X2_ASM = tl.constexpr(block_to_f16x2_ptx())
# the same, then each pair times 2^14 (fp16 0x7400): activation values e2m1 * 1, exact
_E2M1_BLOCK_TO_F16X2_X1_ASM = tl.constexpr(block_to_f16x2_ptx(times_2_14=True))

_BLOCK_DOT_F16X2_ASM = tl.constexpr("""
{
.reg .b32 a;
.reg .f16 l, h;
.reg .f32 fl, fh;
mul.rn.f16x2 a, $1, $9;
fma.rn.f16x2 a, $2, $10, a;
fma.rn.f16x2 a, $3, $11, a;
fma.rn.f16x2 a, $4, $12, a;
fma.rn.f16x2 a, $5, $13, a;
fma.rn.f16x2 a, $6, $14, a;
fma.rn.f16x2 a, $7, $15, a;
fma.rn.f16x2 a, $8, $16, a;
mov.b32 {l, h}, a;
cvt.f32.f16 fl, l;
cvt.f32.f16 fh, h;
add.rn.f32 $0, fl, fh;
}
""")


@triton.jit
def _e2m1_block_to_f16x2(blk_i64):
    """int64 block (16 E2M1 codes) -> 8 int32 fp16 pairs of e2m1 * 2^-14 (a fixed pairing of k)."""
    return tl.inline_asm_elementwise(
        asm=_E2M1_BLOCK_TO_F16X2_ASM, constraints="=r,=r,=r,=r,=r,=r,=r,=r,l", args=[blk_i64],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=True, pack=1)


@triton.jit
def _e2m1_block_to_f16x2_x1(blk_i64):
    """As _e2m1_block_to_f16x2, values e2m1 * 1 (the activation side)."""
    return tl.inline_asm_elementwise(
        asm=_E2M1_BLOCK_TO_F16X2_X1_ASM, constraints="=r,=r,=r,=r,=r,=r,=r,=r,l", args=[blk_i64],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=True, pack=1)


@triton.jit
def _block_dot(w0, w1, w2, w3, w4, w5, w6, w7, x0, x1, x2, x3, x4, x5, x6, x7):
    """fp32 sum of the 16 products of one block (exact, see above)."""
    return tl.inline_asm_elementwise(
        asm=_BLOCK_DOT_F16X2_ASM, constraints="=r," + "r," * 15 + "r",
        args=[w0, w1, w2, w3, w4, w5, w6, w7, x0, x1, x2, x3, x4, x5, x6, x7],
        dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gemv_token(acc, w0, w1, w2, w3, w4, w5, w6, w7, sw, x_ptr, xsf_ptr, t, M, KB, CP4, cols, col_ok,
                BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr):
    tok_ok = t < M
    xb = tl.load(x_ptr + t * KB + cols, mask=col_ok & tok_ok, other=0)
    soff = ((t // 128) * CP4 + cols // 4) * 512 + (t % 32) * 16 + ((t // 32) % 4) * 4 + cols % 4
    soff = tl.max_contiguous(tl.multiple_of(soff, 2), 2)  # pairs of bytes: the weights' layout
    sx = tl.load(xsf_ptr + soff, mask=col_ok & tok_ok, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    x0, x1, x2, x3, x4, x5, x6, x7 = _e2m1_block_to_f16x2_x1(xb)
    shape: tl.constexpr = (BLOCK_N, BLOCK_KB)
    d = _block_dot(w0, w1, w2, w3, w4, w5, w6, w7,
                   tl.broadcast_to(x0[None, :], shape), tl.broadcast_to(x1[None, :], shape),
                   tl.broadcast_to(x2[None, :], shape), tl.broadcast_to(x3[None, :], shape),
                   tl.broadcast_to(x4[None, :], shape), tl.broadcast_to(x5[None, :], shape),
                   tl.broadcast_to(x6[None, :], shape), tl.broadcast_to(x7[None, :], shape))
    return acc + d * (sw * sx[None, :])


@triton.jit
def _gemv_store(acc, t, rows, N, M, alpha_ptr, out_ptr, ws_ptr, pid_s, USE_WS: tl.constexpr):
    y = tl.sum(acc, axis=1) * DECODE_UNSCALE  # fixed reduction tree: deterministic
    mask = (rows < N) & (t < M)
    off = t * N + rows
    _store_acc(y, off, mask, pid_s * M * N, alpha_ptr, out_ptr, ws_ptr, USE_WS)


@triton.jit
def gemv_nvfp4_kernel(
    w_ptr, wsf_ptr, x_ptr, xsf_ptr, alpha_ptr, out_ptr, ws_ptr,
    N, M, KB, CP4, iters_per_split,
    T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, USE_WS: tl.constexpr,
):
    """out[t, n] = alpha * sum_k X[t, k] W[n, k] for t < M <= T (T <= 4). w_ptr / x_ptr:
    packed E2M1 viewed as int64 (one 16-element block per word, KB = K/16 words per
    row); wsf_ptr / xsf_ptr: 128x4-swizzled E4M3 bytes. Grid (cdiv(N, BLOCK_N), split)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    wrow = rows.to(tl.int64) * KB
    srow = (rows // 128) * CP4 * 512 + (rows % 32) * 16 + ((rows // 32) % 4) * 4
    acc0 = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.float32)
    k_iters = tl.cdiv(KB, BLOCK_KB)
    it0 = pid_s * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, k_iters)
    for it in range(it0, it1):
        cols = it * BLOCK_KB + tl.arange(0, BLOCK_KB)
        col_ok = cols < KB
        m2 = row_ok[:, None] & col_ok[None, :]
        wb = tl.load(w_ptr + wrow[:, None] + cols[None, :], mask=m2, other=0)
        # 2 columns per thread (16 bytes of weights), 32 threads and all warps along K: the
        # contiguity hints keep the scale bytes and the activation (1-d) in that layout too
        soff = tl.max_contiguous(tl.multiple_of(srow[:, None] + ((cols // 4) * 512 + cols % 4)[None, :], [1, 2]),
                                 [1, 2])
        sw = tl.load(wsf_ptr + soff, mask=m2, other=0)
        sw = sw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        w0, w1, w2, w3, w4, w5, w6, w7 = _e2m1_block_to_f16x2(wb)
        acc0 = _gemv_token(acc0, w0, w1, w2, w3, w4, w5, w6, w7, sw, x_ptr, xsf_ptr, 0, M, KB, CP4, cols, col_ok,
                           BLOCK_N, BLOCK_KB)
        if T > 1:
            acc1 = _gemv_token(acc1, w0, w1, w2, w3, w4, w5, w6, w7, sw, x_ptr, xsf_ptr, 1, M, KB, CP4, cols,
                               col_ok, BLOCK_N, BLOCK_KB)
        if T > 2:
            acc2 = _gemv_token(acc2, w0, w1, w2, w3, w4, w5, w6, w7, sw, x_ptr, xsf_ptr, 2, M, KB, CP4, cols,
                               col_ok, BLOCK_N, BLOCK_KB)
        if T > 3:
            acc3 = _gemv_token(acc3, w0, w1, w2, w3, w4, w5, w6, w7, sw, x_ptr, xsf_ptr, 3, M, KB, CP4, cols,
                               col_ok, BLOCK_N, BLOCK_KB)
    _gemv_store(acc0, 0, rows, N, M, alpha_ptr, out_ptr, ws_ptr, pid_s, USE_WS)
    if T > 1:
        _gemv_store(acc1, 1, rows, N, M, alpha_ptr, out_ptr, ws_ptr, pid_s, USE_WS)
    if T > 2:
        _gemv_store(acc2, 2, rows, N, M, alpha_ptr, out_ptr, ws_ptr, pid_s, USE_WS)
    if T > 3:
        _gemv_store(acc3, 3, rows, N, M, alpha_ptr, out_ptr, ws_ptr, pid_s, USE_WS)


@triton.jit
def decode_nvfp4_to_f16_mma_order_kernel(p_ptr, sf_ptr, out_ptr, R, HALF_K, CP4,
                                         BLOCK_R: tl.constexpr, USE_ASM: tl.constexpr):
    """Step 1 of the Gluon wgmma path with X_F16: the activations [R, K] (K % 128 == 0) -> fp16
    [R, K] of e2m1 * e4m3 block scale * 2^-7 (exact), each 128-element K tile stored in the
    kernel's logical MMA order: natural k = 32c + 16i + 8e + r goes to 16r + 8i + 2c + e (see
    _gemm_nvfp4_wgmma), so the B tile is a plain K-major copy."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1) * 128
    lo, hi = _load_decoded(p_ptr, sf_ptr, rows, R, kb, HALF_K, CP4, BLOCK_R, 128, USE_ASM)
    v = tl.reshape(tl.join(lo, hi), (BLOCK_R, 4, 2, 2, 8))  # (row, c, i, e, r)
    v = tl.reshape(tl.permute(v, (0, 4, 2, 1, 3)), (BLOCK_R, 128))
    cols = kb + tl.arange(0, 128)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * (HALF_K * 2) + cols[None, :], v, mask=(rows < R)[:, None])
