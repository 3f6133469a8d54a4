"""judge_layer: every verdict of a layer, by the stage table's rows and each row's checks."""

from __future__ import annotations

import traceback
import time
from typing import Callable, Iterable

from references.stages import Check, Stage
from verify.backends.base import Backend
from verify.provenance import stage_provenance
from verify.verdicts.checks import SkipStage, not_served, verdict_of
from verify.verdicts.context import JudgeContext
from verify.verdicts.controls import CONTROL_TIMING, control_verdict
from verify.verdicts.judges import JUDGES
from verify.verdicts.model import LayerCase, Verdict, applicable_stages

__all__ = ["judge_layer", "judge_stage"]


def judge_layer(backend: Backend, case: LayerCase, *, stages: Iterable[Stage] | None = None,
                timings: dict[str, float] | None = None,
                on_phase: Callable[[str], None] | None = None, provenance: dict | None = None,
                controls: list[Verdict] | None = None) -> list[Verdict]:
    """Every verdict of the layer's kernel stages (or of `stages` only), in table order, one per check
    each row lists. Each verdict's metrics hold "seconds": its stage's seconds shared among its verdicts.
    `timings` (the caller's sink) gets "graph_probe", the seconds spent in the sync and graph probes;
    on_phase is told as each probe starts (verify.verdicts.context.JudgeContext). `provenance` (a sink) gets
    per stage the kernels its verdicts launched (verify.provenance.stage_provenance; None: unknown).
    `controls` (a list, when given) receives each verdict's negative control (verify.verdicts.controls), in
    the same order."""
    ctx = JudgeContext(backend, case, {} if timings is None else timings, on_phase)
    out: list[Verdict] = []
    for stage in applicable_stages(case) if stages is None else stages:
        with ctx.timed_stage(stage), stage_provenance(backend) as launched:
            verdicts = judge_stage(ctx, stage, controls)
        if provenance is not None:
            provenance[stage.name] = launched
        for v in verdicts:
            v.metrics.setdefault("seconds", ctx.stage_seconds[stage.name] / max(1, len(verdicts)))
        out += verdicts
    return out


def judge_stage(ctx: JudgeContext, stage: Stage, controls: list[Verdict] | None = None) -> list[Verdict]:
    """One row of the stage table: its judge first collects the backend's outputs for the stage, then each
    check the row lists is looked up (the judge's own checks, else the generic ones) and judged."""
    judge = JUDGES.get(stage.op)
    if judge is None:
        raise KeyError(f"stage {stage.name}: no judge for op {stage.op.value!r} (verify.verdicts.judges.JUDGES)")
    unserved: dict[Check, str] = {}
    for check in stage.checks:
        reason = next((r for op in judge.ops(ctx, stage, check) if (r := ctx.backend.unsupported_reason(op, ctx.device))),
                      None)
        if reason:
            unserved[check] = reason
    if len(unserved) == len(stage.checks):
        return [not_served(stage.name, c, unserved[c]) for c in stage.checks]
    try:
        outputs = judge.collect(ctx, stage)
    except NotImplementedError as exc:  # the backend refuses this case (prepare, a static scale it lacks, ...)
        # a check whose own op is not served keeps that reason (the GEMM it lacks says more than the prepare
        # its collection tripped on first); the others get the refusal
        return [not_served(stage.name, c, unserved.get(c, str(exc))) for c in stage.checks]
    except SkipStage as skip:
        return [Verdict(stage.name, skip.check.value, "skipped", skip.reason)]
    except Exception as exc:  # noqa: BLE001 - a crash inside the backend fails its stage (one line), not the run
        msg = (f"{stage.name}: {ctx.backend.name} crashed while its outputs were collected: {type(exc).__name__}: "
               f"{' '.join(str(exc).split())[:400]}")
        return [Verdict(stage.name, c.value, "fail", msg, {"traceback": traceback.format_exc(limit=-4)})
                for c in stage.checks]
    verdicts = []
    for check in stage.checks:
        if check in unserved:
            verdicts.append(not_served(stage.name, check, unserved[check]))
            continue
        fn = judge.check(check, stage)
        verdicts.append(verdict_of(stage.name, check, lambda metrics: fn(ctx, stage, outputs, metrics)))
        if controls is not None:
            t = time.perf_counter()
            controls.append(control_verdict(ctx, stage, check, fn, outputs, verdicts[-1]))
            ctx.timings[CONTROL_TIMING] = ctx.timings.get(CONTROL_TIMING, 0.0) + time.perf_counter() - t
    return verdicts
