"""Negative controls: for each (stage, check) verdict that passed, the same check judged once more on the
stage's real outputs with one minimal, known-bad change of the kind the check exists to detect. The check
must fail it; a check that passes its control is blind here, and the control fails the run.

What each control plants (on this backend's own outputs, judged by the check's own code):
  bytes     one bit of the backend's quantized codes flipped (NVFP4 packed E2M1 / FP8 E4M3 byte 0);
  bound, rounding, exact
            the check's first comparison judges a `got` moved minimally past what it tolerates: one element
            one representable step beyond its bound or ulps, or one bit of the offsets flipped
            (verify.assertions.planting_beyond_tolerance);
  batch     a token-dependent result: bit 0 of the first row judged alone flipped (alone != inside);
  padding   a GEMM that reads scale padding: its output changes when the padding bytes are not zero;
  sync      a forward that reads one output element on the host (.item());
  graph     a forward with a host value baked in at capture (a counter that eager calls advance);
  ids       router: token 0's first expert replaced by its lowest-scoring unchosen expert (never a near-tie);
  weights   router: the first judged token's first weight scaled by 1 + 4 x its relative fp32 bound (at least
            1 + 2^-10, at most x2);
  interval  fused L1: the signs of the first row's codes flipped;
  mode      the output of one part re-judged as if the backend had declared the mode it matches least (the
            largest bound ratio, > 1) instead of the one it matches: the check must fail naming both (a
            backend whose declaration and computation differ); skipped where every mode matches (the modes
            cannot be told apart on this data);
  prepare   the first weight the backend decodes back (dequantize_prepared) with its largest value moved 4
            float32 ulps away from zero (the check allows one ulp, or none where the exact value is a float32);
  valid     the block run with a valid-token count: its last valid row (next to the garbage) one bit off, a
            leak past the count (graph-safe: the row is picked on the device from the count);
  (a newer check without a control of its own) planted in its first verify.assertions comparison, as bound;
            skipped when it makes none (test_controls requires words for every Check here).

The controls planted inside an assertion move `got` just past the tolerance the check hands that assertion: a
check that loosens its own tolerance before comparing is caught by verify/tests/test_checks_can_fail.py (known-bad
backends just past the true bound), not by its control.

A control is one Verdict with the stage and check of the verdict it controls: "pass" when the check failed
on the planted input (its message, first line), "fail" when it passed it, "skipped" where the verdict did
not pass (a failing check needs no control: the run fails already) or nothing could be planted.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import TYPE_CHECKING

import torch

from references.stages import Check, Stage
from verify.assertions import planting_beyond_tolerance
from verify.backends.protocol import Fp8QuantizedAct, QuantizedAct
from verify.verdicts.checks import Batch, CheckFn, Outputs, Padding, Replay, Skipped, Subset
from verify.verdicts.model import Verdict
from verify.verdicts.probes import as_tensors, bits

if TYPE_CHECKING:
    from verify.verdicts.context import JudgeContext

__all__ = ["CONTROL_WORDS", "CONTROL_TIMING", "control_verdict", "control_counts", "control_line"]

CONTROL_TIMING = "controls"  # the timing sink's key for the seconds spent in the controls (part of "verdicts")

CONTROL_WORDS = {
    Check.BYTES: "one bit of the quantized codes flipped",
    Check.BOUND: "one element one step beyond the bound",
    Check.ROUNDING: "one element one step beyond the ulps",
    Check.EXACT: "one bit of the first comparison flipped",
    Check.BATCH: "a row alone one bit off the batch",
    Check.PADDING: "a GEMM that reads scale padding",
    Check.SYNC: "a host read (.item()) in the forward",
    Check.GRAPH: "a host value baked in at capture",
    Check.IDS: "token 0's first expert swapped for its worst unchosen one",
    Check.WEIGHTS: "a token's first weight x (1 + 4 x its fp32 bound; at least 1 + 2^-10, at most 2)",
    Check.INTERVAL: "the signs of row 0's codes flipped",
    Check.MODE: "the output re-judged as declared in the mode it matches least",
    Check.PREPARE: "one decoded weight value 4 float32 ulps off",
    Check.VALID: "the last valid row one bit off when garbage follows it",
}
_BY_ASSERTION = (Check.BOUND, Check.ROUNDING, Check.EXACT)  # planted inside the check's first comparison
_GENERIC = (Check.BYTES, Check.BATCH, Check.PADDING, Check.SYNC, Check.GRAPH)  # planted in the Outputs they ask for


def _flip_bit0(t: torch.Tensor) -> torch.Tensor:
    """t with bit 0 of its first element flipped (a copy)."""
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    bad = t.detach().contiguous().clone()
    if bad.numel():
        bad.view(int_dtype).reshape(-1)[0] ^= 1
    return bad


def _flip_first_output(out: object) -> object:
    """An op's output (tensor or tuple of tensors) with bit 0 of its first element flipped."""
    outs = as_tensors(out)
    bad = (_flip_bit0(outs[0]), *outs[1:])
    return bad if isinstance(out, (tuple, list)) else bad[0]


class _Planted(Outputs):
    """A stage's collected outputs with one check's input planted (the generic checks' side)."""

    def __init__(self, real: Outputs, check: Check) -> None:
        self.real, self.check = real, check

    def __getattr__(self, name: str):  # what the generic checks do not ask for: the real outputs'
        return getattr(self.real, name)

    def quantized(self):
        pairs = self.real.quantized()
        if isinstance(pairs, list):  # FP8 1x128: the first scale rule's codes
            got, exp = pairs[0]
            return [(Fp8QuantizedAct(_flip_bit0(got.e4m3_u8), got.block_dec_scale, got.scale_rule), exp), *pairs[1:]]
        got, exp = pairs
        return QuantizedAct(_flip_bit0(got.packed_u8), got.sf_swizzled_u8, got.global_dec_f32), exp

    def batch(self, metrics: dict) -> Batch:
        b = self.real.batch(metrics)
        if not b.subsets:
            raise Skipped("no subset to plant (the batch check compares none here)")
        first, *rest = b.subsets
        return Batch(b.full, (Subset(first.label, lambda: _flip_first_output(first.alone()), first.inside), *rest),
                     b.passed)

    def padding(self) -> Padding:
        p = self.real.padding()
        if not bool(p.pad.any()):
            raise Skipped("no scale padding in this shape: nothing to read")

        def reads_padding(a: QuantizedAct):
            y = p.run(a)
            return _flip_first_output(y) if bool((a.sf_swizzled_u8[p.pad] != 0).any()) else y

        return Padding(reads_padding, p.a, p.pad)

    def replay(self) -> Replay:
        r = self.real.replay()
        if self.check is Check.SYNC:
            def syncing():
                y = r.forward()
                bits(y)[:1].sum().item()  # the host waits for the stream
                return y
            return Replay(syncing, r.mutations, r.note)
        counter = itertools.count(1)
        device = bits(r.forward()).device

        def baked():  # the count is a kernel argument: captured once, advanced by every eager call
            return r.forward(), torch.full((1,), next(counter), dtype=torch.int32, device=device)
        return Replay(baked, r.mutations, r.note)


class _Redeclared(Outputs):
    """A GEMM stage's outputs whose first part that can be told apart (its declared mode matches, another does
    not) is re-declared in the mode it matches least: the mode check on a backend that says one mode and
    computes another."""

    def __init__(self, real: Outputs) -> None:
        self.real = real
        self.planted = ""

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def modes(self):
        from verify.verdicts.judges.mode import mode_ratio  # noqa: PLC0415 (judges import this module's package)

        cases = [dataclasses.replace(c, candidates=functools.cache(c.candidates)) for c in self.real.modes()]
        for i, c in enumerate(cases):
            ratios = {m: mode_ratio(c.y, y64, bnd) for m, (y64, bnd) in c.candidates().items()}
            others = {m: r for m, r in ratios.items() if m != c.declared and r > 1}
            if ratios.get(c.declared, float("inf")) <= 1 and others:
                worst = max(others, key=others.get)
                self.planted = f"{c.label} declared {worst} (ratio {others[worst]:.3g}) instead of {c.declared}"
                cases[i] = dataclasses.replace(c, declared=worst)
                return cases
        raise Skipped("every mode the weights allow matches the output of every part: the modes cannot be told "
                      "apart on this data, no declaration to plant")


class _MisDecoded(Outputs):
    """A GEMM stage's outputs whose first decoded prepared weight has its largest value 4 float32 ulps further
    from zero (a copy: the decoded stacks are shared by the stages of a layer)."""

    def __init__(self, real: Outputs) -> None:
        self.real = real
        self.planted = ""

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def prepared_weights(self, ctx: "JudgeContext"):
        from verify.verdicts.judges.prepare import StackTally  # noqa: PLC0415 (judges import this module)

        weights = self.real.prepared_weights(ctx)
        if weights and isinstance(weights[0][2], StackTally):
            return self._stack_planted(weights)
        if not weights or weights[0][2].numel() == 0:
            raise Skipped("no decoded weight to plant")
        (label, key, got, lin), *rest = weights
        if got.dtype != torch.float32:  # the check fails it already (never a pass to control)
            raise Skipped(f"{label}: decoded as {got.dtype}, not float32")
        bad = got.detach().clone(memory_format=torch.contiguous_format)  # reshape(-1) must be a view of it
        flat = bad.view(-1)
        i = int(flat.abs().argmax())
        flat.view(torch.int32)[i] += 4  # sign-magnitude: 4 ulps up in magnitude, either sign
        self.planted = f"{label}: element {i} moved from {float(got.reshape(-1)[i])!r} to {float(flat[i])!r}"
        return [(label, key, bad, lin), *rest]


    def _stack_planted(self, weights):
        """An expert stack, compared chunk by chunk (judges.prepare.scan_prepared_experts): expert 0 of the first
        role scanned again through the real comparison, its decode with the largest value 4 ulps off."""
        from verify.verdicts.judges.prepare import scan_prepared_experts  # noqa: PLC0415

        (label, key, _, lin), *rest = weights
        role = next((r for r in ("w1", "w3", "w2") if f"experts.{r}" in label), None)
        if role is None:
            raise Skipped(f"{label}: no expert role to plant")
        planter = _PlantedDecoder(self.real.backend)
        tally = scan_prepared_experts(planter, self.real.experts, {role: lin}, chunks=[range(0, 1)])[role]
        self.planted = f"{label}: expert 0 {planter.planted}"
        return [(label, key, tally, lin), *rest]


class _PlantedDecoder:
    """A backend's dequantize_prepared whose every decoded piece has its largest value 4 float32 ulps further
    from zero (on a contiguous copy)."""

    def __init__(self, backend: object) -> None:
        self.backend, self.planted = backend, ""
        self.name = getattr(backend, "name", type(backend).__name__)

    def dequantize_prepared(self, prepared, *, experts: range | None = None):
        from verify.verdicts.judges.prepare import dequantized_by_backend  # noqa: PLC0415

        out = {}
        for role, got in dequantized_by_backend(self.backend, prepared, experts).items():
            bad = got.detach().clone(memory_format=torch.contiguous_format)
            flat = bad.view(-1)
            i = int(flat.abs().argmax())
            flat.view(torch.int32)[i] += 4  # sign-magnitude: 4 ulps up in magnitude, either sign
            self.planted = f"element {i} moved from {float(got.reshape(-1)[i])!r} to {float(flat[i])!r}"
            out[role] = bad
        return out


class _LeakingBlock(Outputs):
    """The MoE block's outputs whose run with a valid-token count n gives row n - 1 (the last valid row, next
    to the garbage) with bit 0 of its first element flipped; picked on the device (no host read: the valid
    check replays it in a CUDA graph when the check does not fail first)."""

    def __init__(self, real: Outputs) -> None:
        self.real = real

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def run(self, x, ids, **kw):
        y = self.real.run(x, ids, **kw)
        n_i32 = kw.get("num_valid_tokens_i32")
        if n_i32 is None or y.numel() == 0:
            return y
        int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[y.element_size()]
        flat = y.contiguous().reshape(y.shape[0], -1)
        rows = torch.arange(flat.shape[0], device=y.device)
        hit = (rows == n_i32.to(y.device).long() - 1)[:, None] & (torch.arange(flat.shape[1], device=y.device) == 0)
        return (flat.view(int_dtype) ^ hit.to(int_dtype)).view(y.dtype).reshape(y.shape)


def _planted_router(ctx: "JudgeContext", out, check: Check):
    """Router outputs with token 0's routing planted, re-judged by the router verdict."""
    from verify.verdicts.judges.router import rejudged  # noqa: PLC0415 (judges import this module's package)

    got = out.got
    ids, w = got.ids_i64.clone(), got.weights_f32.clone()
    if ids.shape[0] == 0:
        raise Skipped("no token to plant")
    if check is Check.IDS:
        scores = out.reference.scores_f32[0].double().clone()
        scores[ids[0].to(scores.device)] = float("inf")  # never one it chose
        ids[0, 0] = int(torch.argmin(scores))
    else:  # 4 bounds past the reference (the fp32 bound grows with the hidden size: 2^-10 is inside it at 7168),
        # never more than x2 (a weight applied twice is wrong whatever the check computes: a check whose bound
        # is loose beyond that lets the control through and is shown blind)
        t, rel = out.rv.first_weight_bound or (0, 0.0)
        w[t, 0] = w[t, 0] * (1 + max(2.0**-10, min(1.0, 4 * rel)))
    return rejudged(ctx, out, dataclasses.replace(got, ids_i64=ids, weights_f32=w))


def _planted_interval(out):
    got = out.got
    packed = got.packed_u8.clone()
    if packed.shape[0] == 0:
        raise Skipped("no row to plant")
    packed[0] ^= 0x88
    return dataclasses.replace(out, got=QuantizedAct(packed, got.sf_swizzled_u8, got.global_dec_f32))


def control_verdict(ctx: "JudgeContext", stage: Stage, check: Check, fn: CheckFn, outputs: Outputs,
                    verdict: Verdict) -> Verdict:
    """The negative control of one verdict (module docstring)."""
    words = CONTROL_WORDS.get(check, "a planted defect")
    if verdict.status != "pass":
        return Verdict(stage.name, check.value, "skipped", f"control ({words}): the verdict is {verdict.status}, "
                       "not pass")
    metrics: dict = {}
    planted: list[str] = []
    try:
        if check in _BY_ASSERTION:
            with planting_beyond_tolerance() as planted:
                fn(ctx, stage, outputs, metrics)
        elif check in (Check.IDS, Check.WEIGHTS):
            fn(ctx, stage, _planted_router(ctx, outputs, check), metrics)
        elif check is Check.INTERVAL:
            fn(ctx, stage, _planted_interval(outputs), metrics)
        elif check in (Check.MODE, Check.PREPARE):
            plant = (_Redeclared if check is Check.MODE else _MisDecoded)(outputs)
            try:
                fn(ctx, stage, plant, metrics)
            finally:
                planted.extend([plant.planted] if plant.planted else [])
        elif check is Check.VALID:
            fn(ctx, stage, _LeakingBlock(outputs), metrics)
        elif check in _GENERIC:
            fn(ctx, stage, _Planted(outputs, check), metrics)
        else:  # a check without its own control (a newer one): planted in its first comparison, if it makes one
            with planting_beyond_tolerance() as planted:
                fn(ctx, stage, outputs, metrics)
            if not planted:
                return Verdict(stage.name, check.value, "skipped", f"control: the {check.value} check makes no "
                               "comparison through verify.assertions and has no control of its own "
                               "(verify.verdicts.controls)")
    except AssertionError as exc:
        where = f" ({planted[0]})" if planted else ""
        return Verdict(stage.name, check.value, "pass", f"control ({words}){where}: fails as it must: "
                       f"{str(exc).splitlines()[0]}")
    except Skipped as exc:
        return Verdict(stage.name, check.value, "skipped", f"control ({words}): {exc}")
    except Exception as exc:  # noqa: BLE001 - a control that cannot run shows nothing: it fails, never crashes the run
        return Verdict(stage.name, check.value, "fail", f"control ({words}) could not run: {type(exc).__name__}: {exc}")
    if check in _BY_ASSERTION and not planted:
        return Verdict(stage.name, check.value, "fail", f"control ({words}): the check made no comparison through "
                       "verify.assertions, so nothing could be planted: it cannot be shown to fail")
    return Verdict(stage.name, check.value, "fail", f"control ({words}): the {check.value} check PASSED a known-bad "
                   f"input of {stage.name}: it cannot see what it exists to detect")


def control_counts(controls: list[Verdict]) -> dict[str, int]:
    out = {"pass": 0, "fail": 0, "skipped": 0}
    for v in controls:
        out[v.status] = out.get(v.status, 0) + 1
    return out


def control_line(counts: dict[str, int]) -> str:
    """The run's last line about its negative controls (rich markup), from control_counts summed over layers."""
    caught, blind = counts.get("pass", 0), counts.get("fail", 0)
    if blind:
        return (f"[bold red]negative controls: {blind} check(s) PASSED a known-bad input (blind: the run fails); "
                f"{caught} failed it as they must[/]")
    if not caught:
        return "[yellow]negative controls: none ran (no verdict passed here)[/]"
    return f"[green]negative controls: all {caught} failed their known-bad input as they must[/]"
