"""Global scale conventions: S = 2688/amax and D = amax/2688 are single correctly rounded
float32 divisions (a float64 quotient rounded to float32 is exact for one division, since
53 >= 2*24 + 2). Regression: torch evaluates `2688.0 / t` as reciprocal(t) * 2688, which
rounds twice (found by the sm90 kernel's amax test: amax 5.1522478e-30)."""

from __future__ import annotations

import pytest
import torch

from references.nvfp4 import global_dec_scale_from_amax, global_enc_scale_from_dec, te_global_enc_scale
from verify.assertions import assert_bits_equal


def amax_samples() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.exp2(torch.empty(20000).uniform_(-126, 120, generator=g)) * torch.rand(20000, generator=g).add(1)
    return torch.cat([x.to(torch.float32), torch.tensor([5.1522478e-30, 1.0, 448.0, 2688.0, 3.0, 7.0])])


def test_te_global_enc_scale_is_one_correct_rounding():
    amax = amax_samples()
    expected = torch.clamp((2688.0 / amax.double()).to(torch.float32), max=torch.finfo(torch.float32).max)
    assert_bits_equal(te_global_enc_scale(amax), expected, label="te_global_enc_scale vs float64 quotient")
    assert int(te_global_enc_scale(torch.tensor(5.1522478e-30)).view(torch.int32)) == 0x75CDC7A8


def test_global_dec_scale_is_one_correct_rounding():
    amax = amax_samples()
    assert_bits_equal(global_dec_scale_from_amax(amax), (amax.double() / 2688.0).to(torch.float32),
                      label="global_dec_scale_from_amax vs float64 quotient")


@pytest.mark.parametrize("amax,expected", [(0.0, 1.0), (float("inf"), 1.0), (1e-45, torch.finfo(torch.float32).max)])
def test_te_global_enc_scale_guards(amax, expected):
    assert float(te_global_enc_scale(torch.tensor(amax))) == expected


def test_enc_from_dec_is_the_float32_reciprocal():
    d = global_dec_scale_from_amax(amax_samples())
    assert_bits_equal(global_enc_scale_from_dec(d), (1.0 / d.double()).to(torch.float32), label="1/D")
