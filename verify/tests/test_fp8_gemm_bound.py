"""FP8 block-scaled GEMM reference (references/fp8_gemm.py): the float64 product, and the bound for a
declared narrow accumulator with float32 promotion every `promotion_interval` of K.

The candidate "kernels" are fp8_block_gemm_narrow_acc_model with a p-bit accumulator: the bound must
hold for it when the declaration is honest (bits and interval), and must FAIL (ratio > 1) for a
14-bit accumulator that skips the promotion, on data built so that a large running sum swallows
small products: the verdict "promotion skipped" can be caught.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from references.fp8_act import FP8_ACT_F32, FP8_ACT_UE8M0, Fp8Act1x128, quantize_act_fp8_1x128
from references.fp8_gemm import (
    U_FP64,
    abs_dot_by_chunk_f64,
    fp8_block_gemm_error_bound,
    fp8_block_gemm_f64,
    fp8_block_gemm_narrow_acc_model,
    round_f64_to_bits,
)
from references.fp8_weight import (
    fp8_weight_from_per_tensor,
    fp8_weight_from_v3_weight_scale_inv,
    fp8_weight_from_v4_e8m0_scale,
)
from references.gemm import gamma
from verify.assertions import assert_bits_equal, assert_within_gemm_bound

E4M3_ONE = 0x38


def random_operands(m: int, n: int, k: int, *, seed: int, act_recipe, weight_scales: str):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]).bfloat16()
    act = quantize_act_fp8_1x128(x, recipe=act_recipe)
    b = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    b = torch.where((b & 0x7F) == 0x7F, b ^ 0x01, b)
    grid = (-(-n // 128), -(-k // 128))
    if weight_scales == "ue8m0":
        w = fp8_weight_from_v4_e8m0_scale(b, torch.randint(115, 125, grid, generator=g, dtype=torch.uint8), module="w")
    else:
        w = fp8_weight_from_v3_weight_scale_inv(b, torch.rand(grid, generator=g) * 1e-2 + 1e-4, module="w")
    return act, w


def exact_product(act: Fp8Act1x128, w) -> list[list[Fraction]]:
    a = act.decode_f64().tolist()
    b = w.decode_f64().tolist()
    return [[sum((Fraction(x) * Fraction(y) for x, y in zip(ra, rb)), Fraction(0)) for rb in b] for ra in a]


def test_reference_product_with_pow2_scales_is_the_exact_dot_product():
    act, w = random_operands(4, 5, 300, seed=1, act_recipe=FP8_ACT_UE8M0, weight_scales="ue8m0")
    y = fp8_block_gemm_f64(act, w)
    exact = exact_product(act, w)
    assert_bits_equal(y, torch.tensor([[float(v) for v in r] for r in exact], dtype=torch.float64),
                      label="fp8 block gemm f64 (power-of-two scales)")


def test_reference_product_with_f32_scales_is_within_its_own_float64_error():
    """With float32 scales T_g * sa * sb is not exact in float64: within gamma(G + 2, 2^-53) * P (bound step 4)."""
    act, w = random_operands(3, 4, 300, seed=2, act_recipe=FP8_ACT_F32, weight_scales="f32")
    y = fp8_block_gemm_f64(act, w)
    p = sum(pc for _, pc in abs_dot_by_chunk_f64(act, w, promotion_interval=128))
    exact = exact_product(act, w)
    for i in range(3):
        for j in range(4):
            assert abs(Fraction(float(y[i, j])) - exact[i][j]) <= Fraction(gamma(3 + 2, U_FP64) * float(p[i, j]))


def test_round_f64_to_bits_is_nearest_even_and_truncation():
    """14 bits: the ulp of 1 is 2^-13; 1 + 2^-14 is a tie (to even: 1), 1 + 3 * 2^-14 a tie to 1 + 2^-12."""
    e = 2.0**-14
    x = torch.tensor([1 + e, 1 + 3 * e, 1 + 2 * e + 2.0**-20, -(1 + 3 * e)], dtype=torch.float64)
    assert round_f64_to_bits(x, bits=14, rounding="nearest").tolist() == [1.0, 1 + 4 * e, 1 + 2 * e, -(1 + 4 * e)]
    assert round_f64_to_bits(x, bits=14, rounding="truncate").tolist() == [1.0, 1 + 2 * e, 1 + 2 * e, -(1 + 2 * e)]


# ----------------------------------------------------------------------------- the bound holds for honest declarations

ACCUMULATORS = [  # (bits, rounding, declared u_acc)
    pytest.param(14, "nearest", 2.0**-14, id="14bit-nearest"),
    pytest.param(14, "truncate", 2.0**-13, id="14bit-truncate"),
    pytest.param(24, "nearest", 2.0**-24, id="24bit-nearest"),
]


@pytest.mark.parametrize("bits,rounding,u_acc", ACCUMULATORS)
@pytest.mark.parametrize("act_recipe,weight_scales", [(FP8_ACT_UE8M0, "ue8m0"), (FP8_ACT_F32, "f32")],
                         ids=["ue8m0", "f32"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bound_holds_for_a_promoting_narrow_accumulator(bits, rounding, u_acc, act_recipe, weight_scales,
                                                        out_dtype, seed):
    act, w = random_operands(6, 130, 1024 + 64, seed=seed, act_recipe=act_recipe, weight_scales=weight_scales)
    y = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=bits, rounding=rounding, promotion_interval=128)
    y64 = fp8_block_gemm_f64(act, w)
    bound = fp8_block_gemm_error_bound(act, w, y64, u_acc=u_acc, promotion_interval=128, out_dtype=out_dtype)
    assert_within_gemm_bound(y.to(torch.float32).to(out_dtype), y64, bound,
                             label=f"{bits}-bit {rounding}, promotion 128")


@pytest.mark.parametrize("interval", [256, None], ids=["promote256", "never"])
def test_bound_holds_when_the_declared_interval_is_the_real_one(interval):
    act, w = random_operands(4, 64, 1024, seed=3, act_recipe=FP8_ACT_UE8M0, weight_scales="ue8m0")
    y = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=14, rounding="nearest", promotion_interval=interval)
    y64 = fp8_block_gemm_f64(act, w)
    bound = fp8_block_gemm_error_bound(act, w, y64, u_acc=2.0**-14, promotion_interval=interval or 1024,
                                       out_dtype=torch.float32)
    assert_within_gemm_bound(y.float(), y64, bound, label=f"14-bit, promotion {interval}")


# ----------------------------------------------------------------------------- promotion skipped is caught


def big_sum_small_products(k: int = 1024) -> tuple[Fp8Act1x128, object]:
    """Row: 1024 (code 256 x scale 2^2) first, then 2^-4 (code 1 x 2^-4) in every later group; weight all
    1.0. Exact y = 1024 + (k - 128) 2^-4. In a 14-bit accumulator each 2^-4 is half an ulp of 1024: a
    tie to even, dropped; promoted every 128 of K, the small groups sum exactly on their own."""
    codes = torch.zeros(1, k, dtype=torch.uint8)
    codes[0, 0] = 0x78                                     # 256
    codes[0, 128:] = E4M3_ONE
    scales = torch.full((1, k // 128), 127 - 4, dtype=torch.uint8)
    scales[0, 0] = 127 + 2
    act = Fp8Act1x128(codes, scales, "ue8m0")
    w = fp8_weight_from_v4_e8m0_scale(torch.full((8, k), E4M3_ONE, dtype=torch.uint8),
                                      torch.full((1, k // 128), 127, dtype=torch.uint8), module="w")
    return act, w


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_skipped_promotion_fails_the_declared_bound(out_dtype):
    act, w = big_sum_small_products()
    y64 = fp8_block_gemm_f64(act, w)
    assert float(y64[0, 0]) == 1024 + 896 * 2.0**-4
    bound = fp8_block_gemm_error_bound(act, w, y64, u_acc=2.0**-14, promotion_interval=128, out_dtype=out_dtype)
    promoted = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=14, rounding="nearest", promotion_interval=128)
    skipped = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=14, rounding="nearest", promotion_interval=None)
    assert float(promoted[0, 0]) == float(y64[0, 0]) and float(skipped[0, 0]) == 1024.0
    assert_within_gemm_bound(promoted.float().to(out_dtype), y64, bound, label="promoted every 128")
    with pytest.raises(AssertionError, match="exceed the accumulation bound") as e:
        assert_within_gemm_bound(skipped.float().to(out_dtype), y64, bound, label="promotion skipped")
    ratio = float(str(e.value).split("max |y - y64| / bound = ")[1].split()[0])
    assert ratio > 2, ratio


def test_per_tensor_weight_goes_through_the_same_reference():
    act, _ = random_operands(3, 1, 256, seed=4, act_recipe=FP8_ACT_UE8M0, weight_scales="ue8m0")
    b = torch.full((5, 256), E4M3_ONE, dtype=torch.uint8)
    w = fp8_weight_from_per_tensor(b, torch.tensor(0.5), None, module="w")
    assert_bits_equal(fp8_block_gemm_f64(act, w), (act.decode_f64().sum(-1, keepdim=True) * 0.5).expand(3, 5),
                      label="per-tensor weight of 0.5")


# ----------------------------------------------------------------------------- a declaration looser than the kernel


def big_then_small_in_one_group(small_code: int) -> tuple[Fp8Act1x128, object]:
    """One group of 128: 256 then 127 x small_code, all x 2^2 (1024, then small values); weight 1.0."""
    codes = torch.full((1, 128), small_code, dtype=torch.uint8)
    codes[0, 0] = 0x78
    act = Fp8Act1x128(codes, torch.full((1, 1), 127 + 2, dtype=torch.uint8), "ue8m0")
    w = fp8_weight_from_v4_e8m0_scale(torch.full((4, 128), E4M3_ONE, dtype=torch.uint8),
                                      torch.full((1, 1), 127, dtype=torch.uint8), module="w")
    return act, w


def test_a_14_bit_accumulator_declared_as_fp32_fails():
    """2^-4 = half an ulp of 1024 at 14 bits: dropped 127 times inside one K block (the FP8 tensor core
    behaviour measured on the H100). A backend declaring float32 accumulation is caught."""
    act, w = big_then_small_in_one_group(0x08)                       # 2^-6 x 4 = 2^-4
    y64 = fp8_block_gemm_f64(act, w)
    y = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=14, rounding="nearest", promotion_interval=128)
    honest = fp8_block_gemm_error_bound(act, w, y64, u_acc=2.0**-14, promotion_interval=128, out_dtype=torch.float32)
    lie = fp8_block_gemm_error_bound(act, w, y64, u_acc=2.0**-24, promotion_interval=128, out_dtype=torch.float32)
    assert_within_gemm_bound(y.float(), y64, honest, label="14-bit declared 14-bit")
    with pytest.raises(AssertionError, match="exceed the accumulation bound"):
        assert_within_gemm_bound(y.float(), y64, lie, label="14-bit declared fp32")


def test_truncation_declared_as_round_to_nearest_fails():
    """Small terms of 0.75 ulp: truncation drops each (error 0.75 ulp), nearest keeps an ulp (0.25)."""
    act, w = big_then_small_in_one_group(0x0C)                       # 1.5 x 2^-6 x 4 = 0.75 x 2^-3
    y64 = fp8_block_gemm_f64(act, w)
    nearest_bound = fp8_block_gemm_error_bound(act, w, y64, u_acc=2.0**-14, promotion_interval=128,
                                               out_dtype=torch.float32)
    truncating = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=14, rounding="truncate", promotion_interval=128)
    nearest = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=14, rounding="nearest", promotion_interval=128)
    assert_within_gemm_bound(nearest.float(), y64, nearest_bound, label="nearest declared nearest")
    with pytest.raises(AssertionError, match="exceed the accumulation bound"):
        assert_within_gemm_bound(truncating.float(), y64, nearest_bound, label="truncation declared nearest")
