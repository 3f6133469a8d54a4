"""How one (stage, check) verdict is produced, and the checks written once for every stage kind.

A check is a function `check(ctx, stage, outputs, metrics) -> str`: it judges the outputs a stage's
judge collected and returns the pass message, or raises AssertionError (fail; the verdict's message is
"<stage> <check>: <the assertion's message>"), NotImplementedError (not served: the backend's sentence)
or Skipped (the check does not apply in this run: its reason). Metrics it writes into `metrics` before
it fails are kept in the verdict.

The generic checks below (bytes, batch, padding, sync, graph) ask the collected outputs for what they
need (`Outputs.quantized / batch / padding / replay`); a stage kind's own checks (bound, ids, weights,
exact, interval, rounding) live with its judge (verify.verdicts.judges).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import Tensor

from references.stages import Check, Op, Stage
from verify.assertions import assert_bits_equal
from verify.backends.protocol import Fp8QuantizedAct, QuantizedAct
from verify.verdicts.model import Verdict
from verify.verdicts.probes import Mutation, as_tensors, bits, graph_probe, sync_probe
from verify.verdicts.quantized import check_fp8_quantized, check_quantized

if TYPE_CHECKING:
    from verify.verdicts.context import JudgeContext

__all__ = ["CheckFn", "Skipped", "SkipStage", "Outputs", "Subset", "Batch", "Padding", "Replay", "Judge",
           "GENERIC_CHECKS", "verdict_of", "not_served", "needs_cuda"]

CheckFn = Callable[["JudgeContext", Stage, "Outputs", dict], str]
PADDING_BYTES = (0xFF, 0x7F)  # what the padding check writes into scale padding, one run each (0x7F: E4M3 NaN)


class Skipped(Exception):
    """The check does not apply in this run; the message is the verdict's reason."""


class SkipStage(Exception):
    """The whole stage does not apply in this run: one skipped verdict, under `check`, with the reason
    (moe.l1_fused in dynamic runs: the golden files record that one verdict)."""

    def __init__(self, check: Check, reason: str) -> None:
        super().__init__(reason)
        self.check, self.reason = check, reason


@dataclass(frozen=True)
class Subset:
    """One batch-invariance comparison: `alone()` runs the op on a subset of the rows by themselves;
    `inside(full)` cuts the same rows out of the whole batch's output (tensors or tuples of tensors)."""

    label: str
    alone: Callable[[], object]
    inside: Callable[[object], object]


@dataclass(frozen=True)
class Batch:
    """The batch check of a stage: `full()` runs the op on the whole batch, then every subset alone."""

    full: Callable[[], object]
    subsets: tuple[Subset, ...]
    passed: str


# Batch sizes a row-wise linear's batch check runs as batches of their own (the first p rows), beside the two end rows
# alone: a backend picks its kernel, tile and K split by M, so each of these may take another path than the full
# batch, and a summation order that differs between paths shows only in the few outputs whose float32 sum lies
# near a bf16 rounding boundary (about 1 in 10^4 at K = 3072 on an H100, measured 2026-12-07): two rows of a
# small fixture's N would rarely show it, every row of these batches does.
ROW_BATCH_SIZES = (2, 3, 4, 8, 16, 32, 64, 128, 256)


def row_batch(stage_name: str, x, run: Callable[[object], object]) -> Batch:
    """The batch check of a row-wise op y = run(x): the first and last rows alone, and the first p rows as a
    batch of their own for every p of ROW_BATCH_SIZES below M, each bit-equal to the same rows of run(x)."""
    m = x.shape[0]
    rows = sorted({r % m for r in (0, -1)})
    subsets = [Subset(f"{stage_name} row {r} alone vs in a batch of {m}", lambda r=r: run(x[r:r + 1].contiguous()),
                      lambda full, r=r: full[r:r + 1]) for r in rows]
    sizes = [p for p in ROW_BATCH_SIZES if p < m]
    subsets += [Subset(f"{stage_name} rows 0..{p - 1} as a batch of {p} vs in a batch of {m}",
                       lambda p=p: run(x[:p].contiguous()), lambda full, p=p: full[:p]) for p in sizes]
    return Batch(lambda: run(x), tuple(subsets),
                 f"rows {rows} alone and the first {sizes} rows as batches of their own are bit-equal to the batch "
                 f"of {m}" if sizes else f"rows {rows} alone are bit-equal to the batch of {m}")


@dataclass(frozen=True)
class Padding:
    """The padding check of a stage: `run(a)` on the boundary activations a, whose swizzled scale
    padding is where `pad` (bool, like a.sf_swizzled_u8) is true."""

    run: Callable[[QuantizedAct], object]
    a: QuantizedAct
    pad: Tensor


@dataclass(frozen=True)
class Replay:
    """The sync and graph probes of a stage: forward() reads its inputs from buffers that each mutation
    rewrites in place. `note` is added to a passing graph verdict (what could not be probed)."""

    forward: Callable[[], object]
    mutations: tuple[Mutation, ...]
    note: str = ""


class Outputs:
    """A stage's backend outputs, collected once by its judge. The generic checks ask it for what they
    need; each raises Skipped where the check does not apply to this stage in this run. A stage kind
    lacking one raises TypeError: its table row lists a check its judge cannot run."""

    def quantized(self) -> tuple[QuantizedAct, QuantizedAct] | list[tuple[Fp8QuantizedAct, Fp8QuantizedAct]]:
        """(the backend's quantized activations, the references' expected ones); FP8 1x128 activations: a list
        of such pairs, one per scale rule."""
        raise TypeError(f"{type(self).__name__}: no quantized activations to compare (check bytes)")

    def batch(self, metrics: dict) -> Batch:
        raise TypeError(f"{type(self).__name__}: no batch-invariance run (check batch)")

    def padding(self) -> Padding:
        raise TypeError(f"{type(self).__name__}: no scale padding to fill (check padding)")

    def replay(self) -> Replay:
        raise TypeError(f"{type(self).__name__}: no forward to probe (checks sync, graph)")


@dataclass(frozen=True)
class Judge:
    """How one stage kind is judged: `ops(ctx, stage, check)` the backend must serve for one check (a check
    whose op is not served is "not served" with the backend's reason; when no check is left the stage is
    not collected at all), `collect(ctx, stage)` runs the backend's op(s) on the stage's teacher-forced
    inputs (only the ops it serves: a backend with just a quantizer still gets its bytes judged), and
    `checks` holds the kind's own check functions (the others come from GENERIC_CHECKS)."""

    collect: Callable[["JudgeContext", Stage], Outputs]
    checks: Mapping[Check, CheckFn] = field(default_factory=dict)
    ops: Callable[["JudgeContext", Stage, Check], tuple[Op, ...]] = lambda ctx, stage, check: (stage.op,)

    def check(self, check: Check, stage: Stage) -> CheckFn:
        fn = self.checks.get(check) or GENERIC_CHECKS.get(check)
        if fn is None:
            raise KeyError(f"stage {stage.name}: the stage table lists check {check.value!r}, which no check "
                           f"function judges for op {stage.op.value!r} (verify.verdicts.judges)")
        return fn


def verdict_of(stage: str, check: Check, run: Callable[[dict], str]) -> Verdict:
    """Run one check; its outcome (message or exception) and the metrics it wrote become the verdict."""
    metrics: dict = {}
    try:
        msg = run(metrics)
    except Skipped as exc:
        return Verdict(stage, check.value, "skipped", str(exc), metrics)
    except AssertionError as exc:
        return Verdict(stage, check.value, "fail", f"{stage} {check.value}: {exc}", metrics)
    except NotImplementedError as exc:  # the backend refuses this case (its reason), e.g. a router it lacks
        return not_served(stage, check, str(exc))
    return Verdict(stage, check.value, "pass", msg, metrics)


def not_served(stage: str, check: Check, reason: str) -> Verdict:
    return Verdict(stage, check.value, "not served", reason, {"unsupported": reason})


def needs_cuda(ctx: "JudgeContext", check: Check) -> None:
    """Skipped unless the stage runs on a CUDA device through a graph-safe backend."""
    if ctx.device.type != "cuda":
        raise Skipped(f"{check.value}: needs a CUDA device (running on {ctx.device})")
    if not getattr(ctx.backend, "graph_safe", True):
        raise Skipped(f"{check.value}: the {ctx.backend.name} backend is a reference with host syncs by design")


# ============================================================================= the generic checks


def quantized_bytes(ctx: "JudgeContext", stage: Stage, out: Outputs, metrics: dict) -> str:
    """bytes: the backend's quantized activations equal the references' (NVFP4: check_quantized; FP8 1x128:
    check_fp8_quantized, one comparison per scale rule the stage's weights imply)."""
    __tracebackhide__ = True
    pairs = out.quantized()
    msgs = [check_fp8_quantized(stage.name, got, expected) if isinstance(got, Fp8QuantizedAct) else
            check_quantized(stage.name, got, expected) for got, expected in (pairs if isinstance(pairs, list) else [pairs])]
    return "; ".join(msgs)


def batch_invariance(ctx: "JudgeContext", stage: Stage, out: Outputs, metrics: dict) -> str:
    """batch: rows judged alone have the bits they have inside the batch."""
    __tracebackhide__ = True
    b = out.batch(metrics)
    full = b.full()
    try:
        for s in b.subsets:
            for alone, inside in zip(as_tensors(s.alone()), as_tensors(s.inside(full))):
                assert_bits_equal(alone.cpu(), inside.cpu(), label=s.label)
    except AssertionError as exc:  # the whole batch once more: a run-to-run nondeterministic op is not "batch"
        differ = int((bits(b.full()).cpu() != bits(full).cpu()).sum())
        if differ:
            raise AssertionError(f"nondeterministic: the whole batch twice differs in {differ} output bytes on the "
                                 f"same inputs, so batch invariance cannot be judged ({exc})") from None
        raise
    return b.passed


def scale_padding(ctx: "JudgeContext", stage: Stage, out: Outputs, metrics: dict) -> str:
    """padding: kernels never read scale padding (DESIGN "Non-negotiables"): the activations' swizzled
    scale padding filled with 0xFF, then 0x7F (E4M3 NaN), must leave every output bit unchanged."""
    __tracebackhide__ = True
    p = out.padding()
    n_pad = int(p.pad.sum())
    if n_pad == 0:
        return "no padding in this shape (rows a multiple of 128, K/16 of 4): nothing to read"
    clean = bits(p.run(p.a))
    for byte in PADDING_BYTES:
        sf = p.a.sf_swizzled_u8.clone()
        sf[p.pad] = byte
        dirty = bits(p.run(QuantizedAct(p.a.packed_u8, sf, p.a.global_dec_f32)))
        bad = torch.nonzero(dirty != clean)
        if bad.numel():
            raise AssertionError(f"0x{byte:02X} in the {n_pad} padding bytes of the scale buffer changed "
                                 f"{bad.shape[0]} output bytes (first at byte {int(bad[0, 0])}): the kernel "
                                 "reads scale padding")
    return f"0xFF and 0x7F in the {n_pad} padding bytes change no output bit"


def no_host_sync(ctx: "JudgeContext", stage: Stage, out: Outputs, metrics: dict) -> str:
    """sync: (CUDA) the stage's op under torch.cuda.set_sync_debug_mode("error")."""
    needs_cuda(ctx, Check.SYNC)
    r = out.replay()
    with ctx.probe("sync probe", stage.name):
        return sync_probe(r.forward)


def graph_replay(ctx: "JudgeContext", stage: Stage, out: Outputs, metrics: dict) -> str:
    """graph: (CUDA) captured once, replayed after each mutation of its inputs: bit-equal to eager."""
    needs_cuda(ctx, Check.GRAPH)
    r = out.replay()
    with ctx.probe("graph probe", stage.name):
        msg = graph_probe(r.forward, list(r.mutations), metrics)
    return msg + r.note


GENERIC_CHECKS: dict[Check, CheckFn] = {
    Check.BYTES: quantized_bytes,
    Check.BATCH: batch_invariance,
    Check.PADDING: scale_padding,
    Check.SYNC: no_host_sync,
    Check.GRAPH: graph_replay,
}
