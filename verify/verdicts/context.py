"""What every judge is handed: the JudgeContext (the backend, the layer case, the timing sink and the
progress callback) and the MoE operands the MoE stages share, computed or prepared once per layer."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator

import torch
from torch import Tensor

from references import moe as ref_moe
from references.stages import ROUTER, Stage
from verify.backends.base import Backend
from verify.backends.protocol import QuantizedAct
from verify.verdicts.model import LayerCase
from verify.verdicts.quantized import quant_act_from_reference

__all__ = ["JudgeContext", "MoeOperands", "PROBE_TIMING"]

PROBE_TIMING = "graph_probe"  # the timing sink's key for the seconds spent in the sync and graph probes


@dataclass(frozen=True)
class MoeOperands:
    """The teacher-forced operands of the MoE stages, from the reference layer: its routing dispatched
    (expert-sorted rows, offsets), the rows of x_ffn in that order, and the static decode scales of the
    expert GEMMs' inputs (per expert; None in dynamic runs)."""

    dispatch: ref_moe.Dispatch
    rows_bf16: Tensor
    l1_input_dec_f32: Tensor | None   # max of w1's and w3's input_scale (one quantization feeds both)
    l2_input_dec_f32: Tensor | None   # w2's input_scale
    case: LayerCase

    @classmethod
    def of(cls, case: LayerCase) -> "MoeOperands":
        d = ref_moe.dispatch(case.emulated[ROUTER.tensor("ids")], case.layer.experts.w1.weight_u8.shape[0])
        s1 = s2 = None
        if case.static:
            ex = case.layer.experts
            s1 = torch.stack([ex.w1.input_scale_f32, ex.w3.input_scale_f32]).amax(0).to(torch.float32)
            s2 = ex.w2.input_scale_f32.to(torch.float32)
        return cls(d, case.x_ffn[d.token_of_row_i64], s1, s2, case)

    @property
    def offsets_i64(self) -> Tensor:
        return self.dispatch.offsets_i64

    @property
    def offsets_i32(self) -> Tensor:
        return self.dispatch.offsets_i64.to(torch.int32)

    def boundary(self, stage: Stage) -> QuantizedAct:
        """The reference's quantized activations of a grouped quantization stage (moe.act_quant,
        moe.requant): the input a GEMM stage after it is teacher forced with."""
        return quant_act_from_reference(self.case.emulated, stage, self.offsets_i64)


@dataclass
class JudgeContext:
    """Handed to every judge and check. `timings` is the caller's sink: the seconds of the sync and
    graph probes add up under PROBE_TIMING ("graph_probe"); `stage_seconds` holds each stage's seconds
    (collecting its outputs and judging its checks). `on_phase("sync probe <stage>")` /
    `("graph probe <stage>")` is called as each probe starts (progress bars)."""

    backend: Backend
    case: LayerCase
    timings: dict[str, float] = field(default_factory=dict)
    on_phase: Callable[[str], None] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    _shared: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.timings.setdefault(PROBE_TIMING, 0.0)

    @property
    def device(self) -> torch.device:
        return self.case.device

    @cached_property
    def moe(self) -> MoeOperands:
        """The MoE stages' shared reference operands (once per layer)."""
        return MoeOperands.of(self.case)

    @cached_property
    def experts(self) -> object:
        """The routed experts prepared by the backend's own host code, once per layer for every MoE stage
        (a NotImplementedError is not cached: each stage that needs them reports it)."""
        return self.backend.prepare_experts(self.case.layer.experts)

    def shared(self, key: str, collect: Callable[[], object]) -> object:
        """An op's outputs that two stages judge (swiglu_requant: moe.swiglu and moe.requant), collected once."""
        if key not in self._shared:
            self._shared[key] = collect()
        return self._shared[key]

    @contextmanager
    def probe(self, label: str, stage: str) -> Iterator[None]:
        """Time one sync / graph probe into the sink and report it to on_phase."""
        if self.on_phase is not None:
            self.on_phase(f"{label} {stage}")
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[PROBE_TIMING] = self.timings.get(PROBE_TIMING, 0.0) + time.perf_counter() - t

    @contextmanager
    def timed_stage(self, stage: Stage) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage.name] = self.stage_seconds.get(stage.name, 0.0) + time.perf_counter() - t
