"""Linear layers of a DeepSeek layer, in the two reference modes, for NVFP4, FP8 block-128 and BF16 weights.

Modes (DESIGN.md "Stages", ways 2 and 3):
- "emulated": what a faithful production kernel computes. The activation is quantized
  to the weight's format (NVFP4 with a recipe and a global scale; FP8 1x128 blocks for
  FP8 weights; none for BF16), every product of decoded operands is exact, the dot
  products are taken in float64 (exact up to ~2^-53) and the result is rounded ONCE to
  the output dtype. A kernel differs from this only by its accumulation order/width,
  which the GEMM verdict bounds.
- "high": unquantized activations (float64), dequantized weights (float64), no
  rounding to a storage dtype: the format's own loss is emulated - high.

Weights are plain tensors in checkpoint layout (bytes as stored); verify/ builds these
from its loader. Nothing here picks a device: tensors stay where they are given.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from references.codecs import e4m3_bytes_to_f32, round_f64_to
from references.fp8_act import FP8_ACT_F32, FP8_ACT_UE8M0, quantize_act_fp8_1x128
from references.nvfp4 import (
    Nvfp4Quantized,
    amax_by_recipe,
    decode_nvfp4_block_scaled,
    global_dec_scale_from_amax,
    global_enc_scale_from_dec,
    quantize_nvfp4,
    te_global_enc_scale,
)
from references.recipes import Recipe

__all__ = [
    "MODES",
    "ACT_SCALE_MODES",
    "Nvfp4Weight",
    "weight_experts",
    "grouped_linear",
    "Fp8Block128Weight",
    "Bf16Weight",
    "Weight",
    "Fp8Block128Act",
    "nvfp4_global_scale_for",
    "quantize_act_nvfp4",
    "act_global_dec_f32",
    "quantize_act_fp8_block128",
    "dequantize_weight_f64",
    "decode_weight_f64",
    "quantize_act_for",
    "quantized_operands",
    "linear",
    "rms_norm",
]

MODES = ("emulated", "high")
ACT_SCALE_MODES = ("dynamic", "static")
FP8_BLOCK = 128
FP8_SCALE_FMTS = ("ue8m0", "f32")


@dataclass(frozen=True)
class Nvfp4Weight:
    """ModelOpt NVFP4 weight (or a stack: every tensor with a leading [E]).

    packed_u8 [..., N, K/2] (element 2i low nibble); sf_u8 [..., N, K/16] E4M3 bytes, linear;
    global_dec_f32 [...] weight_scale_2; input_scale_f32 [...] static activation decode
    scale (amax_x / 2688) or None.
    """

    packed_u8: Tensor
    sf_u8: Tensor
    global_dec_f32: Tensor
    input_scale_f32: Tensor | None = None

    @property
    def n(self) -> int:
        return self.packed_u8.shape[-2]

    @property
    def k(self) -> int:
        return self.packed_u8.shape[-1] * 2

    def expert(self, e: int) -> "Nvfp4Weight":
        return Nvfp4Weight(self.packed_u8[e], self.sf_u8[e], self.global_dec_f32[e],
                           None if self.input_scale_f32 is None else self.input_scale_f32[e])


@dataclass(frozen=True)
class Fp8Block128Weight:
    """E4M3 weight bytes [..., N, K] with float32 128x128 block decode scales [..., ceil(N/128), ceil(K/128)]."""

    e4m3_u8: Tensor
    block_dec_f32: Tensor

    @property
    def n(self) -> int:
        return self.e4m3_u8.shape[-2]

    @property
    def k(self) -> int:
        return self.e4m3_u8.shape[-1]

    def expert(self, e: int) -> "Fp8Block128Weight":
        return Fp8Block128Weight(self.e4m3_u8[e], self.block_dec_f32[e])


@dataclass(frozen=True)
class Bf16Weight:
    """An unquantized weight [..., N, K] (bf16, or float32 as stored)."""

    w: Tensor

    @property
    def n(self) -> int:
        return self.w.shape[-2]

    @property
    def k(self) -> int:
        return self.w.shape[-1]

    def expert(self, e: int) -> "Bf16Weight":
        return Bf16Weight(self.w[e])


Weight = Nvfp4Weight | Fp8Block128Weight | Bf16Weight


# ----------------------------------------------------------------------------- weights


def _expand_blocks(scale: Tensor, n: int, k: int) -> Tensor:
    return scale.repeat_interleave(FP8_BLOCK, dim=-2)[..., :n, :].repeat_interleave(FP8_BLOCK, dim=-1)[..., :k]


# Decoded weights of recent calls: a verdict decodes the same weight for every candidate, check and injected bug
# (the CPU selftest: 51 000 decodes of a few dozen weights, experts as views of their stack). Keyed by where the
# bytes are (address, shape, strides, dtype, device) and the version counter a view shares with its base (an in-place
# write bumps it: a changed weight is decoded again); an entry holds its input tensors, so their memory cannot be
# reused while it lives. A hit returns a copy (a caller may write into its result). Bounded in bytes.
_DECODE_MEMO: OrderedDict[tuple, tuple[tuple[Tensor, ...], Tensor]] = OrderedDict()
_DECODE_MEMO_BYTES = 256 << 20  # float64 results kept at most (the oldest go first)
_DECODE_MEMO_ENTRY_BYTES = 32 << 20  # larger results are not kept
_decode_memo_held = 0


def _decoded_memo(inputs: tuple[Tensor, ...], decode) -> Tensor:
    global _decode_memo_held
    if any(t.is_inference() for t in inputs):  # no version counter to key on (torch.inference_mode tensors)
        return decode()
    key = tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version) for t in inputs)
    hit = _DECODE_MEMO.get(key)
    if hit is not None:
        _DECODE_MEMO.move_to_end(key)
        return hit[1].clone()
    out = decode()
    size = out.numel() * out.element_size()
    if size <= _DECODE_MEMO_ENTRY_BYTES:
        _DECODE_MEMO[key] = (inputs, out.clone())
        _decode_memo_held += size
        while _decode_memo_held > _DECODE_MEMO_BYTES:
            _, (_, old) = _DECODE_MEMO.popitem(last=False)
            _decode_memo_held -= old.numel() * old.element_size()
    return out


def decode_weight_f64(w: Weight) -> Tensor:
    """The weight without its per-tensor global scale, float64 [..., N, K] (exact):
    NVFP4 e2m1 * block scale; FP8 e4m3 * block scale (the whole value); BF16 as is. Recent results are
    remembered (_decoded_memo: by the byte tensors' place and version; a new tensor each call)."""
    if isinstance(w, Nvfp4Weight):
        return _decoded_memo((w.packed_u8, w.sf_u8),
                             lambda: decode_nvfp4_block_scaled(w.packed_u8, w.sf_u8, dtype=torch.float64))
    if isinstance(w, Fp8Block128Weight):
        return _decoded_memo((w.e4m3_u8, w.block_dec_f32), lambda: e4m3_bytes_to_f32(w.e4m3_u8).double()
                             * _expand_blocks(w.block_dec_f32.double(), w.n, w.k))
    return w.w.double()


def dequantize_weight_f64(w: Weight) -> Tensor:
    """The weight's real values in float64 (NVFP4: decode * weight_scale_2, exact in float64)."""
    d = decode_weight_f64(w)
    if isinstance(w, Nvfp4Weight):
        d = d * w.global_dec_f32.double()[..., None, None]
    return d


# ----------------------------------------------------------------------------- activations


def nvfp4_global_scale_for(x: Tensor, *, recipe: Recipe, input_scale_f32: Tensor | None) -> dict[str, Tensor]:
    """The activation global scale in the recipe's convention, as a quantize_nvfp4 keyword.

    Static (input_scale_f32 given, a decode scale amax/2688 from the checkpoint): enc
    recipes get S = 1/input_scale (float32 reciprocal), dec recipes D = input_scale.
    Dynamic (None): amax over all of x, NaN elements by the recipe's NaN rule (te / vllm ignore
    them, fmaxf semantics, as they do in the block max; modelopt / torchao propagate them); enc
    recipes S = te_global_enc_scale(amax), dec recipes D = amax/2688.
    """
    if input_scale_f32 is not None:
        d = input_scale_f32.to(torch.float32).reshape(())
        if recipe.global_convention == "enc":
            return {"global_enc_scale_f32": global_enc_scale_from_dec(d)}
        return {"global_dec_scale_f32": d}
    amax = amax_by_recipe(x, recipe).to(torch.float32) if x.numel() else \
        torch.zeros((), dtype=torch.float32, device=x.device)
    if recipe.global_convention == "enc":
        return {"global_enc_scale_f32": te_global_enc_scale(amax)}
    return {"global_dec_scale_f32": global_dec_scale_from_amax(amax)}


def act_global_dec_f32(q: Nvfp4Quantized, input_scale_f32: Tensor | None) -> Tensor:
    """The activation decode multiplier a GEMM's alpha uses: static, the checkpoint's input_scale
    itself (alpha = input_scale * weight_scale_2, as loaders form it; NVFP4_FACTS section 4), never
    1/(1/input_scale), which differs by an ulp for some values; dynamic, q's D or 1/S (float32)."""
    if input_scale_f32 is not None:
        return input_scale_f32.to(torch.float32).reshape(())
    return q.global_dec_scale().to(torch.float32).reshape(())


def quantize_act_nvfp4(x: Tensor, *, recipe: Recipe, input_scale_f32: Tensor | None) -> Nvfp4Quantized:
    """bf16 [M, K] -> NVFP4 with a static (input_scale) or dynamic (amax) global scale."""
    return quantize_nvfp4(x, recipe=recipe, **nvfp4_global_scale_for(x, recipe=recipe, input_scale_f32=input_scale_f32))


@dataclass(frozen=True)
class Fp8Block128Act:
    """FP8 activation: e4m3_u8 [M, K]; block_dec_f32 [M, ceil(K/128)] (one scale per 1x128 block)."""

    e4m3_u8: Tensor
    block_dec_f32: Tensor

    def decode_f64(self) -> Tensor:
        k = self.e4m3_u8.shape[-1]
        return e4m3_bytes_to_f32(self.e4m3_u8).double() * self.block_dec_f32.double().repeat_interleave(FP8_BLOCK, -1)[..., :k]


def quantize_act_fp8_block128(x: Tensor, *, scale_fmt: str = "ue8m0") -> Fp8Block128Act:
    """DeepSeek's act_quant: per 1x128 block, s = max(amax, 1e-4) / 448 (float32), rounded up to a
    power of two for scale_fmt "ue8m0" (V4's FP8 path) or kept for "f32"; codes = E4M3(x / s)
    (RNE, saturating). The recipe FP8_ACT_UE8M0 / FP8_ACT_F32 of references.fp8_act, with the
    scales decoded to float32 (exact)."""
    if scale_fmt not in FP8_SCALE_FMTS:
        raise ValueError(f"scale_fmt={scale_fmt!r}: expected 'ue8m0' or 'f32'")
    q = quantize_act_fp8_1x128(x, recipe=FP8_ACT_UE8M0 if scale_fmt == "ue8m0" else FP8_ACT_F32)
    return Fp8Block128Act(q.e4m3_u8, q.block_dec_scale_f32())


# ----------------------------------------------------------------------------- linear


def _act_scale_for(w: Nvfp4Weight, act_scale: str) -> Tensor | None:
    if act_scale not in ACT_SCALE_MODES:
        raise ValueError(f"act_scale={act_scale!r}: expected one of {ACT_SCALE_MODES}")
    if act_scale == "dynamic":
        return None
    if w.input_scale_f32 is None:
        raise ValueError("act_scale='static' needs the weight's input_scale, which is missing")
    return w.input_scale_f32


def quantize_act_for(x: Tensor, w: Weight, *, recipe: Recipe, act_scale: str = "dynamic",
                     input_scale_f32: Tensor | None = None,
                     fp8_scale_fmt: str = "ue8m0") -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """x [M, K'] quantized to what weight w's GEMM takes: (a_f64, alpha_f32 or None, activation tensors).

    NVFP4: `recipe`, global scale static from input_scale_f32 (else the weight's input_scale
    when act_scale="static", else dynamic from amax over x); a_f64 = decoded values without
    the global scale; alpha = float32(a_dec * w_dec) with a_dec from act_global_dec_f32.
    FP8: per 1x128 block (DeepSeek's act_quant), a_f64 fully decoded, alpha None. BF16: x as bf16.
    K' may differ from w.k (grouped projections quantize their whole input once).
    """
    if isinstance(w, Nvfp4Weight):
        scale = input_scale_f32 if input_scale_f32 is not None else _act_scale_for(w, act_scale)
        q = quantize_act_nvfp4(x, recipe=recipe, input_scale_f32=scale)
        a_dec = act_global_dec_f32(q, scale)
        acts = {"packed_u8": q.packed_u8, "sf_u8": q.sf_u8, "global_dec_f32": a_dec.reshape(1)}
        return (decode_nvfp4_block_scaled(q.packed_u8, q.sf_u8, dtype=torch.float64),
                a_dec * w.global_dec_f32.to(torch.float32), acts)
    if isinstance(w, Fp8Block128Weight):
        a = quantize_act_fp8_block128(x, scale_fmt=fp8_scale_fmt)
        return a.decode_f64(), None, {"e4m3_u8": a.e4m3_u8, "block_dec_f32": a.block_dec_f32}
    return x.to(torch.bfloat16).double(), None, {}


def quantized_operands(x: Tensor, w: Weight, *, recipe: Recipe, act_scale: str = "dynamic",
                       input_scale_f32: Tensor | None = None,
                       fp8_scale_fmt: str = "ue8m0") -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
    """What an emulated GEMM multiplies: (a_f64 [M, K], w_f64 [N, K], alpha_f32 or None, activation
    tensors); see quantize_act_for. w_f64 is decode_weight_f64(w) (no global scale)."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x {tuple(x.shape)}: last dim must be the weight's K={w.k}")
    a, alpha, acts = quantize_act_for(x, w, recipe=recipe, act_scale=act_scale, input_scale_f32=input_scale_f32,
                                      fp8_scale_fmt=fp8_scale_fmt)
    return a, decode_weight_f64(w), alpha, acts


def linear(x: Tensor, w: Weight, *, mode: str, recipe: Recipe, act_scale: str = "dynamic",
           input_scale_f32: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
           fp8_scale_fmt: str = "ue8m0") -> tuple[Tensor, dict[str, Tensor]]:
    """y = x @ W^T in `mode`. Returns (y, quantized-activation tensors keyed by name).

    emulated: y = round_{out_dtype}(a_f64 @ w_f64^T * alpha) with the operands of
    quantized_operands (one rounding of the exact result). high: float64 x @ dequantized W.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if mode == "high":
        if x.shape[-1] != w.k:
            raise ValueError(f"x {tuple(x.shape)}: last dim must be the weight's K={w.k}")
        return x.double() @ dequantize_weight_f64(w).T, {}
    a, b, alpha, acts = quantized_operands(x, w, recipe=recipe, act_scale=act_scale, input_scale_f32=input_scale_f32,
                                           fp8_scale_fmt=fp8_scale_fmt)
    y = a @ b.T
    return round_f64_to(y if alpha is None else y * alpha.double(), out_dtype), acts


def grouped_linear(x: Tensor, w: Weight, *, groups: int, mode: str, recipe: Recipe, act_scale: str = "dynamic",
                   input_scale_f32: Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                   fp8_scale_fmt: str = "ue8m0") -> tuple[Tensor, dict[str, Tensor]]:
    """DeepSeek-V4's wo_a in `mode`: x [M, groups*K] and one weight w [groups*R, K]; group g's columns times
    rows g*R:(g+1)*R of w (einsum "tgd,grd->tgr") -> [M, groups*R]. Returns (y, quantized-activation tensors).

    emulated: x quantized ONCE as a whole (quantize_act_for: one NVFP4 global scale over all of x; FP8 1x128
    per token, whose blocks never straddle two groups when K is a multiple of 128), y = round_{out_dtype}(
    einsum(a_f64, w_f64) * alpha), one rounding of the exact result. high: float64 x times dequantized W.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    t, n, k = x.shape[0], w.n, w.k
    if groups < 1 or n % groups or x.shape[-1] != groups * k:
        raise ValueError(f"x {tuple(x.shape)}, weight [{n}, {k}], groups={groups}: expected x [M, groups * K] and "
                         "N divisible by groups")
    if mode == "high":
        wa = dequantize_weight_f64(w).view(groups, n // groups, k)
        return torch.einsum("tgd,grd->tgr", x.double().view(t, groups, k), wa).reshape(t, n), {}
    a, alpha, acts = quantize_act_for(x, w, recipe=recipe, act_scale=act_scale, input_scale_f32=input_scale_f32,
                                      fp8_scale_fmt=fp8_scale_fmt)
    b = decode_weight_f64(w).view(groups, n // groups, k)
    y = torch.einsum("tgd,grd->tgr", a.view(t, groups, k), b).reshape(t, n)
    return round_f64_to(y if alpha is None else y * alpha.double(), out_dtype), acts


def rms_norm(x: Tensor, weight: Tensor, *, eps: float, mode: str) -> Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, in float64; emulated rounds once to bf16."""
    x64 = x.double()
    y = weight.double() * x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps)
    return y if mode == "high" else round_f64_to(y, torch.bfloat16)


def weight_experts(w: Weight, experts: range) -> Weight:
    """The references' expert stack w [E, N, ...] restricted to a range of its experts (views, no copy)."""
    lo, hi = experts.start, experts.stop
    if isinstance(w, Nvfp4Weight):
        return Nvfp4Weight(w.packed_u8[lo:hi], w.sf_u8[lo:hi], w.global_dec_f32[lo:hi],
                           None if w.input_scale_f32 is None else w.input_scale_f32[lo:hi])
    if isinstance(w, Fp8Block128Weight):
        return Fp8Block128Weight(w.e4m3_u8[lo:hi], w.block_dec_f32[lo:hi])
    if isinstance(w, Bf16Weight):
        return Bf16Weight(w.w[lo:hi])
    raise TypeError(f"weight_experts: {type(w).__name__} is no expert stack")
