"""The MXFP4 expert stages of DeepSeek-V4's MTP block (mtp.experts.l1: gate and up; mtp.experts.l2), W4A8.

Collected (teacher forcing): the stage's input rows from the reference (l1: mtp.x_ffn through every stored
expert, expert-major, references.mtp.expert_major_rows; l2: the reference's mtp.experts.swiglu rows), the
offsets e * T, the backend's FP8 1x128 quantization of those rows under "ue8m0_ceil" (bytes: compared with
references/fp8_act.py FP8_ACT_UE8M0, the W4A8 activations of references.mtp), and its one-call
grouped_linear_mxfp4 with the experts it prepared (prepare_experts of the MXFP4 stacks).

Own check: bound. Each part within gemm_error_bound of the float64 product of the references' FP8 1x128
activations and the checkpoint's MXFP4 weight (references.mxfp4, every product exact), per expert, over
all of K with the backend's declared FP8 accumulator (verify.backends.base.declared_fp8_accumulator: the
activations are FP8, the tensor-core path an FP8 one). A declared float32 promotion interval makes the true
error smaller than that one-chunk bound, never larger, so the bound stays rigorous (no backend with a
promotion interval serves this op yet; the emulator's float64 sum is one chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from references.fp8_act import FP8_ACT_UE8M0, quantize_act_fp8_1x128
from references.gemm import gemm_error_bound
from references.mtp import expert_major_rows
from references.mxfp4 import Mxfp4Weight, mxfp4_abs_dot_f64, mxfp4_gemm_f64
from references.stages import MTP_EXPERTS_L1, Check, Op, Stage
from verify.assertions import assert_within_gemm_bound
from verify.backends.base import Backend, declared_fp8_accumulator
from verify.backends.protocol import Fp8QuantizedAct
from verify.metrics import stage_metrics
from verify.verdicts.checks import Batch, Judge, Outputs, Replay, Subset
from verify.verdicts.context import JudgeContext
from verify.verdicts.quantized import nan_inf

__all__ = ["JUDGE", "SCALE_RULE"]

SCALE_RULE = "ue8m0_ceil"  # the W4A8 activations of the MTP experts (references.mtp)


@dataclass
class Mxfp4ExpertsOutputs(Outputs):
    backend: Backend
    stage: Stage
    layer: str                   # "l1" / "l2": grouped_linear_mxfp4's argument
    weights: tuple[Mxfp4Weight, ...]  # the checkpoint stacks of the stage's parts (references' view)
    rows: Tensor                 # bf16 [E*T, K], expert-major
    offsets_i64: Tensor          # [E+1]
    act: Fp8QuantizedAct | None  # the backend's quantize_fp8(rows)
    experts: object | None       # the backend's prepared experts
    ys: tuple[Tensor, ...]       # one output per part (l1: gate, up; l2: y); () when not served

    def run(self, rows: Tensor, offsets_i64: Tensor):
        return self.backend.grouped_linear_mxfp4(rows, offsets_i64.to(torch.int32), self.experts, layer=self.layer)

    def quantized(self) -> list[tuple[Fp8QuantizedAct, Fp8QuantizedAct]]:
        q = quantize_act_fp8_1x128(self.rows, recipe=FP8_ACT_UE8M0)
        return [(self.act, Fp8QuantizedAct(q.e4m3_u8, q.block_dec_scale, SCALE_RULE))]

    def batch(self, metrics: dict) -> Batch:
        """The first row of the first expert and the last row of the last, each alone (the other experts
        given no rows), give the bits they have among all the rows."""
        off = self.offsets_i64
        e_n, total = off.numel() - 1, int(off[-1])
        picks = [(0, int(off[0])), (e_n - 1, int(off[-1]) - 1)]

        def alone(e: int, r: int):
            sub = torch.zeros_like(off)
            sub[e + 1:] = 1
            return self.run(self.rows[r:r + 1].contiguous(), sub)

        def inside(full, r: int):
            return tuple(f[r:r + 1] for f in (full if isinstance(full, tuple) else (full,)))

        return Batch(lambda: self.run(self.rows, off), tuple(
            Subset(f"{self.stage.name} expert {e} row {r} alone vs among {total} rows", lambda e=e, r=r: alone(e, r),
                   lambda full, r=r: inside(full, r)) for e, r in picks),
            f"rows {[r for _, r in picks]} alone are bit-equal to the same rows among all {total}")

    def replay(self) -> Replay:
        buf = self.rows.clone()
        return Replay(lambda: self.run(buf, self.offsets_i64),
                      (("new values", lambda: buf.copy_((self.rows.roll(1, 0) * -0.75).to(torch.bfloat16))),))


def _stage_rows(ctx: JudgeContext, stage: Stage) -> tuple[Tensor, Tensor]:
    experts = ctx.case.layer.experts
    e_n = experts.w1.weight_u8.shape[0]
    x = ctx.case.emulated[stage.input].to(torch.bfloat16)
    if stage is MTP_EXPERTS_L1:
        rows, off = expert_major_rows(x, e_n)
    else:  # l2: the reference's swiglu rows are already expert-major
        t = x.shape[0] // e_n
        rows, off = x, torch.arange(e_n + 1, dtype=torch.int64, device=x.device) * t
    return rows.contiguous(), off


def _weights(ctx: JudgeContext, stage: Stage) -> tuple[Mxfp4Weight, ...]:
    ex = ctx.case.layer.experts
    by_role = {"mtp.experts.w1": ex.w1, "mtp.experts.w3": ex.w3, "mtp.experts.w2": ex.w2}
    return tuple(Mxfp4Weight(by_role[r].weight_u8, by_role[r].scale_ue8m0, by_role[r].module) for r in stage.weights)


_OPS = (Op.PREPARE, Op.GROUPED_LINEAR_MXFP4)


def _ops(ctx: JudgeContext, stage: Stage, check: Check) -> tuple[Op, ...]:
    """bytes needs only the FP8 quantizer; every other check the backend's prepare and grouped_linear_mxfp4."""
    return (Op.QUANTIZE_FP8,) if check is Check.BYTES else _OPS


def collect(ctx: JudgeContext, stage: Stage) -> Mxfp4ExpertsOutputs:
    b = ctx.backend
    rows, off = _stage_rows(ctx, stage)
    layer = "l1" if stage is MTP_EXPERTS_L1 else "l2"
    act = b.quantize_fp8(rows, scale_rule=SCALE_RULE) if b.unsupported_reason(Op.QUANTIZE_FP8, ctx.device) is None \
        else None
    out = Mxfp4ExpertsOutputs(b, stage, layer, _weights(ctx, stage), rows, off, act, None, ())
    if all(b.unsupported_reason(op, ctx.device) is None for op in _OPS):
        out.experts = b.prepare_experts(ctx.case.layer.experts)
        y = out.run(rows, off)
        out.ys = y if isinstance(y, tuple) else (y,)
    return out


def bound(ctx: JudgeContext, stage: Stage, out: Mxfp4ExpertsOutputs, metrics: dict) -> str:
    """Each part's output within the accumulation bound of the exact-product float64 GEMM (module docstring)."""
    __tracebackhide__ = True
    u, _ = declared_fp8_accumulator(ctx.backend)
    act = quantize_act_fp8_1x128(out.rows, recipe=FP8_ACT_UE8M0)
    off = [int(v) for v in out.offsets_i64.tolist()]
    k = out.rows.shape[1]
    msgs = []
    for part, w, y in zip(stage.parts or (None,), out.weights, out.ys):
        label, key = stage.tensor(part), part or "y"
        y64 = torch.zeros(y.shape, dtype=torch.float64, device=y.device)
        abs_dot = torch.zeros_like(y64)
        for e in range(w.num_experts):
            lo, hi = off[e], off[e + 1]
            if lo < hi:
                sub = type(act)(act.e4m3_u8[lo:hi], act.block_dec_scale[lo:hi], act.scale_storage)
                y64[lo:hi] = mxfp4_gemm_f64(sub, w.expert(e))
                abs_dot[lo:hi] = mxfp4_abs_dot_f64(sub, w.expert(e))
        bnd = gemm_error_bound(abs_dot, y64, torch.ones((), dtype=torch.float32), k=k, u_acc=u, out_dtype=y.dtype)
        metrics.update(nan_inf(y, key))
        ratio = assert_within_gemm_bound(y, y64, bnd, label=label)
        metrics[f"bound_ratio_{key}"] = ratio
        metrics[f"vs_high_{key}"] = stage_metrics(y.double(), ctx.case.high[label].double())
        msgs.append(f"{label}: max |y - y64| / bound = {ratio:.3g}")
    return f"{'; '.join(msgs)} (FP8 u_acc {u:.3g}, K={k}, mxfp4 W4A8, {out.weights[0].num_experts} experts)"


JUDGE = Judge(collect, {Check.BOUND: bound}, _ops)
