"""references.codecs.round_f64_to: float64 -> bf16/fp16 with one round-to-nearest-even.

Oracle: the nearest of the (double-rounded) torch cast and its two neighbours in the target
format, distances taken exactly in float64 (Sterbenz), ties to the even pattern.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from references.codecs import round_f64_to
from verify.assertions import assert_bits_equal

# the oracles this module compares with; verify/oracles.py documents their versions
pytestmark = pytest.mark.oracle("torch")

INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def nearest_even_oracle(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    c = x.to(dtype)
    bits = c.view(INT_OF[dtype]).to(torch.int32)
    cands = torch.stack([bits - 1, bits, bits + 1], -1)  # neighbours in magnitude (sign-magnitude patterns)
    vals = cands.to(torch.int16).view(dtype).double()
    finite = torch.isfinite(vals)
    dist = torch.where(finite, (vals - x[..., None]).abs(), torch.full_like(vals, float("inf")))
    best = dist.min(-1, keepdim=True).values
    tie_ok = (dist == best) & finite
    even = (cands & 1) == 0
    pick = torch.where((tie_ok & even).any(-1, keepdim=True), tie_ok & even, tie_ok).double().argmax(-1, keepdim=True)
    out = torch.gather(cands, -1, pick).squeeze(-1).to(torch.int16).view(dtype)
    # overflow: |x| >= max + half its ulp rounds to inf (the tie too: max's pattern is odd)
    fmax = torch.finfo(dtype).max
    threshold = fmax + (fmax - torch.nextafter(torch.tensor(fmax, dtype=dtype), torch.tensor(0.0, dtype=dtype)).item()) / 2
    inf = torch.full_like(out, float("inf"))
    out = torch.where(x.abs() >= threshold, torch.copysign(inf, x.to(dtype)), out)
    return torch.where(torch.isnan(x), c, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_midpoints_plus_a_far_below_f32_ulp_nudge_round_away(dtype):
    mant = {torch.bfloat16: 8, torch.float16: 11}[dtype]
    k = torch.arange(0, 2 ** (mant - 1), dtype=torch.float64)
    base = 1 + k * 2.0 ** (1 - mant)
    mid = base + 2.0 ** -mant
    for nudge in (2.0 ** -40, -(2.0 ** -40)):
        x = torch.cat([mid + nudge, -(mid + nudge), (mid + nudge) * 2.0**-10])
        assert_bits_equal(round_f64_to(x, dtype), nearest_even_oracle(x, dtype),
                          label=f"round_f64_to({dtype}) at midpoints {nudge:+g}")


def test_the_documented_double_rounding_case():
    x = torch.tensor([1 + 2**-8 + 2**-30], dtype=torch.float64)
    assert x.to(torch.bfloat16).item() == 1.0  # torch rounds twice (why the helper exists)
    assert round_f64_to(x, torch.bfloat16).item() == 1.0078125


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=64))
@example([65519.99999999814, -65520.0, 65520.00000001, 3.3961775292304969e38, 3.3961775292304970e38])
@example([2.0**-134 + 2.0**-170, 1.5 * 2.0**-133, 2.0**-25 + 2.0**-60, 1 + 2.0**-8 + 2.0**-30])
def test_random_doubles_match_the_nearest_even_oracle(dtype, xs):
    x = torch.tensor(xs, dtype=torch.float64)
    assert_bits_equal(round_f64_to(x, dtype), nearest_even_oracle(x, dtype), label=f"round_f64_to({dtype})")


def test_specials_pass_through():
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e300, -1e300], dtype=torch.float64)
    got = round_f64_to(x, torch.bfloat16).double()
    assert got[:2].tolist() == [float("inf"), -float("inf")] and torch.isnan(got[2])
    assert torch.equal(torch.signbit(got[3:5]), torch.tensor([False, True]))
    assert got[5:].tolist() == [float("inf"), -float("inf")]
