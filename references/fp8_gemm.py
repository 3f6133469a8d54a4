"""FP8 block-scaled GEMM reference: float64 product and a rigorous bound for a declared accumulator.

Operands: activation E4M3 codes a_k with 1x128 group decode scales sa (references.fp8_act), weight
E4M3 codes b_k with 128x128 block decode scales sb (references.fp8_weight; a per-tensor weight
scale is the same sb for every block). Element (m, n):

    y = sum_g sigma_g * T_g,   T_g = sum_{k in group g} a_k b_k (codes),   sigma_g = sa[m, g] * sb[n // 128, g]

Kernel model (Hopper FP8 tensor cores; DeepGEMM). Inside a promotion chunk c of L_c <= interval
consecutive k, products are summed in a NARROW accumulator of unit roundoff u_acc (the measured
~14 effective bits give u_acc = 2^-14 for round-to-nearest, 2^-13 for truncation); at the end of each
chunk the partial sum is promoted: scaled by the float32 product of the two scales and added to a
float32 accumulator (DeepGEMM: every 128 of K, one scale group). Let P_c = sum_{k in c} |a_k b_k|
(decoded), P = sum_c P_c, u = 2^-24, g = gamma(n_chunks + 1, u) and gamma(n, v) = n v / (1 - n v).

Derivation (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 3.1 and 4.2):
1. Narrow sum of chunk c, in any order (L_c - 1 additions, each with relative error <= u_acc):
   |t_c - S_c| <= gamma(L_c, u_acc) * sum |s_k|, where s_k are the summed terms. Either the codes
   (DeepGEMM: S_c = T_c, scaled after; sigma_c * sum|codes| = P_c) or decoded products formed with a
   float32 scale product (s_k = a_k b_k (1 + d), |d| <= u), so |e_c| <= gamma(L_c, u_acc)(1 + u) P_c.
2. Promotion: at most two float32 roundings per chunk (sigma = fl(sa * sb), fl(t_c * sigma)) and
   n_chunks - 1 float32 additions: every chunk's term carries a factor (1 + theta), |theta| <= g
   (Higham lemma 3.1; the d of step 1 when scales are folded into the products is one of them).
3. y_kernel - y = sum_c [sigma_c T_c theta_c + e_c (1 + theta_c)], so
       |y_kernel - y| <= (1 + g)(1 + u) * sum_c gamma(L_c, u_acc) P_c  +  g * P  +  (1 + g) n_chunks 2^-149
   (the last term: the absolute error of float32 multiplications that underflow, <= 2^-150 each).
4. The float64 reference below is not exact when scales are float32 (T_g has up to 44 significant
   bits, sigma_g 48): it adds at most gamma(n_groups + 2, 2^-53) * P, folded into the bound; so is
   the float64 rounding of the P_c themselves (a factor 1 + gamma(K + 2, 2^-53)).
5. Output rounding: half an ulp of the output dtype at |y64| + the accumulation bound.
With promotion skipped (one chunk of all K in the narrow accumulator), the bound above with the
declared interval no longer holds: a large running sum swallows small products (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from references.codecs import e4m3_bytes_to_f32
from references.fp8_act import FP8_ACT_GROUP, Fp8Act1x128
from references.fp8_weight import Fp8BlockScaledWeight
from references.gemm import U_FP32, gamma, half_ulp

__all__ = [
    "U_FP64",
    "fp8_block_operands",
    "fp8_block_gemm_f64",
    "abs_dot_by_chunk_f64",
    "fp8_block_gemm_error_bound",
    "round_f64_to_bits",
    "fp8_block_gemm_narrow_acc_model",
]

U_FP64 = 2.0**-53
_F32_UNDERFLOW = 2.0**-149  # two multiplications per chunk, each off by <= 2^-150 when it underflows


def fp8_block_operands(act: Fp8Act1x128, w: Fp8BlockScaledWeight) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(a codes f64 [M, K], sa f32 [M, G], b codes f64 [N, K], sb f32 [N, G]) with G = ceil(K/128):
    E4M3 values as float64 and the decode scale of each row's group (weight scales repeated over the
    128 rows of their block; a per-tensor scale over every group)."""
    m, k = act.e4m3_u8.shape
    if k != w.k:
        raise ValueError(f"act.e4m3_u8: K={k} does not match the weight's K={w.k}")
    sb = w.to_fp8_block128_weight().block_dec_f32.repeat_interleave(FP8_ACT_GROUP, dim=0)[:w.n]
    return (e4m3_bytes_to_f32(act.e4m3_u8).double(), act.block_dec_scale_f32(),
            e4m3_bytes_to_f32(w.e4m3_u8).double(), sb)


def _group(x: Tensor, g: int) -> Tensor:
    return x[:, g * FP8_ACT_GROUP:(g + 1) * FP8_ACT_GROUP]


def fp8_block_gemm_f64(act: Fp8Act1x128, w: Fp8BlockScaledWeight) -> Tensor:
    """y64 [M, N] = sum_g (A_g @ B_g^T) * sa_g sb_g^T in float64. Each group's code dot product is
    exact (multiples of 2^-18 below 2^26); the scaling rounds once per group at most (bound step 4)."""
    a, sa, b, sb = fp8_block_operands(act, w)
    y = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for g in range(sa.shape[1]):
        y = y + (_group(a, g) @ _group(b, g).T) * (sa[:, g, None].double() * sb[None, :, g].double())
    return y


def abs_dot_by_chunk_f64(act: Fp8Act1x128, w: Fp8BlockScaledWeight, *,
                         promotion_interval: int) -> list[tuple[int, Tensor]]:
    """[(L_c, P_c [M, N])] per promotion chunk: P_c = sum over the chunk's k of |a_k b_k| (decoded)."""
    a, sa, b, sb = fp8_block_operands(act, w)
    k = a.shape[1]
    a_dec = a.abs() * sa.double().abs().repeat_interleave(FP8_ACT_GROUP, -1)[:, :k]
    b_dec = b.abs() * sb.double().abs().repeat_interleave(FP8_ACT_GROUP, -1)[:, :k]
    chunks = [slice(lo, lo + promotion_interval) for lo in range(0, k, promotion_interval)]
    return [(min(promotion_interval, k - c.start), a_dec[:, c] @ b_dec[:, c].T) for c in chunks]


def fp8_block_gemm_error_bound(act: Fp8Act1x128, w: Fp8BlockScaledWeight, y64: Tensor, *, u_acc: float,
                               promotion_interval: int, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Per-element bound [M, N] on |y_kernel - y64| for a kernel that sums `promotion_interval`
    consecutive products with unit roundoff u_acc, then promotes to float32 (module docstring)."""
    if promotion_interval < 1:
        raise ValueError(f"promotion_interval={promotion_interval}: must be >= 1")
    k = act.e4m3_u8.shape[1]
    chunks = abs_dot_by_chunk_f64(act, w, promotion_interval=promotion_interval)
    n_chunks, n_groups = len(chunks), -(-k // FP8_ACT_GROUP)
    g = gamma(n_chunks + 1, U_FP32)
    f64_slack = 1 + gamma(k + 2, U_FP64)   # P_c themselves are float64 dot products (each within gamma(k))
    p_total = sum((p for _, p in chunks), torch.zeros_like(y64)) * f64_slack
    narrow = sum((gamma(length, u_acc) * p for length, p in chunks), torch.zeros_like(y64)) * f64_slack
    acc = ((1 + g) * (1 + U_FP32) * narrow + (g + gamma(n_groups + 2, U_FP64)) * p_total
           + (1 + g) * n_chunks * _F32_UNDERFLOW)
    return acc + half_ulp(y64.abs() + acc, out_dtype)


# ----------------------------------------------------------------------------- a model of a narrow-accumulator kernel


def round_f64_to_bits(x_f64: Tensor, *, bits: int, rounding: str) -> Tensor:
    """Round to a `bits`-bit significand (implicit bit included; unbounded exponent): "nearest"
    (ties to even, unit roundoff 2^-bits) or "truncate" (toward zero, 2^(1-bits))."""
    if rounding not in ("nearest", "truncate"):
        raise ValueError(f"rounding={rounding!r}: expected 'nearest' or 'truncate'")
    mant, exp = torch.frexp(x_f64)                 # x = mant * 2^exp, |mant| in [0.5, 1)
    scaled = torch.ldexp(mant, torch.full_like(exp, bits))
    q = torch.round(scaled) if rounding == "nearest" else torch.trunc(scaled)
    return torch.ldexp(q, exp - bits)


def fp8_block_gemm_narrow_acc_model(act: Fp8Act1x128, w: Fp8BlockScaledWeight, *, acc_bits: int, rounding: str,
                                    promotion_interval: int | None) -> Tensor:
    """What a kernel with an `acc_bits`-bit accumulator computes, float32 values as float64 [M, N].

    promotion_interval == 128 (DeepGEMM): per scale group, the codes' products summed in the narrow
    format, then acc_f32 += f32(t * f32(sa * sb)). Otherwise (a multiple of 128, or None = all of K:
    promotion skipped): the products a_k b_k = codes * f32(sa * sb) summed in the narrow format over
    the chunk, then acc_f32 += t. A model for testing bounds, not a reference of any one kernel:
    sums run sequentially in k (hardware uses trees; the bound allows any order).
    """
    if not 1 <= acc_bits <= 24:
        raise ValueError(f"acc_bits={acc_bits}: expected 1..24 (the partial sum must fit a float32)")
    a, sa, b, sb = fp8_block_operands(act, w)
    m, k = a.shape
    sigma = (sa[:, None, :] * sb[None, :, :]).double()        # [M, N, G], float32 products
    interval = k if promotion_interval is None else promotion_interval
    if interval % FP8_ACT_GROUP and interval < k:
        raise ValueError(f"promotion_interval={promotion_interval}: must be a multiple of {FP8_ACT_GROUP} or None")
    acc = torch.zeros(m, b.shape[0], dtype=torch.float32, device=a.device)
    t = torch.zeros(m, b.shape[0], dtype=torch.float64, device=a.device)
    for i in range(k):
        g = i // FP8_ACT_GROUP
        prod = a[:, i, None] * b[None, :, i]                  # exact: 4-bit x 4-bit significands
        term = prod if interval == FP8_ACT_GROUP else prod * sigma[:, :, g]
        t = round_f64_to_bits(t + term, bits=acc_bits, rounding=rounding)
        if (i + 1) % interval == 0 or i + 1 == k:
            promoted = t * sigma[:, :, g] if interval == FP8_ACT_GROUP else t
            acc = acc + promoted.to(torch.float32)
            t = torch.zeros_like(t)
    return acc.double()
