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
def _load_decoded(p_ptr, sf_ptr, rows, R, kb, K, CP4,
                  ROWS: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Rows `rows` and K tile starting at byte column kb // 2 -> (even, odd) fp16 [ROWS, BLOCK_K/2]."""
    pcols = kb // 2 + tl.arange(0, BLOCK_K // 2)
    row_ok = rows < R
    b = tl.load(p_ptr + rows.to(tl.int64)[:, None] * (K // 2) + pcols[None, :],
                mask=row_ok[:, None] & (pcols < K // 2)[None, :], other=0)
    c = kb // 16 + tl.arange(0, BLOCK_K // 16)
    soff = (((rows // 128) * CP4)[:, None] + (c // 4)[None, :]) * 512 \
        + ((rows % 32) * 16 + ((rows // 32) % 4) * 4)[:, None] + (c % 4)[None, :]
    s = tl.load(sf_ptr + soff, mask=row_ok[:, None] & (c < K // 16)[None, :], other=0)
    s16 = e4m3_u8_to_f32(s.to(tl.int32)).to(tl.float16)
    s16 = tl.reshape(tl.broadcast_to(s16[:, :, None], (ROWS, BLOCK_K // 16, 8)), (ROWS, BLOCK_K // 2))
    if USE_ASM:
        lo, hi = _e2m1_nibbles_to_f16_asm(b)
    else:
        lo, hi = _e2m1_nibbles_to_f16_arith(b)
    return lo * s16, hi * s16


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
    for it in range(it0, it1):
        kb = it * BLOCK_K
        x_lo, x_hi = _load_decoded(x_ptr, xsf_ptr, rx, RX, kb, K, CP4, BLOCK_X, BLOCK_K, USE_ASM)
        y_lo, y_hi = _load_decoded(y_ptr, ysf_ptr, ry, RY, kb, K, CP4, BLOCK_Y, BLOCK_K, USE_ASM)
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
