"""Contract-named assertions with readable failure messages. Does not import pytest.

Every function takes a `label` saying what is compared ("act_quant codes [sm90 vs
emulator:te]"). A failure message gives the count of mismatches, the first
mismatching flat index and its coordinate, both bytes in hex and both decoded
values, e.g.

  act_quant codes [sm100 vs emulator:te] (4096, 3584) uint8: 3/14680064 bytes differ
    first at flat 40961 = (11, 1537): got 0x2b (lo -1.5, hi +1.0)  expected 0x3b (lo -1.5, hi +1.5)

Garbage never passes (DESIGN "Verdicts"). The value verdicts (assert_within_gemm_bound,
assert_within_ulps) count NaN / Inf on BOTH sides and fail, saying so, when either side holds one
(nonfinite="fail", the default), when nothing is compared (empty), or when both sides are all zero
(a stage that carries no signal verified nothing, e.g. all-zero block scales), or when the result is
all zero where the expected value is not (whatever the bound). nonfinite="match" is
the NaN-aware defined result (NaN where the exact value is NaN, the same infinity), for tests that
feed bad inputs on purpose (verify.bad_inputs). The identity checks (assert_bytes_equal,
assert_codes_equal_as_values, assert_bits_equal, assert_all_zero) compare bits: a NaN or Inf on one
side only is a bit difference and fails; identical special bits pass, since identity of the same
computation (batch invariance, graph replay, an exhaustive codec table whose NaN and overflow-to-Inf
entries are the contract) is what they state; their messages count NaN / Inf on both sides.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch import Tensor

__all__ = [
    "describe_e2m1x2",
    "describe_e4m3",
    "describe_raw",
    "assert_bytes_equal",
    "assert_codes_equal_as_values",
    "assert_bits_equal",
    "assert_within_gemm_bound",
    "assert_within_ulps",
    "assert_all_zero",
    "first_mismatch",
    "NONFINITE_MODES",
    "planting_beyond_tolerance",
]

NONFINITE_MODES = ("fail", "match")

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _e2m1_value(code: int) -> str:
    v = _E2M1[code & 7]
    return f"{'-' if code & 8 else '+'}{v}"


def describe_e2m1x2(byte: int) -> str:
    """'0x3b (lo -1.5, hi +1.5)': a packed byte, low nibble first."""
    return f"0x{byte:02x} (lo {_e2m1_value(byte & 0xF)}, hi {_e2m1_value(byte >> 4)})"


def describe_e4m3(byte: int) -> str:
    """'0x38 (1.0)': an E4M3 byte and its value (decoded here independently of references/)."""
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 0xF, byte & 7
    if e == 0xF and m == 7:
        val = "nan"
    elif e == 0:
        val = repr(sign * m * 2.0**-9)
    else:
        val = repr(sign * (1 + m / 8) * 2.0 ** (e - 7))
    return f"0x{byte:02x} ({val})"


def describe_raw(byte: int) -> str:
    return f"0x{byte:02x}"


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The coordinate of flat index i in a row-major tensor of `shape` (torch.unravel_index's first call
    imports for seconds, paid by the first failing assertion of a process)."""
    coord = []
    for n in reversed(shape):
        i, c = divmod(i, n)
        coord.append(c)
    return tuple(reversed(coord))


def first_mismatch(mask: Tensor) -> tuple[int, tuple[int, ...]] | None:
    """(flat index, coordinate) of the first True in `mask`, or None."""
    flat = mask.reshape(-1)
    idx = torch.nonzero(flat, as_tuple=False)
    if idx.numel() == 0:
        return None
    i = int(idx[0, 0])
    coord = _unravel(i, tuple(mask.shape))
    return i, coord


# ----------------------------------------------------------------------------- negative controls

_PLANT: ContextVar[list | None] = ContextVar("nvfp4v_plant", default=None)


@contextmanager
def planting_beyond_tolerance() -> Iterator[list[str]]:
    """Negative controls (verify.verdicts.controls): inside, the FIRST comparison made by one of this
    module's assertions judges a copy of its `got` moved minimally past what it tolerates: the value
    comparisons (assert_within_gemm_bound, assert_within_ulps) one element one representable step beyond
    its bound, the identity comparisons (assert_bytes_equal, assert_codes_equal_as_values,
    assert_bits_equal) the lowest bit of the first element flipped. The assertion's own code then judges
    it. The yielded list receives one line saying what was planted (empty: no comparison ran)."""
    planted: list[str] = []
    token = _PLANT.set(planted)
    try:
        yield planted
    finally:
        _PLANT.reset(token)


def _plant_bit(got: Tensor, label: str) -> Tensor:
    """got with bit 0 of its first element flipped, when a control is planting (else got itself)."""
    planted = _PLANT.get()
    if planted is None or planted or got.numel() == 0:
        return got
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    bad = got.detach().cpu().contiguous().clone()
    flat = bad.view(int_dtype).reshape(-1)
    flat[0] ^= 1
    planted.append(f"{label}: bit 0 of element 0 flipped")
    return bad


def _next_up(x: Tensor) -> Tensor:
    """The next representable value above the 0-d floating tensor x, in its dtype."""
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    b = x.reshape(1).clone().view(int_dtype)
    if float(x) == 0:
        b[0] = 1  # +-0 -> the smallest positive subnormal
    else:
        b[0] += 1 if float(x) > 0 else -1
    return b.view(x.dtype).reshape(())


def _plant_beyond(got: Tensor, expected_f64: Tensor, tol_f64: Tensor, label: str) -> Tensor:
    """got with its first element whose expected value and tolerance are finite set to the smallest value of
    got's dtype with |got - expected| > tol, when a control is planting (else got itself)."""
    planted = _PLANT.get()
    if planted is None or planted:
        return got
    ok = (torch.isfinite(expected_f64) & torch.isfinite(tol_f64)).reshape(-1).cpu()
    if not bool(ok.any()):
        return got
    i = int(ok.to(torch.int8).argmax())
    e, tol = float(expected_f64.reshape(-1)[i]), float(tol_f64.reshape(-1)[i])
    c = torch.tensor(e + tol, dtype=torch.float64).to(got.dtype)
    while not abs(float(c) - e) > tol:  # rounding to got's dtype may land inside: step up until outside
        c = _next_up(c)
    bad = got.detach().clone()
    bad.reshape(-1)[i] = c.to(bad.device)
    planted.append(f"{label}: element {i} set to {float(c)!r}, one step beyond {e!r} + {tol:.4g}")
    return bad


def _check_same_shape(label: str, got: Tensor, expected: Tensor) -> None:
    if got.shape != expected.shape:
        raise AssertionError(f"{label}: shape {tuple(got.shape)} != expected {tuple(expected.shape)}")


def assert_bytes_equal(got_u8: Tensor, expected_u8: Tensor, *, label: str,
                       describe: Callable[[int], str] = describe_raw) -> None:
    """Every byte equal. `describe` renders a byte (describe_e2m1x2, describe_e4m3, ...)."""
    __tracebackhide__ = True
    _check_same_shape(label, got_u8, expected_u8)
    got_u8 = _plant_bit(got_u8, label)
    got_u8 = got_u8.detach().to("cpu").view(torch.uint8) if got_u8.dtype != torch.uint8 else got_u8.detach().cpu()
    expected_u8 = expected_u8.detach().cpu()
    expected_u8 = expected_u8.view(torch.uint8) if expected_u8.dtype != torch.uint8 else expected_u8
    mask = got_u8 != expected_u8
    hit = first_mismatch(mask)
    if hit is None:
        return
    i, coord = hit
    g, e = int(got_u8.reshape(-1)[i]), int(expected_u8.reshape(-1)[i])
    raise AssertionError(
        f"{label} {tuple(got_u8.shape)} uint8: {int(mask.sum())}/{mask.numel()} bytes differ\n"
        f"  first at flat {i} = {coord}: got {describe(g)}  expected {describe(e)}")


def assert_codes_equal_as_values(got_u8: Tensor, expected_u8: Tensor, *, label: str) -> None:
    """Packed E2M1 bytes equal as values, +0 == -0 (DESIGN "Formats and recipes");
    the strict byte diff is reported separately with assert_bytes_equal."""
    __tracebackhide__ = True
    _check_same_shape(label, got_u8, expected_u8)
    g, e = _plant_bit(got_u8, label).detach().cpu(), expected_u8.detach().cpu()

    def canon(b: Tensor) -> Tensor:
        lo, hi = b & 0xF, b >> 4
        lo = torch.where(lo == 8, torch.zeros_like(lo), lo)
        hi = torch.where(hi == 8, torch.zeros_like(hi), hi)
        return lo | (hi << 4)

    mask = canon(g) != canon(e)
    hit = first_mismatch(mask)
    if hit is None:
        return
    i, coord = hit
    raise AssertionError(
        f"{label} {tuple(g.shape)} e2m1x2 (as values, +0 == -0): {int(mask.sum())}/{mask.numel()} bytes differ\n"
        f"  first at flat {i} = {coord}: got {describe_e2m1x2(int(g.reshape(-1)[i]))}  "
        f"expected {describe_e2m1x2(int(e.reshape(-1)[i]))}")


def assert_bits_equal(got: Tensor, expected: Tensor, *, label: str) -> None:
    """Floating (or integer) tensors bit-identical: an identity check (NaN == NaN only if the bits match;
    see the module docstring); the message counts NaN / Inf on both sides."""
    __tracebackhide__ = True
    _check_same_shape(label, got, expected)
    if got.dtype != expected.dtype:
        raise AssertionError(f"{label}: dtype {got.dtype} != expected {expected.dtype}")
    got = _plant_bit(got, label)
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    gb, eb = got.detach().cpu().contiguous().view(int_dtype), expected.detach().cpu().contiguous().view(int_dtype)
    mask = gb != eb
    hit = first_mismatch(mask)
    if hit is None:
        return
    i, coord = hit
    width = got.element_size() * 2
    gi, ei = int(gb.reshape(-1)[i]) & ((1 << width * 4) - 1), int(eb.reshape(-1)[i]) & ((1 << width * 4) - 1)
    raise AssertionError(
        f"{label} {tuple(got.shape)} {got.dtype}: {int(mask.sum())}/{mask.numel()} elements differ in bits"
        f"{_special_counts(got, expected, 'got', 'expected')}\n"
        f"  first at flat {i} = {coord}: got {float(got.reshape(-1)[i])!r} (0x{gi:0{width}x})  "
        f"expected {float(expected.reshape(-1)[i])!r} (0x{ei:0{width}x})")


def _special_counts(got: Tensor, expected: Tensor, got_name: str, exp_name: str) -> str:
    """' (NaN/Inf: got 1 NaN 0 Inf, expected 0 NaN 0 Inf)' when either side holds one, else ''."""
    if not (got.is_floating_point() or expected.is_floating_point()):
        return ""
    g, e = got.detach().to(torch.float64), expected.detach().to(torch.float64)
    ng, ig, ne, ie = (int(f(t).sum()) for t in (g, e) for f in (torch.isnan, torch.isinf))
    if not (ng or ig or ne or ie):
        return ""
    return f" (NaN/Inf: {got_name} {ng} NaN {ig} Inf, {exp_name} {ne} NaN {ie} Inf)"


def _check_nonfinite_mode(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite={nonfinite!r}: expected one of {NONFINITE_MODES}")


def _no_signal(label: str, got: Tensor, expected_f64: Tensor, got_name: str) -> None:
    """AssertionError for a comparison that verifies nothing: an empty set, or both sides all zero."""
    __tracebackhide__ = True
    if got.numel() == 0:
        raise AssertionError(f"{label} {tuple(got.shape)}: empty: no elements compared (nothing verified)")
    got_zero, expected_zero = not bool(got.detach().to(torch.float64).any()), not bool(expected_f64.any())
    if got_zero and expected_zero:
        raise AssertionError(f"{label} {tuple(got.shape)}: {got_name} and the expected value are both all zero "
                             f"({got.numel()} elements): the stage carries no signal, nothing verified")
    if got_zero:  # a kernel that wrote nothing (or zeroed its output) is never inside a bound by luck
        raise AssertionError(f"{label} {tuple(got.shape)}: {got_name} is all zero where the expected value is not "
                             f"({int(expected_f64.ne(0).sum())} non-zero elements)")


def _zero_note(got: Tensor, expected_f64: Tensor, got_name: str) -> str:
    """'; <got_name> is all zero where the expected value is not' (or the other way round), else ''."""
    zg, ze = not bool(got.detach().to(torch.float64).any()), not bool(expected_f64.any())
    if zg and not ze:
        return f"; {got_name} is all zero where the expected value is not"
    if ze and not zg:
        return f"; the expected value is all zero where {got_name} is not"
    return ""


def _special_violations(y: Tensor, y64: Tensor, bound_f64: Tensor, nonfinite: str) -> Tensor:
    """True where a NaN / Inf decides the element's verdict against it. nonfinite="fail": any NaN or Inf in
    y, the expected value or its bound. "match": where the expected value (or its bound) is NaN or +-Inf,
    y must be the same special (NaN where NaN, the same infinity); a NaN / Inf in y elsewhere fails by
    the bound itself."""
    yd = y.detach().to(torch.float64)
    special = ~torch.isfinite(y64) | ~torch.isfinite(bound_f64)
    if nonfinite == "fail":
        return special | ~torch.isfinite(yd)
    same = (torch.isnan(yd) & torch.isnan(y64)) | (torch.isinf(y64) & (yd == y64))
    return special & ~same


def assert_within_gemm_bound(y: Tensor, y64: Tensor, bound_f64: Tensor, *, label: str,
                             nonfinite: str = "fail") -> float:
    """|y - y64| <= bound everywhere (DESIGN "Verdicts"); returns max(|y - y64| / bound) over the finite
    elements.

    Garbage never passes: an empty comparison, y and y64 both all zero, and (nonfinite="fail") any NaN or
    Inf in y, y64 or the bound fail, the message counting NaN / Inf on both sides. nonfinite="match"
    (bad-input tests): where y64 (or its bound) is NaN or +-Inf, y must be the same special value and
    the element is judged by that, not by the bound; anywhere else a NaN or Inf in y fails. The message
    names the tensor, the first violating index, both values and the bound, and the worst element.
    """
    __tracebackhide__ = True
    _check_same_shape(label, y, y64)
    _check_nonfinite_mode(nonfinite)
    y64 = y64.to(torch.float64)
    bound_f64 = bound_f64.to(torch.float64).expand_as(y64) if bound_f64.dim() == 0 else bound_f64.to(torch.float64)
    y = _plant_beyond(y, y64, bound_f64, label)
    _no_signal(label, y, y64, "y")
    special_bad = _special_violations(y, y64, bound_f64, nonfinite)
    finite = torch.isfinite(y64) & torch.isfinite(bound_f64)
    err = (y.detach().to(torch.float64) - y64).abs()
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))  # NaN / Inf in y: over
    ratio = torch.where(finite & (err > 0), err / bound_f64, torch.zeros_like(err))  # an exact element: 0
    over = (finite & (ratio > 1.0)) | special_bad
    worst = float(ratio.max())
    hit = first_mismatch(over)
    if hit is None:
        return worst
    i, coord = hit
    j = int(torch.argmax(ratio.reshape(-1)))
    jc = _unravel(j, tuple(ratio.shape))
    n_special = int(special_bad.sum())
    if nonfinite == "fail":
        specials = (f" ({n_special} of them NaN/Inf: y {int(torch.isnan(y).sum())} NaN {int(torch.isinf(y).sum())} "
                    f"Inf, expected {int(torch.isnan(y64).sum())} NaN {int(torch.isinf(y64).sum())} Inf, bound "
                    f"{int((~torch.isfinite(bound_f64)).sum())} non-finite; garbage never passes)") if n_special else ""
    else:
        specials = (f" ({n_special} of them where the expected value is NaN/Inf and y is not the same)"
                    if n_special else "")
    raise AssertionError(
        f"{label} {tuple(y.shape)}: {int(over.sum())}/{over.numel()} elements exceed the accumulation bound"
        + specials + _zero_note(y, y64, "y") + f"; max |y - y64| / bound = {worst:.4g}\n"
        f"  first at flat {i} = {coord}: got {float(y.reshape(-1)[i])!r}  expected {float(y64.reshape(-1)[i])!r}  "
        f"bound {float(bound_f64.reshape(-1)[i]):.4g}\n"
        f"  worst at {jc}: got {float(y.reshape(-1)[j])!r}  expected {float(y64.reshape(-1)[j])!r}")


def assert_all_zero(t: Tensor, *, label: str) -> None:
    """Every element zero (padding, rows past a valid count); the message names the first nonzero."""
    __tracebackhide__ = True
    flat = t.detach().cpu()
    mask = flat != 0
    hit = first_mismatch(mask)
    if hit is None:
        return
    i, coord = hit
    v = flat.reshape(-1)[i]
    shown = f"0x{int(v):02x}" if flat.dtype == torch.uint8 else repr(v.item())
    raise AssertionError(f"{label} {tuple(flat.shape)} {flat.dtype}: {int(mask.sum())}/{mask.numel()} elements "
                         f"are not zero\n  first at flat {i} = {coord}: got {shown}  expected 0")


def assert_within_ulps(got: Tensor, expected_f64: Tensor, *, ulps: float, label: str, nonfinite: str = "fail") -> None:
    """|got - expected| <= ulps * ulp(got.dtype at |expected|), for elementwise stages. Garbage never
    passes: empty, both all zero, and (nonfinite="fail") any NaN / Inf on either side fail;
    nonfinite="match" (bad-input tests) requires the same special where the expected value is NaN / Inf."""
    __tracebackhide__ = True
    _check_same_shape(label, got, expected_f64)
    _check_nonfinite_mode(nonfinite)
    _no_signal(label, got, expected_f64.to(torch.float64), "got")
    info = torch.finfo(got.dtype)
    e = expected_f64.to(torch.float64)
    ax = e.abs()
    exp = torch.floor(torch.log2(torch.where(ax > 0, ax, torch.ones_like(ax))))
    p = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}[got.dtype]
    min_exp = math.log2(info.smallest_normal) - p + 1  # a Python float: works on any device
    ulp = torch.exp2(torch.clamp(exp - p + 1, min=min_exp))
    got = _plant_beyond(got, e, ulps * ulp, label)
    err = (got.detach().to(torch.float64) - e).abs()
    g64 = got.detach().to(torch.float64)
    if nonfinite == "fail":
        bad = ~(err <= ulps * ulp) | ~torch.isfinite(g64) | ~torch.isfinite(e)
    else:
        same_special = (torch.isnan(g64) & torch.isnan(e)) | (torch.isinf(e) & (g64 == e))
        bad = ~same_special & ~(err <= ulps * ulp)
    hit = first_mismatch(bad)
    if hit is None:
        return
    i, coord = hit
    garbage = "; garbage never passes" if nonfinite == "fail" and _special_counts(got, e, "", "") else ""
    raise AssertionError(
        f"{label} {tuple(got.shape)} {got.dtype}: {int(bad.sum())}/{bad.numel()} elements beyond {ulps} ulp"
        f"{_special_counts(got, e, 'got', 'expected')}{garbage}{_zero_note(got, e, 'got')}\n"
        f"  first at flat {i} = {coord}: got {float(got.reshape(-1)[i])!r}  expected {float(e.reshape(-1)[i])!r}")
