"""The SwiGLU + requantization op, judged as two stages (moe.swiglu: h; moe.requant: h's NVFP4 bytes).

Collected once for both stages: the backend's swiglu_requant of the reference's L1 output (gate, up),
with the routing weight per row when it is applied before w2. Own check: rounding (moe.swiglu); the
requant row's checks are the generic ones (bytes against the references' quantization of the backend's
own h, sync, graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from references import moe as ref_moe
from references.stages import ROUTER, Check, Stage, stage as table_row
from verify.assertions import assert_within_ulps
from verify.backends.base import Backend
from verify.backends.protocol import QuantizedAct
from verify.verdicts.checks import Judge, Outputs, Replay
from verify.verdicts.context import JudgeContext, MoeOperands
from verify.verdicts.quantized import expected_grouped_quant

__all__ = ["JUDGE"]


@dataclass
class SwigluRequantOutputs(Outputs):
    backend: Backend
    moe: MoeOperands
    swiglu_limit: float | None
    gate: Tensor
    up: Tensor
    row_weight_f32: Tensor | None   # before_w2: each row's routing weight; None: applied in the combine
    h: Tensor                       # the backend's h
    a2: QuantizedAct                # the backend's quantization of h

    def quantized(self) -> tuple[QuantizedAct, QuantizedAct]:
        m = self.moe
        return self.a2, expected_grouped_quant(self.backend, self.h.to(torch.bfloat16), m.offsets_i64,
                                               m.l2_input_dec_f32)

    def replay(self) -> Replay:
        m = self.moe
        g_buf, u_buf = self.gate.clone(), self.up.clone()
        return Replay(lambda: self.backend.swiglu_requant(
            g_buf, u_buf, m.offsets_i32, swiglu_limit=self.swiglu_limit, row_weight_f32=self.row_weight_f32,
            input_dec_scale_f32=m.l2_input_dec_f32), (("new values", lambda: (g_buf.mul_(-0.5), u_buf.mul_(1.5))),))


def _collect_op(ctx: JudgeContext, l1: Stage) -> SwigluRequantOutputs:
    case, m = ctx.case, ctx.moe
    e, d, limit = case.emulated, m.dispatch, case.moe_spec.swiglu_limit
    gate, up = (e[l1.tensor(p)] for p in l1.parts)
    before = case.options.weight_placement == "before_w2"
    row_w = e[ROUTER.tensor("weights")][d.token_of_row_i64, d.slot_of_row_i64] if before else None
    h, a2 = ctx.backend.swiglu_requant(gate, up, m.offsets_i32, swiglu_limit=limit, row_weight_f32=row_w,
                                       input_dec_scale_f32=m.l2_input_dec_f32)
    return SwigluRequantOutputs(ctx.backend, m, limit, gate, up, row_w, h, a2)


def collect(ctx: JudgeContext, stage: Stage) -> SwigluRequantOutputs:
    """The op's outputs, collected by the first of its stages and shared with the next (moe.requant's input
    is moe.swiglu, the same op; moe.swiglu's is the L1 stage, whose reference output the op is fed)."""
    first = stage
    while table_row(first.input).op is stage.op:
        first = table_row(first.input)
    return ctx.shared(stage.op.value, lambda: _collect_op(ctx, table_row(first.input)))


def rounding(ctx: JudgeContext, stage: Stage, out: SwigluRequantOutputs, metrics: dict) -> str:
    """h within one ulp of its dtype of the exact clamped SwiGLU (a faithful rounding)."""
    __tracebackhide__ = True
    h = out.h
    h64 = ref_moe.swiglu(out.gate, out.up, limit=out.swiglu_limit, row_weight_f32=out.row_weight_f32, mode="high")
    assert_within_ulps(h, h64, ulps=1.0, label=f"{stage.name} h ({h.dtype}) vs exact")
    return f"h within one {h.dtype} ulp of the exact clamped SwiGLU ({h.numel()} elements)"


JUDGE = Judge(collect, {Check.ROUNDING: rounding})
