"""The grouped GEMM stages (moe.l1: gate and up; moe.l2): expert-sorted NVFP4 rows x the expert stack.

Collected: the backend's grouped_gemm on the reference's quantized activations of the stage's input
(teacher forcing: moe.act_quant for l1, moe.requant for l2) with the experts it prepared once per layer.
Own checks: bound (each part within the accumulation bound of the float64 product of the same operands);
mode (judges.mode: the outputs against every NVFP4 mode, w4a4 on the teacher-forced boundary, w4a16 / w4a8 /
bf16 on the stage's unquantized rows: x_ffn's for l1, the reference's bf16 h for l2); prepare (judges.prepare:
the backend's prepared expert stacks decoded back by its dequantize_prepared, once per layer).
grouped_gemm takes NVFP4 activations (protocol.QuantizedAct): a backend declaring another mode for it is
skipped by the mode check with that reason (its mode shows on moe.block and the dense linears).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from references import layouts as ref_layouts
from references.gemm import grouped_gemm_error_bound
from references.modes import W4A4, grouped_mode_gemm_f64, modes_of_weight
from references.nvfp4 import decode_nvfp4_block_scaled
from references.stages import MOE_SWIGLU, Check, Op, Stage, stage as table_row
from verify.backends.base import Backend
from verify.backends.protocol import QuantizedAct
from verify.assertions import assert_within_gemm_bound
from verify.reference_layer import to_reference_weight
from verify.verdicts.checks import Batch, Judge, Outputs, Padding, Replay, Skipped, Subset
from verify.verdicts.context import JudgeContext
from verify.verdicts.judges.mode import ModeCase, candidate_bound, declared_mode, mode
from verify.verdicts.judges.prepare import ROLES, own_stack_if_it_differs, prepare, scan_prepared_experts
from verify.verdicts.intervals import nonempty_experts
from verify.verdicts.quantized import clone_act, grouped_bound, grouped_f64, nan_inf

__all__ = ["JUDGE"]


@dataclass
class GroupedGemmOutputs(Outputs):
    backend: Backend
    stage: Stage
    layer: str                 # "l1" / "l2": grouped_gemm's argument
    experts: object            # the backend's prepared experts
    a: QuantizedAct            # the teacher-forced activations
    offsets_i64: Tensor
    ys: tuple[Tensor, ...]     # one output per part (l1: gate, up; l2: y)
    ctx: JudgeContext | None = None  # the layer (checkpoint stacks, unquantized rows) for the mode / prepare checks

    def _weights(self) -> list[tuple[str, str, object]]:
        """(label, role, checkpoint stack) per part: l1 gate w1, up w3; l2 y w2."""
        experts = self.ctx.case.layer.experts
        return [(label, role.removeprefix("experts."), getattr(experts, role.removeprefix("experts.")))
                for label, role in zip(self.stage.parts or ("y",), self.stage.weights)]

    def _scan(self) -> object:
        """The prepare scan of the backend's three prepared stacks against the checkpoint's
        (judges.prepare.scan_prepared_experts: decoded a bounded chunk of experts at a time, only the per-role
        tallies kept), once per layer: {role: StackTally}, or the exception it raised (NotImplementedError:
        no dequantize_prepared; AssertionError: a wrong shape or dtype)."""
        def scan():
            experts = self.ctx.case.layer.experts
            try:
                return scan_prepared_experts(self.backend, self.experts, {r: getattr(experts, r) for r in ROLES})
            except (NotImplementedError, AssertionError) as exc:
                return exc
        return self.ctx.shared("prepare scan experts", scan)

    def own(self, role: str):
        """The backend's own decoded stack of `role` ("w1" / "w3" / "w2") when it differs from the checkpoint's
        (the prepare check fails it), else None: a judges.prepare.OwnStack, own[e] decoded a chunk at a time as
        the GEMM judges read the experts the routed rows reach."""
        scan = self._scan()
        return None if isinstance(scan, Exception) else own_stack_if_it_differs(self.backend, self.experts, scan, role)

    def modes(self) -> list[ModeCase]:
        declared = declared_mode(self.backend, Op.GROUPED_GEMM, "nvfp4")
        if declared != W4A4:
            raise Skipped(f"mode: {self.backend.name} declares grouped_gemm {declared}, but grouped_gemm takes NVFP4 "
                          "activations (protocol.QuantizedAct): its mode shows on moe.block and the dense linears")
        m = self.ctx.moe
        rows = m.rows_bf16 if self.layer == "l1" else self.ctx.case.emulated[MOE_SWIGLU.name].to(torch.bfloat16)
        scales = m.l1_input_dec_f32 if self.layer == "l1" else m.l2_input_dec_f32
        cases = []
        for (label, role, lin), y in zip(self._weights(), self.ys):
            own = self.own(role)

            def candidates(lin=lin, y=y, own=own):
                w = to_reference_weight(lin)
                out = {W4A4: grouped_f64(self.backend, self.a, self.offsets_i64, lin, y.dtype) if own is None else
                       _on_own_weights(self.backend, self.a, self.offsets_i64, own, y.dtype)}
                for md in modes_of_weight(w):
                    if md in out:
                        continue
                    y64, abs_dot, alpha = grouped_mode_gemm_f64(rows, self.offsets_i64, w, md, recipe=self.backend.recipe,
                                                                input_scale_f32=scales, w_values=own)
                    bnd = candidate_bound(self.backend, md, y64, abs_dot, alpha, k=rows.shape[1], out_dtype=y.dtype)
                    out[md] = (y64, bnd if own is None else bnd + 3 * 2.0**-24 * alpha.double().abs() * abs_dot)
                return out
            note = " (on the backend's own prepared weight, which the prepare check fails)" if own is not None else ""
            cases.append(ModeCase(f"{self.stage.name}.{label}" if self.stage.parts else self.stage.name, y, declared,
                                  candidates, note))
        return cases

    def prepared_weights(self, ctx: JudgeContext) -> list[tuple[str, str, object, object]]:
        scan = self._scan()
        if isinstance(scan, Exception):
            raise scan
        return [(f"{self.stage.name} experts.{role} stack", label, scan[role], lin)
                for label, role, lin in self._weights()]

    def run(self, act: QuantizedAct, offsets_i32: Tensor):
        return self.backend.grouped_gemm(act, offsets_i32, self.experts, layer=self.layer)

    def batch(self, metrics: dict) -> Batch:
        """The first expert that has rows: its rows alone give the bits they have among all experts' rows."""
        a, off_i64 = self.a, self.offsets_i64
        counts = (off_i64[1:] - off_i64[:-1]).tolist()
        e = max(range(len(counts)), key=lambda i: (counts[i] > 0, -i if counts[i] > 0 else 0))
        lo, hi = int(off_i64[e]), int(off_i64[e + 1])
        sub_off = torch.zeros_like(off_i64)
        sub_off[e + 1:] = hi - lo
        sf_lin = ref_layouts.sf_grouped_swizzled_128x4_to_linear(a.sf_swizzled_u8, off_i64, cols=a.k // 16)
        sub = QuantizedAct(a.packed_u8[lo:hi].contiguous(),
                           ref_layouts.sf_grouped_linear_to_swizzled_128x4(sf_lin[lo:hi], sub_off)[0], a.global_dec_f32)
        total = int(off_i64[-1])
        return Batch(lambda: self.run(a, off_i64.to(torch.int32)), (Subset(
            f"{self.stage.name} expert {e}'s {hi - lo} rows alone vs among {total} rows",
            lambda: self.run(sub, sub_off.to(torch.int32)),
            lambda full: tuple(f[lo:hi] for f in (full if isinstance(full, tuple) else (full,)))),),
            f"expert {e}'s {hi - lo} rows alone are bit-equal to the same rows among all {total}")

    def padding(self) -> Padding:
        a, off_i64 = self.a, self.offsets_i64
        real, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(
            torch.ones(int(off_i64[-1]), a.k // 16, dtype=torch.uint8, device=off_i64.device), off_i64)
        pad = torch.ones_like(a.sf_swizzled_u8, dtype=torch.bool)
        pad[:real.shape[0]] = real == 0
        off_i32 = off_i64.to(torch.int32)
        return Padding(lambda act: self.run(act, off_i32), a, pad)

    def replay(self) -> Replay:
        a, off_i32 = self.a, self.offsets_i64.to(torch.int32)
        a_buf = clone_act(a)
        return Replay(lambda: self.run(a_buf, off_i32), (
            ("new values (every code negated)", lambda: a_buf.packed_u8.copy_(a.packed_u8 ^ 0x88)),
            ("new global scales", lambda: a_buf.global_dec_f32.mul_(2.0))))


def _on_own_weights(backend: Backend, a: QuantizedAct, offsets_i64: Tensor, own,
                    out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(y64, bound) of the grouped GEMM on the boundary activations a and the backend's own decoded stack
    own [E, N, K] (float32 values, weight_scale_2 included; own[e] read for the experts that have rows, in order): per expert a_dec[e] * A_e @ own[e]^T, the bound of
    references.gemm.grouped_gemm_error_bound plus 3 float32 unit roundoffs (own's rounding, the kernel's alpha)."""
    k = a.k
    a_sf = ref_layouts.sf_grouped_swizzled_128x4_to_linear(a.sf_swizzled_u8, offsets_i64, cols=k // 16)
    a64 = decode_nvfp4_block_scaled(a.packed_u8, a_sf, dtype=torch.float64)
    y64 = torch.zeros(a64.shape[0], own.shape[1], dtype=torch.float64, device=a64.device)
    abs_dot = torch.zeros_like(y64)
    for e, lo, hi in nonempty_experts(offsets_i64):
        w = own[e].to(a64.device).double()
        y64[lo:hi] = (a64[lo:hi] @ w.T) * a.global_dec_f32.reshape(-1)[e].double()
        abs_dot[lo:hi] = a64[lo:hi].abs() @ w.abs().T
    dec = a.global_dec_f32.to(torch.float32).reshape(-1)
    bound = grouped_gemm_error_bound(abs_dot, y64, dec, offsets_i64, k=k, u_acc=backend.u_acc, out_dtype=out_dtype)
    counts = (offsets_i64[1:] - offsets_i64[:-1]).to(dec.device)
    dec_rows = torch.repeat_interleave(dec.double().abs(), counts).unsqueeze(-1).to(abs_dot.device)
    return y64, bound + 3 * 2.0**-24 * dec_rows * abs_dot


def collect(ctx: JudgeContext, stage: Stage) -> GroupedGemmOutputs:
    m = ctx.moe
    a = m.boundary(table_row(stage.input))
    layer = stage.name.removeprefix("moe.")
    y = ctx.backend.grouped_gemm(a, m.offsets_i32, ctx.experts, layer=layer)
    return GroupedGemmOutputs(ctx.backend, stage, layer, ctx.experts, a, m.offsets_i64,
                              y if isinstance(y, tuple) else (y,), ctx)


def bound(ctx: JudgeContext, stage: Stage, out: GroupedGemmOutputs, metrics: dict) -> str:
    """Each part (l1: gate with w1, up with w3; l2: y with w2) within the grouped GEMM's accumulation bound;
    each part's NaN / Inf counts are in the metrics also when its bound fails."""
    __tracebackhide__ = True
    experts = ctx.case.layer.experts
    msgs, own_roles = [], []
    for label, role, y in zip(stage.parts or ("y",), stage.weights, out.ys):
        w = getattr(experts, role.removeprefix("experts."))
        own = out.own(role.removeprefix("experts."))
        if own is None:
            msgs.append(grouped_bound(stage.name, ctx.backend, out.a, out.offsets_i64, w, y, label, metrics))
            continue
        own_roles.append(role)
        y64, bnd = _on_own_weights(ctx.backend, out.a, out.offsets_i64, own, y.dtype)
        metrics.update(nan_inf(y, label))
        ratio = assert_within_gemm_bound(y, y64, bnd, label=f"{stage.name} {label}")
        metrics[f"bound_ratio_{label}"] = ratio
        msgs.append(f"{label}: max |y - y64| / bound = {ratio:.3g}")
    note = (f"; judged on the backend's own prepared {', '.join(own_roles)} (dequantize_prepared), which differ from "
            "the checkpoint's: the prepare check fails them") if own_roles else ""
    return f"{'; '.join(msgs)} (u_acc {ctx.backend.u_acc:.3g}, K={out.a.k}){note}"


def _ops(ctx: JudgeContext, stage: Stage, check: Check) -> tuple[Op, ...]:
    """prepare: the backend's prepare (and dequantize_prepared, which the check asks for); the rest: the
    stage's op (its prepared experts are collected with it)."""
    return (Op.PREPARE,) if check is Check.PREPARE else (stage.op,)


JUDGE = Judge(collect, {Check.BOUND: bound, Check.MODE: mode, Check.PREPARE: prepare}, _ops)
