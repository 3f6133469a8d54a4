"""Triton bodies of kernels.sm90.gemm_nvfp4 (imported lazily by its _compile).

The kernel computes C[rx, ry] = sum_k X[rx, k] * Y[ry, k] for two NVFP4 operands in the
same layout (packed [rows, K/2], element 2i in the low nibble; E4M3 block scales 128x4
swizzled). X feeds the MMA's M side, Y its N side: X = A, Y = B normally; X = B, Y = A
for small M ("swap-AB"), where the output is written transposed through its strides.

Decode in registers: each byte's low nibble is element 2j, high nibble element 2j+1.
Instead of interleaving them, the kernel runs two MMAs per K tile, one over the even
and one over the odd elements (the same permutation of k on both operands, so only
the accumulation order changes). Values are decoded to fp16 (e2m1 * e4m3 is exact
in fp16: at most 6 significant bits, magnitudes 2^-10 .. 2688), fp16 MMA with fp32
accumulation, alpha (a GPU scalar) in the epilogue.
"""

import triton
import triton.language as tl

from kernels.sm90._te_math import e4m3_u8_to_f32

# fp16 high bytes of the E2M1 magnitudes 0, .5, 1, 1.5 | 2, 3, 4, 6 (their low bytes are 0)
_E2M1_F16_HI_0123 = 0x3E3C3800
_E2M1_F16_HI_4567 = 0x46444240


@triton.jit
def _e2m1_nibbles_to_f16_arith(b_u8):
    """(low nibble, high nibble) of each byte -> two fp16 tensors (portable path)."""
    b = b_u8.to(tl.int32)
    lo = b & 0xF
    hi = b >> 4
    mlo = lo & 7
    mhi = hi & 7
    blo = tl.where(mlo >= 2, (mlo << 9) + (14 << 10), tl.where(mlo == 1, 0x3800, 0)) | ((lo & 8) << 12)
    bhi = tl.where(mhi >= 2, (mhi << 9) + (14 << 10), tl.where(mhi == 1, 0x3800, 0)) | ((hi & 8) << 12)
    return (blo.to(tl.int16).to(tl.float16, bitcast=True), bhi.to(tl.int16).to(tl.float16, bitcast=True))


@triton.jit
def _e2m1_nibbles_to_f16_asm(b_u8):
    """Same as the arithmetic path, 4 bytes per instance: prmt table lookup of the fp16
    high byte (magnitude) and the sign moved from bit 3 / bit 7 of each byte to bit 15."""
    lo = tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 w, sel, t, sg, ta, tb;
        mov.b32 w, $2;
        mov.b32 ta, 0x3E3C3800;
        mov.b32 tb, 0x46444240;
        shl.b32 sel, w, 4;
        and.b32 sel, sel, 0x7070;
        prmt.b32 $0, ta, tb, sel;
        prmt.b32 t, w, 0, 0x1404;
        shl.b32 sg, t, 4;
        and.b32 sg, sg, 0x80008000;
        or.b32 $0, $0, sg;
        shr.b32 sel, w, 12;
        and.b32 sel, sel, 0x7070;
        prmt.b32 $1, ta, tb, sel;
        prmt.b32 t, w, 0, 0x3424;
        shl.b32 sg, t, 4;
        and.b32 sg, sg, 0x80008000;
        or.b32 $1, $1, sg;
        }
        """,
        constraints="=r,=r,r",
        args=[b_u8],
        dtype=tl.float16,
        is_pure=True,
        pack=4,
    )
    hi = tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 w, sel, t, sg, ta, tb;
        mov.b32 w, $2;
        mov.b32 ta, 0x3E3C3800;
        mov.b32 tb, 0x46444240;
        and.b32 sel, w, 0x7070;
        prmt.b32 $0, ta, tb, sel;
        prmt.b32 t, w, 0, 0x1404;
        and.b32 sg, t, 0x80008000;
        or.b32 $0, $0, sg;
        shr.b32 sel, w, 16;
        and.b32 sel, sel, 0x7070;
        prmt.b32 $1, ta, tb, sel;
        prmt.b32 t, w, 0, 0x3424;
        and.b32 sg, t, 0x80008000;
        or.b32 $1, $1, sg;
        }
        """,
        constraints="=r,=r,r",
        args=[b_u8],
        dtype=tl.float16,
        is_pure=True,
        pack=4,
    )
    return lo, hi


@triton.jit
def _load_raw(p_ptr, sf_ptr, rows, R, kb, K, CP4, BLOCK_K: tl.constexpr):
    """Packed bytes [ROWS, BLOCK_K/2] and scale bytes [ROWS, BLOCK_K/16] of a K tile (masked: 0)."""
    pcols = kb // 2 + tl.arange(0, BLOCK_K // 2)
    row_ok = rows < R
    b = tl.load(p_ptr + rows.to(tl.int64)[:, None] * (K // 2) + pcols[None, :],
                mask=row_ok[:, None] & (pcols < K // 2)[None, :], other=0)
    c = kb // 16 + tl.arange(0, BLOCK_K // 16)
    soff = (((rows // 128) * CP4)[:, None] + (c // 4)[None, :]) * 512 \
        + ((rows % 32) * 16 + ((rows // 32) % 4) * 4)[:, None] + (c % 4)[None, :]
    s = tl.load(sf_ptr + soff, mask=row_ok[:, None] & (c < K // 16)[None, :], other=0)
    return b, s


@triton.jit
def _decode(b, s, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """-> (even-k, odd-k) fp16 [ROWS, BLOCK_K/2]: e2m1 value * e4m3 block scale, exact."""
    s16 = e4m3_u8_to_f32(s.to(tl.int32)).to(tl.float16)
    s16 = tl.reshape(tl.broadcast_to(s16[:, :, None], (ROWS, BLOCK_K // 16, 8)), (ROWS, BLOCK_K // 2))
    if USE_ASM:
        lo, hi = _e2m1_nibbles_to_f16_asm(b)
    else:
        lo, hi = _e2m1_nibbles_to_f16_arith(b)
    return lo * s16, hi * s16


@triton.jit
def _load_decoded(p_ptr, sf_ptr, rows, R, kb, K, CP4,
                  ROWS: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    b, s = _load_raw(p_ptr, sf_ptr, rows, R, kb, K, CP4, BLOCK_K)
    return _decode(b, s, ROWS, BLOCK_K, USE_ASM)


@triton.jit
def gemm_nvfp4_kernel(
    x_ptr, xsf_ptr, y_ptr, ysf_ptr, alpha_ptr, out_ptr, ws_ptr,
    RX, RY, K, CP4, stride_ox, stride_oy, iters_per_split,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_WS: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    pid_s = tl.program_id(2)
    rx = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    ry = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)
    acc = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    k_iters = tl.cdiv(K, BLOCK_K)
    it0 = pid_s * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, k_iters)
    for it in range(it0, it1, 2):
        # two K sub-tiles per trip, raw bytes of both requested before either is decoded:
        # doubles the bytes in flight (Triton does not stage these loads through shared memory)
        kb = it * BLOCK_K
        kb2 = tl.where(it + 1 < it1, kb + BLOCK_K, K)  # past the split's end: fully masked
        xb0, xs0 = _load_raw(x_ptr, xsf_ptr, rx, RX, kb, K, CP4, BLOCK_K)
        yb0, ys0 = _load_raw(y_ptr, ysf_ptr, ry, RY, kb, K, CP4, BLOCK_K)
        xb1, xs1 = _load_raw(x_ptr, xsf_ptr, rx, RX, kb2, K, CP4, BLOCK_K)
        yb1, ys1 = _load_raw(y_ptr, ysf_ptr, ry, RY, kb2, K, CP4, BLOCK_K)
        x_lo, x_hi = _decode(xb0, xs0, BLOCK_X, BLOCK_K, USE_ASM)
        y_lo, y_hi = _decode(yb0, ys0, BLOCK_Y, BLOCK_K, USE_ASM)
        acc = tl.dot(x_lo, tl.trans(y_lo), acc)
        acc = tl.dot(x_hi, tl.trans(y_hi), acc)
        x_lo, x_hi = _decode(xb1, xs1, BLOCK_X, BLOCK_K, USE_ASM)
        y_lo, y_hi = _decode(yb1, ys1, BLOCK_Y, BLOCK_K, USE_ASM)
        acc = tl.dot(x_lo, tl.trans(y_lo), acc)
        acc = tl.dot(x_hi, tl.trans(y_hi), acc)
    mask = (rx < RX)[:, None] & (ry < RY)[None, :]
    off = rx.to(tl.int64)[:, None] * stride_ox + ry.to(tl.int64)[None, :] * stride_oy
    if not USE_WS:
        alpha = tl.load(alpha_ptr)
        tl.store(out_ptr + off, (acc * alpha).to(tl.bfloat16), mask=mask)
    else:
        # fp32 partial in output orientation; the reduce kernel sums splits in a fixed order
        tl.store(ws_ptr + pid_s.to(tl.int64) * RX * RY + off, acc, mask=mask)


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
def decode_nvfp4_to_f16_kernel(p_ptr, sf_ptr, out_ptr, R, K, CP4,
                               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Large-M path, step 1: e2m1 * e4m3 block scale -> fp16 [R, K] (exact), natural k order."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1) * BLOCK_K
    lo, hi = _load_decoded(p_ptr, sf_ptr, rows, R, kb, K, CP4, BLOCK_R, BLOCK_K, USE_ASM)
    vals = tl.reshape(tl.join(lo, hi), (BLOCK_R, BLOCK_K))
    cols = kb + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], vals,
             mask=(rows < R)[:, None] & (cols < K)[None, :])


@triton.jit
def gemm_f16_alpha_kernel(a_ptr, b_ptr, alpha_ptr, out_ptr, M, N, K,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """Large-M path, step 2: out_bf16 = alpha * A16 @ B16^T, fp32 accumulation (wgmma)."""
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
    alpha = tl.load(alpha_ptr)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], (acc * alpha).to(tl.bfloat16),
             mask=(rm < M)[:, None] & (rn < N)[None, :])
