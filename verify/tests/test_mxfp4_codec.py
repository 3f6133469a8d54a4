"""references.mxfp4 (DeepSeek-V4's MTP experts: E2M1 + E8M0 per 32 along K) against ml_dtypes' float4_e2m1fn and
float8_e8m0fnu: every (code, scale byte) pair exhaustively, bit for bit (signed zeros included); 0xFF refused; the
nibble order; random packed tensors by Hypothesis; and the fixture writer's MXFP4 tensors decode to the nearest
representable value of their weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from references.mxfp4 import Mxfp4Weight, decode_mxfp4_f64, e2m1_codes_to_f64_bits
from verify.assertions import assert_bits_equal

pytestmark = pytest.mark.oracle("ml_dtypes")

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the third-party oracle (pip install '.[test]')")
if not hasattr(ml_dtypes, "float4_e2m1fn") or not hasattr(ml_dtypes, "float8_e8m0fnu"):
    pytest.skip("ml_dtypes < 0.5: no float4_e2m1fn / float8_e8m0fnu oracle", allow_module_level=True)


def oracle_f64(codes_u8: np.ndarray, scale_u8: np.ndarray) -> np.ndarray:
    """ml_dtypes: e2m1(code) * e8m0(byte), in float64 (exact: both factors are exact in float64)."""
    return codes_u8.view(ml_dtypes.float4_e2m1fn).astype(np.float64) * \
        scale_u8.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)


def pack(codes: np.ndarray) -> np.ndarray:
    """[..., K] codes -> [..., K/2] bytes, element 2i in the LOW nibble (the oracle's side of the packing)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def test_every_e2m1_code_builds_the_bits_of_its_value():
    codes = np.arange(16, dtype=np.uint8)
    got = e2m1_codes_to_f64_bits(torch.from_numpy(codes)).view(torch.float64)
    expected = torch.from_numpy(codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64))
    assert_bits_equal(got, expected, label="e2m1 code -> float64 bits vs ml_dtypes float4_e2m1fn")  # -0 for code 8


def test_every_code_times_every_finite_e8m0_byte_matches_ml_dtypes():
    """16 codes x 255 finite scale bytes (2^-127 .. 2^127), each pair one 32-element block: bit-exact."""
    codes = np.tile(np.arange(16, dtype=np.uint8), 2)                 # one block of 32: the 16 codes twice
    scales = np.arange(255, dtype=np.uint8)                           # 0xFF is NaN: refused, tested below
    k_codes = np.broadcast_to(codes, (255, 32)).copy()
    got = decode_mxfp4_f64(torch.from_numpy(pack(k_codes)), torch.from_numpy(scales.reshape(255, 1)))
    expected = oracle_f64(k_codes, np.repeat(scales.reshape(255, 1), 32, axis=1))
    assert_bits_equal(got, torch.from_numpy(expected), label="mxfp4 decode vs ml_dtypes (all codes x all bytes)")


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_nan_e8m0_scale_byte_is_refused_naming_the_tensor(where):
    scale = torch.full((2, 4), 127, dtype=torch.uint8)
    scale[(0, 0) if where == "first" else (1, 3)] = 0xFF
    with pytest.raises(ValueError, match=r"mtp\.0\.ffn\.experts\.\*\.w1\.scale: 1 NaN E8M0 scale bytes \(0xFF\) of 8"):
        Mxfp4Weight(torch.zeros(2, 64, dtype=torch.uint8), scale, "mtp.0.ffn.experts.*.w1")
    with pytest.raises(ValueError, match="NaN E8M0"):
        decode_mxfp4_f64(torch.zeros(2, 64, dtype=torch.uint8), scale)


def test_element_2i_is_the_low_nibble():
    packed = torch.full((1, 16), 0x71, dtype=torch.uint8)  # low 0x1 (0.5), high 0x7 (6.0)
    x = decode_mxfp4_f64(packed, torch.full((1, 1), 127, dtype=torch.uint8))
    assert x[0, 0] == 0.5 and x[0, 1] == 6.0, x[0, :2]


def test_a_scale_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[\.\.\., N, K/32\]"):
        Mxfp4Weight(torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8))  # K=64: 2 blocks


def test_int8_and_e8m0_storage_are_viewed_not_cast():
    """DeepSeek stores `.weight` I8 and `.scale` F8_E8M0: the bytes are reinterpreted (a cast of 0xF0 as int8
    -16 would give other bytes)."""
    packed = torch.tensor([[0xF0] * 16], dtype=torch.uint8)
    scale = torch.tensor([[130]], dtype=torch.uint8)
    want = Mxfp4Weight(packed, scale).decode_f64()
    got = Mxfp4Weight(packed.view(torch.int8), scale.view(torch.float8_e8m0fnu)).decode_f64()
    assert_bits_equal(got, want, label="I8 / F8_E8M0 storage vs uint8")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 4))
@example(0, 1, 1)
def test_random_packed_tensors_decode_like_the_oracle(seed, rows, blocks):
    g = np.random.default_rng(seed)
    codes = g.integers(0, 16, size=(rows, 32 * blocks), dtype=np.uint8)
    scales = g.integers(0, 255, size=(rows, blocks), dtype=np.uint8)
    got = decode_mxfp4_f64(torch.from_numpy(pack(codes)), torch.from_numpy(scales))
    expected = oracle_f64(codes, np.repeat(scales, 32, axis=1))
    assert_bits_equal(got, torch.from_numpy(expected), label=f"mxfp4 decode seed {seed}")


def test_the_fixture_writer_rounds_each_weight_to_its_nearest_mxfp4_value():
    """verify.checkpoint.writer.make_mxfp4_tensors (test data) decodes to within half an E2M1 step of the weight
    (the step at its magnitude, times the block scale): a wrong nibble order or scale would not."""
    from verify.checkpoint.writer import make_mxfp4_tensors
    from verify.rng import CounterRng

    w = CounterRng(7).normal((8, 64))
    t = make_mxfp4_tensors(w)
    assert t["weight"].dtype == torch.int8 and t["scale"].dtype == torch.float8_e8m0fnu
    x = Mxfp4Weight(t["weight"], t["scale"]).decode_f64()
    s = torch.ldexp(torch.ones(8, 2, dtype=torch.float64),
                    t["scale"].view(torch.uint8).to(torch.int64) - 127).repeat_interleave(32, 1)
    a = (w.double() / s).abs()
    half_step = torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))  # E2M1 spacing 0.5 / 1 / 2 below 2 / 4 / 6
    assert bool(((w.double() - x).abs() <= half_step * s).all())
