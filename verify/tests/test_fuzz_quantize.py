"""Property-based fuzz suite of the NVFP4 quantizer emulator (references/nvfp4.py).

Every recipe (te, vllm, modelopt, torchao) is checked byte for byte against a
re-derivation written here, from NVFP4_FACTS.md sections 1-2, along a different
route than the emulator's bit-level codecs:

  * block max, block scale and encode multiplier in numpy float32 arithmetic, in
    the recipe's association (IEEE float32 ops are correctly rounded in numpy and
    torch alike, so the association is the only thing that must match);
  * E4M3 rounding by ml_dtypes' float8_e4m3fn cast AFTER an explicit clamp to 448
    (ml_dtypes returns NaN on overflow; the hardware saturates);
  * E2M1 rounding by nearest-value search over the 8 magnitudes in float64, with
    ties sent to the even code explicitly, then the recipe's sign rule.

The global scale is fuzzed (exact powers of two so that E2M1 ties are hit
exactly, amax-derived, and wild values that saturate or underflow block scales).
Metamorphic properties (power-of-two scaling, block independence, negation,
block max -> +-6, dequantization error) state exactly what must hold per recipe;
the derivations are in the comments. Known-wrong quantizers
(verify/tests/wrong_quantizers.py) prove the search finds real bug classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import Phase, event, example, find, given, settings
from hypothesis import strategies as st

from references.nvfp4 import dequantize_nvfp4, quantize_nvfp4
from references.recipes import MODELOPT, TE, TORCHAO, VLLM, Recipe
from references.codecs import f32_to_e2m1_codes, f32_to_e4m3_bytes
from verify.assertions import assert_bits_equal, assert_bytes_equal, describe_e2m1x2, describe_e4m3
from verify.tests import wrong_quantizers as wq

# the oracles this module compares with; verify/oracles.py documents their versions
pytestmark = pytest.mark.oracle("ml_dtypes", "torch")

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the E4M3 oracle (pip install '.[test]')")

F32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)
U = 2.0**-24  # float32 unit roundoff
SIXTH_F32 = F32(1.0) / F32(6.0)  # 0x3E2AAAAB, the recipes' float32 (1/6)
E2M1_MAGS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)
GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
SIGNED_GRID = tuple(sorted(set(GRID + MIDPOINTS + tuple(-t for t in GRID + MIDPOINTS)), key=abs))
NAN, INF = float("nan"), float("inf")
SPECIALS = (NAN, INF, -INF, 0.0, -0.0, 2.0**-149, -(2.0**-149), FLT_MAX, -FLT_MAX, 2.0**-126)

RECIPE_PARAMS = [pytest.param(r, id=r.name) for r in (TE, VLLM, MODELOPT, TORCHAO)]


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True, eq=False)
class QuantCase:
    """x [rows, K] float32 and the global scale in both conventions (S = 2688/amax, D = amax/2688)."""

    x: np.ndarray
    g_enc: float
    g_dec: float

    def g(self, recipe: Recipe) -> np.float32:
        return F32(self.g_enc if recipe.global_convention == "enc" else self.g_dec)

    def __repr__(self) -> str:  # pasteable into @example(c=...)
        rows = [[float(v) for v in r] for r in self.x]
        return f"case({rows!r}, g_enc={float(self.g_enc)!r}, g_dec={float(self.g_dec)!r})"


def case(rows, *, k: int | None = None, amax: float | None = None,
         g_enc: float | None = None, g_dec: float | None = None) -> QuantCase:
    """Build a case: global S = 2^k, D = 2^-k, or from amax (S = fl(2688/amax), D = fl(amax/2688))."""
    x = np.array(rows, dtype=np.float64).astype(np.float32).reshape(len(rows), -1)
    if k is not None:
        g_enc, g_dec = 2.0**k, 2.0**-k
    elif amax is not None:
        g_enc, g_dec = float(F32(2688.0) / F32(amax)), float(F32(amax) / F32(2688.0))
    return QuantCase(x=x, g_enc=float(F32(g_enc)), g_dec=float(F32(g_dec)))


SIGNED_GRID_ARR = np.array(SIGNED_GRID, dtype=np.float64)
SPECIALS_ARR = np.array(SPECIALS, dtype=np.float64)
KINDS_ALL = ("grid", "grid", "random", "zero", "tiny", "special")
KINDS_FINITE = ("grid", "grid", "random", "zero")


def _fill_block(kind: str, seed: int, j: int, e: int) -> np.ndarray:
    """16 base values of one block from a seeded RNG (cheap; hypothesis draws the seed and the
    block's parameters, plus a few override elements, so each example costs ~10 draws, not ~50).

    grid:    t * 2^j, t half from the E2M1 grid and its midpoints (exact ties), half uniform
             in [-6.5, 6.5] (rounded to float32, so the half-step bug's intervals are hit);
    random:  random sign, magnitude log-uniform over [2^(e-24), 2^e];
    zero:    +0.0 / -0.0;  tiny: magnitudes in [2^(e-20), 2^e], e in [-130, -100] (float32
             subnormals included: block scales underflow);
    special: NaN, +-Inf, +-0, 2^-149, FLT_MAX, 2^-126 mixed with grid values * 2^j.
    """
    rng = np.random.default_rng(seed)
    if kind == "grid":
        t = np.where(rng.random(16) < 0.5, rng.choice(SIGNED_GRID_ARR, 16),
                     rng.uniform(-6.5, 6.5, 16).astype(np.float32))
        return t * 2.0**j
    if kind in ("random", "tiny"):
        span = 24 if kind == "random" else 20
        mag = 2.0 ** rng.uniform(e - span, e, 16)
        return np.where(rng.random(16) < 0.5, -mag, mag)
    if kind == "zero":
        return np.where(rng.random(16) < 0.5, -0.0, 0.0)
    return np.where(rng.random(16) < 0.5, rng.choice(SPECIALS_ARR, 16), rng.choice(SIGNED_GRID_ARR, 16) * 2.0**j)


# Strategies are built once (building one per draw costs more than the draw itself).
_UNIT_OVERRIDE = {
    # value before scaling by 2^j (grid, special grid part) or 2^e (random, tiny)
    "grid": st.one_of(st.sampled_from(SIGNED_GRID), st.floats(-6.5, 6.5, width=32)),
    "random": st.floats(-1.0, 1.0, width=32),
    "tiny": st.floats(-1.0, 1.0, width=32),
    "zero": st.sampled_from((0.0, -0.0)),
    "special": st.sampled_from(SPECIALS),
}
_OVERRIDES = {k: st.lists(st.tuples(st.integers(0, 15), v), max_size=3) for k, v in _UNIT_OVERRIDE.items()}
_KIND = {kinds: st.sampled_from(kinds) for kinds in (KINDS_ALL, KINDS_FINITE)}
_SEED = st.integers(0, 2**32 - 1)
_POS = st.integers(0, 15)
_SIX = st.sampled_from((None, 6.0, -6.0))
_TINY_E = st.integers(-130, -100)


@st.composite
def blocks(draw, *, kinds: tuple[str, ...], j: st.SearchStrategy[int], e: st.SearchStrategy[int]) -> list[float]:
    """One 16-element block: kind, exponent, RNG seed, up to 3 hypothesis-chosen overrides
    (boundary floats, exact grid points and ties), and for grid blocks maybe a +-6*2^j block
    max (in pow2 mode that makes the E4M3 scale an exact power of two: exact ties)."""
    kind = draw(_KIND[kinds] if kinds in _KIND else st.sampled_from(kinds))
    jj = draw(j)
    ee = draw(_TINY_E) if kind == "tiny" else draw(e)
    vals = _fill_block(kind, draw(_SEED), jj, ee)
    scale = 2.0**jj if kind == "grid" else (2.0**ee if kind in ("random", "tiny") else 1.0)
    for pos, v in draw(_OVERRIDES[kind]):
        vals[pos] = v * scale
    if kind == "grid":
        six = draw(_SIX)
        if six is not None:
            vals[draw(_POS)] = six * 2.0**jj
    return vals.tolist()


_J_WIDE = st.integers(-30, 30)
_J_POW2 = st.integers(-10, 10)  # the E4M3 exponent of a grid block's scale in pow2 mode
_E_DEFAULT = st.integers(-40, 40)
_ROWS = st.integers(1, 3)
_MODE = st.sampled_from(("pow2", "amax", "wild"))
_K = st.integers(-20, 20)
_FACTOR = st.one_of(st.sampled_from((1.0, 0.5, 2.0, 1.0 / 448, 448.0)), st.floats(2.0**-8, 2.0**8, width=32))


def _finite_amax(x: np.ndarray) -> float:
    f = np.abs(x[np.isfinite(x)]).astype(np.float64)
    m = float(f.max()) if f.size else 0.0
    return m if m > 0 else 1.0


@st.composite
def quant_cases(draw, *, specials: bool = True, max_rows: int = 3, max_blocks: int = 4,
                wild_exp: int = 100, e_range: int = 40) -> QuantCase:
    """rows x (16 * blocks) float32 data and a global scale.

    Global modes: "pow2" (S = 2^k, D = 2^-k, grid blocks placed so their E4M3 scale is
    2^jj, jj in [-10, 10]: exact ties, subnormal, zero and saturated scales), "amax"
    (the data's amax times a factor in [2^-8, 2^8]) and "wild" (any amax in
    [2^-wild_exp, 2^wild_exp]).
    """
    rows = draw(_ROWS if max_rows == 3 else st.integers(1, max_rows))
    nblk = draw(st.integers(1, max_blocks))
    mode = draw(_MODE)
    k = draw(_K) if mode == "pow2" else 0
    kinds = KINDS_ALL if specials else KINDS_FINITE
    j = _J_POW2.map(lambda jj: jj - k) if mode == "pow2" else _J_WIDE
    strat = blocks(kinds=kinds, j=j, e=_E_DEFAULT if e_range == 40 else st.integers(-e_range, e_range))
    vals = [draw(strat) for _ in range(rows * nblk)]
    x = np.array(vals, dtype=np.float64).astype(np.float32).reshape(rows, nblk * 16)
    if mode == "pow2":
        return case(x, k=k)
    if mode == "amax":
        factor = draw(_FACTOR)
        amax = _finite_amax(x) * factor
    else:
        amax = draw(st.floats(2.0**-wild_exp, 2.0**wild_exp, width=32))
    amax = float(F32(min(max(amax, 2.0**-wild_exp), 2.0**wild_exp)))
    return case(x, amax=amax)


# ----------------------------------------------------------------------------- re-derivation


@dataclass(frozen=True)
class Rederived:
    packed_u8: np.ndarray  # [R, K/2], element 2i in the low nibble
    sf_u8: np.ndarray      # [R, K/16] E4M3 bytes
    s_pre: np.ndarray      # [R, K/16] float32 block scale in the recipe's association, before clamps
    s_dec: np.ndarray      # [R, K/16] float32 value of the E4M3 byte
    y: np.ndarray          # [R, K] float32 x mapped onto the E2M1 grid, before the clamp to [-6, 6]
    codes: np.ndarray      # [R, K] uint8 E2M1 codes


def e2m1_nearest_even_codes(y: np.ndarray, sign_rule: str) -> np.ndarray:
    """Nearest of the 8 magnitudes to clamp(|y|, 6) by float64 distance; an exact tie goes
    to the even code (the only two candidates of a tie are adjacent, one even, one odd).
    Sign: "lt_zero" -> y < 0 (so -0.0 -> +0), "signbit" -> sign bit of y.
    NaN -> +6 (0x7), the emulator's documented policy (PTX cvt.rn.satfinite.e2m1x2)."""
    y64 = y.astype(np.float64)
    nan = np.isnan(y64)
    a = np.minimum(np.abs(np.where(nan, 0.0, y64)), 6.0)
    d = np.abs(a[..., None] - E2M1_MAGS)
    is_min = d == d.min(axis=-1, keepdims=True)
    even = is_min & (np.arange(8) % 2 == 0)
    mag = np.where(even.any(axis=-1), np.argmax(even, axis=-1), np.argmax(is_min, axis=-1))
    neg = (y < 0) if sign_rule == "lt_zero" else np.signbit(y)
    codes = (mag | (neg & ~nan).astype(np.int64) << 3).astype(np.uint8)
    return np.where(nan, np.uint8(0x7), codes)


def e4m3_via_ml_dtypes(s_f32: np.ndarray) -> np.ndarray:
    """E4M3 RNE bytes through ml_dtypes, after the explicit clamp to 448 (NaN stays NaN)."""
    clamped = np.where(s_f32 > F32(448.0), F32(448.0), s_f32)
    return clamped.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def pack_low_first(codes: np.ndarray) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def rederive(x: np.ndarray, recipe: Recipe, g: np.float32) -> Rederived:
    """The recipe of NVFP4_FACTS.md section 2, in numpy float32 (see the module docstring)."""
    name = recipe.name
    with np.errstate(all="ignore"):
        r, k = x.shape
        xb = x.reshape(r, k // 16, 16)
        a = np.abs(xb)
        if name in ("te", "vllm"):  # CUDA fmaxf from 0: NaN never raises the block max
            v = np.fmax.reduce(a, axis=-1, initial=F32(0.0))
        else:                       # torch.amax: NaN propagates
            v = np.max(a, axis=-1)
        if name == "te":
            s_pre = v * (g * SIXTH_F32)
        elif name == "vllm":
            s_pre = g * (v * SIXTH_F32)
        elif name == "modelopt":
            s_pre = v / (F32(6.0) * g)
        else:
            s_pre = (v / F32(6.0)) / g
        s = s_pre
        if name == "modelopt":
            s = np.clip(np.where(s == 0, F32(1.0), s), F32(2.0**-9), F32(448.0))
        elif name == "torchao":
            s = np.clip(s, F32(2.0**-6), F32(448.0))
        sf_u8 = e4m3_via_ml_dtypes(s.astype(np.float32))
        s_dec = sf_u8.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        sd = s_dec[..., None]
        if name == "te":
            y = xb * np.minimum(F32(1.0) / (sd * (F32(1.0) / g)), F32(FLT_MAX))
        elif name == "vllm":
            y = xb * np.where(sd != 0, F32(1.0) / (sd * (F32(1.0) / g)), F32(0.0))
        elif name == "modelopt":
            y = xb / (sd * g)
        else:
            y = xb * ((F32(1.0) / g) / sd)
        y = y.astype(np.float32).reshape(r, k)
    codes = e2m1_nearest_even_codes(y, recipe.sign_rule)
    return Rederived(packed_u8=pack_low_first(codes), sf_u8=sf_u8, s_pre=s_pre.astype(np.float32),
                     s_dec=s_dec, y=y, codes=codes)


def emulate(recipe: Recipe, x: np.ndarray, g: np.float32):
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).copy())
    gt = torch.tensor(float(g), dtype=torch.float32)
    if recipe.global_convention == "enc":
        return quantize_nvfp4(xt, recipe=recipe, global_enc_scale_f32=gt)
    return quantize_nvfp4(xt, recipe=recipe, global_dec_scale_f32=gt)


def unpack_low_first(packed: np.ndarray) -> np.ndarray:
    return np.stack((packed & 0xF, packed >> 4), axis=-1).reshape(*packed.shape[:-1], -1)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).copy())


# ----------------------------------------------------------------------------- examples

TIES_ROW = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0]
EX_TIES = case([TIES_ROW], k=0)                                   # te: s = fl(6 * fl(1/6)) -> E4M3 1.0, enc = 1
EX_TIES_SCALED = case([[t * 2.0**12 for t in TIES_ROW]], k=-12)        # same ties, scale 2^12 * 2^-12 = 1
EX_TIES_SCALED_2 = case([[t * 2.0**-20 for t in TIES_ROW]], k=20)
EX_MIXED_SCALES = case([[t * 2.0**-20 for t in TIES_ROW], [t * 2.0**12 for t in TIES_ROW]], k=4)  # 0 and 448
EX_NEG_ZERO = case([[-0.0] * 4 + [0.0] * 4 + [-1e-3, 1e-3, -0.2, 0.2, -0.0, 6.0, -0.0, -1e-30]], amax=6.0)
EX_ZERO_BLOCKS = case([[0.0] * 16 + [-0.0] * 16], amax=1.0)
EX_UNDERFLOW = case([[1e-30, -1e-30, 3e-31, 0.0] * 4 + [1.0] * 16], amax=1.0)   # first block's scale -> 0
EX_SUBNORMAL_X = case([[2.0**-149, -(2.0**-149)] * 8], amax=2.0**20)        # modelopt: s underflows f32 -> 1.0
EX_NAN_INF = case([[NAN, 1.0, 2.0, -3.0] * 4 + [INF, -INF, 0.5, -0.0] * 4], amax=6.0)
EX_SATURATED = case([[100.0, -50.0, 3.0, 1e-3] * 4], amax=1.0)             # s = 100 * 448 -> 448
EX_SUBNORMAL_SCALE = case([[6.0 * 2.0**-8, 2.5 * 2.0**-8] + [0.0] * 14], k=0)  # E4M3 scale 2^-8 (subnormal)
PINNED = (EX_TIES, EX_TIES_SCALED, EX_TIES_SCALED_2, EX_MIXED_SCALES, EX_NEG_ZERO, EX_ZERO_BLOCKS, EX_UNDERFLOW,
          EX_SUBNORMAL_X, EX_NAN_INF, EX_SATURATED, EX_SUBNORMAL_SCALE)


def pin_examples(f):
    """Apply @example(case=...) for every pinned case (classic ties, -0.0, zero, underflow, NaN/Inf)."""
    for c in reversed(PINNED):
        f = example(c=c)(f)
    return f


# ----------------------------------------------------------------------------- 1. vs re-derivation


def check_matches_rederivation(quantize, recipe: Recipe, c: QuantCase) -> None:
    """quantize(recipe, x_f32 [R, K], g_f32 0-d) -> object with packed_u8 and sf_u8: bytes must
    equal the re-derivation (scales first: a wrong scale explains wrong codes)."""
    g = c.g(recipe)
    ref = rederive(c.x, recipe, g)
    q = quantize(recipe, c.x, g)
    assert_bytes_equal(q.sf_u8, _t(ref.sf_u8), label=f"block scales [{recipe.name} vs re-derivation]",
                       describe=describe_e4m3)
    assert_bytes_equal(q.packed_u8, _t(ref.packed_u8), label=f"packed codes [{recipe.name} vs re-derivation]",
                       describe=describe_e2m1x2)


@pytest.mark.fuzz
@pytest.mark.parametrize("recipe", RECIPE_PARAMS)
@given(c=quant_cases())
@pin_examples
def test_quantize_bytes_match_independent_rederivation(recipe, c):
    check_matches_rederivation(emulate, recipe, c)
    _record_coverage(rederive(c.x, recipe, c.g(recipe)))


# E4M3 block-scale rounding midpoints: every adjacent pair of positive E4M3 values (subnormal and
# normal), exactly representable in float32. Near them the recipes' float32 associations
# (te v*(S*(1/6)), vllm S*(v*(1/6)), modelopt v/(6*D), torchao (v/6)/D) round to different bytes.
_E4M3_POS = np.arange(1, 0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)  # ascending
E4M3_MIDPOINTS = (_E4M3_POS[:-1] + _E4M3_POS[1:]) / 2
_GLOBAL_FACTORS = (1.0, 2688.0 / 7.0, 2688.0 / 0.37, 1.0 / 3.0, 0.6180339887)


@st.composite
def e4m3_midpoint_cases(draw) -> QuantCase:
    """Blocks whose block amax v puts v * S / 6 within a few float32 ulps of an E4M3 rounding
    midpoint, at several global scales (powers of two and amax-derived ones); D = fl(1 / S), so the
    dec recipes' v / (6 D) lands there too. The other 15 elements are random within [-v, v]."""
    k = draw(st.integers(-12, 12))
    g_enc = float(F32(2.0**k * draw(st.sampled_from(_GLOBAL_FACTORS))))
    g_dec = float(F32(1.0) / F32(g_enc))
    rows, nblk = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    seed = draw(_SEED)
    rng = np.random.default_rng(seed)
    x = np.empty((rows, nblk * 16), dtype=np.float32)
    for b in range(rows * nblk):
        m = float(draw(st.sampled_from(E4M3_MIDPOINTS)))
        v = F32(m * 6.0 / g_enc)
        for _ in range(abs(draw(st.integers(-4, 4)))):
            v = np.nextafter(v, F32(np.inf) if rng.random() < 0.5 else F32(0))
        blk = (rng.uniform(-1.0, 1.0, 16) * float(v)).astype(np.float32)
        blk[draw(_POS)] = v if rng.random() < 0.5 else -v
        r, c = divmod(b, nblk)
        x[r, c * 16:(c + 1) * 16] = blk
    return QuantCase(x=x, g_enc=g_enc, g_dec=g_dec)


@pytest.mark.fuzz
@pytest.mark.parametrize("recipe", RECIPE_PARAMS)
@given(c=e4m3_midpoint_cases())
def test_block_scale_near_e4m3_midpoints_matches_rederivation(recipe, c):
    """Each recipe's own float32 association of the block scale, where it matters: near an E4M3
    rounding midpoint a re-associated product rounds to the neighbouring byte."""
    check_matches_rederivation(emulate, recipe, c)
    ref = rederive(c.x, recipe, c.g(recipe))
    s = np.abs(ref.s_pre.astype(np.float64))
    near = np.abs(s[..., None] - E4M3_MIDPOINTS) <= 4 * U * np.maximum(s[..., None], 2.0**-9)
    if near.any():
        event("block scale within 4 ulps of an E4M3 midpoint")


def _record_coverage(ref: Rederived) -> None:
    """Hypothesis events (shown by --hypothesis-show-statistics): proof the search reaches the
    regions that matter: exact E2M1 ties, the half-step table's wrong intervals, every class of
    scale byte, NaN and Inf."""
    y = np.abs(ref.y.astype(np.float64))
    sf = ref.sf_u8 & 0x7F
    for name, hit in (("exact E2M1 tie", np.isin(y, MIDPOINTS).any()),
                      ("|y| in a half-step-table wrong interval", _in_wrong_interval(y).any()),
                      ("scale byte 0x00", (sf == 0).any()),
                      ("subnormal scale byte", ((sf > 0) & (sf < 0x08)).any()),
                      ("saturated scale byte 0x7E", (sf == 0x7E).any()),
                      ("NaN scale byte", (sf == 0x7F).any()),
                      ("NaN or Inf element", (~np.isfinite(y)).any())):
        if hit:
            event(name)


def test_pinned_ties_encode_to_even_codes_te():
    """A literal anchor for the property above: te, S = 1, block max 6 -> scale byte 0x38 (1.0)."""
    q = emulate(TE, EX_TIES.x, EX_TIES.g(TE))
    assert_bytes_equal(q.sf_u8, torch.tensor([[0x38]], dtype=torch.uint8), label="te ties scale", describe=describe_e4m3)
    # 6, .25->0, .75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4, then the negatives (sign bit 8)
    codes = [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 15]
    assert_bytes_equal(q.packed_u8, _t(pack_low_first(np.array([codes], dtype=np.uint8))),
                       label="te ties codes", describe=describe_e2m1x2)


# ----------------------------------------------------------------------------- 2. scaling by 2^k
#
# Claim: quantize(x * 2^k, amax * 2^k) == quantize(x, amax) byte for byte, for every recipe,
# whenever every float32 intermediate stays a normal float (no float32 overflow/underflow).
# Proof sketch (te; the others are the same argument): S' = fl(2688 / (amax 2^k)) = S 2^-k
# and fl(S' * (1/6)) = fl(S/6) 2^-k exactly (power-of-two scaling commutes with rounding
# in the normal range); so v' * fl(S'/6) is the same real number as v * fl(S/6): the
# float32 block scale is bit-identical, hence the same E4M3 byte (normal, subnormal, zero
# or saturated alike). Then fl(1/S') = fl(1/S) 2^k, enc' = enc 2^-k, and x' * enc' is the
# same real number as x * enc: same y, same code. modelopt: 6 D' = fl(6D) 2^k, the
# quotient v'/(6D') and x'/(s D') are the same reals; its zero -> 1.0 and [2^-9, 448]
# clamps act on an identical float. torchao: fl(v'/6) = fl(v/6) 2^k, fl(1/D') = fl(1/D)
# 2^-k, same argument. The one recipe-specific exception is te's underflowed block (scale
# byte 0): enc = FLT_MAX does NOT scale, so y = x * FLT_MAX must saturate in both runs;
# here every nonzero |x| >= 2^-48 after scaling, so x * FLT_MAX >= 2^80 > 6 always.
# The data below keeps every intermediate normal: nonzero |x| in [2^-24, 2^24], amax =
# data max * [2^-20, 2^20], |k| <= 24 (so S in [2^-57, 2^80], block scales >= 2^-59).
# That is strictly more than "all block scales stay normal E4M3": zero, subnormal and
# saturated scale bytes are covered too, by the argument above.


@st.composite
def scalable_cases(draw) -> tuple[QuantCase, QuantCase, int]:
    rows = draw(st.integers(1, 3))
    nblk = draw(st.integers(1, 4))
    blk = blocks(kinds=("grid", "grid", "random", "zero", "special"), j=st.integers(-18, 18), e=st.integers(0, 24))
    x = np.array([draw(blk) for _ in range(rows * nblk)], dtype=np.float64)
    # keep the ranges of the proof above: nonzero finite |x| in [2^-24, 2^24]
    x = np.where(np.abs(x) < 2.0**-24, np.copysign(0.0, x), x)
    x = np.where(np.isfinite(x) & (np.abs(x) > 2.0**24), np.sign(x) * 2.0**24, x)
    x = x.astype(np.float32).reshape(rows, nblk * 16)
    amax = float(F32(_finite_amax(x) * draw(st.floats(2.0**-20, 2.0**20, width=32))))
    kk = draw(st.integers(-24, 24))
    return case(x, amax=amax), case(x.astype(np.float64) * 2.0**kk, amax=amax * 2.0**kk), kk


@pytest.mark.fuzz
@pytest.mark.parametrize("recipe", RECIPE_PARAMS)
@given(cases=scalable_cases())
@example(cases=(EX_TIES, case([[t * 2.0**-7 for t in TIES_ROW]], k=7), -7))
@example(cases=(case([[1.0] * 16], amax=2.0**20), case([[2.0**24] * 16], amax=2.0**44), 24))  # te scale byte 0
def test_scaling_x_and_amax_by_power_of_two_keeps_bytes(recipe, cases):
    c1, c2, kk = cases
    # the scaled case really is the scaling (x and amax both exact after * 2^k)
    assert np.array_equal(c2.x.astype(np.float64), c1.x.astype(np.float64) * 2.0**kk, equal_nan=True)
    q1 = emulate(recipe, c1.x, c1.g(recipe))
    q2 = emulate(recipe, c2.x, c2.g(recipe))
    assert_bytes_equal(q2.sf_u8, q1.sf_u8, label=f"block scales [{recipe.name}: x*2^{kk} vs x]", describe=describe_e4m3)
    assert_bytes_equal(q2.packed_u8, q1.packed_u8, label=f"codes [{recipe.name}: x*2^{kk} vs x]",
                       describe=describe_e2m1x2)


# ----------------------------------------------------------------------------- 3. block independence


@st.composite
def case_and_replacement(draw):
    c = draw(quant_cases())
    rows, nblk = c.x.shape[0], c.x.shape[1] // 16
    r = draw(st.integers(0, rows - 1))
    b = draw(st.integers(0, nblk - 1))
    new = draw(blocks(kinds=KINDS_ALL, j=_J_WIDE, e=_E_DEFAULT))
    return c, r, b, new


@pytest.mark.fuzz
@pytest.mark.parametrize("recipe", RECIPE_PARAMS)
@given(args=case_and_replacement())
@example(args=(EX_TIES_SCALED, 0, 0, [NAN] * 16))
@example(args=(EX_UNDERFLOW, 0, 1, [INF] + [0.0] * 15))
def test_blocks_are_independent(recipe, args):
    """Changing block (r, b) changes only its own 8 code bytes and 1 scale byte, and a block's
    bytes are those of the block quantized alone (same global scale)."""
    c, r, b, new = args
    g = c.g(recipe)
    x2 = c.x.copy()
    x2[r, 16 * b:16 * (b + 1)] = np.array(new, dtype=np.float64).astype(np.float32)
    q1, q2 = emulate(recipe, c.x, g), emulate(recipe, x2, g)
    keep_sf = torch.ones(q1.sf_u8.shape, dtype=torch.bool)
    keep_sf[r, b] = False
    keep_p = torch.ones(q1.packed_u8.shape, dtype=torch.bool)
    keep_p[r, 8 * b:8 * (b + 1)] = False
    assert_bytes_equal(q2.sf_u8[keep_sf], q1.sf_u8[keep_sf],
                       label=f"untouched block scales [{recipe.name}, block ({r},{b}) replaced]", describe=describe_e4m3)
    assert_bytes_equal(q2.packed_u8[keep_p], q1.packed_u8[keep_p],
                       label=f"untouched codes [{recipe.name}, block ({r},{b}) replaced]", describe=describe_e2m1x2)
    alone = emulate(recipe, x2[r:r + 1, 16 * b:16 * (b + 1)], g)
    assert_bytes_equal(alone.sf_u8[0], q2.sf_u8[r, b:b + 1], label=f"block ({r},{b}) scale alone vs in tensor",
                       describe=describe_e4m3)
    assert_bytes_equal(alone.packed_u8[0], q2.packed_u8[r, 8 * b:8 * (b + 1)],
                       label=f"block ({r},{b}) codes alone vs in tensor", describe=describe_e2m1x2)


# ----------------------------------------------------------------------------- 4. negation
#
# |x| is unchanged, so v, the block scale and enc are unchanged: the scale bytes are equal,
# and y(-x) = -y(x) exactly (IEEE negation commutes with * and /), so the magnitude bits
# (code & 7) are equal. The sign bit:
#   lt_zero (te, vllm, modelopt): sign = (y < 0). It flips iff y is nonzero and not NaN.
#     y == +-0 (x == +-0, a vllm zero-scale block where enc == 0, or x*enc underflowing
#     float32) gives +0 (0x0) for both x and -x. A NaN y gives 0x7 for both.
#   signbit (torchao): sign = signbit(y). It flips for every non-NaN y, zeros included
#     (0x0 <-> 0x8). A NaN y (a NaN element, or any element of a block whose max is NaN:
#     torchao propagates) gives 0x7 for both.
# y is taken from the re-derivation (property 1 ties it to the emulator).


@pytest.mark.fuzz
@pytest.mark.parametrize("recipe", RECIPE_PARAMS)
@given(c=quant_cases())
@pin_examples
def test_negation_flips_exactly_the_sign_bits_the_recipe_says(recipe, c):
    g = c.g(recipe)
    q1, q2 = emulate(recipe, c.x, g), emulate(recipe, -c.x, g)
    assert_bytes_equal(q2.sf_u8, q1.sf_u8, label=f"block scales [{recipe.name}: -x vs x]", describe=describe_e4m3)
    y = rederive(c.x, recipe, g).y
    codes1 = unpack_low_first(q1.packed_u8.numpy())
    if recipe.sign_rule == "lt_zero":
        flips = (y != 0) & ~np.isnan(y)
    else:
        flips = ~np.isnan(y)
    expected = np.where(flips, codes1 ^ 0x8, codes1).astype(np.uint8)
    assert_bytes_equal(q2.packed_u8, _t(pack_low_first(expected)),
                       label=f"codes of -x [{recipe.name}: sign bit flipped where y != 0 (lt_zero) / y not NaN]",
                       describe=describe_e2m1x2)


# ----------------------------------------------------------------------------- 5. block max -> +-6
#
# The max element |x| = v maps to y = fl(v * enc) with enc ~ 1 / (s * g_dec), s the
# decoded block scale; s_f (the float32 block scale before rounding) ~ v / (6 g_dec).
# So y ~ 6 * s_f / s. Its code is +-6 (magnitude code 7) iff y > 5 (y == 5 ties to 4).
# * If s is a normal E4M3 value 2^e (1 + m/8), everything that rounds to it lies within
#   half an ulp 2^(e-4) below it (less below a power of two), so s_f >= s - 2^(e-4) >=
#   s (15/16). If s saturated at 448, s_f >= 440 > s (15/16) as well (E4M3 RNE above 432
#   ends at 448). Hence y >= 6 * 15/16 * (1 - 4u) = 5.62 > 5: code 7. Rounding the scale
#   DOWN only makes y larger (saturating to 6), so "did not round down" is not needed.
# * te, vllm: s_f is exactly the value rounded to the byte, so "scale byte normal
#   (0x08..0x7E)" is sufficient.
# * modelopt: a float32 s_f that underflowed to 0 is replaced by 1.0 (byte 0x38, normal)
#   and then y = v / D is tiny: the byte alone is NOT sufficient (EX_SUBNORMAL_X, see
#   test_modelopt_normal_byte_is_not_enough). The [2^-9, 448] clamp raises s above s_f.
#   torchao: the 2^-6 lower clamp makes every byte normal while s may exceed s_f by any
#   factor. For both, the sufficient condition is on s_f itself: s_f >= 2^-6 (then no
#   clamp or replacement acts and s_f rounds to a normal byte).
# * te, scale byte 0x00: enc = FLT_MAX ("codes saturate"), y = v * FLT_MAX > 5 iff
#   v > 5 / FLT_MAX; asserted for v >= 2^-125 (y >= 2^3). vllm, byte 0x00: enc = 0, every
#   code of the block is +0.


@pytest.mark.fuzz
@pytest.mark.parametrize("recipe", RECIPE_PARAMS)
@given(c=quant_cases())
@pin_examples
def test_block_max_encodes_to_six_when_its_scale_is_normal(recipe, c):
    g = c.g(recipe)
    q = emulate(recipe, c.x, g)
    ref = rederive(c.x, recipe, g)
    codes = unpack_low_first(q.packed_u8.numpy())
    sf = q.sf_u8.numpy()
    r, k = c.x.shape
    xb = c.x.reshape(r, k // 16, 16)
    cb = codes.reshape(r, k // 16, 16)
    a = np.where(np.isnan(xb), np.float32(-1), np.abs(xb))
    v = a.max(axis=-1, keepdims=True)
    is_max = (a == v) & (v > 0)
    if recipe.name in ("te", "vllm"):
        cond = (sf >= 0x08) & (sf <= 0x7E)
    else:
        cond = ref.s_pre >= F32(2.0**-6)  # False for NaN
        cond &= ~np.isnan(xb).any(axis=-1)
    sign = (xb < 0) if recipe.sign_rule == "lt_zero" else np.signbit(xb)
    expected_max_code = (7 | (sign.astype(np.uint8) << 3)).astype(np.uint8)
    must = is_max & cond[..., None]
    assert_bytes_equal(_t(cb[must]), _t(expected_max_code[must]),
                       label=f"code of the block max [{recipe.name}, normal scale]", describe=describe_e2m1x2)
    if recipe.name == "te":
        must0 = is_max & (sf == 0)[..., None] & (v >= 2.0**-125)
        assert_bytes_equal(_t(cb[must0]), _t(expected_max_code[must0]),
                           label="code of the block max [te, scale byte 0: saturates to +-6]", describe=describe_e2m1x2)
    if recipe.name == "vllm":
        zero_blk = np.broadcast_to((sf == 0)[..., None], cb.shape) & ~np.isnan(xb)  # NaN * 0 -> NaN -> 0x7
        assert_bytes_equal(_t(cb[zero_blk]), _t(np.zeros(int(zero_blk.sum()), dtype=np.uint8)),
                           label="codes of a vllm block with scale byte 0 (enc = 0 -> +0)", describe=describe_e2m1x2)


def test_modelopt_normal_byte_is_not_enough():
    """The pinned reason the modelopt condition is on s_f: |x| = 2^-149, D = 2^20/2688 makes
    v/(6D) underflow to 0 in float32, it becomes 1.0 (0x38, a normal byte) and the block max
    encodes to +0 (y = +-2^-149 / D underflows to +-0.0), not 6."""
    q = emulate(MODELOPT, EX_SUBNORMAL_X.x, EX_SUBNORMAL_X.g(MODELOPT))
    assert_bytes_equal(q.sf_u8, torch.tensor([[0x38]], dtype=torch.uint8), label="modelopt zero -> 1.0",
                       describe=describe_e4m3)
    # y = -2^-149 / D underflows to -0.0 in float32, and lt_zero gives +0 for it: all codes 0x0
    assert_bytes_equal(q.packed_u8, torch.zeros(1, 8, dtype=torch.uint8),
                       label="modelopt codes (+0; -2^-149/D is -0.0)", describe=describe_e2m1x2)


# ----------------------------------------------------------------------------- 6. dequantization error
#
# deq = fl(q * s * g), q the E2M1 value, s the E4M3 scale (q*s exact), g the float32
# decode multiplier (fl(1/S) for te/vllm, D for modelopt/torchao). With y = fl(x * enc)
# and every rounding (1 + delta), |delta| <= u = 2^-24:
#   te/vllm:  P = fl(s g), enc = fl(1/P), y = fl(x enc)   => x = y s g (1+d2) / ((1+d3)(1+d4))
#   modelopt: P = fl(s D), y = fl(x / P)                  => x = y s D (1+d2) / (1+d3)
#   torchao:  Q = fl(fl(1/D) / s), y = fl(x Q)            => x = y s D / ((1+d2)(1+d3)(1+d4))
# so x - deq = s g (y theta - q (1 + d1)) with |theta - 1| <= 3u (1 + 2^-20), and
#   |x - deq| <= s g (|y - q| + 3u|y| + u|q|) (1 + 2^-20) + s g 2^-149
# (the last term: y may be a float32 subnormal, an absolute rounding of 2^-150).
# |y - q| is at most half the E2M1 step around y: 0.25 up to 2, 0.5 up to 4, 1 up to 6,
# chosen by t = max(m, |q|) with m = |x| / (s g) (float64; it differs from |y| by ~4u,
# which can only move t across a grid point 2 or 4 where |y - q| is tiny). |y| <= m (1+4u).
# Saturated elements (m > 6 (1 + 2^-20)) have their own rule: code +-6 with x's sign and
# |deq| <= |x|. Blocks with scale byte 0 (te, vllm) decode to 0 and their |x| <= 6 * 2^-10
# * g * (1 + 2^-20) (RNE sends s_f <= 2^-10 to 0). Data: finite, amax in [2^-60, 2^60], so
# s g, 1/(s g) and g are normal floats. Also deq == fl(q s g) exactly.


def _half_step(t: np.ndarray) -> np.ndarray:
    return np.where(t <= 2.0, 0.25, np.where(t <= 4.0, 0.5, 1.0))


@pytest.mark.fuzz
@pytest.mark.parametrize("recipe", RECIPE_PARAMS)
@given(c=quant_cases(specials=False, wild_exp=60, e_range=40))
@example(c=EX_TIES)
@example(c=EX_TIES_SCALED)
@example(c=EX_UNDERFLOW)
@example(c=EX_SATURATED)
@example(c=EX_SUBNORMAL_SCALE)
@example(c=EX_ZERO_BLOCKS)
def test_dequantize_is_within_half_an_e2m1_step(recipe, c):
    g = c.g(recipe)
    q = emulate(recipe, c.x, g)
    deq = dequantize_nvfp4(q)
    g_dec = (F32(1.0) / g) if recipe.global_convention == "enc" else g
    r, k = c.x.shape
    x = c.x.astype(np.float64).reshape(r, k // 16, 16)
    codes = unpack_low_first(q.packed_u8.numpy()).reshape(r, k // 16, 16)
    qv = np.where(codes & 8, -1.0, 1.0) * E2M1_MAGS[codes & 7]
    s = q.sf_u8.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float64)[..., None]
    sg = s * float(g_dec)  # exact in float64
    expected_deq = (qv * sg).astype(np.float32).reshape(r, k)  # one rounding of an exact product
    assert_bits_equal(deq, _t(expected_deq), label=f"dequantize == fl32(e2m1 * s * g) [{recipe.name}]")
    d = deq.numpy().astype(np.float64).reshape(r, k // 16, 16)
    zero_scale = np.broadcast_to(s == 0, x.shape)
    with np.errstate(all="ignore"):
        m = np.abs(x) / sg
        sat = ~zero_scale & (m > 6.0 * (1 + 2.0**-20))
        unsat = ~zero_scale & ~sat
        t = np.maximum(m, np.abs(qv))
        bound = sg * (_half_step(t) + (3 * U * m * (1 + 4 * U) + U * np.abs(qv))) * (1 + 2.0**-20) + sg * 2.0**-149
        err = np.abs(x - d)
        bad = unsat & ~(err <= bound)
    assert_bytes_equal(_t(bad.astype(np.uint8)), _t(np.zeros_like(bad, dtype=np.uint8)),
                       label=f"|x - deq| > s*g*(half E2M1 step + 3u|y| + u|q|) [{recipe.name}]; "
                             f"first bad x={x[bad][:1]}, deq={d[bad][:1]}, bound={bound[bad][:1]}")
    sign_ok = (np.signbit(x) == np.signbit(qv)) | (x == 0)
    bad_sat = sat & ~(((codes & 7) == 7) & sign_ok & (np.abs(d) <= np.abs(x)))
    assert_bytes_equal(_t(bad_sat.astype(np.uint8)), _t(np.zeros_like(bad_sat, dtype=np.uint8)),
                       label=f"saturated elements not +-6 with x's sign and |deq| <= |x| [{recipe.name}]")
    bad_zero = zero_scale & ~((d == 0) & (np.abs(x) <= 6 * 2.0**-10 * float(g_dec) * (1 + 2.0**-20)))
    assert_bytes_equal(_t(bad_zero.astype(np.uint8)), _t(np.zeros_like(bad_zero, dtype=np.uint8)),
                       label=f"zero-scale block: deq != 0 or |x| > 6*2^-10*g [{recipe.name}]")


# ----------------------------------------------------------------------------- codecs on fuzzed floats


@pytest.mark.fuzz
@pytest.mark.parametrize("sign_rule", ["lt_zero", "signbit"])
@given(xs=st.lists(st.one_of(st.floats(width=32), st.sampled_from(SIGNED_GRID),
                             st.floats(-7.0, 7.0, width=32)), min_size=1, max_size=64))
@example(xs=[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -0.0, 0.0])
@example(xs=[NAN, INF, -INF, FLT_MAX, -FLT_MAX, 2.0**-149, -(2.0**-149), 6.0, -6.0, 7.0, 6.5, 5.0000005])
def test_e2m1_codec_is_nearest_ties_to_even(sign_rule, xs):
    x = np.array(xs, dtype=np.float32)
    got = f32_to_e2m1_codes(_t(x), sign_rule=sign_rule)
    assert_bytes_equal(got, _t(e2m1_nearest_even_codes(x, sign_rule)),
                       label=f"f32_to_e2m1_codes({sign_rule}) vs nearest search")


@pytest.mark.fuzz
@given(xs=st.lists(st.one_of(st.floats(width=32), st.floats(-500.0, 500.0, width=32),
                             st.floats(-(2.0**-5), 2.0**-5, width=32)), min_size=1, max_size=64))
@example(xs=[448.0, 464.0, 464.00003, 2.0**-10, 1.5 * 2.0**-9, -(2.0**-10), -0.0, INF, -INF, NAN])
def test_e4m3_codec_matches_ml_dtypes_and_torch_after_clamp(xs):
    x = np.array(xs, dtype=np.float32)
    with np.errstate(all="ignore"):
        clamped = np.clip(x, F32(-448.0), F32(448.0))  # NaN stays NaN
        oracle_sat = clamped.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        oracle_raw = x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    nan = np.isnan(x)
    got_sat = f32_to_e4m3_bytes(_t(x), saturate=True).numpy()
    got_raw = f32_to_e4m3_bytes(_t(x), saturate=False).numpy()
    # NaN payload/sign conventions are the exhaustive test's business; compare non-NaN inputs
    assert_bytes_equal(_t(got_sat[~nan]), _t(oracle_sat[~nan]), label="e4m3 satfinite vs ml_dtypes(clamp 448)",
                       describe=describe_e4m3)
    assert_bytes_equal(_t(got_raw[~nan]), _t(oracle_raw[~nan]), label="e4m3 non-saturating vs ml_dtypes",
                       describe=describe_e4m3)
    torch_sat = torch.from_numpy(clamped).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert_bytes_equal(_t(got_sat[~nan]), _t(torch_sat[~nan]), label="e4m3 satfinite vs torch cast(clamp 448)",
                       describe=describe_e4m3)


# ----------------------------------------------------------------------------- known-wrong quantizers


def _double(fn):
    def quantize(recipe, x, g):
        assert recipe is TE
        return fn(_t(x), global_enc_scale_f32=torch.tensor(float(g), dtype=torch.float32))
    return quantize


DOUBLES = {
    "half_step_table": _double(wq.quantize_te_half_step_table),
    "ties_away_from_zero": _double(wq.quantize_te_ties_away),
    "swapped_nibbles": _double(wq.quantize_te_swapped_nibbles),
}


def _fails(quantize, c: QuantCase) -> bool:
    try:
        check_matches_rederivation(quantize, TE, c)
    except AssertionError:
        return True
    return False


def _in_wrong_interval(a: np.ndarray) -> np.ndarray:
    hit = np.zeros(a.shape, dtype=bool)
    for lo, lo_in, hi, hi_in in wq.HALF_STEP_TABLE_WRONG_INTERVALS:
        hit |= ((a >= lo) if lo_in else (a > lo)) & ((a <= hi) if hi_in else (a < hi))
    return hit


@pytest.mark.fuzz
@pytest.mark.parametrize("name", list(DOUBLES))
def test_fuzz_search_finds_the_planted_bug(name):
    """Run property 1 (te) against a known-wrong quantizer with NO @example hints: hypothesis must
    find a counterexample. The shrunk counterexample must show the documented bug."""
    quantize = DOUBLES[name]
    found = find(quant_cases(), lambda c: _fails(quantize, c),
                 settings=settings(max_examples=3000, database=None, deadline=None,
                                   phases=(Phase.generate, Phase.shrink)))
    print(f"\n{name}: minimal counterexample {found!r}")
    ref = rederive(found.x, TE, found.g(TE))
    got = quantize(TE, found.x, found.g(TE))
    assert np.array_equal(got.sf_u8.numpy(), ref.sf_u8), "the doubles only break codes, not scales"
    got_codes = unpack_low_first(got.packed_u8.numpy())
    wrong = got_codes != ref.codes
    y = np.abs(ref.y.astype(np.float64))
    if name == "half_step_table":
        assert wrong.any() and _in_wrong_interval(y[wrong]).all(), \
            f"mismatches outside NVFP4_FACTS' intervals: |y| = {y[wrong]}"
    elif name == "ties_away_from_zero":
        assert wrong.any() and np.isin(y[wrong], MIDPOINTS).all(), f"mismatch not at a midpoint: |y| = {y[wrong]}"
    else:
        assert wrong.any() and np.array_equal(got_codes.reshape(-1, 2)[:, ::-1], ref.codes.reshape(-1, 2))


@pytest.mark.parametrize("name,c", [
    # minimal counterexamples of test_fuzz_search_finds_the_planted_bug, pinned
    pytest.param("half_step_table", case([[6.0, 2.625] + [0.0] * 14], k=0), id="half_step-2.625"),
    pytest.param("half_step_table", case([[6.0, -3.5] + [0.0] * 14], k=0), id="half_step-neg3.5"),
    pytest.param("half_step_table", case([[6.0, 5.25] + [0.0] * 14], k=0), id="half_step-5.25"),
    pytest.param("ties_away_from_zero", case([[6.0, 0.25] + [0.0] * 14], k=0), id="ties_away-0.25"),
    pytest.param("ties_away_from_zero", case([[6.0, -5.0] + [0.0] * 14], k=0), id="ties_away-neg5"),
    pytest.param("swapped_nibbles", case([[0.5] + [0.0] * 15], k=0), id="swapped-0.5"),
])
def test_planted_bugs_fail_the_property_on_pinned_examples(name, c):
    assert _fails(DOUBLES[name], c), f"{name} passed the re-derivation on {c!r}"
    check_matches_rederivation(emulate, TE, c)  # and the emulator passes it
