"""Known-wrong NVFP4 quantizers, kept as test doubles for the fuzz suite.

Each double is the `te` recipe (NVFP4_FACTS.md section 2) with exactly one
shipped bug class (section 6) planted in it, so a property test can prove that
it *finds* that bug: verify/tests/test_fuzz_quantize.py runs its re-derivation
property against these with `hypothesis.find` and no `@example` hints.

Everything except the planted bug is written here from the formulas, in plain
float32 torch arithmetic, so a double never shares code with references/:

    v      = max |x| over the 16-element block (NaN ignored, as fmaxf does)
    s_f32  = v * (S * (1/6))                      S = 2688 / amax (encode scale)
    sf     = E4M3 RNE of min(s_f32, 448)          torch's float8_e4m3fn cast, after the clamp
    enc    = min(1 / (float(sf) * (1/S)), FLT_MAX)
    y      = clamp(x * enc, -6, 6) -> E2M1 code   sign from y < 0 (-0.0 -> +0)

These names are deliberately not reference-like (STYLE.md section 11): they are
wrong on purpose and must never be used to produce expected bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "WrongQuantized",
    "half_step_table_e2m1_codes",
    "ties_away_e2m1_codes",
    "quantize_te_with_e2m1_rounding",
    "quantize_te_half_step_table",
    "quantize_te_ties_away",
    "quantize_te_swapped_nibbles",
    "HALF_STEP_TABLE_WRONG_INTERVALS",
]

_FLT_MAX = torch.finfo(torch.float32).max
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# round(|y| * 2) (half to even) -> magnitude code. Index n stands for |y| = n / 2.
# The entries at n = 5 (2.5), 7 (3.5) and 10 (5.0) are where the bug hides: the table
# is right at the grid points, but rounding to the half-step grid first loses the
# information on which side of the E2M1 midpoint |y| was.
_HALF_STEP_TABLE = (0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 6, 7, 7)  # values 0 .5 1 1.5 2 2 3 3 4 4 4 6 6

# Where the half-step table disagrees with nearest-ties-to-even (NVFP4_FACTS section 1),
# as (lo, lo_inclusive, hi, hi_inclusive) on |y|: it returns 2, 3, 4 where the nearest is 3, 4, 6.
HALF_STEP_TABLE_WRONG_INTERVALS = ((2.5, False, 2.75, False), (3.5, True, 3.75, False), (5.0, False, 5.25, True))


@dataclass(frozen=True)
class WrongQuantized:
    """What a double returns: the two byte tensors the suite compares."""

    packed_u8: Tensor  # [..., K/2], element 2i in the low nibble (unless the double swaps them)
    sf_u8: Tensor      # [..., K/16] E4M3 bytes, linear


def _sign_lt_zero(y_f32: Tensor) -> Tensor:
    return (y_f32 < 0).to(torch.uint8) << 3


def half_step_table_e2m1_codes(y_f32: Tensor) -> Tensor:
    """WRONG: round |y|*2 to an integer, map it through a 13-entry table (the bug of section 1)."""
    n = torch.round(torch.clamp(y_f32.abs(), max=6.0) * 2).to(torch.int64)
    table = torch.tensor(_HALF_STEP_TABLE, dtype=torch.uint8)
    return table[n] | _sign_lt_zero(y_f32)


def ties_away_e2m1_codes(y_f32: Tensor) -> Tensor:
    """WRONG: nearest E2M1 value, but exact midpoints go away from zero (2.5 -> 3, 5 -> 6)."""
    a = torch.clamp(y_f32.abs(), max=6.0).to(torch.float64).unsqueeze(-1)
    mags = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float64)
    d = (a - mags).abs()
    # among the minimal distances take the LAST (largest) magnitude: ties away from zero
    is_min = d == d.amin(dim=-1, keepdim=True)
    idx = 7 - torch.argmax(is_min.flip(-1).to(torch.uint8), dim=-1)
    return idx.to(torch.uint8) | _sign_lt_zero(y_f32)


def quantize_te_with_e2m1_rounding(x: Tensor, *, global_enc_scale_f32: Tensor,
                                   e2m1_codes: Callable[[Tensor], Tensor]) -> WrongQuantized:
    """The te recipe with a pluggable E2M1 rounding. x: [..., K] float, K % 16 == 0."""
    x = x.to(torch.float32)
    s_enc = global_enc_scale_f32.to(torch.float32).reshape(())
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // 16, 16)
    a = xb.abs()
    v = torch.where(torch.isnan(a), torch.zeros_like(a), a).amax(dim=-1)
    s_f32 = v * (s_enc * torch.tensor(1.0 / 6.0, dtype=torch.float32))
    sf = torch.clamp(s_f32, max=448.0).to(torch.float8_e4m3fn)
    s_dec = sf.to(torch.float32).unsqueeze(-1)
    enc = torch.clamp(1.0 / (s_dec * torch.reciprocal(s_enc)), max=_FLT_MAX)
    y = torch.clamp(xb * enc, -6.0, 6.0).reshape(x.shape)
    # a NaN element encodes to +6 (0x7), the PTX cvt.rn.satfinite.e2m1x2 rule
    is_nan = torch.isnan(y)
    codes = e2m1_codes(torch.where(is_nan, torch.zeros_like(y), y))
    codes = torch.where(is_nan, torch.full_like(codes, 0x7), codes)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return WrongQuantized(packed_u8=packed, sf_u8=sf.view(torch.uint8))


def quantize_te_half_step_table(x: Tensor, *, global_enc_scale_f32: Tensor) -> WrongQuantized:
    """te with the 13-entry half-step table rounding (wrong for 2.5<|y|<2.75, 3.5<=|y|<3.75, 5<|y|<=5.25)."""
    return quantize_te_with_e2m1_rounding(x, global_enc_scale_f32=global_enc_scale_f32,
                                          e2m1_codes=half_step_table_e2m1_codes)


def quantize_te_ties_away(x: Tensor, *, global_enc_scale_f32: Tensor) -> WrongQuantized:
    """te with ties rounded away from zero (wrong only at exact E2M1 midpoints)."""
    return quantize_te_with_e2m1_rounding(x, global_enc_scale_f32=global_enc_scale_f32,
                                          e2m1_codes=ties_away_e2m1_codes)


def _nearest_even_codes(y_f32: Tensor) -> Tensor:
    a = torch.clamp(y_f32.abs(), max=6.0).to(torch.float64).unsqueeze(-1)
    d = (a - torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float64)).abs()
    is_min = d == d.amin(dim=-1, keepdim=True)
    even = is_min & (torch.arange(8) % 2 == 0)
    idx = torch.where(even.any(-1), torch.argmax(even.to(torch.uint8), -1), torch.argmax(is_min.to(torch.uint8), -1))
    return idx.to(torch.uint8) | _sign_lt_zero(y_f32)


def quantize_te_swapped_nibbles(x: Tensor, *, global_enc_scale_f32: Tensor) -> WrongQuantized:
    """te with correct rounding but element 2i in the HIGH nibble (the vendor bug of section 1)."""
    q = quantize_te_with_e2m1_rounding(x, global_enc_scale_f32=global_enc_scale_f32,
                                       e2m1_codes=_nearest_even_codes)
    p = q.packed_u8
    return WrongQuantized(packed_u8=(p >> 4) | ((p & 0xF) << 4), sf_u8=q.sf_u8)
