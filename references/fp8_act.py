"""FP8 activation quantization of DeepSeek-style block-scaled linears, as a recipe.

Per token (row), groups of 128 consecutive elements along K (the last group may be shorter:
it is zero-padded, which changes no amax), E4M3 values and one decode scale per group
(NVFP4_FACTS.md section 5b). With v the group's max |x| (float32):

    s   = max(v, amax_floor) / 448                     float32, correctly rounded
    s   = 2^ceil(log2 s)  (scale_rule "ue8m0_ceil")    on the f32 bits: exponent + (mantissa != 0)
    y   = x / s  ("divide")  or  x * (1 / s)  ("mul_reciprocal")
    e4m3 = RNE(clamp(y, -448, 448))                    the explicit clamp engines write; the
                                                       hardware conversion saturates as well

Which engine does what (the recipes below; every byte-changing choice is a field):

| recipe            | scale rule | stored as   | floor | encode         | used by                                 |
|-------------------|------------|-------------|-------|----------------|-----------------------------------------|
| FP8_ACT_UE8M0     | ue8m0_ceil | UE8M0 bytes | 1e-4  | divide         | DeepSeek's reference act_quant (V4,     |
|                   |            |             |       |                | "ue8m0"); DeepGEMM on Blackwell         |
| FP8_ACT_F32       | f32        | float32     | 1e-4  | divide         | DeepSeek's reference, no scale_fmt;     |
|                   |            |             |       |                | DeepGEMM on Hopper (plain amax/448)     |
| FP8_ACT_F32_RECIP | f32        | float32     | 1e-4  | mul_reciprocal | DeepGEMM's per_token_cast_to_fp8 test   |
|                   |            |             |       |                | helper (x * (1/sf))                     |

Under ue8m0_ceil, 1/s is a power of two, so "divide" and "mul_reciprocal" give the same bytes;
under f32 they differ by an ulp of y on some inputs (then, rarely, by one E4M3 code).
Kernels that divide with an approximate reciprocal (Triton's default fp32 `/` is div.full.f32)
can differ from this emulator's correctly rounded division under the f32 rule: a known deviation,
not a tolerance (as for vLLM's rcp.approx in references/recipes.py).

Zero groups (recipe field amax_floor_f32; DeepSeek and DeepGEMM clamp the amax at 1e-4, vLLM and
SGLang's per_token_group_quant at 1e-10): an all-zero group gets s = floor / 448 (float32
2.2321428e-07 for 1e-4; UE8M0 byte 105 = 2^-22) and codes +0 (0x00), or -0 (0x80) for -0.0
inputs (the sign bit is kept, as x / s keeps it). A floor of 0 (DeepSeek-V3's first reference)
would make 0 / 0 = NaN codes; it is refused here rather than emulated.

NaN and Inf inputs (defined here; tested):
- amax_nan "propagate" (torch amax, the torch reference helpers): a NaN makes the group's amax
  NaN, its scale NaN (UE8M0 0xFF, float32 NaN) and every code of the group 0x7F.
  amax_nan "ignore" (fmaxf in CUDA/Triton kernels): NaN elements do not raise the amax; the NaN
  element itself encodes to 0x7F, the rest of the group as usual.
- +-Inf in a group: amax = inf, so the scale is 0xFF (UE8M0; 2^ceil(log2 inf) does not exist)
  or +inf (float32). Codes are computed with the stored scale decoded: finite elements give +-0
  under f32 (x / inf) and 0x7F under UE8M0 (x / NaN); infinite elements give 0x7F. Either way
  every element of that group decodes (code * scale) to NaN: an Inf is never silently finite.
- Every NaN code is the canonical 0x7F (the sign of a NaN result is not something engines agree on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from references.codecs import (
    E4M3_MAX,
    E4M3_NAN_BYTE,
    e4m3_bytes_to_f32,
    f32_to_e4m3_bytes,
    f32_to_ue8m0_bytes,
    ue8m0_bytes_to_f32,
)

__all__ = [
    "FP8_ACT_GROUP",
    "Fp8ActRecipe",
    "FP8_ACT_UE8M0",
    "FP8_ACT_F32",
    "FP8_ACT_F32_RECIP",
    "FP8_ACT_RECIPES",
    "fp8_act_recipe_by_name",
    "Fp8Act1x128",
    "group_amax_f32_1x128",
    "group_dec_scale_f32_from_amax",
    "group_dec_scale_to_storage",
    "f32_to_e4m3_bytes_group_scaled",
    "quantize_act_fp8_1x128",
    "quantize_act_fp8_per_tensor_static",
]

FP8_ACT_GROUP = 128


@dataclass(frozen=True)
class Fp8ActRecipe:
    """Every byte-changing choice of a per-token 1x128 FP8 activation quantizer.

    scale_rule: "ue8m0_ceil" (power of two rounded UP, stored as UE8M0 bytes) or "f32" (amax/448,
        stored as float32).
    amax_floor_f32: the group amax is clamped from below to this (> 0); decides the zero-group scale.
    encode_rule: "divide" (x / s) or "mul_reciprocal" (x * (1/s), 1/s rounded to float32 first).
    amax_nan: "propagate" (a NaN element makes the group's scale NaN) or "ignore" (fmaxf).
    """

    name: str
    scale_rule: Literal["ue8m0_ceil", "f32"]
    amax_floor_f32: float
    encode_rule: Literal["divide", "mul_reciprocal"]
    amax_nan: Literal["propagate", "ignore"]

    def __post_init__(self) -> None:
        if self.scale_rule not in ("ue8m0_ceil", "f32"):
            raise ValueError(f"{self.name}: scale_rule={self.scale_rule!r}: expected 'ue8m0_ceil' or 'f32'")
        if self.encode_rule not in ("divide", "mul_reciprocal"):
            raise ValueError(f"{self.name}: encode_rule={self.encode_rule!r}: expected 'divide' or 'mul_reciprocal'")
        if self.amax_nan not in ("propagate", "ignore"):
            raise ValueError(f"{self.name}: amax_nan={self.amax_nan!r}: expected 'propagate' or 'ignore'")
        if not self.amax_floor_f32 > 0:
            raise ValueError(f"{self.name}: amax_floor_f32={self.amax_floor_f32!r}: must be > 0 (0 / 0 codes)")

    @property
    def scale_storage(self) -> str:
        """"ue8m0" (uint8 bytes) or "f32"."""
        return "ue8m0" if self.scale_rule == "ue8m0_ceil" else "f32"

    def __str__(self) -> str:
        return self.name


FP8_ACT_UE8M0 = Fp8ActRecipe(name="fp8_ue8m0", scale_rule="ue8m0_ceil", amax_floor_f32=1e-4,
                             encode_rule="divide", amax_nan="propagate")
FP8_ACT_F32 = Fp8ActRecipe(name="fp8_f32", scale_rule="f32", amax_floor_f32=1e-4,
                           encode_rule="divide", amax_nan="propagate")
FP8_ACT_F32_RECIP = Fp8ActRecipe(name="fp8_f32_recip", scale_rule="f32", amax_floor_f32=1e-4,
                                 encode_rule="mul_reciprocal", amax_nan="propagate")

FP8_ACT_RECIPES: dict[str, Fp8ActRecipe] = {r.name: r for r in (FP8_ACT_UE8M0, FP8_ACT_F32, FP8_ACT_F32_RECIP)}


def fp8_act_recipe_by_name(name: str) -> Fp8ActRecipe:
    """The named FP8 activation recipe; ValueError listing the known names otherwise."""
    try:
        return FP8_ACT_RECIPES[name]
    except KeyError:
        raise ValueError(f"fp8 act recipe={name!r}: expected one of {sorted(FP8_ACT_RECIPES)}") from None


@dataclass(frozen=True)
class Fp8Act1x128:
    """e4m3_u8 [M, K] E4M3 bytes; block_dec_scale [M, ceil(K/128)] in storage form: uint8 UE8M0 bytes
    (scale_storage "ue8m0", value 2^(b-127)) or float32 ("f32"). x ~= e4m3 * scale of its group."""

    e4m3_u8: Tensor
    block_dec_scale: Tensor
    scale_storage: Literal["ue8m0", "f32"]

    def block_dec_scale_f32(self) -> Tensor:
        """The group decode scales as float32 (exact: a UE8M0 byte is built into f32 bits)."""
        if self.scale_storage == "ue8m0":
            return ue8m0_bytes_to_f32(self.block_dec_scale)
        return self.block_dec_scale

    def decode_f64(self) -> Tensor:
        """e4m3 value * group scale, float64 [M, K] (exact)."""
        k = self.e4m3_u8.shape[-1]
        scale = self.block_dec_scale_f32().double().repeat_interleave(FP8_ACT_GROUP, -1)[..., :k]
        return e4m3_bytes_to_f32(self.e4m3_u8).double() * scale


def _groups_f32(x: Tensor) -> Tensor:
    """[M, K] -> float32 [M, ceil(K/128), 128], the last group zero-padded (padding raises no amax)."""
    m, k = x.shape
    pad = (-k) % FP8_ACT_GROUP
    return torch.nn.functional.pad(x.to(torch.float32), (0, pad)).view(m, (k + pad) // FP8_ACT_GROUP, FP8_ACT_GROUP)


def group_amax_f32_1x128(x_groups_f32: Tensor, *, amax_nan: str) -> Tensor:
    """[M, G, 128] float32 -> [M, G] max |x|. "propagate": NaN if the group has a NaN (torch.amax);
    "ignore": the max over the non-NaN elements (fmaxf; an all-NaN group gives 0)."""
    a = x_groups_f32.abs()
    if amax_nan == "ignore":
        a = torch.where(torch.isnan(a), torch.zeros_like(a), a)
    return a.amax(-1)


def group_dec_scale_f32_from_amax(amax_f32: Tensor, *, recipe: Fp8ActRecipe) -> Tensor:
    """s = max(amax, floor) / 448 in float32 (NaN stays NaN); under "ue8m0_ceil" then the smallest
    power of two >= s, built on the f32 bits (codecs.f32_to_ue8m0_bytes rounding "ceil"), and NaN
    when that power does not exist (s = inf or NaN: byte 0xFF)."""
    s = torch.clamp(amax_f32, min=recipe.amax_floor_f32) / torch.tensor(E4M3_MAX, dtype=torch.float32,
                                                                         device=amax_f32.device)
    if recipe.scale_rule == "ue8m0_ceil":
        return ue8m0_bytes_to_f32(f32_to_ue8m0_bytes(s, rounding="ceil"))
    return s


def group_dec_scale_to_storage(s_f32: Tensor, *, recipe: Fp8ActRecipe) -> Tensor:
    """The stored form of group_dec_scale_f32_from_amax's result: UE8M0 bytes (exact: s is 2^e or
    NaN -> 0xFF) or the float32 scale itself."""
    if recipe.scale_rule == "ue8m0_ceil":
        return f32_to_ue8m0_bytes(s_f32, rounding="ceil")
    return s_f32


def f32_to_e4m3_bytes_group_scaled(x_groups_f32: Tensor, s_f32: Tensor, *, encode_rule: str) -> Tensor:
    """[M, G, 128] float32 and [M, G] decode scales -> E4M3 bytes [M, G, 128]: y = x / s or x * (1/s),
    clamped to +-448 (NaN stays NaN), RNE saturating; every NaN y gives the canonical 0x7F."""
    s = s_f32.unsqueeze(-1)
    y = x_groups_f32 / s if encode_rule == "divide" else x_groups_f32 * (1.0 / s)
    y = torch.clamp(y, min=-E4M3_MAX, max=E4M3_MAX)
    codes = f32_to_e4m3_bytes(y, saturate=True)
    return torch.where(torch.isnan(y), torch.full_like(codes, E4M3_NAN_BYTE), codes)


def quantize_act_fp8_1x128(x: Tensor, *, recipe: Fp8ActRecipe) -> Fp8Act1x128:
    """x [M, K] (bf16, fp16 or float32; float64 is rounded to float32 first) -> E4M3 bytes [M, K] and
    one decode scale per 1x128 group, [M, ceil(K/128)], in the recipe's storage form (module
    docstring: formula, zero groups, NaN/Inf)."""
    if not isinstance(recipe, Fp8ActRecipe):
        raise TypeError(f"recipe: expected an Fp8ActRecipe, got {type(recipe).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x: expected [M, K], got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"x: expected bfloat16, float16, float32 or float64, got {x.dtype}")
    k = x.shape[1]
    xg = _groups_f32(x)
    s = group_dec_scale_f32_from_amax(group_amax_f32_1x128(xg, amax_nan=recipe.amax_nan), recipe=recipe)
    codes = f32_to_e4m3_bytes_group_scaled(xg, s, encode_rule=recipe.encode_rule).flatten(1)[:, :k]
    return Fp8Act1x128(codes.contiguous(), group_dec_scale_to_storage(s, recipe=recipe), recipe.scale_storage)


def quantize_act_fp8_per_tensor_static(x: Tensor, input_dec_scale_f32: Tensor, *,
                                       encode_rule: str = "mul_reciprocal") -> Fp8Act1x128:
    """Per-tensor FP8 with the checkpoint's static `input_scale` D (a decode scale): codes =
    E4M3(clamp(x * (1/D), +-448)) ("mul_reciprocal": vLLM's scaled_fp8_quant multiplies by the
    float32 reciprocal) or x / D ("divide"); NaN codes 0x7F. Returned as Fp8Act1x128 with D in every
    group (float32 storage), which decodes and multiplies exactly like the per-tensor scale."""
    if encode_rule not in ("divide", "mul_reciprocal"):
        raise ValueError(f"encode_rule={encode_rule!r}: expected 'divide' or 'mul_reciprocal'")
    if input_dec_scale_f32.dtype != torch.float32 or input_dec_scale_f32.numel() != 1:
        raise ValueError(f"input_dec_scale_f32: expected one float32 value, got {input_dec_scale_f32.dtype} "
                         f"{list(input_dec_scale_f32.shape)}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating [M, K] tensor, got {x.dtype} {tuple(x.shape)}")
    xg = _groups_f32(x)
    s = input_dec_scale_f32.reshape(1, 1).expand(xg.shape[0], xg.shape[1]).contiguous()
    codes = f32_to_e4m3_bytes_group_scaled(xg, s, encode_rule=encode_rule).flatten(1)[:, :x.shape[1]]
    return Fp8Act1x128(codes.contiguous(), s, "f32")
