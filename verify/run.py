"""One run per layer, for every entry point: `python -m verify layer|model`, `pytest -m layerN` and the
golden-file writer all call `run_layer`.

A run loads nothing itself beyond what it is given: the caller opens the checkpoint and (optionally)
passes an already loaded layer and its inputs, so several run configurations can share one load.
It runs the reference layer in both modes (emulated NVFP4 and float64 high precision), measures the
quantization loss per stage of the stage table, digests every emulated tensor, and, with a backend,
judges every kernel stage of the layer through the backend protocol (verify.verdicts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from references.layer import RunOptions
from verify.backends import Backend
from verify.checkpoint import Checkpoint, LayerWeights
from verify.golden import tensor_digest
from verify.provenance import provenance_document, stage_mismatches
from verify.reference_layer import LOSS_STAGE_OF, LayerInputs, moe_spec_from, quantization_loss, run_reference_layer
from verify.verdicts import LayerCase, Verdict, judge_layer

__all__ = ["LayerRun", "run_layer", "judge_into", "reference_run", "verdict_counts", "E4M3_MAX_BYTE", "saturated_block_fractions", "PHASES",
           "stage_seconds"]

# The phases of one layer's run, in order, as run_layer reports them to `on_phase` and in timings_s
# (the caller adds "load"; "graph_probe" is the part of "verdicts" spent in the sync and CUDA-graph
# probes, so it is not added to the total twice).
PHASES = ("emulated", "high", "verdicts", "graph_probe")


E4M3_MAX_BYTE = 0x7E  # block scale 448: the block amax did not fit (static global scale too small)


def saturated_block_fractions(emulated: dict[str, Tensor]) -> dict[str, float]:
    """Per NVFP4 quantization stage, the fraction of 16-element blocks whose E4M3 scale byte is 448
    (0x7E): with a static input_scale those blocks are clipped at 6 * 448 * D."""
    return {k[: -len(".sf_u8")]: float((v == E4M3_MAX_BYTE).double().mean()) if v.numel() else 0.0
            for k, v in emulated.items() if k.endswith(".sf_u8")}


@dataclass
class LayerRun:
    """The result of one layer under one run configuration."""

    layer: int
    emulated: dict[str, Tensor]
    high: dict[str, Tensor]
    loss: dict[str, dict[str, float]]
    digests: dict[str, str]
    saturated: dict[str, float]
    verdicts: list[Verdict] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    provenance: dict | None = None  # verify.provenance.provenance_document of the backend's stages, or None
    controls: list[Verdict] = field(default_factory=list)  # negative controls (verify.verdicts.controls)

    def verdict(self, stage: str, check: str) -> Verdict | None:
        return next((v for v in self.verdicts if v.stage == stage and v.check == check), None)

    @property
    def loss_failures(self) -> list[Verdict]:
        """A "loss" verdict per quantization-loss row whose comparison is garbage (status "fail": NaN / Inf,
        empty, all zero, a gain > 1; verify.metrics), blamed on the row's table stage."""
        return [Verdict(LOSS_STAGE_OF.get(t, t), "loss", "fail", f"{LOSS_STAGE_OF.get(t, t)} loss: {t} emulated vs "
                        f"high: {m['problem']}", dict(m))
                for t, m in self.loss.items() if m.get("status") == "fail"]

    @property
    def control_failures(self) -> list[Verdict]:
        """A "control" verdict per check that passed its negative control (a known-bad input), blamed on
        its stage: the check is blind there."""
        return [Verdict(v.stage, "control", "fail", f"{v.stage} {v.check} {v.message}", {"check": v.check})
                for v in self.controls if v.status == "fail"]

    @property
    def failed(self) -> list[Verdict]:
        """Every failed verdict, then every failed loss row and control: the run fails when this is not empty."""
        return [v for v in self.verdicts if v.status == "fail"] + self.loss_failures + self.control_failures

    def as_dict(self) -> dict:
        return {"metrics": self.loss, "digests": self.digests, "saturated_block_fraction": self.saturated,
                "verdicts": [v.as_dict() for v in self.verdicts], "timings_s": self.timings_s}


def verdict_counts(verdicts: list[Verdict]) -> dict[str, int]:
    out = {"pass": 0, "fail": 0, "not served": 0, "skipped": 0}
    for v in verdicts:
        out[v.status] += 1
    return out


def stage_seconds(verdicts: list[Verdict]) -> dict[str, float]:
    """Seconds spent on each stage's verdicts (the sum of its verdicts' `seconds`), in table order."""
    out: dict[str, float] = {}
    for v in verdicts:
        out[v.stage] = out.get(v.stage, 0.0) + float(v.metrics.get("seconds", 0.0))
    return out


def run_layer(ckpt: Checkpoint, layer: LayerWeights, inputs: LayerInputs, *, options: RunOptions,
              backend: Backend | None = None, on_phase: Callable[[str], None] | None = None,
              controls: bool = False) -> LayerRun:
    """Reference layer (both modes), loss per stage, digests and (with a backend) every stage's verdicts.

    on_phase(name) is called as each phase starts ("emulated", "high", "verdicts", and on CUDA
    "sync probe <stage>" / "graph probe <stage>"), for progress bars. timings_s holds the seconds of
    each phase (PHASES) and, with a backend, "stages": the verdict seconds per stage. controls: also run
    each passing verdict's negative control (verify.verdicts.controls) into run.controls, timed as "controls"
    (part of "verdicts")."""
    run = reference_run(layer.index, lambda mode: run_reference_layer(ckpt, layer, inputs, mode=mode, options=options),
                        on_phase, saturated=True)
    if backend is not None:
        case = LayerCase(layer, ckpt.config.schema, inputs.x_attn_bf16, inputs.x_ffn_bf16, inputs.token_ids_i64,
                         run.emulated, run.high, options,
                         moe_spec_from(ckpt.config) if layer.experts is not None else None)
        judge_into(run, backend, case, on_phase=on_phase, controls=controls)
    return run


def reference_run(index: int, reference: Callable[[str], dict[str, Tensor]],
                  on_phase: Callable[[str], None] | None, *, saturated: bool) -> LayerRun:
    """The reference half of a unit's run (run_layer, verify.mtp.run_mtp): `reference(mode)` in the "emulated"
    then the "high" mode, the quantization loss per stage, the digests, with `saturated` the fractions of
    saturated blocks, timed per phase; on_phase(name) as each phase starts."""
    t0 = time.perf_counter()
    if on_phase is not None:
        on_phase("emulated")
    emulated = reference("emulated")
    t1 = time.perf_counter()
    if on_phase is not None:
        on_phase("high")
    high = reference("high")
    t2 = time.perf_counter()
    return LayerRun(index, emulated, high, quantization_loss(emulated, high),
                    {k: tensor_digest(v) for k, v in emulated.items()},
                    saturated_block_fractions(emulated) if saturated else {},
                    timings_s={"emulated": t1 - t0, "high": t2 - t1})


def judge_into(run: LayerRun, backend: Backend, case: LayerCase, *, on_phase: Callable[[str], None] | None,
               controls: bool) -> None:
    """The verdict half of a unit's run (run_layer, verify.mtp.run_mtp): every stage's verdicts of `case` into
    run.verdicts, with `controls` their negative controls into run.controls; a stage whose kernel was not built
    for this device fails ("provenance", naming both architectures); the kernels each stage launched into
    run.provenance; run.timings_s gains "verdicts" (seconds since `since`) and "stages"."""
    since = time.perf_counter()
    if on_phase is not None:
        on_phase("verdicts")
    launched: dict = {}
    control_list = [] if controls else None
    run.verdicts = judge_layer(backend, case, timings=run.timings_s, on_phase=on_phase, provenance=launched,
                               controls=control_list)
    run.controls = control_list or []
    run.verdicts += [Verdict(stage, "provenance", "fail", msg, metrics)
                     for stage, msg, metrics in stage_mismatches(launched, case.device)]
    run.provenance = provenance_document(launched, case.device)
    run.timings_s["verdicts"] = time.perf_counter() - since
    run.timings_s["stages"] = stage_seconds(run.verdicts)
