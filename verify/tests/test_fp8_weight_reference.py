"""FP8 block-scaled weights (references/fp8_weight.py): every shipped scale encoding decodes to the
same weight; UE8M0 scale bytes against ml_dtypes and torch; each known mistake refused in one line
naming the tensor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from references.fp8_weight import (
    FP8_WEIGHT_ENCODINGS,
    Fp8BlockScaledWeight,
    fp8_weight_from_ct_fp8_block,
    fp8_weight_from_modelopt_fp8_pb_wo,
    fp8_weight_from_per_tensor,
    fp8_weight_from_v3_weight_scale_inv,
    fp8_weight_from_v4_e8m0_scale,
)
from references.linear import decode_weight_f64
from verify.assertions import assert_bits_equal

pytestmark = pytest.mark.oracle("ml_dtypes", "torch")
ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the E8M0 oracle (pip install '.[test]')")

MODULE = "layers.3.attn.wq_a"
N, K = 200, 300   # both partial edge blocks: 2 x 3 scale blocks, the last 72 rows / 44 columns


def random_e4m3_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """float8_e4m3fn [n, k] with every non-NaN byte possible."""
    b = torch.randint(0, 256, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return torch.where((b & 0x7F) == 0x7F, b ^ 0x01, b).view(torch.float8_e4m3fn)


def pow2_exponents(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-20, 3, (math.ceil(n / 128), math.ceil(k / 128)), generator=g, dtype=torch.int32)


def expected_decode_f64(weight: torch.Tensor, scale_f64: torch.Tensor) -> torch.Tensor:
    """DeepSeek's weight_dequant block by block, with torch's own E4M3 decode."""
    w = weight.double().clone()
    for i in range(math.ceil(w.shape[0] / 128)):
        for j in range(math.ceil(w.shape[1] / 128)):
            w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= float(scale_f64[i, j])
    return w


def checkpoint_tensors(encoding: str, weight: torch.Tensor, exps: torch.Tensor):
    """The same power-of-two block scales 2^e as each encoding stores them -> the constructor's result."""
    pow2 = torch.ldexp(torch.ones_like(exps, dtype=torch.float32), exps)
    if encoding == "v4_e8m0_scale":
        return fp8_weight_from_v4_e8m0_scale(weight, (exps + 127).to(torch.uint8).view(torch.float8_e8m0fnu),
                                             module=MODULE)
    if encoding == "v3_weight_scale_inv":
        return fp8_weight_from_v3_weight_scale_inv(weight, pow2, module=MODULE)
    if encoding == "ct_fp8_block_bf16":
        return fp8_weight_from_ct_fp8_block(weight, pow2.bfloat16(), module=MODULE)
    if encoding == "ct_fp8_block_f32":
        return fp8_weight_from_ct_fp8_block(weight, pow2, module=MODULE)
    if encoding == "modelopt_fp8_pb_wo":
        return fp8_weight_from_modelopt_fp8_pb_wo(weight, pow2[:, None, :, None], module=MODULE)
    raise AssertionError(encoding)


BLOCK_ENCODINGS = ["v4_e8m0_scale", "v3_weight_scale_inv", "ct_fp8_block_bf16", "ct_fp8_block_f32",
                   "modelopt_fp8_pb_wo"]


@pytest.mark.parametrize("encoding", BLOCK_ENCODINGS)
@pytest.mark.parametrize("shape", [(N, K), (256, 128), (1, 129)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_each_block_encoding_decodes_to_the_same_weight(encoding, shape):
    weight, exps = random_e4m3_weight(*shape, seed=3), pow2_exponents(*shape, seed=4)
    w = checkpoint_tensors(encoding, weight, exps)
    expected = expected_decode_f64(weight, torch.ldexp(torch.ones_like(exps, dtype=torch.float64), exps))
    assert_bits_equal(w.decode_f64(), expected, label=f"{encoding} decode")
    assert_bits_equal(decode_weight_f64(w.to_fp8_block128_weight()), expected,
                      label=f"{encoding} as Fp8Block128Weight")


def test_float_scales_that_are_not_powers_of_two_decode_exactly():
    """V3 / CT float32 and CT bf16 scales amax/448-like: decode = e4m3 * float(scale) element for element."""
    weight = random_e4m3_weight(N, K, seed=5)
    s = (torch.rand(2, 3, generator=torch.Generator().manual_seed(6)) * 1e-2 + 1e-5).float()
    for w, s_used in ((fp8_weight_from_v3_weight_scale_inv(weight, s, module=MODULE), s),
                      (fp8_weight_from_ct_fp8_block(weight, s.bfloat16(), module=MODULE), s.bfloat16().float())):
        assert_bits_equal(w.decode_f64(), expected_decode_f64(weight, s_used.double()), label=w.encoding)


def test_per_tensor_is_one_block_and_equals_a_uniform_block_grid():
    weight = random_e4m3_weight(N, K, seed=7)
    w = fp8_weight_from_per_tensor(weight, torch.tensor(2.0**-9), torch.tensor([0.0125]), module=MODULE)
    uniform = fp8_weight_from_v4_e8m0_scale(weight, torch.full((2, 3), 127 - 9, dtype=torch.uint8), module=MODULE)
    assert (w.block_n, w.block_k, tuple(w.block_dec_scale.shape)) == (N, K, (1, 1))
    assert_bits_equal(w.decode_f64(), uniform.decode_f64(), label="per-tensor vs uniform V4 grid")
    assert_bits_equal(decode_weight_f64(w.to_fp8_block128_weight()), uniform.decode_f64(),
                      label="per-tensor as 128x128")
    assert float(w.input_dec_scale_f32) == float(np.float32(0.0125))


def test_every_encoding_has_a_constructor():
    assert set(FP8_WEIGHT_ENCODINGS) == {"v4_e8m0_scale", "v3_weight_scale_inv", "ct_fp8_block",
                                         "modelopt_fp8_pb_wo", "per_tensor"}


@pytest.mark.parametrize("oracle", ["ml_dtypes", "torch"])
def test_ue8m0_scale_bytes_all_256_decode_like_the_oracle(oracle):
    """All 256 bytes as a 16 x 16 scale grid (0xFF included: the class decodes it to NaN; the
    constructor would refuse it). Value 2^(b-127) built from the byte's bits, never 120.0 for 0x78."""
    b = torch.arange(256, dtype=torch.uint8).view(16, 16)
    w = Fp8BlockScaledWeight(torch.zeros(16 * 128, 16 * 128, dtype=torch.uint8), b, "ue8m0", 128, 128,
                             "v4_e8m0_scale")
    got = w.block_dec_scale_f32()
    if oracle == "ml_dtypes":
        expected = torch.from_numpy(b.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    else:
        expected = b.view(torch.float8_e8m0fnu).to(torch.float32)
    nan = torch.isnan(expected)
    assert nan.sum() == 1 and bool(nan[15, 15]) and bool(torch.isnan(got[15, 15]))
    assert_bits_equal(got[~nan], expected[~nan], label=f"UE8M0 scale decode vs {oracle}")
    assert float(got.view(-1)[0x78]) == 2.0**-7


# ----------------------------------------------------------------------------- known mistakes, refused by name


def _v4_bytes(exps: torch.Tensor) -> torch.Tensor:
    return (exps + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


W = random_e4m3_weight(N, K, seed=11)
EXPS = pow2_exponents(N, K, seed=12)
POW2 = torch.ldexp(torch.ones_like(EXPS, dtype=torch.float32), EXPS)
E8M0_AS_NUMBERS = (EXPS + 127).to(torch.uint8).float()          # the shipped bug: bytes read as numbers
W_SQ, EXPS_SQ = random_e4m3_weight(256, 384, seed=13), pow2_exponents(256, 384, seed=14)   # 2 x 3 blocks


def _with_byte(t: torch.Tensor, at: tuple[int, int], value: int) -> torch.Tensor:
    b = t.view(torch.uint8).clone()
    b[at] = value
    return b


v4, v3 = fp8_weight_from_v4_e8m0_scale, fp8_weight_from_v3_weight_scale_inv
ct, mo, pt = fp8_weight_from_ct_fp8_block, fp8_weight_from_modelopt_fp8_pb_wo, fp8_weight_from_per_tensor

# kind -> (call, suffix of the tensor the error must name, fragment of the message)
MISTAKES = {
    "e8m0_bytes_read_as_numbers_v3": (lambda: v3(W, E8M0_AS_NUMBERS, module=MODULE), "weight_scale_inv",
                                      "integers 0..255"),
    "e8m0_bytes_read_as_numbers_ct": (lambda: ct(W, E8M0_AS_NUMBERS.bfloat16(), module=MODULE), "weight_scale",
                                      "E8M0 bytes read as numbers"),
    "e8m0_float_copy_for_v4": (lambda: v4(W, POW2, module=MODULE), "scale", "expected F8_E8M0"),
    "transposed_v4": (lambda: v4(W_SQ, _v4_bytes(EXPS_SQ).T.contiguous(), module=MODULE), "scale", "transposed"),
    "transposed_modelopt": (lambda: mo(W_SQ, torch.ones(3, 1, 2, 1), module=MODULE), "weight_scale", "transposed"),
    "floor_division": (lambda: v3(W, POW2[:1, :2].contiguous(), module=MODULE), "weight_scale_inv", "floor division"),
    "nan_0xff_scale": (lambda: v4(W, _with_byte(_v4_bytes(EXPS), (1, 2), 0xFF), module=MODULE), "scale",
                       "1 NaN E8M0 scale bytes"),
    "nan_f32_scale": (lambda: v3(W, POW2.masked_fill(EXPS == EXPS[0, 0], float("nan")), module=MODULE),
                      "weight_scale_inv", "NaN, Inf or negative"),
    "nan_weight_byte": (lambda: v4(_with_byte(W, (5, 7), 0xFF), _v4_bytes(EXPS), module=MODULE), "weight",
                        "1 NaN E4M3 bytes"),
    "modelopt_2d_scale": (lambda: mo(W, POW2, module=MODULE), "weight_scale", "4-D"),
    "per_tensor_two_values": (lambda: pt(W, torch.ones(2), None, module=MODULE), "weight_scale", "one F32 value"),
    "per_tensor_negative_input_scale": (lambda: pt(W, torch.tensor(1.0), torch.tensor(-1.0), module=MODULE),
                                        "input_scale", "negative"),
    "e5m2_weight": (lambda: v4(W.view(torch.uint8).view(torch.float8_e5m2), _v4_bytes(EXPS), module=MODULE),
                    "weight", "F8_E4M3"),
}


@pytest.mark.parametrize("kind", sorted(MISTAKES))
def test_known_mistake_is_refused_in_one_line_naming_the_tensor(kind):
    call, suffix, fragment = MISTAKES[kind]
    with pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    assert msg.startswith(f"{MODULE}.{suffix}:"), msg
    assert fragment in msg and "\n" not in msg, msg


def test_genuine_float_scales_are_not_taken_for_e8m0_bytes():
    """The heuristic refuses integers 0..255 that are not powers of two; real scales pass: amax/448
    values, and power-of-two scales that happen to be integers (1.0, 2.0, 128.0)."""
    weight = random_e4m3_weight(N, K, seed=15)
    for s in (torch.tensor([[1.0, 2.0, 128.0], [4.0, 1.0, 0.5]]), torch.full((2, 3), 0.0123), torch.zeros(2, 3)):
        assert fp8_weight_from_v3_weight_scale_inv(weight, s, module=MODULE).block_dec_scale is s
