"""Exhaustive codec tables against third-party oracles (ml_dtypes, torch casts).

Small domains are enumerated completely: all 16 E2M1 codes, all 256 E4M3 and
UE8M0 bytes, every bf16 bit pattern, every midpoint between adjacent E2M1 and
E4M3 values and its float32 neighbours. Where an oracle differs from the
emulator's documented policy (overflow to NaN, NaN encodings, the sign of a
UE8M0 input), the test asserts that the difference is exactly that set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from references.codecs import (
    e2m1_codes_to_f32,
    e4m3_bytes_to_f32,
    f32_to_e2m1_codes,
    f32_to_e4m3_bytes,
    f32_to_ue8m0_bytes,
    ue8m0_bytes_to_f32,
)
from verify.assertions import assert_bits_equal, assert_bytes_equal, describe_e4m3

# the oracles this module compares with; verify/oracles.py documents their versions
pytestmark = pytest.mark.oracle("ml_dtypes", "torch")

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the third-party oracle (pip install '.[test]')")

E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def all_bf16_as_f32() -> torch.Tensor:
    """Every one of the 65536 bf16 bit patterns, widened exactly to float32."""
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(torch.float32)


def ml_cast_bytes(x_f32: torch.Tensor, dtype) -> torch.Tensor:
    with np.errstate(invalid="ignore", over="ignore"):
        return torch.from_numpy(x_f32.numpy().astype(dtype).view(np.uint8).copy())


def f32_neighbours(x_f32: torch.Tensor) -> torch.Tensor:
    """x, nextafter(x, -inf), nextafter(x, +inf), concatenated."""
    down = torch.nextafter(x_f32, torch.full_like(x_f32, -float("inf")))
    up = torch.nextafter(x_f32, torch.full_like(x_f32, float("inf")))
    return torch.cat([x_f32, down, up])


def assert_f32_equal_nan_aware(got: torch.Tensor, expected: torch.Tensor, *, label: str) -> None:
    """Bits equal where not NaN; NaN exactly where the oracle has NaN (payloads may differ)."""
    nan_g, nan_e = torch.isnan(got), torch.isnan(expected)
    assert_bytes_equal(nan_g.to(torch.uint8), nan_e.to(torch.uint8), label=f"{label} NaN positions")
    assert_bits_equal(torch.where(nan_g, 0.0, got), torch.where(nan_e, 0.0, expected), label=label)


# ----------------------------------------------------------------------------- decode


def test_e2m1_decode_all_16_codes_match_facts_table_and_ml_dtypes():
    codes = torch.arange(16, dtype=torch.uint8)
    got = e2m1_codes_to_f32(codes)
    table = torch.tensor(E2M1_VALUES + [-v for v in E2M1_VALUES], dtype=torch.float32)
    assert_bits_equal(got, table, label="e2m1 decode vs NVFP4_FACTS table (0x8 is -0)")
    oracle = torch.from_numpy(codes.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    assert_bits_equal(got, oracle, label="e2m1 decode vs ml_dtypes.float4_e2m1fn")


def test_torch_has_no_e2m1_cast_so_it_is_not_an_oracle_here():
    """torch's float4_e2m1fn_x2 has no conversion kernel in this torch; if one appears,
    this fails so the suite adds torch as a second E2M1 oracle."""
    with pytest.raises((NotImplementedError, RuntimeError, TypeError)):
        torch.tensor([1.0, 2.5]).to(torch.float4_e2m1fn_x2)


@pytest.mark.parametrize("oracle", ["ml_dtypes", "torch"])
def test_e4m3_decode_all_256_bytes(oracle):
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = e4m3_bytes_to_f32(b)
    if oracle == "ml_dtypes":
        expected = torch.from_numpy(b.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    else:
        expected = b.view(torch.float8_e4m3fn).to(torch.float32)
    assert_f32_equal_nan_aware(got, expected, label=f"e4m3 decode vs {oracle}")
    assert torch.isnan(got).nonzero().flatten().tolist() == [0x7F, 0xFF]


@pytest.mark.parametrize("oracle", ["ml_dtypes", "torch"])
def test_ue8m0_decode_all_256_bytes(oracle):
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = ue8m0_bytes_to_f32(b)
    if oracle == "ml_dtypes":
        expected = torch.from_numpy(b.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    else:
        expected = b.view(torch.float8_e8m0fnu).to(torch.float32)
    assert_f32_equal_nan_aware(got, expected, label=f"ue8m0 decode vs {oracle}")
    assert float(got[127]) == 1.0 and float(got[0]) == 2.0**-127


# ----------------------------------------------------------------------------- encode E2M1


def e2m1_midpoints_and_neighbours() -> torch.Tensor:
    mids = [(a + b) / 2 for a, b in zip(E2M1_VALUES, E2M1_VALUES[1:])] + [7.0]  # 7 = midpoint to "8"
    m = torch.tensor(mids + [-v for v in mids] + E2M1_VALUES + [-v for v in E2M1_VALUES], dtype=torch.float32)
    return f32_neighbours(m)


@pytest.mark.parametrize("inputs", ["all_bf16", "midpoints"])
def test_e2m1_encode_vs_ml_dtypes_differs_only_on_nan(inputs):
    x = all_bf16_as_f32() if inputs == "all_bf16" else e2m1_midpoints_and_neighbours()
    got = f32_to_e2m1_codes(x)
    oracle = ml_cast_bytes(x, ml_dtypes.float4_e2m1fn)
    nan = torch.isnan(x)
    assert_bytes_equal(got[~nan], oracle[~nan], label=f"e2m1 encode ({inputs}) vs ml_dtypes, non-NaN inputs")
    # Documented difference: NaN -> +6 (0x7, PTX cvt.rn.satfinite.e2m1x2 NaN rule) here,
    # while ml_dtypes maps NaN to a signed zero.
    if nan.any():
        assert set(got[nan].tolist()) == {0x7}
        assert set(oracle[nan].tolist()) <= {0x0, 0x8}


def test_e2m1_encode_ties_to_even_and_saturation_literal_cases():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 1e30, float("inf"), -2.5, -5.0, -0.0, -0.1])
    expected = torch.tensor([0, 2, 2, 4, 4, 6, 6, 7, 7, 7, 0xC, 0xE, 0x8, 0x8], dtype=torch.uint8)
    assert_bytes_equal(f32_to_e2m1_codes(x), expected, label="e2m1 ties to even / saturation")
    lt = f32_to_e2m1_codes(x, sign_rule="lt_zero")
    assert lt[-2] == 0x0 and lt[-1] == 0x8, "lt_zero: -0.0 -> +0, small negative -> -0"


# ----------------------------------------------------------------------------- encode E4M3


def e4m3_midpoints_and_neighbours() -> torch.Tensor:
    v = e4m3_bytes_to_f32(torch.arange(0x7F, dtype=torch.uint8)).to(torch.float64)  # 0 .. 448
    mids = ((v[1:] + v[:-1]) / 2).to(torch.float32)                                   # exact in f32
    pts = torch.cat([mids, v.to(torch.float32), torch.tensor([464.0, 480.0, 2.0**-10, 2.0**-11])])
    return f32_neighbours(torch.cat([pts, -pts]))


def torch_e4m3_cast_saturates() -> bool:
    """torch <= 2.11 eager casts give NaN past 464 (NVFP4_FACTS); torch 2.13 on CPU saturates."""
    return int(torch.tensor([465.0]).to(torch.float8_e4m3fn).view(torch.uint8)) == 0x7E


@pytest.mark.parametrize("inputs", ["all_bf16", "midpoints"])
@pytest.mark.parametrize("oracle", ["ml_dtypes", "torch"])
def test_e4m3_encode_vs_oracles_differs_only_in_overflow_policy(inputs, oracle):
    x = all_bf16_as_f32() if inputs == "all_bf16" else e4m3_midpoints_and_neighbours()
    if oracle == "ml_dtypes":
        expected = ml_cast_bytes(x, ml_dtypes.float8_e4m3fn)
        oracle_saturates = False
    else:
        expected = x.to(torch.float8_e4m3fn).view(torch.uint8)
        oracle_saturates = torch_e4m3_cast_saturates()
    same_mode = f32_to_e4m3_bytes(x, saturate=oracle_saturates)
    assert_bytes_equal(same_mode, expected, label=f"e4m3 encode saturate={oracle_saturates} ({inputs}) vs {oracle}",
                       describe=describe_e4m3)
    # The hardware mode differs from a NaN-on-overflow oracle exactly on |x| > 464 and +-Inf.
    hw = f32_to_e4m3_bytes(x, saturate=True)
    differs = hw != expected
    overflow = (x.abs() > 464.0) & ~torch.isnan(x)
    if oracle_saturates:
        assert not differs.any()
    else:
        assert torch.equal(differs, overflow), "satfinite vs NaN-on-overflow must differ exactly past 464"
        assert set(hw[overflow].tolist()) <= {0x7E, 0xFE} and set(expected[overflow].tolist()) <= {0x7F, 0xFF}


def test_e4m3_overflow_boundary_literal_cases():
    x = torch.tensor([448.0, 464.0, 464.00003, float("inf"), -float("inf"), float("nan"), -0.0, 2.0**-10])
    assert_bytes_equal(f32_to_e4m3_bytes(x, saturate=True),
                       torch.tensor([0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0x7F, 0x80, 0x00], dtype=torch.uint8),
                       label="e4m3 satfinite boundary", describe=describe_e4m3)
    assert_bytes_equal(f32_to_e4m3_bytes(x, saturate=False),
                       torch.tensor([0x7E, 0x7E, 0x7F, 0x7F, 0xFF, 0x7F, 0x80, 0x00], dtype=torch.uint8),
                       label="e4m3 nonsaturating boundary", describe=describe_e4m3)


# ----------------------------------------------------------------------------- encode UE8M0


@pytest.mark.parametrize("oracle", ["ml_dtypes", "torch"])
def test_ue8m0_cast_rule_vs_oracles_differs_only_on_documented_inputs(oracle):
    x = torch.cat([all_bf16_as_f32(), f32_neighbours(torch.tensor([1.5, 3.0, 1.5 * 2.0**-127, 2.0**-127]))])
    got = f32_to_ue8m0_bytes(x, rounding="cast")
    if oracle == "ml_dtypes":
        expected = ml_cast_bytes(x, ml_dtypes.float8_e8m0fnu)
        # ml_dtypes maps +-0 to NaN; the policy here is 0x00 (2^-127, the nearest value).
        documented = x == 0
        assert set(got[documented].tolist()) == {0x00} and set(expected[documented].tolist()) == {0xFF}
    else:
        expected = x.to(torch.float8_e8m0fnu).view(torch.uint8)
        # torch drops the sign of a finite negative input; the policy here is NaN (a scale has no sign).
        documented = (x < 0) & torch.isfinite(x)
        assert set(got[documented].tolist()) == {0xFF}
        assert_bytes_equal(expected[documented], f32_to_ue8m0_bytes(x[documented].abs(), rounding="cast"),
                           label="torch's e8m0 cast of a negative equals that of its magnitude")
    assert_bytes_equal(got[~documented], expected[~documented], label=f"ue8m0 encode (cast rule) vs {oracle}")


def test_ue8m0_rounding_modes_literal_cases():
    x = torch.tensor([1.0, 1.5, 1.50001, 3.0, 0.75, 2.0**127, 2.0**127 * 1.5, 0.0])
    cases = {
        "rne": [127, 128, 128, 128, 126, 254, 254, 0],   # ties to the even byte: 1.5 -> 128, 3.0 -> 128
        "cast": [127, 128, 128, 129, 127, 254, 255, 0],  # ties up (torch / ml_dtypes)
        "ceil": [127, 128, 128, 129, 127, 254, 255, 0],
        "floor": [127, 127, 127, 128, 126, 254, 254, 0],
    }
    for rounding, expected in cases.items():
        assert_bytes_equal(f32_to_ue8m0_bytes(x, rounding=rounding), torch.tensor(expected, dtype=torch.uint8),
                           label=f"ue8m0 rounding={rounding}")
