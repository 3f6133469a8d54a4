"""NVFP4 x NVFP4 GEMM reference: float64 result and a rigorous per-element error bound.

Decoded operands (e2m1 * E4M3 block scale) are exact in bf16 and fp32, so every
product a_k * b_k is exact and only the accumulation and the epilogue round. A
kernel accumulating K products in a format of unit roundoff u, then multiplying
by the float32 alpha (one more rounding) and rounding to the output dtype obeys

    |y - y64| <= gamma(K + 1, u) * |alpha| * sum_k |a_k b_k|  +  half an ulp of the output at |y64| + that

with gamma(n, u) = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., eq. 3.4). alpha is an input: the float32 product of the
two global decode scales that the kernel is given. DESIGN.md "Verdicts".
"""

from __future__ import annotations

import torch
from torch import Tensor

from references.nvfp4 import decode_nvfp4_block_scaled

__all__ = [
    "U_FP32",
    "gamma",
    "half_ulp",
    "nvfp4_gemm_f64",
    "nvfp4_grouped_gemm_f64",
    "gemm_error_bound",
    "grouped_gemm_error_bound",
    "bound_ratio",
]

U_FP32 = 2.0**-24


def gamma(n: int, u: float) -> float:
    """n u / (1 - n u); raises if n u >= 1 (no bound exists)."""
    if n * u >= 1:
        raise ValueError(f"gamma: n*u = {n * u} >= 1, the accumulation bound does not exist")
    return n * u / (1 - n * u)


_DTYPE_PRECISION = {torch.bfloat16: (8, -133), torch.float16: (11, -24), torch.float32: (24, -149)}


def half_ulp(x_f64: Tensor, dtype: torch.dtype) -> Tensor:
    """Half the spacing of `dtype` at |x| (upper bound over the binade; float64 in, float64 out).

    For |x| in [2^e, 2^(e+1)): ulp = 2^(e - p + 1), p the precision; subnormal floor at 2^emin_sub.
    """
    p, e_sub = _DTYPE_PRECISION[dtype]
    ax = x_f64.abs()
    e = torch.floor(torch.log2(torch.where(ax > 0, ax, torch.ones_like(ax))))
    ulp = torch.exp2(torch.clamp(e - p + 1, min=e_sub))
    return torch.where(ax > 0, ulp, torch.full_like(ax, 2.0**e_sub)) / 2


def _decoded_f64(packed_u8: Tensor, sf_u8: Tensor) -> Tensor:
    return decode_nvfp4_block_scaled(packed_u8, sf_u8, dtype=torch.float64)


def nvfp4_gemm_f64(a_packed_u8: Tensor, a_sf_u8: Tensor, b_packed_u8: Tensor, b_sf_u8: Tensor,
                   alpha_f32: Tensor) -> tuple[Tensor, Tensor]:
    """y64 = alpha * A @ B^T in float64, and sum_k |a_k b_k| (for the bound).

    A: [M, K/2] packed + [M, K/16] linear scales; B: [N, K/2] + [N, K/16] (checkpoint
    layout, K-major); alpha_f32: 0-d float32 (product of the global decode scales).
    Returns (y64 [M, N], abs_dot [M, N]) in float64.
    """
    a = _decoded_f64(a_packed_u8, a_sf_u8)
    b = _decoded_f64(b_packed_u8, b_sf_u8)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"K mismatch: A has K={a.shape[-1]}, B has K={b.shape[-1]}")
    alpha = alpha_f32.to(torch.float64)
    return (a @ b.T) * alpha, a.abs() @ b.abs().T


def gemm_error_bound(abs_dot_f64: Tensor, y64: Tensor, alpha_f32: Tensor, *, k: int, u_acc: float,
                     out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Per-element bound on |y - y64| for a kernel with accumulator unit roundoff u_acc."""
    acc = gamma(k + 1, u_acc) * alpha_f32.to(torch.float64).abs() * abs_dot_f64
    return acc + half_ulp(y64.abs() + acc, out_dtype)


def nvfp4_grouped_gemm_f64(a_packed_u8: Tensor, a_sf_u8: Tensor, b_packed_u8: Tensor, b_sf_u8: Tensor,
                           offsets_i64: Tensor, alpha_f32: Tensor) -> tuple[Tensor, Tensor]:
    """MoE grouped GEMM: rows offsets[e]:offsets[e+1] of A times expert e's B.

    A: [T, K/2], [T, K/16]; B: [E, N, K/2], [E, N, K/16]; offsets_i64: [E+1] (zero-token
    experts allowed); alpha_f32: [E] per-expert alpha. Returns (y64 [T, N], abs_dot [T, N]).
    One float64 matmul per expert with tokens (a loop over experts, not elements);
    empty experts are skipped and contribute nothing.
    """
    e = b_packed_u8.shape[0]
    if offsets_i64.numel() != e + 1 or alpha_f32.numel() != e:
        raise ValueError(f"offsets_i64 must have E+1={e + 1} entries and alpha_f32 E={e}; "
                         f"got {offsets_i64.numel()} and {alpha_f32.numel()}")
    a = _decoded_f64(a_packed_u8, a_sf_u8)                       # [T, K]
    if int(offsets_i64[-1]) != a.shape[0]:
        raise ValueError(f"offsets_i64[-1]={int(offsets_i64[-1])} != A rows {a.shape[0]}")
    n = b_packed_u8.shape[1]
    y = torch.zeros(a.shape[0], n, dtype=torch.float64, device=a.device)
    abs_dot = torch.zeros_like(y)
    bounds = offsets_i64.tolist()
    alpha = alpha_f32.to(torch.float64).reshape(-1).tolist()
    for i in range(e):
        lo, hi = bounds[i], bounds[i + 1]
        if hi == lo:
            continue
        b = _decoded_f64(b_packed_u8[i], b_sf_u8[i])              # [N, K]
        y[lo:hi] = (a[lo:hi] @ b.T) * alpha[i]
        abs_dot[lo:hi] = a[lo:hi].abs() @ b.abs().T
    return y, abs_dot


def grouped_gemm_error_bound(abs_dot_f64: Tensor, y64: Tensor, alpha_f32: Tensor, offsets_i64: Tensor, *,
                             k: int, u_acc: float, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Per-element bound for the grouped GEMM (per-row alpha of the row's expert)."""
    counts = offsets_i64[1:] - offsets_i64[:-1]
    alpha_rows = torch.repeat_interleave(alpha_f32.to(torch.float64), counts.to(alpha_f32.device)).unsqueeze(-1)
    acc = gamma(k + 1, u_acc) * alpha_rows.abs().to(abs_dot_f64.device) * abs_dot_f64
    return acc + half_ulp(y64.abs() + acc, out_dtype)


def bound_ratio(y: Tensor, y64: Tensor, bound_f64: Tensor) -> Tensor:
    """max |y - y64| / bound as a float64 0-d tensor (<= 1 passes). NaN in y gives inf."""
    err = (y.to(torch.float64) - y64).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    if err.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return (err / bound_f64).max()
