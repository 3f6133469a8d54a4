"""NVFP4 quantization recipes: every choice that changes bytes, as data.

The formulas are NVFP4_FACTS.md section 2. With v the block's max |x| and the
per-tensor global scale either in the encode convention S = 2688/amax
("enc") or the decode convention D = amax/2688 ("dec"):

| recipe   | global | block scale before E4M3 RNE  | clamp of it           | x is multiplied into the grid by     |
|----------|--------|------------------------------|-----------------------|--------------------------------------|
| te       | enc S  | v * (S * (1/6))              | min(FLT_MAX), sat 448 | min(1 / (float(s) * (1/S)), FLT_MAX) |
| vllm     | enc S  | S * (v * (1/6))              | sat 448               | s != 0 ? 1 / (float(s) * (1/S)) : 0  |
| modelopt | dec D  | v / (6 * D), 0 -> 1.0        | [2^-9, 448]           | x / (float(s) * D)                   |
| torchao  | dec D  | (v / 6) / D                  | [2^-6, 448]           | x * ((1/D) / float(s))               |

Then the scaled value is clamped to [-6, 6] and rounded to E2M1, ties to even.
All arithmetic is IEEE float32 with correctly rounded division (vLLM's kernel
uses rcp.approx.ftz for its reciprocals; this emulator uses exact reciprocals,
so it can differ from that kernel in the last ulp of a reciprocal: a known,
documented deviation, not a tolerance).

Sign of zero: te, vllm and modelopt take the code's sign from `y < 0`, so an
exact -0.0 input gives +0 (0x0) and a small negative gives -0 (0x8); torchao
keeps the sign bit, so -0.0 gives 0x8.
NaN in a block: te and vllm (CUDA kernels, fmaxf) ignore NaN in the block max;
modelopt and torchao (torch amax) propagate it into the block scale (0x7F).
A NaN element itself encodes to +6 (0x7), the E2M1 codec's policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Recipe", "TE", "VLLM", "MODELOPT", "TORCHAO", "RECIPES", "recipe_by_name"]


@dataclass(frozen=True)
class Recipe:
    """Every byte-changing choice of an NVFP4 quantizer.

    name: short identifier used in reports and golden files.
    global_convention: "enc" (takes S = 2688/amax) or "dec" (takes D = amax/2688).
    block_scale_rule: which association computes the block scale (table above).
    block_scale_lower_clamp: lower clamp applied before the E4M3 rounding, or None.
    zero_block_scale_to_one: a block scale of exactly 0 becomes 1.0 (0x38) first.
    encode_rule: how the block's elements are multiplied into the E2M1 grid.
    sign_rule: "lt_zero" (sign from y < 0) or "signbit" (sign bit of y kept).
    block_amax_nan: "ignore" (fmaxf: NaN elements do not raise the block max)
        or "propagate" (torch.amax: NaN makes the block max NaN).
    """

    name: str
    global_convention: Literal["enc", "dec"]
    block_scale_rule: Literal["te", "vllm", "modelopt", "torchao"]
    block_scale_lower_clamp: float | None
    zero_block_scale_to_one: bool
    encode_rule: Literal["recip_clamped", "recip_or_zero", "divide", "quotient"]
    sign_rule: Literal["lt_zero", "signbit"]
    block_amax_nan: Literal["ignore", "propagate"]

    def __str__(self) -> str:
        return self.name


TE = Recipe(
    name="te", global_convention="enc", block_scale_rule="te", block_scale_lower_clamp=None,
    zero_block_scale_to_one=False, encode_rule="recip_clamped", sign_rule="lt_zero",
    block_amax_nan="ignore",
)
VLLM = Recipe(
    name="vllm", global_convention="enc", block_scale_rule="vllm", block_scale_lower_clamp=None,
    zero_block_scale_to_one=False, encode_rule="recip_or_zero", sign_rule="lt_zero",
    block_amax_nan="ignore",
)
MODELOPT = Recipe(
    name="modelopt", global_convention="dec", block_scale_rule="modelopt", block_scale_lower_clamp=2.0**-9,
    zero_block_scale_to_one=True, encode_rule="divide", sign_rule="lt_zero",
    block_amax_nan="propagate",
)
TORCHAO = Recipe(
    name="torchao", global_convention="dec", block_scale_rule="torchao", block_scale_lower_clamp=2.0**-6,
    zero_block_scale_to_one=False, encode_rule="quotient", sign_rule="signbit",
    block_amax_nan="propagate",
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (TE, VLLM, MODELOPT, TORCHAO)}


def recipe_by_name(name: str) -> Recipe:
    """The named recipe; ValueError listing the known names otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"recipe={name!r}: expected one of {sorted(RECIPES)}") from None
