"""The grouped quantization stage (moe.act_quant): expert-sorted rows, one global scale per expert.

Collected: the backend's grouped_quantize of x_ffn's rows in the reference dispatch's order. Checks:
the generic ones only (bytes against the references' grouped quantization, sync, graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from references.stages import Stage
from verify.backends.base import Backend
from verify.backends.protocol import QuantizedAct
from verify.verdicts.checks import Judge, Outputs, Replay
from verify.verdicts.context import JudgeContext, MoeOperands
from verify.verdicts.quantized import expected_grouped_quant

__all__ = ["JUDGE"]


@dataclass
class ActQuantOutputs(Outputs):
    backend: Backend
    moe: MoeOperands
    got: QuantizedAct

    def quantized(self) -> tuple[QuantizedAct, QuantizedAct]:
        m = self.moe
        return self.got, expected_grouped_quant(self.backend, m.rows_bf16, m.offsets_i64, m.l1_input_dec_f32)

    def replay(self) -> Replay:
        m, rows = self.moe, self.moe.rows_bf16
        rows_buf = rows.clone()
        return Replay(lambda: self.backend.grouped_quantize(rows_buf, m.offsets_i32,
                                                            input_dec_scale_f32=m.l1_input_dec_f32),
                      (("new values", lambda: rows_buf.copy_((rows.roll(1, 0) * -0.75).to(torch.bfloat16))),))


def collect(ctx: JudgeContext, stage: Stage) -> ActQuantOutputs:
    m = ctx.moe
    return ActQuantOutputs(ctx.backend, m, ctx.backend.grouped_quantize(m.rows_bf16, m.offsets_i32,
                                                                        input_dec_scale_f32=m.l1_input_dec_f32))


JUDGE = Judge(collect)
