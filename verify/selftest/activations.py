"""Bugs in the quantized activations an op returns (scale padding, tie rounding, the last K element
masked off) and the rows of exact ties the tie bugs need to show."""

from __future__ import annotations

import math

import torch

from references import layouts as ref_layouts
from references.codecs import e4m3_bytes_to_f32
from references.linear import nvfp4_global_scale_for
from references.nvfp4 import (amax_by_recipe, block_scale_f32, e2m1_codes_with_scale, e2m1_grid_values,
                              pack_e2m1x2_low_first, unpack_e2m1x2_low_first)
from verify.backends import QuantizedAct
from verify.reference_layer import LayerInputs

__all__ = ["fill_padding", "dense_padding_filled", "last_k_masked_off", "ties_away", "with_tie_rows"]


def fill_padding(a: QuantizedAct, offsets_i32: torch.Tensor, byte: int) -> QuantizedAct:
    off = offsets_i32.to(torch.int64)
    real, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(
        torch.ones(int(off[-1]), a.k // 16, dtype=torch.uint8, device=off.device), off)
    sf = a.sf_swizzled_u8.clone()
    pad = torch.ones_like(sf, dtype=torch.bool)
    pad[:real.shape[0]] = real == 0
    sf[pad] = byte
    return QuantizedAct(a.packed_u8, sf, a.global_dec_f32)


def dense_padding_filled(a: QuantizedAct, byte: int) -> QuantizedAct:
    """A dense quantizer that leaves its swizzled scale padding (rows past M, columns past K/16 in the 128x4
    tiles) as a previous launch left it: `byte` there instead of zero."""
    m = a.packed_u8.shape[0]
    real = ref_layouts.sf_linear_to_swizzled_128x4(
        torch.ones(m, a.k // 16, dtype=torch.uint8, device=a.packed_u8.device))
    sf = a.sf_swizzled_u8.clone()
    sf[real == 0] = byte
    return QuantizedAct(a.packed_u8, sf, a.global_dec_f32)


def last_k_masked_off(a: QuantizedAct) -> QuantizedAct:
    """The operand a GEMM whose K-tail mask is off by one reads (k < K - 1 instead of k < K): the last
    element of every row as code 0 (the high nibble of each row's last byte)."""
    packed = a.packed_u8.clone()
    if packed.numel():
        packed[:, -1] &= 0x0F
    return QuantizedAct(packed, a.sf_swizzled_u8, a.global_dec_f32)


_E2M1_TIES_BELOW_EVEN = (0.25, 1.25, 2.5, 5.0)  # ties whose even neighbour is the smaller magnitude


def _global_for(x_bf16: torch.Tensor, recipe, scale) -> torch.Tensor:
    return next(iter(nvfp4_global_scale_for(x_bf16, recipe=recipe, input_scale_f32=scale).values()))


def ties_away(a: QuantizedAct, x_bf16: torch.Tensor, recipe, scale, *, e4m3: bool) -> QuantizedAct:
    """a with its ties rounded away from zero: E2M1 codes (e4m3=False: |x * enc| exactly 0.25, 1.25, 2.5
    or 5 goes up one code instead of to the even one below) or E4M3 block scales (e4m3=True: a float32
    block scale exactly between two E4M3 values whose even one is below takes the byte above, and the
    block's codes follow that scale). Ties are found on x with the backend's own scale bytes and the
    references' global scale (the one the bytes verdict requires)."""
    m, k = x_bf16.shape
    g = _global_for(x_bf16, recipe, scale)
    xb = x_bf16.float().reshape(m, k // 16, 16)
    sf = ref_layouts.sf_swizzled_128x4_to_linear(a.sf_swizzled_u8, rows=m, cols=k // 16)
    codes = unpack_e2m1x2_low_first(a.packed_u8).reshape(m, k // 16, 16)
    if not e4m3:
        y = e2m1_grid_values(xb, sf, recipe=recipe, global_scale_f32=g).abs()
        tie = torch.zeros_like(y, dtype=torch.bool)
        for t in _E2M1_TIES_BELOW_EVEN:
            tie |= y == t
        codes = torch.where(tie, codes + 1, codes)  # magnitude + 1, sign bit kept (no carry: mag <= 6)
        return QuantizedAct(pack_e2m1x2_low_first(codes.reshape(m, k)), a.sf_swizzled_u8, a.global_dec_f32)
    s32 = block_scale_f32(amax_by_recipe(xb, recipe, dim=-1), recipe=recipe, global_scale_f32=g).double()
    up = torch.clamp(sf.to(torch.int16) + 1, max=0x7E).to(torch.uint8)
    mid = (e4m3_bytes_to_f32(sf).double() + e4m3_bytes_to_f32(up).double()) / 2
    tie = (s32 == mid) & (up != sf) & (sf & 1 == 0)
    sf_new = torch.where(tie, up, sf)
    new_codes = e2m1_codes_with_scale(xb, sf_new, recipe=recipe, global_scale_f32=g)
    codes = torch.where(tie[..., None], new_codes, codes)
    return QuantizedAct(pack_e2m1x2_low_first(codes.reshape(m, k)), ref_layouts.sf_linear_to_swizzled_128x4(sf_new),
                        a.global_dec_f32)


def with_tie_rows(inputs: LayerInputs) -> LayerInputs:
    """The layer inputs with the last token's x_attn and x_ffn rows replaced by a row of exact ties that
    also holds the tensor's amax (so a dynamic global scale S = 2688/amax is a power of two): block 0 holds
    amax = 21 * 2^j; blocks 1..4 have a block scale of exactly 1.0 and elements x * enc exactly +-0.25,
    1.25, 2.5, 5 (E2M1 ties whose even code is the smaller); blocks 5..8 have block scales v * S / 6
    exactly 1.0625 and 1.3125 (E4M3 midpoints whose even byte is the smaller). Random data almost never
    holds an exact tie, so a tie-rounding bug needs these to be seen."""
    def tied(x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        j = math.ceil(math.log2(max(float(x.float().abs().max()), 1e-30) / 21.0))
        unit = 2.0 ** (j - 7)  # = 1 / S: x * enc = x / unit where the block scale is 1.0
        row = torch.zeros(k, dtype=torch.float64)
        row[0] = 21.0 * 2.0**j
        ties = torch.tensor([6.0, 0.25, -1.25, 2.5, -5.0, 1.25, -0.25, 5.0, -2.5, 0.75, 3.0, -6.0, 1.0, 0.5, 2.0, 4.0])
        for b in range(1, 5):
            if 16 * b + 16 <= k:
                row[16 * b:16 * b + 16] = ties.roll(b).double() * unit
        for b, v in zip(range(5, 9), (6.375, 7.875, -6.375, 7.875)):  # block scales 1.0625, 1.3125
            if 16 * b + 16 <= k:
                row[16 * b] = v * unit
                row[16 * b + 1:16 * b + 16] = ties[1:].double() * (abs(v) / 6.0) * unit
        out = x.clone()
        out[-1] = row.to(torch.bfloat16).to(x.device)
        return out

    return LayerInputs(inputs.token_ids_i64, tied(inputs.x_attn_bf16), tied(inputs.x_ffn_bf16))
