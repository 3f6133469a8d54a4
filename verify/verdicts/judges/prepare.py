"""The `prepare` check of the GEMM stages: the backend's prepared weights, decoded back by the backend itself,
equal the checkpoint's dequantized values.

A backend may serve the optional op `dequantize_prepared(prepared)` (verify.backends.base.Backend): it decodes
its own prepared operand (after its repack, interleave, swizzle, scale folding) back to float32 in checkpoint
layout: a prepare_linear result -> [N, K]; a prepare_experts result -> {"w1", "w3", "w2": [E, N, K]}. The
check compares that with the checkpoint weight dequantized by references/ (references.linear.
dequantize_weight_f64: exact in float64), so a repack bug is blamed on prepare, not on the GEMM that reads it.

Exactness: e2m1 x E4M3 block scale is exact in float32 (<= 6 significant bits); times weight_scale_2 (a
float32) it rounds once, and a backend that folds weight_scale_2 into the block scale first rounds once more,
so an element passes when it is within one float32 ulp of the exact value (two roundings of any association)
and is bit-equal wherever the exact value is itself a float32 (zero codes; weight_scale_2 a power of two; FP8
block-128 weights with E8M0 power-of-two scales; BF16 weights): there a 1-ulp difference fails. The metrics
count the bit-equal elements; a failure names the first element, both values, and when every wrong element
is the checkpoint value times one constant, that constant (weight_scale_2 again: "a scale applied twice").
A backend without dequantize_prepared is "not served" with that reason.

Blame: when a stage's prepared weight differs from the checkpoint (own_weight_if_it_differs), the stage's
bound and mode checks judge the GEMM on the backend's OWN decoded weight (the dense judge): a repack bug then
fails prepare and only prepare, and a GEMM that is also wrong still fails its bound. (The grouped stages, the
fused L1 and the MoE block keep judging on the checkpoint weights: not done yet.)
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from references.gemm import half_ulp
from references.linear import dequantize_weight_f64
from references.stages import Stage
from verify.assertions import first_mismatch
from verify.reference_layer import to_reference_weight

__all__ = ["dequantized_by_backend", "check_prepared_weight", "own_weight_if_it_differs", "prepare"]


def dequantized_by_backend(backend: object, prepared: object) -> Tensor | Mapping[str, Tensor]:
    """backend.dequantize_prepared(prepared), or NotImplementedError (not served) naming why."""
    fn = getattr(backend, "dequantize_prepared", None)
    if fn is None:
        raise NotImplementedError(f"not served: {getattr(backend, 'name', type(backend).__name__)} has no "
                                  "dequantize_prepared (it cannot decode its prepared weights back)")
    return fn(prepared)


def check_prepared_weight(label: str, got: Tensor, lin, metrics: dict, key: str) -> str:
    """got (float32, checkpoint layout) against the checkpoint linear `lin` dequantized (module docstring)."""
    __tracebackhide__ = True
    exp64 = dequantize_weight_f64(to_reference_weight(lin))
    if tuple(got.shape) != tuple(exp64.shape):
        raise AssertionError(f"{label}: dequantize_prepared gave shape {tuple(got.shape)}, the checkpoint layout is "
                             f"{tuple(exp64.shape)} ([N, K], experts [E, N, K])")
    if got.dtype != torch.float32:
        raise AssertionError(f"{label}: dequantize_prepared gave {got.dtype}, expected float32")
    if got.numel() == 0:
        raise AssertionError(f"{label}: empty weight: nothing compared")
    g64, exp64 = got.detach().cpu().double(), exp64.cpu()
    bad = _mismatches(g64, exp64)
    equal = int((got.detach().cpu() == exp64.float()).sum())  # bit-equal to the float32 nearest the exact value
    metrics[f"prepare_bit_equal_{key}"] = equal / got.numel()
    metrics[f"prepare_mismatches_{key}"] = int(bad.sum())
    hit = first_mismatch(bad)
    if hit is None:
        rest = got.numel() - equal
        return (f"{label}: {got.numel()} values equal the checkpoint's dequantized ones (" +
                ("all bit-equal)" if rest == 0 else
                 f"{equal} bit-equal, {rest} within the float32 rounding of weight_scale_2)"))
    _, coord = hit
    raise AssertionError(f"{label} {tuple(got.shape)}: {int(bad.sum())}/{got.numel()} prepared values differ from the "
                         f"checkpoint's dequantized ones; first at {coord}: prepared {float(g64[coord]):.9g}, "
                         f"checkpoint {float(exp64[coord]):.9g}" + _factor_note(g64, exp64, bad, lin) +
                         " (the backend's prepare, not its GEMM)")


def _mismatches(g64: Tensor, exp64: Tensor) -> Tensor:
    """Where the backend's value is not the exact one: bit-equal required where the exact value is a float32,
    else within one float32 ulp (module docstring); NaN is a mismatch."""
    exact_f32 = exp64.float().double() == exp64
    allowed = torch.where(exact_f32, torch.zeros_like(exp64), 2 * half_ulp(exp64, torch.float32))
    return ~((g64 - exp64).abs() <= allowed)


def own_weight_if_it_differs(backend: object, prepared: object, lin, role: str | None = None) -> Tensor | None:
    """The backend's decoded prepared weight (float32, checkpoint layout; role: "w1" / "w3" / "w2" of an expert
    stack) when it serves dequantize_prepared and the decoded weight differs from the checkpoint's (the prepare
    check fails it), else None. The GEMM checks of that stage then judge the GEMM on the backend's own weight,
    so a repack bug fails prepare alone (module docstring)."""
    try:
        got = dequantized_by_backend(backend, prepared)
    except NotImplementedError:
        return None
    got = got[role] if role is not None else got
    exp64 = dequantize_weight_f64(to_reference_weight(lin))
    if tuple(got.shape) != tuple(exp64.shape) or not bool(_mismatches(got.detach().double().cpu(), exp64.cpu()).any()):
        return None
    return got


def _factor_note(g64: Tensor, exp64: Tensor, bad: Tensor, lin) -> str:
    """'; every differing value is the checkpoint's x 0.00123 (= weight_scale_2: applied twice)' when one constant
    explains all of them."""
    sel = bad & (exp64 != 0) & torch.isfinite(g64)
    if not bool(sel.any()) or int(sel.sum()) != int(bad.sum()):
        return ""
    r = g64[sel] / exp64[sel]
    r0 = float(r.reshape(-1)[0])
    if not bool(((r - r0).abs() <= 1e-6 * abs(r0)).all()):
        return ""
    note = f"; every differing value is the checkpoint's x {r0:.6g}"
    ws2 = getattr(lin, "weight_scale_2_f32", None)
    if ws2 is not None and ws2.numel() >= 1:
        for w in ws2.reshape(-1).double().unique().tolist():
            if w and abs(r0 - w) <= 1e-6 * abs(w):
                return note + " (= weight_scale_2: the global scale applied twice)"
            if w and abs(r0 * w - 1) <= 1e-6:
                return note + " (= 1 / weight_scale_2: the global scale missing)"
    return note


def prepare(ctx, stage: Stage, out, metrics: dict) -> str:
    """prepare: each weight the stage reads, as the backend decodes its prepared form, equals the checkpoint's."""
    __tracebackhide__ = True
    msgs, fails = [], []
    for label, key, got, lin in out.prepared_weights(ctx):
        try:
            msgs.append(check_prepared_weight(label, got, lin, metrics, key))
        except AssertionError as exc:
            fails.append(str(exc))
    if fails:
        raise AssertionError("; ".join(fails))
    return "; ".join(msgs)
