"""NVFP4 quantize / dequantize emulator (E2M1 values, E4M3 block scales over 16 elements).

Blocks run along the last dimension. Activations [M, K] and checkpoint weights
[N, K] (K-packed: [N, K/2] uint8 codes and [N, K/16] E4M3 scales) are the same
math; stacked experts [E, N, K] work too. Packing puts element 2i in the LOW
nibble: byte = (code[2i+1] << 4) | code[2i].

Global scale conventions (never a bare "global scale"):
  global_enc_scale_f32 = 2688 / amax   multiplies values into the format (te, vllm)
  global_dec_scale_f32 = amax / 2688   multiplies values out of it     (modelopt, torchao,
                                       and the checkpoint's weight_scale_2 / input_scale)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from references.codecs import (
    E4M3_MAX,
    round_f64_to,
    e2m1_codes_to_f32,
    e4m3_bytes_to_f32,
    f32_to_e2m1_codes,
    f32_to_e4m3_bytes,
)
from references.recipes import Recipe

__all__ = [
    "BLOCK",
    "FP4_X_FP8_MAX",
    "Nvfp4Quantized",
    "te_global_enc_scale",
    "global_dec_scale_from_amax",
    "global_enc_scale_from_dec",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "DEQUANT_ORDERS",
    "block_scale_f32",
    "e2m1_grid_values",
    "amax_by_recipe",
    "block_scale_bytes",
    "e2m1_codes_with_scale",
    "decode_nvfp4_block_scaled",
    "pack_e2m1x2_low_first",
    "unpack_e2m1x2_low_first",
    "quantize_nvfp4_weight_checkpoint",
]

BLOCK = 16
FP4_X_FP8_MAX = 2688.0  # 6 * 448, exact in float32
_FLT_MAX = torch.finfo(torch.float32).max
_ONE_SIXTH_F32 = 1.0 / 6.0  # rounded to float32 where it is used: 0x3E2AAAAB


def _const_like(t: Tensor, value: float) -> Tensor:
    """A float32 0-d constant on t's device. Divisions are always tensor / tensor on one
    device: torch evaluates `python_scalar / t` as reciprocal(t) * scalar and, on CUDA,
    `t / python_scalar` as t * (1 / scalar), both of which round twice."""
    return torch.tensor(value, dtype=torch.float32, device=t.device)


@dataclass(frozen=True)
class Nvfp4Quantized:
    """An NVFP4 tensor in checkpoint layout.

    packed_u8: [..., K // 2] uint8, element 2i in the low nibble.
    sf_u8: [..., K // 16] uint8 E4M3 block-scale bytes, linear (row-major) layout.
    global_enc_scale_f32 / global_dec_scale_f32: 0-d float32; exactly one is set,
        the one the recipe takes.
    recipe_name: the recipe that produced it.
    """

    packed_u8: Tensor
    sf_u8: Tensor
    global_enc_scale_f32: Tensor | None
    global_dec_scale_f32: Tensor | None
    recipe_name: str

    @property
    def k(self) -> int:
        return self.packed_u8.shape[-1] * 2

    def global_dec_scale(self) -> Tensor:
        """The float32 decode multiplier: D as given, or 1/S (float32 reciprocal) for enc recipes."""
        if self.global_dec_scale_f32 is not None:
            return self.global_dec_scale_f32
        return torch.reciprocal(self.global_enc_scale_f32)


def te_global_enc_scale(amax_f32: Tensor) -> Tensor:
    """S = 2688 / amax in float32, guarded as TransformerEngine does.

    min(S, FLT_MAX) for tiny amax; S = 1.0 when amax == 0 or S == 0 (amax inf).
    NaN amax gives NaN (a NaN tensor is a finding, not something to hide).
    """
    amax_f32 = amax_f32.to(torch.float32)
    s = torch.clamp(_const_like(amax_f32, FP4_X_FP8_MAX) / amax_f32, max=_FLT_MAX)
    return torch.where((amax_f32 == 0) | (s == 0), torch.ones_like(s), s)


def global_dec_scale_from_amax(amax_f32: Tensor) -> Tensor:
    """D = amax / 2688 in float32 (ModelOpt's weight_scale_2 and input_scale)."""
    return amax_f32.to(torch.float32) / _const_like(amax_f32, FP4_X_FP8_MAX)


def global_enc_scale_from_dec(global_dec_scale_f32: Tensor) -> Tensor:
    """S = 1 / D in float32: what a loader passes to an enc-convention quantizer for a
    checkpoint's input_scale. A lossy conversion (one rounding), so it is explicit."""
    return torch.reciprocal(global_dec_scale_f32.to(torch.float32))


# ----------------------------------------------------------------------------- packing


def pack_e2m1x2_low_first(codes_u8: Tensor) -> Tensor:
    """[..., C] codes (0..15) -> [..., C // 2] bytes, element 2i in the low nibble."""
    if codes_u8.dtype != torch.uint8:
        raise TypeError(f"codes_u8: expected torch.uint8, got {codes_u8.dtype}")
    if codes_u8.shape[-1] % 2:
        raise ValueError(f"codes_u8: last dim {codes_u8.shape[-1]} must be even to pack two codes per byte")
    pairs = codes_u8.reshape(*codes_u8.shape[:-1], codes_u8.shape[-1] // 2, 2)  # explicit: rows may be 0
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1x2_low_first(packed_u8: Tensor) -> Tensor:
    """[..., C // 2] bytes -> [..., C] codes, low nibble first."""
    if packed_u8.dtype != torch.uint8:
        raise TypeError(f"packed_u8: expected torch.uint8, got {packed_u8.dtype}")
    return torch.stack((packed_u8 & 0xF, packed_u8 >> 4), dim=-1).reshape(*packed_u8.shape[:-1], packed_u8.shape[-1] * 2)


# ----------------------------------------------------------------------------- quantize


def _check_global(recipe: Recipe, enc: Tensor | None, dec: Tensor | None) -> Tensor:
    if (enc is None) == (dec is None):
        raise ValueError("pass exactly one of global_enc_scale_f32 and global_dec_scale_f32")
    if recipe.global_convention == "enc" and enc is None:
        raise ValueError(
            f"recipe {recipe.name!r} takes global_enc_scale_f32 (2688/amax); convert a decode "
            "scale explicitly with global_enc_scale_from_dec(...)")
    if recipe.global_convention == "dec" and dec is None:
        raise ValueError(
            f"recipe {recipe.name!r} takes global_dec_scale_f32 (amax/2688); it has no encode-scale "
            "form (1/S is not bit-identical to amax/2688)")
    g = enc if enc is not None else dec
    name = "global_enc_scale_f32" if enc is not None else "global_dec_scale_f32"
    if g.dtype != torch.float32 or g.numel() != 1:
        raise ValueError(f"{name}: expected a 1-element float32 tensor, got {g.dtype} {tuple(g.shape)}")
    return g.reshape(())


def amax_by_recipe(x: Tensor, recipe: Recipe, *, dim: int | None = None) -> Tensor:
    """max |x| (over `dim`, or all of x) under the recipe's NaN rule: "ignore" (te, vllm: fmaxf, a NaN
    element does not raise the max) or "propagate" (modelopt, torchao). The block max and the dynamic
    tensor max use this one rule."""
    a = x.abs()
    if recipe.block_amax_nan == "ignore":
        a = torch.where(torch.isnan(a), torch.zeros((), dtype=a.dtype, device=a.device), a)
    return torch.amax(a) if dim is None else torch.amax(a, dim=dim)


def _block_scale_f32(v_f32: Tensor, g_f32: Tensor, recipe: Recipe) -> Tensor:
    """The float32 block scale before E4M3 rounding (association per recipe)."""
    sixth = _const_like(v_f32, _ONE_SIXTH_F32)
    rule = recipe.block_scale_rule
    if rule == "te":
        s = torch.clamp(v_f32 * (g_f32 * sixth), max=_FLT_MAX)
    elif rule == "vllm":
        s = g_f32 * (v_f32 * sixth)
    elif rule == "modelopt":
        s = v_f32 / (_const_like(v_f32, 6.0) * g_f32)
    else:  # torchao
        s = (v_f32 / _const_like(v_f32, 6.0)) / g_f32
    if recipe.zero_block_scale_to_one:
        s = torch.where(s == 0, torch.ones_like(s), s)
    if recipe.block_scale_lower_clamp is not None:
        s = torch.clamp(s, min=recipe.block_scale_lower_clamp, max=E4M3_MAX)
    return s


def _scaled_for_grid(xb_f32: Tensor, s_f32: Tensor, g_f32: Tensor, recipe: Recipe) -> Tensor:
    """x mapped onto the E2M1 grid (before clamping and rounding); s_f32 is the decoded scale."""
    s = s_f32.unsqueeze(-1)
    rule = recipe.encode_rule
    if rule == "recip_clamped":
        enc = torch.clamp(torch.reciprocal(s * torch.reciprocal(g_f32)), max=_FLT_MAX)
        return xb_f32 * enc
    if rule == "recip_or_zero":
        enc = torch.where(s != 0, torch.reciprocal(s * torch.reciprocal(g_f32)), torch.zeros_like(s))
        return xb_f32 * enc
    if rule == "divide":
        return xb_f32 / (s * g_f32)
    return xb_f32 * (torch.reciprocal(g_f32) / s)  # quotient (torchao)


def quantize_nvfp4(
    x: Tensor,
    *,
    recipe: Recipe,
    global_enc_scale_f32: Tensor | None = None,
    global_dec_scale_f32: Tensor | None = None,
) -> Nvfp4Quantized:
    """[..., K] bf16/fp16/fp32 -> NVFP4 (packed codes + linear E4M3 block scales).

    K must be a multiple of 16. Pass the global scale in the recipe's convention
    (te/vllm: global_enc_scale_f32 = 2688/amax; modelopt/torchao:
    global_dec_scale_f32 = amax/2688); the other raises ValueError.
    Source: NVFP4_FACTS.md section 2 (see references.recipes for the table).
    """
    if not x.dtype.is_floating_point or x.dtype.itemsize > 4:
        raise TypeError(f"x: expected bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % BLOCK:
        raise ValueError(f"x: last dim (K) must be a multiple of {BLOCK}, got shape {tuple(x.shape)}")
    g = _check_global(recipe, global_enc_scale_f32, global_dec_scale_f32).to(x.device)
    xb = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    v = amax_by_recipe(xb, recipe, dim=-1)
    sf_u8 = f32_to_e4m3_bytes(_block_scale_f32(v, g, recipe), saturate=True)
    y = _scaled_for_grid(xb, e4m3_bytes_to_f32(sf_u8), g, recipe)
    # the codec saturates at +-6, which is the recipes' clamp to [-6, 6]
    codes = f32_to_e2m1_codes(y, sign_rule=recipe.sign_rule).reshape(x.shape)
    return Nvfp4Quantized(
        packed_u8=pack_e2m1x2_low_first(codes),
        sf_u8=sf_u8,
        global_enc_scale_f32=global_enc_scale_f32.reshape(()) if global_enc_scale_f32 is not None else None,
        global_dec_scale_f32=global_dec_scale_f32.reshape(()) if global_dec_scale_f32 is not None else None,
        recipe_name=recipe.name,
    )


def block_scale_bytes(block_amax_f32: Tensor, *, recipe: Recipe, global_scale_f32: Tensor) -> Tensor:
    """E4M3 block-scale bytes the recipe gives blocks whose amax is `block_amax_f32` (any shape),
    with the recipe's global scale (S for enc recipes, D for dec). Monotone non-decreasing in the
    amax: the interval rule of fused stages bounds a kernel's byte by the bytes of its amax bounds."""
    g = global_scale_f32.to(torch.float32).reshape(())
    return f32_to_e4m3_bytes(_block_scale_f32(block_amax_f32.to(torch.float32), g, recipe), saturate=True)


def block_scale_f32(block_amax_f32: Tensor, *, recipe: Recipe, global_scale_f32: Tensor) -> Tensor:
    """The float32 block scale the recipe forms before its E4M3 rounding (association and clamps per
    recipe): where a value lies between two E4M3 bytes, e.g. exactly on a midpoint (a tie)."""
    g = global_scale_f32.to(torch.float32).reshape(())
    return _block_scale_f32(block_amax_f32.to(torch.float32), g, recipe)


def e2m1_grid_values(xb_f32: Tensor, sf_u8: Tensor, *, recipe: Recipe, global_scale_f32: Tensor) -> Tensor:
    """Blocks xb_f32 [..., 16] mapped onto the E2M1 grid under the block-scale bytes sf_u8 [...] (the
    recipe's encode rule), before clamping and rounding: an element whose value is 0.25, 0.75, ... 5 is
    an E2M1 tie."""
    g = global_scale_f32.to(torch.float32).reshape(())
    return _scaled_for_grid(xb_f32.to(torch.float32), e4m3_bytes_to_f32(sf_u8), g, recipe)


def e2m1_codes_with_scale(xb_f32: Tensor, sf_u8: Tensor, *, recipe: Recipe, global_scale_f32: Tensor) -> Tensor:
    """E2M1 codes of blocks xb_f32 [..., 16] under GIVEN block-scale bytes sf_u8 [...] (the recipe's
    encode rule and sign rule): what a quantizer that chose those scale bytes writes for x."""
    g = global_scale_f32.to(torch.float32).reshape(())
    y = _scaled_for_grid(xb_f32.to(torch.float32), e4m3_bytes_to_f32(sf_u8), g, recipe)
    return f32_to_e2m1_codes(y, sign_rule=recipe.sign_rule)


def decode_nvfp4_block_scaled(packed_u8: Tensor, sf_u8: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """e2m1(code) * e4m3(block scale), without the global scale: exact in float32
    (and in bf16: at most 6 significant bits). [..., K/2], [..., K/16] -> [..., K]."""
    if sf_u8.dtype == torch.float8_e4m3fn:
        sf_u8 = sf_u8.view(torch.uint8)
    k = packed_u8.shape[-1] * 2
    if sf_u8.shape[:-1] != packed_u8.shape[:-1] or sf_u8.shape[-1] * BLOCK != k:
        raise ValueError(
            f"sf_u8 shape {tuple(sf_u8.shape)} does not match packed_u8 {tuple(packed_u8.shape)}: "
            f"expected [..., {k // BLOCK}] scales for K={k}")
    vals = e2m1_codes_to_f32(unpack_e2m1x2_low_first(packed_u8)).reshape(*sf_u8.shape, BLOCK)
    out = vals * e4m3_bytes_to_f32(sf_u8).unsqueeze(-1)
    return out.reshape(*packed_u8.shape[:-1], k).to(dtype)


DEQUANT_ORDERS = ("exact", "torchao", "modelopt", "vllm")


def _order_name(order) -> str:
    name = getattr(order, "name", order)
    if name not in DEQUANT_ORDERS:
        raise ValueError(f"order={name!r}: expected one of {DEQUANT_ORDERS} (or a Recipe of those names); recipe "
                         "'te' documents no dequantize of its own: use 'exact'")
    return name


def dequantize_nvfp4(q: Nvfp4Quantized, *, dtype: torch.dtype = torch.float32, order="exact") -> Tensor:
    """NVFP4 -> values in `dtype`, in one of four documented float orders (c = E2M1 code value,
    s = decoded E4M3 block scale, D = the float32 decode scale, S = the float32 encode scale):

      exact     round_dtype(c * s * D): ONE rounding of the exact product into `dtype`, D being the decode
                multiplier the suite's GEMMs fold into alpha (q.global_dec_scale(): D as given, or the
                float32 1/S of enc recipes); what the verdicts use (no library's order is privileged).
      torchao   round_dtype(fl32(c * fl32(D * s))): NVFP4Tensor.dequantize with get_hp_scales in
                torchao/prototype/mx_formats/nvfp4_tensor.py, torchao 0.18 (per_tensor_scale *
                scale_e4m3.to(torch.float) first, then data_f32 * that, then .to(output_dtype)).
      modelopt  round_dtype(fl32(c * fl32(s * D))): NVFP4QTensor.dequantize (fast=False) in
                modelopt/torch/quantization/qtensor/nvfp4_tensor.py (per_block_scale = scale.float() *
                double_scale, then values * per_block_scale, then .to(dtype)).
      vllm      round_dtype(fl32(c * fl32(s / S))): dequantize_nvfp4_to_dtype in vLLM's
                tests/kernels/quantization/nvfp4_utils.py (tensor_sf.float() / global_scale with the
                ENCODE scale, then codes * that, then .to(dtype)).

    The library orders round twice (the scale product, then the code product; then the cast), so they
    differ from `exact` by an ulp on some elements (test_dequant_libraries); torchao and modelopt form
    the same float32 product (D * s = s * D), vllm divides by S instead.
    torchao and modelopt take D; vllm takes S: a tensor holding the other direction is refused with a
    ValueError (converting silently would be a third order). `order` may be a Recipe (its name).
    Each step is computed as an exact float64 product (or a float64 quotient, whose double rounding
    to float32 / bf16 is innocuous: 53 >= 2 * 24 + 2) rounded once to float32 with round_f64_to.
    """
    name = _order_name(order)
    codes = e2m1_codes_to_f32(unpack_e2m1x2_low_first(q.packed_u8)).double()
    c = codes.reshape(*q.sf_u8.shape, BLOCK)
    s = e4m3_bytes_to_f32(q.sf_u8.view(torch.uint8) if q.sf_u8.dtype != torch.uint8 else q.sf_u8).double()[..., None]
    enc = q.global_enc_scale_f32
    dec = q.global_dec_scale_f32
    shape = q.packed_u8.shape[:-1] + (q.k,)
    if name == "exact":  # c * s * D is exact in float64 (3 + 4 + 24 significant bits)
        return round_f64_to((c * s) * q.global_dec_scale().double(), dtype).reshape(shape)
    if name in ("torchao", "modelopt"):
        if dec is None:
            raise ValueError(f"q: order={name!r} multiplies by the DECODE scale (amax/2688), but q holds an encode "
                             "scale (recipe te/vllm); dequantize it with order='exact' or 'vllm'")
        scale = round_f64_to(s * dec.double(), torch.float32).double()
    else:  # vllm
        if enc is None:
            raise ValueError("q: order='vllm' divides by the ENCODE scale (2688/amax), but q holds a decode scale "
                             "(recipe modelopt/torchao); dequantize it with order='exact', 'torchao' or 'modelopt'")
        scale = round_f64_to(s / enc.double(), torch.float32).double()
    out_f32 = round_f64_to(c * scale, torch.float32)
    return round_f64_to(out_f32.double(), dtype).reshape(shape)


def quantize_nvfp4_weight_checkpoint(w: Tensor, *, recipe: Recipe, amax_f32: Tensor | None = None) -> dict[str, Tensor]:
    """A weight [..., N, K] -> the ModelOpt checkpoint tensors of one NVFP4 linear.

    Returns {"weight": uint8 [..., N, K/2], "weight_scale": float8_e4m3fn [..., N, K/16]
    (bytes reinterpreted, never value-cast), "weight_scale_2": float32 0-d = amax/2688}.
    amax defaults to max |w| (NaN-propagating). Enc-convention recipes get 1/weight_scale_2.
    """
    amax = torch.amax(w.abs()).to(torch.float32) if amax_f32 is None else amax_f32.to(torch.float32).reshape(())
    dec = global_dec_scale_from_amax(amax)
    if recipe.global_convention == "dec":
        q = quantize_nvfp4(w, recipe=recipe, global_dec_scale_f32=dec)
    else:
        q = quantize_nvfp4(w, recipe=recipe, global_enc_scale_f32=global_enc_scale_from_dec(dec))
    return {"weight": q.packed_u8, "weight_scale": q.sf_u8.view(torch.float8_e4m3fn), "weight_scale_2": dec}
