"""FP8 1x128 activation quantization (references/fp8_act.py) against an oracle built another way.

The oracle: group amax, floor and the division by 448 in numpy float32; the power of two rounded
up with np.frexp (exact); y = x / s or x * (1/s) in numpy float32; clamp to +-448; then torch's own
float8_e4m3fn cast (RNE) for the bytes, and ml_dtypes' float8_e8m0fnu cast of the (exact power of
two) scale for the UE8M0 byte. Hypothesis fuzzes values, shapes and magnitudes under every recipe;
@example pins ties, saturation, zero groups, E4M3 subnormals and a partial last group.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from references.fp8_act import (
    FP8_ACT_F32,
    FP8_ACT_F32_RECIP,
    FP8_ACT_RECIPES,
    FP8_ACT_UE8M0,
    Fp8ActRecipe,
    fp8_act_recipe_by_name,
    quantize_act_fp8_1x128,
    quantize_act_fp8_per_tensor_static,
)
from references.linear import quantize_act_fp8_block128
from verify.assertions import assert_bits_equal, assert_bytes_equal, describe_e4m3

pytestmark = pytest.mark.oracle("ml_dtypes", "torch")
ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the UE8M0 oracle (pip install '.[test]')")

F32 = np.float32
RECIPES = [pytest.param(r, id=r.name) for r in FP8_ACT_RECIPES.values()]


def oracle_act_quant(x_f32: np.ndarray, recipe: Fp8ActRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 bytes [M, K], scales [M, G]: UE8M0 bytes or float32) for finite x, one group at a time."""
    m, k = x_f32.shape
    groups = -(-k // 128)
    codes = np.zeros((m, k), dtype=np.uint8)
    scales = np.zeros((m, groups), dtype=np.float32)
    for g in range(groups):
        blk = x_f32[:, g * 128:(g + 1) * 128]
        amax = np.maximum(np.abs(blk).max(axis=1), F32(recipe.amax_floor_f32)).astype(F32)
        s = (amax / F32(448.0)).astype(F32)
        if recipe.scale_rule == "ue8m0_ceil":
            mant, ex = np.frexp(s)                       # s = mant * 2^ex, mant in [0.5, 1)
            s = np.ldexp(F32(1.0), np.where(mant == 0.5, ex - 1, ex)).astype(F32)
        sc = s[:, None]
        y = blk / sc if recipe.encode_rule == "divide" else blk * (F32(1.0) / sc)
        y = np.clip(y.astype(F32), F32(-448.0), F32(448.0))
        codes[:, g * 128:(g + 1) * 128] = torch.from_numpy(np.ascontiguousarray(y)).to(
            torch.float8_e4m3fn).view(torch.uint8).numpy()
        scales[:, g] = s
    if recipe.scale_rule == "ue8m0_ceil":
        return torch.from_numpy(codes), torch.from_numpy(scales.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8))
    return torch.from_numpy(codes), torch.from_numpy(scales)


def assert_matches_oracle(x_f32: np.ndarray, recipe: Fp8ActRecipe) -> None:
    __tracebackhide__ = True
    q = quantize_act_fp8_1x128(torch.from_numpy(x_f32), recipe=recipe)
    codes, scales = oracle_act_quant(x_f32, recipe)
    assert_bytes_equal(q.e4m3_u8, codes, label=f"fp8 act codes [{recipe}]", describe=describe_e4m3)
    if recipe.scale_rule == "ue8m0_ceil":
        assert_bytes_equal(q.block_dec_scale, scales, label=f"fp8 act UE8M0 scales [{recipe}]")
    else:
        assert_bits_equal(q.block_dec_scale, scales, label=f"fp8 act f32 scales [{recipe}]")


# ----------------------------------------------------------------------------- fixed cases


def _row(*head: float, k: int = 128, fill: float = 0.0) -> np.ndarray:
    r = np.full((1, k), fill, dtype=F32)
    r[0, :len(head)] = head
    return r


TIES = _row(448.0, 1.0625, 1.1875, -1.0625, 0.0078125 * 1.5, 136.0, 144.0 + 8.0)  # s = 1 under every rule
SATURATES_DIV = _row(9350.724609375, -9350.724609375, 1.0)     # x / fl(amax/448) = 448.00003 before the clamp
SATURATES_RCP = _row(27.38599967956543, 3.0)                    # x * (1/s) = 448.00003 before the clamp
ZERO_GROUP = _row(k=130)
NEG_ZERO_GROUP = _row(k=128, fill=-0.0)
SUBNORMALS = _row(448.0, 2.0**-9, 3 * 2.0**-10, 2.0**-10, -(2.0**-7), k=200, fill=2.0**-8)
PARTIAL_LAST = np.linspace(-3.0, 5.0, 3 * 259, dtype=F32).reshape(3, 259)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("case", ["ties", "saturates_div", "saturates_rcp", "zero_group", "neg_zero_group",
                                  "subnormals", "partial_last"])
def test_act_quant_bytes_match_oracle_on_pinned_cases(recipe, case):
    x = {"ties": TIES, "saturates_div": SATURATES_DIV, "saturates_rcp": SATURATES_RCP, "zero_group": ZERO_GROUP,
         "neg_zero_group": NEG_ZERO_GROUP, "subnormals": SUBNORMALS, "partial_last": PARTIAL_LAST}[case]
    assert_matches_oracle(x, recipe)


@pytest.mark.parametrize("recipe", RECIPES)
def test_act_quant_bytes_match_oracle_on_random_bf16_rows(recipe):
    g = torch.Generator().manual_seed(23)
    x = (torch.randn(16, 7 * 128 + 40, generator=g) * torch.logspace(-6, 3, 16)[:, None]).bfloat16()
    assert_matches_oracle(x.float().numpy(), recipe)


@pytest.mark.parametrize("recipe", RECIPES)
def test_zero_group_scale_and_codes_are_the_documented_ones(recipe):
    q = quantize_act_fp8_1x128(torch.from_numpy(np.concatenate([ZERO_GROUP[:, :128], NEG_ZERO_GROUP], 1)),
                               recipe=recipe)
    if recipe.scale_rule == "ue8m0_ceil":
        assert q.block_dec_scale.tolist() == [[105, 105]]                      # 2^-22 >= 1e-4 / 448
    else:
        assert q.block_dec_scale.tolist() == [[float(F32(1e-4) / F32(448.0))] * 2]
    assert q.e4m3_u8[0, :128].eq(0x00).all() and q.e4m3_u8[0, 128:].eq(0x80).all()


def test_divide_and_reciprocal_differ_in_bytes_under_the_f32_rule():
    """x / s = 136.00002 rounds up to 144; x * (1/s) = 136 is a tie and goes to the even 128."""
    x = _row(413.5601501464844, 125.54505157470703)
    a = quantize_act_fp8_1x128(torch.from_numpy(x), recipe=FP8_ACT_F32).e4m3_u8
    b = quantize_act_fp8_1x128(torch.from_numpy(x), recipe=FP8_ACT_F32_RECIP).e4m3_u8
    assert (int(a[0, 1]), int(b[0, 1])) == (0x71, 0x70)


def test_legacy_linear_act_quant_is_the_recipe():
    x = torch.randn(5, 3 * 128 + 17, generator=torch.Generator().manual_seed(1)).bfloat16()
    for fmt, recipe in (("ue8m0", FP8_ACT_UE8M0), ("f32", FP8_ACT_F32)):
        old, new = quantize_act_fp8_block128(x, scale_fmt=fmt), quantize_act_fp8_1x128(x, recipe=recipe)
        assert_bytes_equal(old.e4m3_u8, new.e4m3_u8, label=f"linear.quantize_act_fp8_block128 {fmt}")
        assert_bits_equal(old.block_dec_f32, new.block_dec_scale_f32(), label=f"legacy scales {fmt}")


# ----------------------------------------------------------------------------- NaN / Inf (documented policy)


@pytest.mark.parametrize("recipe", RECIPES)
def test_nan_propagates_to_its_group_only(recipe):
    x = torch.ones(2, 256)
    x[0, 3] = float("nan")
    q = quantize_act_fp8_1x128(x, recipe=recipe)
    assert q.e4m3_u8[0, :128].eq(0x7F).all()
    assert torch.isnan(q.block_dec_scale_f32()[0, 0])
    assert not torch.isnan(q.decode_f64()[0, 128:]).any() and not torch.isnan(q.decode_f64()[1]).any()


def test_nan_ignored_by_an_fmaxf_recipe_marks_only_its_element():
    recipe = Fp8ActRecipe(name="fmaxf", scale_rule="ue8m0_ceil", amax_floor_f32=1e-4, encode_rule="divide",
                          amax_nan="ignore")
    x = torch.ones(1, 128)
    x[0, 3] = float("nan")
    q = quantize_act_fp8_1x128(x, recipe=recipe)
    assert int(q.e4m3_u8[0, 3]) == 0x7F and int(q.block_dec_scale[0, 0]) == 127 - 8    # 2^ceil(log2(1/448))
    assert torch.isnan(q.decode_f64()[0]).sum() == 1


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("inf", [float("inf"), float("-inf")], ids=["+inf", "-inf"])
def test_inf_makes_its_whole_group_decode_to_nan(recipe, inf):
    x = torch.ones(1, 256)
    x[0, 130] = inf
    q = quantize_act_fp8_1x128(x, recipe=recipe)
    d = q.decode_f64()
    assert torch.isnan(d[0, 128:]).all() and torch.isfinite(d[0, :128]).all()
    assert int(q.e4m3_u8[0, 130]) == 0x7F


def test_recipe_fields_are_validated():
    with pytest.raises(ValueError, match="amax_floor_f32"):
        Fp8ActRecipe(name="nofloor", scale_rule="f32", amax_floor_f32=0.0, encode_rule="divide", amax_nan="propagate")
    with pytest.raises(ValueError, match="scale_rule"):
        Fp8ActRecipe(name="x", scale_rule="ue8m0_floor", amax_floor_f32=1e-4, encode_rule="divide",
                     amax_nan="propagate")
    with pytest.raises(ValueError, match="expected one of"):
        fp8_act_recipe_by_name("fp8_e5m2")
    with pytest.raises(ValueError, match="x: expected"):
        quantize_act_fp8_1x128(torch.ones(2, 3, 128), recipe=FP8_ACT_UE8M0)


# ----------------------------------------------------------------------------- planted bug: UE8M0 rounded down


def quantize_ue8m0_rounded_down(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A WRONG quantizer (test data only): the scale rounded DOWN to a power of two, so the group max
    lands past 448 and saturates. Same as the recipe wherever amax/448 is already a power of two."""
    xg = x.float().view(x.shape[0], -1, 128)
    s = torch.clamp(xg.abs().amax(-1), min=1e-4) / 448.0
    s_down = torch.exp2(torch.floor(torch.log2(s)))
    codes = torch.clamp(xg / s_down.unsqueeze(-1), -448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.view(x.shape), (torch.log2(s_down) + 127).to(torch.uint8)


def test_ue8m0_rounded_down_differs_in_bytes_where_it_matters():
    x = torch.from_numpy(np.concatenate([_row(300.0, 100.0, -7.0), _row(448.0, 3.0)], 0))  # amax/448 = 0.67, 1
    codes, scales = quantize_ue8m0_rounded_down(x)
    q = quantize_act_fp8_1x128(x, recipe=FP8_ACT_UE8M0)
    # where amax / 448 is a power of two the two rules agree (the bug hides on such data) ...
    assert_bytes_equal(codes[1], q.e4m3_u8[1], label="rounded down, amax 448")
    assert_bytes_equal(scales[1], q.block_dec_scale[1], label="rounded down, amax 448")
    # ... and where it is not, both the scale byte and the saturated codes differ
    with pytest.raises(AssertionError, match="1/1 bytes differ"):
        assert_bytes_equal(scales[0], q.block_dec_scale[0], label="rounded-down scale")
    with pytest.raises(AssertionError, match="3/128 bytes differ"):
        assert_bytes_equal(codes[0], q.e4m3_u8[0], label="rounded-down codes", describe=describe_e4m3)


# ----------------------------------------------------------------------------- fuzz


@st.composite
def act_rows(draw) -> np.ndarray:
    """Random rows (normal, uniform or sparse; magnitudes 2^-30 .. 2^30; optionally bf16-rounded) with up
    to 6 drawn float32 values planted at drawn positions (ties, maxima, subnormals come from there)."""
    m = draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 127, 128, 129, 256, 300]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "uniform", "sparse"]))
    x = {"normal": rng.standard_normal((m, k)), "uniform": rng.uniform(-1, 1, (m, k)),
         "sparse": rng.standard_normal((m, k)) * (rng.uniform(size=(m, k)) < 0.05)}[kind]
    x = (x * 2.0 ** draw(st.integers(-30, 30))).astype(F32)
    for _ in range(draw(st.integers(0, 6))):
        i, j = draw(st.integers(0, m - 1)), draw(st.integers(0, k - 1))
        x[i, j] = draw(st.floats(-2.0**100, 2.0**100, width=32, allow_nan=False, allow_infinity=False))
    if draw(st.booleans()):
        x = torch.from_numpy(x).bfloat16().float().numpy()      # what the engines feed in
    return x


@pytest.mark.fuzz
@pytest.mark.parametrize("recipe", RECIPES)
@given(x=act_rows())
@example(x=TIES)
@example(x=SATURATES_DIV)
@example(x=SATURATES_RCP)
@example(x=ZERO_GROUP)
@example(x=NEG_ZERO_GROUP)
@example(x=SUBNORMALS)
@example(x=_row(413.5601501464844, 125.54505157470703))   # divide / reciprocal tie split
def test_act_quant_matches_oracle_fuzz(recipe, x):
    assert_matches_oracle(x, recipe)


@pytest.mark.parametrize("encode_rule", ["mul_reciprocal", "divide"])
def test_per_tensor_static_act_quant_matches_torch_cast(encode_rule):
    x = (torch.randn(4, 200, generator=torch.Generator().manual_seed(9)) * 30).bfloat16()
    d = torch.tensor(0.0123, dtype=torch.float32)
    q = quantize_act_fp8_per_tensor_static(x, d, encode_rule=encode_rule)
    y = x.float() * (1.0 / d) if encode_rule == "mul_reciprocal" else x.float() / d
    expected = torch.clamp(y, -448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert_bytes_equal(q.e4m3_u8, expected, label=f"per-tensor act quant ({encode_rule})", describe=describe_e4m3)
    assert q.block_dec_scale.shape == (4, 2) and bool((q.block_dec_scale == d).all())
    assert bool((q.e4m3_u8 == 0x7E).any() | (q.e4m3_u8 == 0xFE).any())     # some saturate at 448
