"""Host-side preparation of checkpoint weights for the sm90 kernels (runs once per layer).

The dense GEMM takes B as stored in a ModelOpt checkpoint (packed E2M1 [N, K/2], K-major,
low nibble first) and its E4M3 block scales in the 128x4 swizzled layout; this module turns
the checkpoint's linear scales into that layout with its own index math (kernels/ never
imports references/) and keeps weight_scale_2, which the GEMM folds into its alpha on the
device (alpha = activation decode scale x weight_scale_2, one float32 product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Sm90Nvfp4Weight", "prepare_nvfp4_weight", "swizzle_128x4"]


def swizzle_128x4(sf_u8: Tensor) -> Tensor:
    """Linear block scales [R, C] or a stack [E, R, C] (uint8 or float8_e4m3fn bytes) -> the 128x4
    swizzled buffer [Rp, Cp] (stack: [E, Rp, Cp], each [R, C] swizzled on its own) (R up to 128, C up
    to 4, zero padding): scale (r, c) lands at byte
    ((r // 128) * (Cp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4."""
    if sf_u8.dtype == torch.float8_e4m3fn:
        sf_u8 = sf_u8.view(torch.uint8)
    if sf_u8.dtype != torch.uint8 or sf_u8.dim() not in (2, 3):
        raise ValueError(f"weight_scale: expected [N, K/16] or [E, N, K/16] uint8/float8_e4m3fn bytes, got "
                         f"{sf_u8.dtype} {tuple(sf_u8.shape)}")
    stack = sf_u8 if sf_u8.dim() == 3 else sf_u8.unsqueeze(0)
    e, r, c = stack.shape
    rp, cp = -(-r // 128) * 128, -(-c // 4) * 4
    rows = torch.arange(r, device=sf_u8.device).view(r, 1)
    cols = torch.arange(c, device=sf_u8.device).view(1, c)
    offset = ((rows // 128) * (cp // 4) + cols // 4) * 512 + (rows % 32) * 16 + ((rows // 32) % 4) * 4 + cols % 4
    out = torch.zeros(e, rp * cp, dtype=torch.uint8, device=sf_u8.device)
    out[:, offset.reshape(-1)] = stack.reshape(e, r * c)
    return out.view(e, rp, cp) if sf_u8.dim() == 3 else out.view(rp, cp)


@dataclass(frozen=True)
class Sm90Nvfp4Weight:
    """packed_u8 [N, K/2]; sf_swizzled_u8 [Np, Cp]; dec_scale_f32 [1] (weight_scale_2)."""

    packed_u8: Tensor
    sf_swizzled_u8: Tensor
    dec_scale_f32: Tensor

    @property
    def n(self) -> int:
        return self.packed_u8.shape[0]

    @property
    def k(self) -> int:
        return 2 * self.packed_u8.shape[1]


def prepare_nvfp4_weight(weight_u8: Tensor, weight_scale_e4m3: Tensor, weight_scale_2_f32: Tensor) -> Sm90Nvfp4Weight:
    """One NVFP4 linear's checkpoint tensors -> the dense GEMM's B operand."""
    if weight_u8.dtype != torch.uint8 or weight_u8.dim() != 2:
        raise ValueError(f"weight: expected packed E2M1 [N, K/2] uint8, got {weight_u8.dtype} {tuple(weight_u8.shape)}")
    n, k = weight_u8.shape[0], 2 * weight_u8.shape[1]
    if tuple(weight_scale_e4m3.shape) != (n, k // 16):
        raise ValueError(f"weight_scale: expected [{n}, {k // 16}] for weight [{n}, {k // 2}], "
                         f"got {tuple(weight_scale_e4m3.shape)}")
    if weight_scale_2_f32.numel() != 1:
        raise ValueError(f"weight_scale_2: expected one float32 value, got shape {tuple(weight_scale_2_f32.shape)}")
    return Sm90Nvfp4Weight(weight_u8.contiguous(), swizzle_128x4(weight_scale_e4m3),
                           weight_scale_2_f32.to(torch.float32).reshape(1).contiguous())
