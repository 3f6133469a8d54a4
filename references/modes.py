"""Numerics modes of a linear layer: what a GEMM multiplies, for each way kernels compute it.

A GEMM op of a backend declares one mode (DESIGN "Verdicts", numerics mode); the `mode` check
compares its output with every mode below that the weight's format allows and names the one(s) it
matches within that mode's rigorous accumulation bound. Each mode is defined by its operands: a_f64
[M, K] and w_f64 [N, K] whose products are exact in float32 (so only accumulation, alpha and the
output rounding differ between a faithful kernel and the float64 product), and a float32 alpha that
the kernel multiplies in its epilogue.

  w4a4       NVFP4 weight x NVFP4 activations quantized with the backend's recipe (static: the
             checkpoint's input_scale; dynamic: amax over x): references.linear.quantized_operands.
  w4a16      NVFP4 weight dequantized exactly (e2m1 x E4M3 block scale: <= 6 significant bits, exact
             in bf16) x the bf16 activations as given; alpha = weight_scale_2 (the global decode scale
             in the epilogue). What Marlin-style kernels compute on Hopper. A kernel that folds
             weight_scale_2 into bf16 block scales rounds each scale once more: it matches neither
             w4a16 nor bf16 exactly (reported as such, with its ratios).
  w4a8       NVFP4 weight x FP8 E4M3 activations, ONE per-tensor decode scale D8 (the convention of
             W4A8 NVFP4-FP8 kernels: per-tensor FP8 activations, block scales on the weight only):
             static D8 = 6 * input_scale (the NVFP4 calibration amax / 2688 re-expressed for E4M3's 448,
             float32 product), dynamic D8 = amax(x) / 448 (float32); codes = E4M3(x * (1 / D8)), RNE,
             saturating (references.fp8_act.quantize_act_fp8_per_tensor_static, "mul_reciprocal", as
             vLLM's scaled_fp8_quant); alpha = float32(D8 * weight_scale_2). E4M3 (4 bits) x e2m1 x E4M3
             (<= 6 bits): exact products.
  fp8_block  FP8 block-128 weight x DeepSeek's 1x128 FP8 activations (references.linear: the scale
             rule the weight's block scales imply); alpha 1 (the scales are in the operands).
  bf16       the weight dequantized and rounded once to bf16 (global scale included) x bf16
             activations; alpha 1. bf16 x bf16 products are exact in float32.

Modes per weight format (MODES_OF_FORMAT): NVFP4 w4a4, w4a16, w4a8, bf16; FP8 block-128 fp8_block,
bf16; BF16 bf16 only. Imports torch only (references/ rule); the mode names are the values of
verify.backends.protocol.NumericsMode.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from references.codecs import e4m3_bytes_to_f32, round_f64_to
from references.fp8_act import quantize_act_fp8_per_tensor_static
from references.gemm import U_FP32, gamma, half_ulp
from references.linear import (Bf16Weight, Fp8Block128Weight, Nvfp4Weight, Weight, decode_weight_f64,
                               dequantize_weight_f64, quantize_act_for)
from references.recipes import Recipe

__all__ = ["W4A4", "W4A16", "W4A8", "FP8_BLOCK", "BF16", "MODES", "MODES_OF_FORMAT", "modes_of_weight",
           "w4a8_act_dec_scale_f32", "mode_act_operand", "mode_operands", "mode_gemm_f64", "mode_gemm_f64_on", "linear_in_mode",
           "chunked_gemm_error_bound", "grouped_mode_gemm_f64", "grouped_linear_mode_gemm_f64"]

W4A4, W4A16, W4A8, FP8_BLOCK, BF16 = "w4a4", "w4a16", "w4a8", "fp8_block", "bf16"
MODES = (W4A4, W4A16, W4A8, FP8_BLOCK, BF16)
MODES_OF_FORMAT = {"nvfp4": (W4A4, W4A16, W4A8, BF16), "fp8_block": (FP8_BLOCK, BF16), "bf16": (BF16,)}
E4M3_MAX_OVER_E2M1_MAX = 6.0  # 2688 / 448: an NVFP4 decode scale amax/2688 times 6 is the E4M3 one, amax/448


def modes_of_weight(w: Weight) -> tuple[str, ...]:
    """The modes a GEMM on weight w can compute (module docstring)."""
    if isinstance(w, Nvfp4Weight):
        return MODES_OF_FORMAT["nvfp4"]
    if isinstance(w, Fp8Block128Weight):
        return MODES_OF_FORMAT["fp8_block"]
    return MODES_OF_FORMAT["bf16"]


def w4a8_act_dec_scale_f32(x: Tensor, input_scale_f32: Tensor | None) -> Tensor:
    """The w4a8 per-tensor FP8 decode scale D8 (float32 [1]): static 6 * input_scale, dynamic amax(x) / 448
    (NaN ignored, as the NVFP4 te recipe's amax; an all-zero x gives 1.0, so zeros stay zeros)."""
    if input_scale_f32 is not None:
        return (input_scale_f32.to(torch.float32).reshape(1) * E4M3_MAX_OVER_E2M1_MAX).to(torch.float32)
    xf = x.float()
    amax = torch.where(torch.isnan(xf), torch.zeros_like(xf), xf.abs()).amax() if x.numel() else xf.new_zeros(())
    d8 = (amax / 448.0).to(torch.float32)
    return torch.where(d8 > 0, d8, torch.ones_like(d8)).reshape(1)


def mode_act_operand(x: Tensor, w: Weight, mode: str, *, recipe: Recipe, input_scale_f32: Tensor | None = None,
                     fp8_scale_fmt: str = "ue8m0", groups: int = 1) -> tuple[Tensor, Tensor]:
    """(a_f64 [M, K], a_dec_f32 0-d): the activation operand of `mode` and the decode scale the kernel folds into
    its alpha (w4a4: the NVFP4 global decode scale; w4a8: D8; 1 where the operand is already its value).
    groups > 1: x [M, groups*K] of a grouped linear (grouped_linear_mode_gemm_f64), quantized as a whole."""
    if mode not in modes_of_weight(w):
        raise ValueError(f"mode={mode!r}: a {type(w).__name__} GEMM has modes {', '.join(modes_of_weight(w))}")
    if x.shape[-1] != groups * w.k:
        raise ValueError(f"x {tuple(x.shape)}: last dim must be groups={groups} times the weight's K={w.k}")
    one = torch.ones((), dtype=torch.float32, device=x.device)
    if mode in (W4A4, FP8_BLOCK):
        a, _, acts = quantize_act_for(x, w, recipe=recipe, input_scale_f32=input_scale_f32, fp8_scale_fmt=fp8_scale_fmt)
        return a, acts["global_dec_f32"].to(torch.float32).reshape(()) if mode == W4A4 else one
    if mode == W4A8:
        d8 = w4a8_act_dec_scale_f32(x, input_scale_f32)
        q = quantize_act_fp8_per_tensor_static(x, d8, encode_rule="mul_reciprocal")
        return e4m3_bytes_to_f32(q.e4m3_u8).double(), d8.reshape(())
    return x.to(torch.bfloat16).double(), one


def mode_operands(x: Tensor, w: Weight, mode: str, *, recipe: Recipe, input_scale_f32: Tensor | None = None,
                  fp8_scale_fmt: str = "ue8m0") -> tuple[Tensor, Tensor, Tensor]:
    """(a_f64 [M, K], w_f64 [N, K], alpha_f32 0-d) of `mode` for x [M, K] and weight w (module docstring);
    input_scale_f32: the static activation decode scale (None: dynamic). ValueError for a mode w's format
    does not have."""
    a, a_dec = mode_act_operand(x, w, mode, recipe=recipe, input_scale_f32=input_scale_f32,
                                fp8_scale_fmt=fp8_scale_fmt)
    return (a, *_mode_weight_operand(w, mode, a_dec))


def _mode_weight_operand(w: Weight, mode: str, a_dec: Tensor) -> tuple[Tensor, Tensor]:
    """(w_f64 [N, K], alpha_f32 0-d) of `mode` given the activation decode scale (mode_operands)."""
    if mode in (W4A4, W4A8, W4A16):  # the NVFP4 weight without its global scale; alpha = float32 product
        return decode_weight_f64(w), (a_dec * w.global_dec_f32.to(torch.float32).reshape(())).to(torch.float32)
    if mode == FP8_BLOCK:
        return decode_weight_f64(w), a_dec
    # BF16: the weight's real values rounded once to bf16, as a dequantize-then-bf16-GEMM path holds them
    w_bf16 = w.w.to(torch.bfloat16) if isinstance(w, Bf16Weight) else round_f64_to(dequantize_weight_f64(w), torch.bfloat16)
    return w_bf16.double(), a_dec


def mode_gemm_f64_on(x: Tensor, w: Weight, w_values: Tensor, mode: str, **kw) -> tuple[Tensor, Tensor, Tensor]:
    """mode_gemm_f64 with the weight's values replaced by w_values [N, K] (its real values, global scale
    included: a backend's own decoded prepared weight): (y64, sum |a w_values|, a_dec_f32). bf16 rounds
    w_values to bf16 as the mode does."""
    a, a_dec = mode_act_operand(x, w, mode, **kw)
    wv = w_values.double() if mode != BF16 else w_values.to(torch.bfloat16).double()
    return (a @ wv.T) * a_dec.double(), a.abs() @ wv.abs().T, a_dec


def mode_gemm_f64(x: Tensor, w: Weight, mode: str, **kw) -> tuple[Tensor, Tensor, Tensor]:
    """(y64 = alpha * a @ w^T, sum_k |a_k w_k| (without alpha), alpha_f32) of `mode` (mode_operands)."""
    a, b, alpha = mode_operands(x, w, mode, **kw)
    return (a @ b.T) * alpha.double(), a.abs() @ b.abs().T, alpha


def grouped_linear_mode_gemm_f64(x: Tensor, w: Weight, mode: str, *, groups: int, w_values: Tensor | None = None,
                                 **kw) -> tuple[Tensor, Tensor, Tensor]:
    """mode_gemm_f64 of a grouped linear (DeepSeek-V4's wo_a, references.linear.grouped_linear): x [M, groups*K]
    quantized ONCE as a whole (one global / per-tensor scale over all of x), group g's columns times rows
    g*N/groups:(g+1)*N/groups of w [N, K] -> (y64 [M, N], sum |a w| [M, N] (without alpha), alpha_f32 0-d).
    w_values [N, K]: the weight's values replaced (mode_gemm_f64_on; alpha is then the activation decode scale)."""
    if groups < 1 or w.n % groups:
        raise ValueError(f"groups={groups}: must divide the weight's N={w.n}")
    a, a_dec = mode_act_operand(x, w, mode, groups=groups, **kw)
    if w_values is None:
        b, alpha = _mode_weight_operand(w, mode, a_dec)
    else:
        b, alpha = (w_values.double() if mode != BF16 else w_values.to(torch.bfloat16).double()), a_dec
    m, n = x.shape[0], w.n
    av, bv = a.view(m, groups, w.k), b.view(groups, n // groups, w.k)
    y = torch.einsum("tgd,grd->tgr", av, bv).reshape(m, n)
    abs_dot = torch.einsum("tgd,grd->tgr", av.abs(), bv.abs()).reshape(m, n)
    return y * alpha.double(), abs_dot, alpha


def linear_in_mode(x: Tensor, w: Weight, mode: str, *, out_dtype: torch.dtype = torch.bfloat16, **kw) -> Tensor:
    """What a faithful kernel of `mode` returns: the float64 product rounded once to out_dtype."""
    return round_f64_to(mode_gemm_f64(x, w, mode, **kw)[0], out_dtype)


def chunked_gemm_error_bound(abs_dot_f64: Tensor, y64: Tensor, alpha_f32: Tensor, *, k: int, u_acc: float,
                             promotion_interval: int | None, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Per-element bound on |y - y64| for a kernel summing exact products in chunks of `promotion_interval`
    consecutive k with unit roundoff u_acc, each chunk promoted into a float32 sum, times the float32 alpha:
    (1 + gamma(L, u_acc)) (1 + gamma(n_chunks + 1, 2^-24)) - 1 relative to |alpha| sum_k |a_k w_k| (Higham
    3.1, a sum of sums), plus half an ulp of the output. promotion_interval None: one chunk of all K
    (references.gemm.gemm_error_bound with u_acc)."""
    length = k if promotion_interval is None else min(k, promotion_interval)
    n_chunks = 1 if promotion_interval is None else math.ceil(k / promotion_interval)
    outer = gamma(n_chunks + 1, U_FP32) if promotion_interval is not None else 0.0
    coeff = (1 + gamma(length + (1 if promotion_interval is None else 0), u_acc)) * (1 + outer) - 1
    acc = coeff * alpha_f32.to(torch.float64).abs() * abs_dot_f64
    return acc + half_ulp(y64.abs() + acc, out_dtype)


def grouped_mode_gemm_f64(rows: Tensor, offsets_i64: Tensor, w: Weight, mode: str, *, recipe: Recipe,
                          input_scale_f32: Tensor | None = None,
                          w_values: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The grouped GEMM of `mode`: rows offsets[e]:offsets[e+1] (expert-sorted, [R, K]) times expert e of the
    stack w ([E, N, ...]), each expert's activations quantized on their own (one global / per-tensor scale per
    expert, as the grouped quantizers do; input_scale_f32 [E] static, None dynamic). w_values [E, N, K]: the
    weights' values replaced (mode_gemm_f64_on; alpha is then the activation decode scale alone). Returns
    (y64 [R, N], abs_dot [R, N], alpha_f32 per row [R, 1]); zero-token experts are skipped."""
    out = torch.zeros(rows.shape[0], w.n, dtype=torch.float64, device=rows.device)
    abs_dot = torch.zeros_like(out)
    alpha = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
    bounds = offsets_i64.tolist()
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if lo == hi:
            continue
        scale = None if input_scale_f32 is None else input_scale_f32.reshape(-1)[e]
        if w_values is None:
            y, d, a = mode_gemm_f64(rows[lo:hi], w.expert(e), mode, recipe=recipe, input_scale_f32=scale)
        else:
            y, d, a = mode_gemm_f64_on(rows[lo:hi], w.expert(e), w_values[e], mode, recipe=recipe,
                                       input_scale_f32=scale)
        out[lo:hi], abs_dot[lo:hi], alpha[lo:hi] = y, d, a
    return out, abs_dot, alpha
