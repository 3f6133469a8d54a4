"""The `mode` check of the GEMM stages: which numerics mode the backend's output matches (references.modes).

Each GEMM op declares a mode per weight format (verify.backends.base.Backend.numerics_mode: w4a4 with the
backend's recipe, w4a16, w4a8, fp8_block, bf16). For every part of a GEMM stage the stage's judge hands
over a ModeCase: the backend's output, its declared mode, and for each mode the weight's format allows the
float64 product of that mode's operands with its rigorous bound (the same bound machinery as the stage's
bound check: references.gemm / references.fp8_gemm / references.modes.chunked_gemm_error_bound, with the
backend's declared accumulators: u_acc for w4a4, w4a16, bf16; its FP8 accumulator for w4a8 and fp8_block).
The output matches a mode when max |y - y64| / bound <= 1 there (garbage never matches: NaN / Inf, an empty
or all-zero comparison count as ratio inf).

  pass  the declared mode matches; when other modes match too (possible on degenerate data, e.g. inputs
        that NVFP4 represents exactly), the message says the modes cannot be told apart on this data;
  fail  the declared mode does not match and another does, naming both: "declared w4a4, output matches w4a16
        (max bound ratio 0.3), not w4a4 (ratio 41)";
  skipped  no mode matches: the output is wrong in every mode, which is the bound check's failure (the bound
        judges the declared mode or the one the output matches, so with no match it always fails: one failure,
        where it belongs); the message gives every ratio, smallest first. A part with no match among parts
        that fail as above still fails the check.
Metrics: mode_ratio_<mode>_<part> for every candidate (golden tolerances: verify.golden, per mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from references.gemm import bound_ratio, gemm_error_bound
from references.modes import BF16, FP8_BLOCK, W4A4, W4A8, W4A16, chunked_gemm_error_bound
from references.stages import Op, Stage
from verify.assertions import assert_within_gemm_bound
from verify.backends.base import declared_fp8_accumulator
from verify.backends.protocol import WEIGHT_FORMATS, NumericsMode
from verify.verdicts.checks import Skipped

__all__ = ["ModeCase", "declared_mode", "candidate_bound", "mode_ratio", "mode"]

_DEFAULT = {"nvfp4": NumericsMode.W4A4, "fp8_block": NumericsMode.FP8_BLOCK, "mxfp4": NumericsMode.W4A4}


@dataclass(frozen=True)
class ModeCase:
    """One part of a GEMM stage for the mode check: `candidates()` -> {mode: (y64, bound)} for every mode the
    weight allows (computed when the check runs)."""

    label: str
    y: Tensor
    declared: str
    candidates: Callable[[], Mapping[str, tuple[Tensor, Tensor]]]
    note: str = ""  # e.g. "on the backend's own prepared weight (the prepare check fails it)"


def declared_mode(backend: object, op: Op, weight_format: str) -> str:
    """The backend's declared mode of `op` on `weight_format` (its numerics_mode; a wrapper that only satisfies
    the protocol gets the format's default: w4a4 for NVFP4 and MXFP4, fp8_block for FP8 block-128)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format={weight_format!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    fn = getattr(backend, "numerics_mode", None)
    return NumericsMode(fn(op, weight_format) if fn is not None else _DEFAULT[weight_format]).value


def candidate_bound(backend: object, mode: str, y64: Tensor, abs_dot: Tensor, alpha_f32: Tensor, *, k: int,
                    out_dtype: torch.dtype) -> Tensor:
    """The accumulation bound of one mode's float64 product: u_acc over K for w4a4, w4a16, bf16 (bf16 or
    NVFP4 tensor-core products, the backend's GEMM accumulator); w4a8 with the backend's FP8 accumulator
    (fp8_u_acc, promoted to float32 every fp8_promotion_interval of K when it declares one)."""
    if mode in (W4A8, FP8_BLOCK):  # fp8_block here only on a backend's own decoded weight (no block structure)
        u, interval = declared_fp8_accumulator(backend)
        return chunked_gemm_error_bound(abs_dot, y64, alpha_f32, k=k, u_acc=u, promotion_interval=interval,
                                        out_dtype=out_dtype)
    if mode in (W4A4, W4A16, BF16):
        return gemm_error_bound(abs_dot, y64, alpha_f32, k=k, u_acc=float(backend.u_acc), out_dtype=out_dtype)
    raise ValueError(f"mode={mode!r}: not a references.modes mode")


def mode_ratio(y: Tensor, y64: Tensor, bound: Tensor) -> float:
    """max |y - y64| / bound; inf where the comparison is garbage (NaN / Inf, empty, all zero against
    all zero: verify.assertions.assert_within_gemm_bound's rules)."""
    try:
        return assert_within_gemm_bound(y, y64, bound, label="mode")
    except AssertionError:
        r = float(bound_ratio(y, y64, bound))
        return r if r > 1 and math.isfinite(r) else math.inf


def mode(ctx, stage: Stage, out, metrics: dict) -> str:
    """mode: each part's output matches its declared mode (module docstring)."""
    __tracebackhide__ = True
    msgs, fails, none = [], [], []
    for case in out.modes():
        ratios = {m: mode_ratio(case.y, y64, bnd) for m, (y64, bnd) in case.candidates().items()}
        key = case.label.removeprefix(f"{stage.name}.") if case.label != stage.name else "y"
        for m, r in ratios.items():
            metrics[f"mode_ratio_{m}_{key}"] = r
        matches = sorted((m for m, r in ratios.items() if r <= 1), key=ratios.get)
        words = ", ".join(f"{m} {ratios[m]:.3g}" for m in sorted(ratios, key=ratios.get))
        if case.declared in matches:
            also = [m for m in matches if m != case.declared]
            msgs.append(f"{case.label}: declared {case.declared} matches (bound ratios {words}){case.note}" +
                        (f"; {', '.join(also)} match too: on this data the modes cannot be told apart" if also else ""))
        elif matches:
            best = matches[0]
            fails.append(f"{case.label}: declared {case.declared}, output matches {best} (max bound ratio "
                         f"{ratios[best]:.3g}), not {case.declared} (ratio {ratios.get(case.declared, math.inf):.3g})"
                         f"; all ratios: {words}{case.note}")
        else:
            none.append(f"{case.label}: declared {case.declared}, output matches no mode (bound ratios {words}): "
                        f"wrong in every mode, not a mode mix-up{case.note}")
    if fails:
        raise AssertionError("; ".join(fails + none))
    if none:
        raise Skipped("mode: " + "; ".join(none) + " (the bound check fails it)")
    if not msgs:
        raise Skipped("mode: no GEMM part to judge")
    return "; ".join(msgs)
