"""bf16 [M, K] -> NVFP4 (packed E2M1 [M, K/2] + E4M3 block scales in the 128x4 swizzled
layout), recipe `te`, on Hopper, in Triton.

Math per 16-element block along K (v = max |x| with NaN elements ignored, fmaxf
semantics; S = global_enc_scale_f32 read from a GPU buffer, never from the host):

  s_byte = e4m3_rne_satfinite(min(v * (S * f32(1/6)), FLT_MAX))       (NaN -> 0x7F)
  enc    = min(1 / (f32(s_byte) * (1 / S)), FLT_MAX)                  (IEEE div.rn, NaN kept)
  code   = e2m1_rne(x * enc), saturating at +-6, sign from (x * enc < 0), NaN -> 0x7

What special inputs give (the emulator's `te` recipe gives the same bytes):
  * +-Inf element: the block scale saturates at 448 (0x7E), the Inf codes to +-6
    (0x7 / 0xF), the block's finite elements code to what 448 makes of them (mostly 0).
  * NaN element: ignored by the block max; the NaN itself codes to 0x7 (+6).
  * all-NaN or all-zero block: scale byte 0x00, enc = FLT_MAX, zeros code 0x0, NaN 0x7.
  * -0.0 codes to +0 (0x0); a small negative to -0 (0x8).
  * block whose scale underflows (v > 0, s_byte == 0): enc = FLT_MAX, codes saturate to +-6.

Layout: packed byte j of a row holds element 2j in its LOW nibble. Scale of (row r,
block c) sits at byte ((r//128)*(Cp//4) + c//4)*512 + (r%32)*16 + ((r//32)%4)*4 + c%4 of
a [Rp, Cp] buffer (Rp = M rounded up to 128, Cp = K/16 rounded up to 4); the kernel
writes every padding byte (zero), so the buffer can come from torch.empty.

Static mode: pass count_saturated=True to also get how many blocks of real data had a
block scale above 448 before saturation (v * S / 6 > 448: their largest elements
are clipped). The count is an int32 atomic add (integer: deterministic).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90._consts import BLOCK, FLT_MAX, ONE_SIXTH_F32

__all__ = ["CompileKey", "launch", "swizzled_sf_shape"]


def swizzled_sf_shape(rows: int, k: int) -> tuple[int, int]:
    """(Rp, Cp) of the 128x4 swizzled scale buffer for `rows` rows of K elements."""
    return (rows + 127) // 128 * 128, (k // BLOCK + 3) // 4 * 4


@dataclass(frozen=True)
class CompileKey:
    """Everything codegen reads. M, K and strides are runtime arguments, so not here;
    the recipe is fixed (`te`) by this file."""

    block_m: int
    block_k: int
    num_warps: int
    count_saturated: bool

    @staticmethod
    def for_shape(m: int, k: int, count_saturated: bool) -> "CompileKey":
        # H200 sweep (NOTES.md): 16 rows x 512 columns (16 KB of bf16, 1 KB contiguous per
        # row) ran at 2.0 TB/s at M = 4096, twice the 32 x 256 tile of the same size.
        if m <= 16:
            return CompileKey(block_m=16, block_k=256, num_warps=4, count_saturated=count_saturated)
        return CompileKey(block_m=16, block_k=512, num_warps=4, count_saturated=count_saturated)


@functools.lru_cache(maxsize=32)
def _compile(key: CompileKey):
    """The Triton kernel for `key` with its constexprs bound (Triton compiles on first launch)."""
    import triton

    from kernels.sm90._quantize_nvfp4_1x16_jit import quantize_nvfp4_1x16_te_kernel

    def run(x_bf16: Tensor, enc_f32: Tensor, packed_u8: Tensor, sf_u8: Tensor, sat_i32: Tensor | None) -> None:
        m, k = x_bf16.shape
        rp, cp = sf_u8.shape
        grid = (rp // key.block_m, triton.cdiv(cp * BLOCK, key.block_k))
        sat = sat_i32 if sat_i32 is not None else enc_f32  # unused pointer when not counting
        quantize_nvfp4_1x16_te_kernel[grid](
            x_bf16, x_bf16.stride(0), enc_f32, packed_u8, sf_u8.view(torch.int32), sat,
            m, k, cp // 4,
            BLOCK_M=key.block_m, BLOCK_K=key.block_k, COUNT_SAT=key.count_saturated,
            ONE_SIXTH=ONE_SIXTH_F32, FMAX=FLT_MAX, num_warps=key.num_warps,
        )

    return run


def _check_inputs(x_bf16: Tensor, global_enc_scale_f32: Tensor) -> None:
    if not isinstance(x_bf16, Tensor) or x_bf16.dtype != torch.bfloat16 or x_bf16.dim() != 2:
        raise ValueError(f"x_bf16: expected a 2-d torch.bfloat16 tensor [M, K], got "
                         f"{getattr(x_bf16, 'dtype', type(x_bf16))} {tuple(getattr(x_bf16, 'shape', ()))}")
    m, k = x_bf16.shape
    if k == 0 or k % BLOCK:
        raise ValueError(f"x_bf16: K={k} must be a positive multiple of {BLOCK}")
    if x_bf16.stride(1) != 1:
        raise ValueError(f"x_bf16: rows must be contiguous along K (stride(1) == 1), got strides {x_bf16.stride()}")
    if not x_bf16.is_cuda:
        raise ValueError(f"x_bf16: expected a CUDA tensor, got device {x_bf16.device}")
    if (not isinstance(global_enc_scale_f32, Tensor) or global_enc_scale_f32.dtype != torch.float32
            or global_enc_scale_f32.numel() != 1):
        raise ValueError("global_enc_scale_f32: expected a 1-element torch.float32 tensor (2688/amax) on the GPU")
    if global_enc_scale_f32.device != x_bf16.device:
        raise ValueError(f"global_enc_scale_f32: on {global_enc_scale_f32.device}, x_bf16 on {x_bf16.device}")


def launch(x_bf16: Tensor, global_enc_scale_f32: Tensor, *, count_saturated: bool = False,
           check: bool = True) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Quantize x_bf16 [M, K] with the `te` recipe.

    Returns (packed_u8 [M, K/2], sf_swizzled_u8 [Rp, Cp]) and, with count_saturated,
    a 0-d int32 GPU tensor: blocks whose scale saturated at 448. M may be 0 (empty
    outputs, padding-free scale buffer of 0 rows). No host sync, graph-capturable.
    """
    if check:
        _check_inputs(x_bf16, global_enc_scale_f32)
    m, k = x_bf16.shape
    rp, cp = swizzled_sf_shape(m, k)
    packed_u8 = torch.empty((m, k // 2), dtype=torch.uint8, device=x_bf16.device)
    sf_u8 = torch.empty((rp, cp), dtype=torch.uint8, device=x_bf16.device)
    sat_i32 = torch.zeros((), dtype=torch.int32, device=x_bf16.device) if count_saturated else None
    if m > 0:
        _compile(CompileKey.for_shape(m, k, count_saturated))(
            x_bf16, global_enc_scale_f32.reshape(()), packed_u8, sf_u8, sat_i32)
    if count_saturated:
        return packed_u8, sf_u8, sat_i32
    return packed_u8, sf_u8
