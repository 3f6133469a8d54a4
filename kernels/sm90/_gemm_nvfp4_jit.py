"""Triton decode kernels of kernels.sm90.gemm_nvfp4 (imported lazily by its _compile) and the decode helpers the
grouped Triton kernels share (_load_decoded, _decode).

NVFP4 operands (packed [rows, K/2], element 2i in the low nibble; E4M3 block scales 128x4 swizzled) are decoded in
registers: each byte's low nibble is element 2j, high nibble element 2j+1, returned as an even-k and an odd-k half.
Values are decoded to fp16 as e2m1 * e4m3 * 2^-7 (exact in fp16: at most 6 significant bits, magnitudes 2^-17 ..
21); the GEMMs multiply by 2^14 (exact) and alpha (a GPU scalar) in their epilogues. The decode kernels store fp16
rows in natural k order or in the register-fed wgmma kernel's logical order (MMA_ORDER).
"""

import triton
import triton.language as tl

from kernels.sm90._consts import DECODE_UNSCALE as _DECODE_UNSCALE
from kernels.sm90._e2m1_ptx import bytes_to_f16x2_ptx

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
def decode_nvfp4_to_f16_kernel(p_ptr, sf_ptr, out_ptr, R, HALF_K, CP4,
                               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr,
                               MMA_ORDER: tl.constexpr):
    """Large-M path, step 1: e2m1 * e4m3 block scale * 2^-7 -> fp16 [R, K] (exact), natural k order, or with
    MMA_ORDER each 128-element K tile in the wgmma path's logical order (see _decode_rows_to_f16)."""
    _decode_rows_to_f16(p_ptr, sf_ptr, out_ptr, tl.program_id(0) * BLOCK_R, R, HALF_K, CP4, BLOCK_R, BLOCK_K, USE_ASM,
                        MMA_ORDER)


@triton.jit
def _decode_rows_to_f16(p_ptr, sf_ptr, out_ptr, r0, R, HALF_K, CP4,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr,
                        MMA_ORDER: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_R of K tile program_id(1): e2m1 * e4m3 * 2^-7 -> fp16 (exact), in natural k order, or
    with MMA_ORDER (K % 128 == 0, BLOCK_K % 128 == 0) each 128-element tile in the register-fed wgmma kernel's
    logical order (natural 32c + 16i + 8e + r at 16r + 8i + 2c + e, see _gemm_nvfp4_wgmma): that kernel's act_f16
    activations, and the predecode operands on which a natural-order GEMM issues each k16 wgmma step over the
    products the wgmma kernel sums in it."""
    rows = r0 + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1) * BLOCK_K
    lo, hi = _load_decoded(p_ptr, sf_ptr, rows, R, kb, HALF_K, CP4, BLOCK_R, BLOCK_K, USE_ASM)
    K = HALF_K * 2
    vals = tl.join(lo, hi)
    if MMA_ORDER:  # (row, tile, c, i, e, r) -> (row, tile, r, i, c, e)
        vals = tl.permute(tl.reshape(vals, (BLOCK_R, BLOCK_K // 128, 4, 2, 2, 8)), (0, 1, 5, 3, 2, 4))
    vals = tl.reshape(vals, (BLOCK_R, BLOCK_K))
    cols = kb + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], vals,
             mask=(rows < R)[:, None] & (cols < K)[None, :])


@triton.jit
def decode_nvfp4_pair_to_f16_kernel(a_ptr, asf_ptr, a_out_ptr, RA, b_ptr, bsf_ptr, b_out_ptr, RB, HALF_K, CP4,
                                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr,
                                    MMA_ORDER: tl.constexpr):
    """Large-M path, step 1 in one launch for both operands: decode_nvfp4_to_f16_kernel's tiles of A (the first
    cdiv(RA, BLOCK_R) row tiles of the grid) then of B, each element decoded by the same code (same bytes)."""
    tiles_a = tl.cdiv(RA, BLOCK_R)
    pid = tl.program_id(0)
    if pid < tiles_a:
        p_ptr, sf_ptr, out_ptr, R, r0 = a_ptr, asf_ptr, a_out_ptr, RA, pid * BLOCK_R
    else:
        p_ptr, sf_ptr, out_ptr, R, r0 = b_ptr, bsf_ptr, b_out_ptr, RB, (pid - tiles_a) * BLOCK_R
    _decode_rows_to_f16(p_ptr, sf_ptr, out_ptr, r0, R, HALF_K, CP4, BLOCK_R, BLOCK_K, USE_ASM, MMA_ORDER)
