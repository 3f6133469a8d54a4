"""Host bridge for the sm100 FP8 block-scaled linear: checkpoint bytes -> kernel operands.

Written independently of references/ (never imports it); torch only, device-agnostic.

What the tcgen05 block-scaled MMA of kind mxf8f6f4 reads (MXFP8, scale_vec::1X): one UE8M0
scale per 32 consecutive K elements of each row, from the cuBLAS/CUTLASS 128x4 swizzle
(NVFP4_FACTS.md section 3): rows padded to 128, scale columns to 4, byte offset of sf[r][c]

    ((r // 128) * (Cp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4.

DeepSeek-V4's FP8 linears carry coarser scales, and a 128-block scale repeated over its four
32-blocks is the same number (a UE8M0 byte is an exact power of two, so the MMA's per-32
scaling multiplies by the same 2^e):
- weight `.scale` F8_E8M0 [ceil(N/128), ceil(K/128)] (128x128 blocks): row r, column c of
  the per-32 grid holds scale[r // 128, c // 4]. Every 128x4 atom then holds one byte 512
  times; rows past N (padding of the last block row) are zero.
- activation scales [M, ceil(K/128)] (1x128 groups, UE8M0): row r, column c holds
  sf[r, c // 4]; rows past M are zero. Cp = 4 * ceil(K/128), so Cp // 4 = ceil(K/128).
A UE8M0 byte 0xFF is NaN: refused in a weight (it would turn its block's outputs NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_BLOCK = 128  # K (and weight N) extent of one checkpoint scale
SF_VEC = 32  # K elements per scale of the MMA
SF_PER_BLOCK = SCALE_BLOCK // SF_VEC  # = 4 = the swizzle atom's column count
SF_ROW_ALIGN = 128
K_ALIGN = 16  # TMA: a row of E4M3 bytes must be a multiple of 16 bytes
N_ALIGN = 8  # bf16 output rows 16-byte aligned
UE8M0_NAN_BYTE = 0xFF


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(n: int, m: int) -> int:
    return ceil_div(n, m) * m


def _bytes(t: Tensor, name: str, dtypes: tuple) -> Tensor:
    """uint8 view of FP8 bytes (reinterpreted, never cast)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.uint8, *dtypes):
        raise TypeError(f"{name}: expected {', '.join(str(d) for d in (torch.uint8, *dtypes))} bytes, got {t.dtype}")
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def e4m3_bytes(t: Tensor, name: str) -> Tensor:
    """uint8 view of E4M3 codes given as uint8 or float8_e4m3fn."""
    return _bytes(t, name, (torch.float8_e4m3fn,))


def ue8m0_bytes(t: Tensor, name: str) -> Tensor:
    """uint8 view of UE8M0 scale bytes given as uint8 or float8_e8m0fnu (never read as numbers)."""
    return _bytes(t, name, (torch.float8_e8m0fnu,))


def _swizzle_128x4(sf_u8: Tensor) -> Tensor:
    """Linear per-32 scales [Rp, Cp] (Rp % 128 == 0, Cp % 4 == 0) -> 128x4 swizzled [Rp, Cp] (graph-safe)."""
    rp, cp = sf_u8.shape
    # r = r0*128 + r1*32 + r2 ; c = c0*4 + c1  ->  memory order (r0, c0, r2, r1, c1)
    v = sf_u8.reshape(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)
    return v.reshape(rp, cp).contiguous()


def ue8m0_block128x128_to_swizzled_128x4_per32(scale_u8: Tensor, *, n: int, k: int) -> Tensor:
    """Weight scales [ceil(N/128), ceil(K/128)] UE8M0 -> the MMA's per-32 swizzled bytes
    [round_up(N, 128), 4 * ceil(K/128)]: each 128-block scale repeated over its 128 rows and four
    32-columns; rows past N zero. Graph-safe (no device value read on the host)."""
    scale_u8 = ue8m0_bytes(scale_u8, "scale_u8")
    want = (ceil_div(n, SCALE_BLOCK), ceil_div(k, SCALE_BLOCK))
    if tuple(scale_u8.shape) != want:
        raise ValueError(f"scale_u8: expected [ceil(N/128), ceil(K/128)] = {list(want)} for N={n}, K={k}, "
                         f"got {list(scale_u8.shape)}")
    lin = scale_u8.repeat_interleave(SCALE_BLOCK, 0).repeat_interleave(SF_PER_BLOCK, 1)
    lin[n:] = 0
    return _swizzle_128x4(lin)


def ue8m0_1x128_to_swizzled_128x4_per32(sf_u8: Tensor, *, k: int) -> Tensor:
    """Activation scales [M, ceil(K/128)] UE8M0 -> the MMA's per-32 swizzled bytes
    [round_up(M, 128), 4 * ceil(K/128)]: each group's scale repeated over its four 32-columns; rows
    past M zero. Graph-safe. (The sm100 quantizer writes this layout itself; this serves
    activations quantized elsewhere, e.g. by another backend.)"""
    sf_u8 = ue8m0_bytes(sf_u8, "sf_u8")
    if sf_u8.dim() != 2 or sf_u8.shape[1] != ceil_div(k, SCALE_BLOCK):
        raise ValueError(f"sf_u8: expected [M, ceil(K/128)] = [M, {ceil_div(k, SCALE_BLOCK)}] for K={k}, "
                         f"got {list(sf_u8.shape)}")
    m = sf_u8.shape[0]
    lin = sf_u8.new_zeros(round_up(max(m, 1), SF_ROW_ALIGN), sf_u8.shape[1] * SF_PER_BLOCK)
    lin[:m] = sf_u8.repeat_interleave(SF_PER_BLOCK, 1)
    return _swizzle_128x4(lin)


def swizzled_128x4_per32_to_ue8m0_1x128(sf_swizzled_u8: Tensor, *, m: int, k: int) -> Tensor:
    """Inverse of ue8m0_1x128_to_swizzled_128x4_per32 for rows < M: [M, ceil(K/128)], read from the
    first of each group's four 32-columns (tests compare the other three separately)."""
    g = ceil_div(k, SCALE_BLOCK)
    rp = round_up(max(m, 1), SF_ROW_ALIGN)
    if tuple(sf_swizzled_u8.shape) != (rp, SF_PER_BLOCK * g):
        raise ValueError(f"sf_swizzled_u8: expected {[rp, SF_PER_BLOCK * g]} for M={m}, K={k}, "
                         f"got {list(sf_swizzled_u8.shape)}")
    lin = sf_swizzled_u8.reshape(rp // 128, g, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(rp, SF_PER_BLOCK * g)
    return lin[:m, 0::SF_PER_BLOCK].contiguous()


@dataclass(frozen=True)
class Sm100Fp8BlockWeight:
    """Kernel operands of one FP8 block-scaled linear.

    e4m3_u8: [N, K] E4M3 bytes, K-major (as the checkpoint stores them);
    sf_swizzled_u8: [round_up(N, 128), 4 * ceil(K/128)] the MMA's per-32 UE8M0 bytes.
    """

    e4m3_u8: Tensor
    sf_swizzled_u8: Tensor

    @property
    def n(self) -> int:
        return self.e4m3_u8.shape[0]

    @property
    def k(self) -> int:
        return self.e4m3_u8.shape[1]


def check_fp8_shape(n_or_m: int, k: int, name: str, *, row_align: int) -> None:
    """One-line errors for shapes the kernel's TMA and stores cannot cover."""
    if k <= 0 or k % K_ALIGN:
        raise ValueError(f"{name}: K={k} must be a positive multiple of {K_ALIGN} (a TMA row is a multiple "
                         f"of 16 bytes); K need not be a multiple of 128")
    if n_or_m % row_align:
        raise ValueError(f"{name}: N={n_or_m} must be a multiple of {row_align} (bf16 output rows 16-byte "
                         f"aligned); N need not be a multiple of 128")


def prepare_fp8_block_weight(weight_e4m3: Tensor, scale_e8m0: Tensor) -> Sm100Fp8BlockWeight:
    """DeepSeek-V4 checkpoint tensors of one FP8 linear -> kernel operands (load time, not graph-safe:
    the NaN checks read the weight and the scales; NaN E4M3 bytes or 0xFF scales are refused).

    weight_e4m3 [N, K] (float8_e4m3fn or its uint8 bytes); scale_e8m0 [ceil(N/128), ceil(K/128)]
    (float8_e8m0fnu or uint8 bytes, value 2^(b-127)).
    """
    w = e4m3_bytes(weight_e4m3, "weight_e4m3")
    if w.dim() != 2:
        raise ValueError(f"weight_e4m3: expected [N, K], got shape {list(w.shape)}")
    n, k = w.shape
    check_fp8_shape(n, k, "weight_e4m3", row_align=N_ALIGN)
    s = ue8m0_bytes(scale_e8m0, "scale_e8m0")
    if tuple(s.shape) != (ceil_div(n, SCALE_BLOCK), ceil_div(k, SCALE_BLOCK)):
        raise ValueError(f"scale_e8m0: expected [ceil(N/128), ceil(K/128)] = "
                         f"{[ceil_div(n, SCALE_BLOCK), ceil_div(k, SCALE_BLOCK)]} for weight [{n}, {k}], "
                         f"got {list(s.shape)}")
    nan_w = ((w & 0x7F) == 0x7F).nonzero()
    if nan_w.numel():
        r, c = nan_w[0].tolist()
        raise ValueError(f"weight_e4m3: {nan_w.shape[0]} NaN byte(s) (0x7F/0xFF), first at [{r}, {c}]")
    nan = (s == UE8M0_NAN_BYTE).nonzero()
    if nan.numel():
        r, c = nan[0].tolist()
        raise ValueError(f"scale_e8m0: {nan.shape[0]} NaN byte(s) 0xFF, first at block [{r}, {c}]")
    return Sm100Fp8BlockWeight(w.contiguous(), ue8m0_block128x128_to_swizzled_128x4_per32(s, n=n, k=k))


_F32_MANT_BITS = 23
_F32_EXP_MASK = 0x7F800000
_F32_MANT_MASK = 0x7FFFFF
_F32_2_POW_M127_BITS = 1 << (_F32_MANT_BITS - 1)  # 2^-127, the subnormal UE8M0 byte 0 stands for


def pow2_f32_to_ue8m0_bytes(scale_f32: Tensor) -> Tensor | None:
    """float32 block scales that are all exact powers of two in UE8M0's range (2^-127 .. 2^127) -> their
    UE8M0 bytes (b = the float32 exponent field; 2^-127, a float32 subnormal, -> byte 0), else None (a
    scale the MMA's UE8M0 scales cannot carry exactly: not a power of two, zero, negative, NaN, Inf).
    For float32 block-scale encodings (DeepSeek-V3 `weight_scale_inv` and kin) whose values happen to be
    powers of two. Load time (reads the scales on the host once)."""
    if not isinstance(scale_f32, Tensor) or scale_f32.dtype != torch.float32:
        raise TypeError(f"scale_f32: expected a float32 tensor, got {getattr(scale_f32, 'dtype', type(scale_f32))}")
    bits = scale_f32.contiguous().view(torch.int32)
    exp = (bits & _F32_EXP_MASK) >> _F32_MANT_BITS
    normal_pow2 = ((bits & _F32_MANT_MASK) == 0) & (exp > 0) & (exp < 0xFF) & (bits >= 0)
    if not bool((normal_pow2 | (bits == _F32_2_POW_M127_BITS)).all()):
        return None
    return torch.where(normal_pow2, exp, torch.zeros_like(exp)).to(torch.uint8)


@dataclass(frozen=True)
class Fp8ActSm100:
    """A 1x128 FP8 activation as the sm100 quantizer leaves it.

    e4m3_u8 [M, K] E4M3 bytes; sf_ue8m0_u8 [M, ceil(K/128)] group scale bytes (value 2^(b-127));
    sf_swizzled_u8 [round_up(M,128), 4*ceil(K/128)] the same bytes in the MMA's per-32 layout.
    """

    e4m3_u8: Tensor
    sf_ue8m0_u8: Tensor
    sf_swizzled_u8: Tensor
