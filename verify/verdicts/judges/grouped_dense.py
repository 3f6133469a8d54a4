"""The grouped dense linear stage (DeepSeek-V4's attention output projection attn.wo_a): one call.

The op (verify.backends.base.Backend.grouped_dense_linear): x [T, g*d] (the stage input, the emulated wq_b output as
the stand-in for the attention core's) and the backend's prepare_linear of the WHOLE checkpoint linear [g*r, d] ->
[T, g*r], group gi's columns of x times row block gi of W (einsum "tgd,grd->tgr"), x quantized once as a whole like
any dense linear of the weight's format. The number of groups is x's width over the weight's K.

The checks are the dense linear's (verify.verdicts.judges.dense), on the stage as a whole: bytes (the backend's
quantize / quantize_fp8 of the whole x: FP8's 1x128 and NVFP4's 1x16 blocks never straddle a group, d being a
multiple of both), prepare (the whole weight decoded back), bound and mode (dense's bound and mode functions; the
candidates of each mode are built per group on the REFERENCE side: FP8 block-128 with the backend's FP8 accumulator,
dense._unquantized_act_bound on x's group columns and a row block of the checkpoint linear; the other modes with x
quantized once as a whole, references.modes.grouped_linear_mode_gemm_f64, and the accumulation bound over K = d),
batch, sync and graph of the one call. No padding check: the op takes bf16 and quantizes inside the call, so there
is no NVFP4 boundary activation whose scale padding could be filled. When the backend's decoded weight differs from
the checkpoint's (prepare fails it), bound and mode judge the products on the backend's own weight, as the dense
judge does: one failure, where it belongs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from references.modes import FP8_BLOCK, grouped_linear_mode_gemm_f64, modes_of_weight
from references.stages import Check, Op, Stage
from verify.backends.base import Backend
from verify.backends.emulator import fp8_act_scale_fmt
from verify.reference_layer import to_reference_weight
from verify.verdicts.checks import Batch, Judge, Replay, row_batch
from verify.verdicts.context import JudgeContext
from verify.metrics import stage_metrics
from verify.verdicts.judges.dense import (DenseOutputs, _accumulator_words, _batch_static_scale, _fp8_scale_rules,
                                          _input, _is_fp8, _is_nvfp4, _linear_of, _mode_judged,
                                          _own_weight_slack, _static_scale, _unquantized_act_bound)
from verify.verdicts.judges.mode import candidate_bound, declared_mode, mode
from verify.verdicts.judges.prepare import prepare
from verify.verdicts.quantized import nan_inf

__all__ = ["JUDGE", "row_block"]

_FP8_BLOCK_ROWS = 128
_OPS = (Op.PREPARE, Op.GROUPED_DENSE_LINEAR)


def row_block(lin, gi: int, groups: int):
    """Rows gi*r:(gi+1)*r of a checkpoint linear [g*r, d] as a linear of its own kind (the REFERENCE side of the
    bound only; never given to a backend). FP8 block-128: the block-scale rows of those rows, which needs each
    group's rows inside whole 128-row blocks (r a multiple of 128, or a divisor of it)."""
    n = lin.n
    r = n // groups
    lo, hi = gi * r, (gi + 1) * r
    if lin.format == "nvfp4":
        return dataclasses.replace(lin, weight_u8=lin.weight_u8[lo:hi], weight_scale_e4m3=lin.weight_scale_e4m3[lo:hi])
    if lin.format == "bf16":
        return dataclasses.replace(lin, weight_bf16=lin.weight_bf16[lo:hi])
    if lin.format != "fp8_block128":
        raise ValueError(f"{lin.module}: a {lin.format} weight has no grouped dense linear")
    if r % _FP8_BLOCK_ROWS and _FP8_BLOCK_ROWS % r:
        raise ValueError(f"{lin.module}: a group's {r} rows straddle the 128-row weight blocks")
    s_lo, s_n = lo // _FP8_BLOCK_ROWS, -(-r // _FP8_BLOCK_ROWS)
    cut = (lambda s: None if s is None else s[s_lo:s_lo + s_n])
    return dataclasses.replace(lin, weight_e4m3=lin.weight_e4m3[lo:hi], scale_ue8m0=cut(lin.scale_ue8m0),
                               scale_inv_f32=cut(lin.scale_inv_f32))


def grouped_candidates(backend: Backend, x: Tensor, lin, groups: int, scale: Tensor | None, out_dtype: torch.dtype,
                       own: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """{mode: (y64 [T, g*r], bound)} for every mode the weight allows (module docstring). own: the backend's own
    decoded weight [g*r, d] when it differs from the checkpoint's (prepare fails it): the products on it, the bound
    widened by dense._own_weight_slack, as the dense judge does."""
    w = to_reference_weight(lin)
    d = x.shape[1] // groups
    cands = {}
    for m in modes_of_weight(w):
        if m == FP8_BLOCK and own is None:
            per_group = [_unquantized_act_bound(backend, x[:, gi * d:(gi + 1) * d], row_block(lin, gi, groups),
                                                out_dtype) for gi in range(groups)]
            cands[m] = tuple(torch.cat(parts, dim=1) for parts in zip(*per_group))
            continue
        y64, abs_dot, alpha = grouped_linear_mode_gemm_f64(x, w, m, groups=groups, w_values=own, recipe=backend.recipe,
                                                           input_scale_f32=scale, fp8_scale_fmt=fp8_act_scale_fmt(w))
        bnd = candidate_bound(backend, m, y64, abs_dot, alpha, k=d, out_dtype=out_dtype)
        cands[m] = (y64, bnd if own is None else bnd + _own_weight_slack(abs_dot, alpha))
    return cands


@dataclasses.dataclass
class GroupedDenseOutputs(DenseOutputs):
    groups: int = 1

    def declared(self) -> str:
        if self.weight_format is None:
            return super().declared()  # BF16: Skipped, one mode
        return declared_mode(self.backend, Op.GROUPED_DENSE_LINEAR, self.weight_format)

    def candidates(self, i: int) -> dict[str, tuple[Tensor, Tensor]]:
        if i not in self._candidates:
            self._candidates[i] = grouped_candidates(self.backend, self.x, self.lins[0], self.groups, self.scale,
                                                     self.y_linear[0].dtype, self.own_weight(0))
        return self._candidates[i]

    def _run(self, x: Tensor, scale: Tensor | None) -> Tensor:
        return self.backend.grouped_dense_linear(x, self.prepared[0], groups=self.groups, input_dec_scale_f32=scale)

    def batch(self, metrics: dict) -> Batch:
        x = self.x
        scale = self.scale if self.scale is not None or not self.nvfp4 else _batch_static_scale(x)
        return row_batch(self.stage.name, x, lambda xx: self._run(xx, scale))

    def padding(self):
        raise TypeError("grouped_dense_linear: no NVFP4 boundary activation (check padding)")

    def replay(self) -> Replay:
        x_buf = self.x.clone()
        s_buf = None if self.scale is None else self.scale.clone()
        muts = [("new values", lambda: x_buf.copy_((self.x.roll(1, 0) * -0.75).to(torch.bfloat16)))]
        if s_buf is not None:
            muts.append(("a new static scale", lambda: s_buf.mul_(1.5)))
        return Replay(lambda: self._run(x_buf, s_buf), tuple(muts))


def _ops(ctx: JudgeContext, stage: Stage, check: Check) -> tuple[Op, ...]:
    """bytes: only the quantizer of the weight's format; prepare: prepare; the others: prepare and the one call."""
    lins = [_linear_of(ctx.case, stage.weights[0])]
    if check is Check.BYTES:
        return (Op.QUANTIZE,) if _is_nvfp4(lins) else (Op.QUANTIZE_FP8,) if _is_fp8(lins) else ()
    return (Op.PREPARE,) if check is Check.PREPARE else _OPS


def collect(ctx: JudgeContext, stage: Stage) -> GroupedDenseOutputs:
    """The whole x quantized by the backend (bytes) and its one grouped call, for the ops it serves."""
    b, case = ctx.backend, ctx.case
    lin = _linear_of(case, stage.weights[0])
    x = _input(case, stage).contiguous()
    groups, rest = divmod(x.shape[1], lin.k)
    if rest or groups < 1 or lin.n % groups:
        raise ValueError(f"{stage.name}: input {tuple(x.shape)} is not groups x the weight's K={lin.k} with groups "
                         f"dividing N={lin.n}")
    served = all(b.unsupported_reason(op, ctx.device) is None for op in _OPS)
    prepared = [b.prepare_linear(lin)] if served else []
    scale = _static_scale(case, stage.weights[0]) if _is_nvfp4([lin]) else None
    a = b.quantize(x, input_dec_scale_f32=scale) \
        if _is_nvfp4([lin]) and b.unsupported_reason(Op.QUANTIZE, ctx.device) is None else None
    fp8_acts = [b.quantize_fp8(x, scale_rule=rule) for rule in _fp8_scale_rules([lin])] \
        if _is_fp8([lin]) and b.unsupported_reason(Op.QUANTIZE_FP8, ctx.device) is None else []
    y = [b.grouped_dense_linear(x, w, groups=groups, input_dec_scale_f32=scale) for w in prepared]
    return GroupedDenseOutputs(b, case, stage, x, [lin], prepared, scale, a, [], y, fp8_acts, groups=groups)


def bound(ctx: JudgeContext, stage: Stage, out: GroupedDenseOutputs, metrics: dict) -> str:
    """The one call vs its declared mode's float64 product and bound, built per group (grouped_candidates); an
    output of another mode passes here and fails the mode check (dense._mode_judged)."""
    __tracebackhide__ = True
    y, lin = out.y_linear[0], out.lins[0]
    metrics.update(nan_inf(y, "y"))
    msg = _mode_judged(out, 0, stage.name, metrics, "bound_ratio_y", prefix="max |y - y64| / bound = ")
    metrics["vs_high_y"] = stage_metrics(y.double(), ctx.case.high[stage.name].double())
    note = ("; judged on the backend's own prepared weight (dequantize_prepared), which differs from the "
            "checkpoint's: the prepare check fails it") if out.own_weight(0) is not None else ""
    return (f"{msg} ({_accumulator_words(ctx.backend, lin)}, {out.groups} groups of K={out.x.shape[1] // out.groups}, "
            f"{lin.format}){note}")


JUDGE = Judge(collect, {Check.BOUND: bound, Check.MODE: mode, Check.PREPARE: prepare}, _ops)
