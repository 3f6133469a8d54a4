"""Interval arithmetic for the stages whose intermediates are not visible (DESIGN "Verdicts", the interval
rule): the clamped SwiGLU of an interval, the float64 -> float32 directed roundings, and the interval of
dequantized values an encode-scale recipe can give an interval of h. Used by moe.l1_fused and moe.block."""

from __future__ import annotations

import torch
from torch import Tensor

from references.codecs import e2m1_codes_to_f32, e4m3_bytes_to_f32
from references.gemm import half_ulp
from references.nvfp4 import block_scale_bytes, e2m1_codes_with_scale

__all__ = ["swiglu_interval", "nonempty_experts", "f32_down", "f32_up", "deq_interval", "widen_by_bf16_rounding"]

_SILU_ARGMIN = -1.2784645427610738  # silu(g) = g * sigmoid(g) is smallest here (silu' = 0)


def swiglu_interval(g_lo: Tensor, g_hi: Tensor, u_lo: Tensor, u_hi: Tensor, limit: float | None) -> tuple[Tensor, Tensor]:
    """[h_lo, h_hi] of silu(min(g, L)) * clamp(u, -L, L) over g in [g_lo, g_hi], u in [u_lo, u_hi] (float64)."""
    def silu(g):
        g = torch.clamp(g, max=limit) if limit else g
        return g * torch.sigmoid(g)

    s_cand = [silu(g_lo), silu(g_hi)]
    inside = (g_lo < _SILU_ARGMIN) & (g_hi > _SILU_ARGMIN)
    s_min = torch.where(inside, silu(torch.full_like(g_lo, _SILU_ARGMIN)), torch.minimum(*s_cand))
    s_lo, s_hi = s_min, torch.maximum(*s_cand)
    if limit:
        u_lo, u_hi = torch.clamp(u_lo, -limit, limit), torch.clamp(u_hi, -limit, limit)
    corners = torch.stack([s_lo * u_lo, s_lo * u_hi, s_hi * u_lo, s_hi * u_hi])
    return corners.amin(0), corners.amax(0)


def widen_by_bf16_rounding(h_lo: Tensor, h_hi: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel may round h to bf16 before quantizing it: the interval widened by one bf16 ulp each way."""
    return h_lo - 2 * half_ulp(h_lo.abs(), torch.bfloat16), h_hi + 2 * half_ulp(h_hi.abs(), torch.bfloat16)


def nonempty_experts(offsets: Tensor):
    """(expert, first row, end row) of every expert that has rows, from int offsets [E+1] (read once)."""
    bounds = offsets.tolist()
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if lo != hi]


def f32_down(x64: Tensor) -> Tensor:
    """float64 -> the largest float32 <= x."""
    f = x64.float()
    return torch.where(f.double() > x64, torch.nextafter(f, torch.full_like(f, -float("inf"))), f)


def f32_up(x64: Tensor) -> Tensor:
    """float64 -> the smallest float32 >= x."""
    f = x64.float()
    return torch.where(f.double() < x64, torch.nextafter(f, torch.full_like(f, float("inf"))), f)


def deq_interval(h_lo: Tensor, h_hi: Tensor, recipe, g_lo: Tensor, g_hi: Tensor) -> tuple[Tensor, Tensor]:
    """[lo, hi] of the dequantized value (code x block scale x 1/S) that an enc-recipe quantizer gives h
    [R, N] for any h inside [h_lo, h_hi] and any encode scale S inside [g_lo, g_hi] (float32 0-d): the block
    scale byte lies between the bytes of the block amax bounds at the S ends (monotone in both), the code
    is monotone in h and, for a fixed byte, in h * S (non-decreasing in S for h > 0, non-increasing for
    h < 0), and 1/S is monotone; every candidate byte between the two ends is tried."""
    r, n = h_lo.shape
    b_lo, b_hi = h_lo.view(r, n // 16, 16), h_hi.view(r, n // 16, 16)
    straddles_zero = (b_lo <= 0) & (b_hi >= 0)
    amax_lo = torch.where(straddles_zero, 0.0, torch.minimum(b_lo.abs(), b_hi.abs())).amax(-1).float()
    amax_hi = torch.maximum(b_lo.abs(), b_hi.abs()).amax(-1).float()
    byte_lo = block_scale_bytes(amax_lo, recipe=recipe, global_scale_f32=g_lo).to(torch.int16)
    byte_hi = block_scale_bytes(amax_hi, recipe=recipe, global_scale_f32=g_hi).to(torch.int16)
    d_lo = torch.reciprocal(g_hi.float()).double()  # the float32 1/S the GEMM folds into alpha
    d_hi = torch.reciprocal(g_lo.float()).double()
    x_lo, x_hi = f32_down(b_lo), f32_up(b_hi)
    lo = torch.full_like(b_lo, float("inf"))
    hi = torch.full_like(b_hi, float("-inf"))
    for step in range(int((byte_hi - byte_lo).max()) + 1 if byte_lo.numel() else 0):
        byte = torch.minimum(byte_lo + step, byte_hi).to(torch.uint8)
        sc = e4m3_bytes_to_f32(byte).double()[..., None]
        vals = [e2m1_codes_to_f32(e2m1_codes_with_scale(xx, byte, recipe=recipe, global_scale_f32=gg)).double()
                for xx in (x_lo, x_hi) for gg in (g_lo, g_hi)]
        v_min, v_max = torch.minimum(vals[0], vals[1]), torch.maximum(vals[2], vals[3])
        corners = torch.stack([v * sc * d for v in (v_min, v_max) for d in (d_lo, d_hi)])
        lo, hi = torch.minimum(lo, corners.amin(0)), torch.maximum(hi, corners.amax(0))
    return lo.view(r, n), hi.view(r, n)
