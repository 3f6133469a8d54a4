"""Stage metrics (DESIGN "Verdicts"): cosine, calc_diff, SQNR dB, rel-L2, max abs/rel, bit-exact fraction,
the norm ratio ||got|| / ||ref||, and a status: garbage never passes.

All computed in float64 from `got` against `ref`. NaN / Inf are counted on BOTH sides (nan_count /
inf_count: got, ref_nan_count / ref_inf_count: ref). A comparison FAILS (status "fail", `problem` says
why) when:
  - either side holds NaN or Inf: where the other side is finite, or at the same positions (a NaN
    against a NaN is no evidence the stage is right; the metrics over such a set are NaN, never
    cosine 1 / SQNR inf);
  - the compared set is empty;
  - got is all zero where ref is not, ref is all zero where got is not, or both are all zero (every
    stage compared here carries signal from a non-zero input: a zero-vs-zero stage, e.g. all-zero
    block scales, verified nothing);
  - the difference is a gain above 1 that rounding cannot make: ||got|| - ||ref|| >= GAIN_SHARE_MAX *
    ||got - ref|| (a pure factor x2 gives 1) AND ||got|| / ||ref|| > 1 + ROUNDING_GAIN_MAX. Rounding
    error uncorrelated with ref gives a share (sqrt(1 + r^2) - 1) / r < r / 2 for rel-L2 r, but rounding
    can be correlated with ref (one token through power-of-two FP8 scales rounded up: norm ratio 1.021
    with a 91 % share, measured on the fixture), so the share alone is not evidence. The size is:
    round-to-nearest moves a normal E2M1 code by at most a quarter of its value (the half step 0.25 at
    1.0; E4M3 1/16), and clipping (saturated scales) makes ||got|| smaller, so no rounding of these
    formats raises a norm by more than 25 %.
    A gain below 1 is reported (norm_ratio), not failed: a static activation scale that clips
    (golden static runs: norm ratio 0.23 .. 0.30, the difference 95 % gain) looks the same.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["stage_metrics", "calc_diff", "comparison_problem", "GAIN_SHARE_MAX", "ROUNDING_GAIN_MAX"]

# (||got|| - ||ref||) / ||got - ref|| at or above this: the difference is a scale factor > 1, not rounding
GAIN_SHARE_MAX = 0.9
# the largest relative change round-to-nearest makes to a normal E2M1 value (0.25 at 1.0); E4M3's is 1/16
ROUNDING_GAIN_MAX = 0.25


def calc_diff(x: Tensor, y: Tensor) -> float:
    """DeepGEMM's calc_diff: 1 - 2 <x, y> / (<x, x> + <y, y>) (0 for identical tensors)."""
    x, y = x.double(), y.double()
    denom = float((x * x + y * y).sum())
    return 0.0 if denom == 0 else 1.0 - 2.0 * float((x * y).sum()) / denom


def _specials(t: Tensor) -> str:
    return f"{int(torch.isnan(t).sum())} NaN {int(torch.isinf(t).sum())} Inf"


def comparison_problem(got_f64: Tensor, ref_f64: Tensor, *, got_name: str = "got", ref_name: str = "ref") -> str:
    """Why comparing got with ref (same shape, float64) proves nothing: empty, NaN / Inf on either side,
    all zero on one or both sides; "" when none applies. The gain rule is stage_metrics' own."""
    n = got_f64.numel()
    if n == 0:
        return "empty: no elements to compare (nothing verified)"
    bad_g, bad_r = ~torch.isfinite(got_f64), ~torch.isfinite(ref_f64)
    if bool(bad_g.any() | bad_r.any()):
        one_sided = int((bad_g ^ bad_r).sum())
        where = (f"{one_sided} of them where the other side is finite" if one_sided else
                 "at the same positions on both sides")
        return (f"NaN/Inf: {got_name} {_specials(got_f64)}, {ref_name} {_specials(ref_f64)} of {n} ({where}); "
                "garbage never passes")
    zero_g, zero_r = not bool(got_f64.any()), not bool(ref_f64.any())
    if zero_g and zero_r:
        return (f"both sides are all zero ({n} elements): the stage carries no signal, nothing verified "
                "(e.g. all-zero block scales)")
    if zero_g:
        return f"{got_name} is all zero where {ref_name} is not (||{ref_name}|| = {float(ref_f64.norm()):.6g})"
    if zero_r:
        return f"{ref_name} is all zero where {got_name} is not (||{got_name}|| = {float(got_f64.norm()):.6g})"
    return ""


def stage_metrics(got: Tensor, ref: Tensor) -> dict[str, float | int | str]:
    """Metrics of `got` against `ref` (same shape), with status "pass" / "fail" and `problem` ("" or why it
    fails; see the module docstring). Over a set holding NaN / Inf or an empty set, the norm metrics
    (cosine, calc_diff, SQNR, rel-L2, norm ratio, max abs / rel) are NaN."""
    if got.shape != ref.shape:
        raise ValueError(f"got {tuple(got.shape)} and ref {tuple(ref.shape)} must have the same shape")
    g, r = got.detach().double().cpu().reshape(-1), ref.detach().double().cpu().reshape(-1)
    problem = comparison_problem(g, r)
    counts = {"nan_count": int(torch.isnan(g).sum()), "inf_count": int(torch.isinf(g).sum()),
              "ref_nan_count": int(torch.isnan(r).sum()), "ref_inf_count": int(torch.isinf(r).sum())}
    exact = float((got.detach().cpu() == ref.detach().to(got.dtype).cpu()).double().mean()) if got.numel() else math.nan
    if g.numel() == 0 or not bool(torch.isfinite(g).all() & torch.isfinite(r).all()):
        nan = math.nan
        return {"cosine": nan, "calc_diff": nan, "sqnr_db": nan, "rel_l2": nan, "max_abs": nan, "max_rel": nan,
                "frac_bit_exact": exact, **counts, "norm_ratio": nan, "status": "fail", "problem": problem}
    err = g - r
    sig = float((r * r).sum())
    noise = float((err * err).sum())
    norm_g, norm_r = float(g.norm()), float(r.norm())
    both_zero = not norm_g and not norm_r
    out = {
        "cosine": math.nan if both_zero else float((g * r).sum()) / (norm_g * norm_r) if norm_g and norm_r else 0.0,
        "calc_diff": math.nan if both_zero else calc_diff(g, r),
        "sqnr_db": math.nan if both_zero else math.inf if noise == 0 else
        (10 * math.log10(sig / noise) if sig else -math.inf),
        "rel_l2": math.nan if both_zero else math.sqrt(noise / sig) if sig else math.inf,
        "max_abs": float(err.abs().max()),
        "max_rel": float((err.abs() / r.abs().clamp_min(1e-30)).max()),
        "frac_bit_exact": exact,
        **counts,
        "norm_ratio": math.nan if both_zero else norm_g / norm_r if norm_r else math.inf,
    }
    if not problem and noise and (norm_g - norm_r) >= GAIN_SHARE_MAX * math.sqrt(noise) \
            and norm_g > (1 + ROUNDING_GAIN_MAX) * norm_r:
        problem = (f"norm ratio ||got|| / ||ref|| = {out['norm_ratio']:.6g} with cosine {out['cosine']:.6f}: "
                   f"the difference is a scale factor (||got|| - ||ref|| = {(norm_g - norm_r) / math.sqrt(noise):.0%} "
                   "of ||got - ref||), not rounding")
    return {**out, "status": "fail" if problem else "pass", "problem": problem}
