"""The dense linear stages (attention projections, shared expert, dense MLP): quantize + dense GEMM.

Collected: the backend's quantized activations of the stage's input (NVFP4 weights: quantize; FP8
block-128 weights: quantize_fp8 under the scale rule each part's weight implies), its dense GEMM on them
(NVFP4) and its one-call dense_linear, per part of the stage (shared.l1: gate, up). Own check: bound.

bytes of an FP8 block-128 stage: the backend's quantize_fp8 of the stage input, with the activation scale
rule the checkpoint weight's block scales imply (verify.backends.emulator.fp8_act_scale_fmt: power-of-two
scales, as V4's E8M0 `.scale`, -> "ue8m0_ceil"; float32 ones, V3, -> "f32"), equals references/fp8_act.py
(FP8_ACT_UE8M0 / FP8_ACT_F32) byte for byte: E4M3 codes, UE8M0 scale bytes or float32 scale bits
(verify.verdicts.quantized.check_fp8_quantized). The rule comes from the checkpoint, not from the backend's
prepared weight, so a prepare bug is the bound's to find.

FP8 block-128 weights are judged with the backend's declared FP8 accumulator
(verify.backends.base.declared_fp8_accumulator), not its NVFP4 u_acc: with a promotion interval (sm90:
about 14 bits, u = 2^-13, inside each 128-K group, promoted to float32 every 128) the bound is
references.fp8_gemm.fp8_block_gemm_error_bound on the references' 1x128 activations and the checkpoint
weight; without one (one chunk: all of K in one accumulator, rounded once, as the emulator's float64
GEMM) it is gemm_error_bound over K with that unit roundoff (the FP8 block bound would add a float32
promotion such a kernel does not do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from references import layouts as ref_layouts
from references.fp8_act import FP8_ACT_F32, FP8_ACT_UE8M0, quantize_act_fp8_1x128
from references.fp8_gemm import fp8_block_gemm_error_bound, fp8_block_gemm_f64
from references.fp8_weight import (Fp8BlockScaledWeight, fp8_weight_from_v3_weight_scale_inv,
                                   fp8_weight_from_v4_e8m0_scale)
from references.gemm import gemm_error_bound, nvfp4_gemm_f64
from references.linear import act_global_dec_f32, nvfp4_global_scale_for, quantized_operands
from references.modes import FP8_BLOCK, mode_gemm_f64, mode_gemm_f64_on, modes_of_weight
from references.nvfp4 import decode_nvfp4_block_scaled, quantize_nvfp4
from references.stages import FUSED_INPUT_ROLES, INPUT_ATTN, INPUT_FFN, Check, Op, Stage
from verify.assertions import assert_within_gemm_bound
from verify.backends.emulator import fp8_act_recipe_for_rule, fp8_act_scale_fmt
from verify.backends.base import Backend, declared_fp8_accumulator
from verify.backends.protocol import Fp8QuantizedAct, QuantizedAct
from verify.metrics import stage_metrics
from verify.reference_layer import to_reference_weight
from verify.verdicts.checks import Batch, Judge, Outputs, Padding, Replay, Skipped, row_batch
from verify.verdicts.context import JudgeContext
from verify.verdicts.model import LayerCase
from verify.verdicts.judges.mode import ModeCase, candidate_bound, declared_mode, mode, mode_ratio
from verify.verdicts.judges.prepare import dequantized_by_backend, own_weight_if_it_differs, prepare
from verify.verdicts.quantized import nan_inf

__all__ = ["JUDGE"]


def _roles(stage: Stage) -> list[tuple[str | None, str]]:
    """(part, weight role) of a dense linear stage: shared.l1 -> [("gate", "shared.w1"), ("up", "shared.w3")]."""
    if stage.parts:
        return list(zip(stage.parts, stage.weights))
    return [(None, stage.weights[0])]


def _linear_of(case: LayerCase, role: str):
    group, name = role.split(".", 1)
    lw = case.layer
    if group == "attn":
        return lw.attention[name]
    if group == "indexer":  # V4's indexer wq_b: the loader keeps it with attention as "indexer.wq_b"
        return lw.attention[role]
    if group == "mtp":  # the MTP block's e_proj / h_proj (verify.checkpoint.MtpWeights)
        return lw.projections[name]
    mlp = {"shared": lw.shared_experts, "dense": lw.dense_mlp}[group]
    return getattr(mlp, name)


def _fused_partner(role: str) -> str | None:
    group = next((g for g in FUSED_INPUT_ROLES if role in g), ())
    return next((r for r in group if r != role), None)


def _input(case: LayerCase, stage: Stage) -> Tensor:
    if stage.input == INPUT_ATTN:
        return case.x_attn
    if stage.input == INPUT_FFN:
        return case.x_ffn
    return case.emulated[stage.input].to(torch.bfloat16)


def _static_scale(case: LayerCase, role: str) -> Tensor | None:
    """The static activation decode scale of a dense linear: its input_scale, the max with its fused
    partner's (one quantization feeds both GEMMs)."""
    if not case.static:
        return None
    lin = _linear_of(case, role)
    partner = _fused_partner(role)
    scales = [lin.input_scale_f32]
    if partner is not None:
        other = _linear_of(case, partner)
        if getattr(other, "format", None) == "nvfp4":
            scales.append(other.input_scale_f32)
    return torch.stack([s.to(torch.float32).reshape(()) for s in scales]).amax().reshape(1)


def _batch_static_scale(x: Tensor) -> Tensor:
    """For the batch check in dynamic mode: the whole batch's global scale as a static decode scale,
    so a row alone is quantized with the same scale it has inside the batch (dynamic amax over a
    different batch would legitimately change the bits)."""
    amax = torch.amax(x.abs()).to(torch.float32)
    return (amax / 2688.0).reshape(1).to(torch.float32)


def _is_nvfp4(lins: list) -> bool:
    return all(getattr(lin, "format", None) == "nvfp4" for lin in lins)


def _is_fp8(lins: list) -> bool:
    return all(getattr(lin, "format", None) == "fp8_block128" for lin in lins)


_FP8_SCALE_RULE = {"ue8m0": "ue8m0_ceil", "f32": "f32"}  # fp8_act_scale_fmt -> protocol scale rule


def _fp8_scale_rules(lins: list) -> list[str]:
    """The activation scale rules the stage's FP8 weights imply, each once, in part order (the parts of one
    stage normally agree: one rule)."""
    return list(dict.fromkeys(_FP8_SCALE_RULE[fp8_act_scale_fmt(to_reference_weight(lin))] for lin in lins))


@dataclass
class DenseOutputs(Outputs):
    backend: Backend
    case: LayerCase
    stage: Stage
    x: Tensor                     # the stage's input, bf16 [M, K]
    lins: list                    # the checkpoint linears, one per part
    prepared: list                # the backend's prepare_linear of each
    scale: Tensor | None          # the static activation decode scale (None: dynamic, or not NVFP4)
    a: QuantizedAct | None        # NVFP4: the backend's quantize(x)
    y_gemm: list[Tensor]          # NVFP4: dense_gemm(a, w) per part
    y_linear: list[Tensor]        # dense_linear(x, w) per part (NVFP4: with the static scale)
    fp8_acts: list[Fp8QuantizedAct] = field(default_factory=list)  # FP8: quantize_fp8(x) per scale rule
    _candidates: dict = field(default_factory=dict, repr=False)     # part -> {mode: (y64, bound)}, once
    _own: dict = field(default_factory=dict, repr=False)            # part -> the backend's own weight or None

    @property
    def nvfp4(self) -> bool:
        return _is_nvfp4(self.lins)

    @property
    def weight_format(self) -> str | None:
        """protocol.WEIGHT_FORMATS name of the stage's weights (None: BF16, one mode)."""
        return "nvfp4" if self.nvfp4 else "fp8_block" if _is_fp8(self.lins) else None

    def declared(self) -> str:
        fmt = self.weight_format
        if fmt is None:
            lin = self.lins[0]
            raise Skipped(f"mode: {lin.module} is {lin.format}: one mode (bf16), judged by the bound")
        return declared_mode(self.backend, Op.DENSE_LINEAR, fmt)

    def own_weight(self, i: int) -> Tensor | None:
        """The backend's own decoded weight of part i when it differs from the checkpoint's (the prepare check
        fails it; judges.prepare.own_weight_if_it_differs), else None."""
        if i not in self._own:
            self._own[i] = own_weight_if_it_differs(self.backend, self.prepared[i], self.lins[i]) \
                if self.prepared else None
        return self._own[i]

    def candidates(self, i: int) -> dict[str, tuple[Tensor, Tensor]]:
        """{mode: (y64, bound)} of part i for every mode its weight allows (references.modes), with this
        backend's accumulators (judges.mode.candidate_bound; fp8_block: the FP8 bound of _unquantized_act_bound).
        When the backend's prepared weight differs from the checkpoint's (the prepare check fails it), on the
        backend's own decoded weight, the bound widened by _own_weight_slack."""
        if i not in self._candidates:
            lin, y, x = self.lins[i], self.y_linear[i], self.x
            w = to_reference_weight(lin)
            own = self.own_weight(i)
            cands = {}
            for m in modes_of_weight(w):
                if own is not None:
                    y64, abs_dot, a_dec = mode_gemm_f64_on(x, w, own, m, recipe=self.backend.recipe,
                                                           input_scale_f32=self.scale, fp8_scale_fmt=fp8_act_scale_fmt(w))
                    cands[m] = (y64, candidate_bound(self.backend, m, y64, abs_dot, a_dec, k=x.shape[1],
                                                     out_dtype=y.dtype) + _own_weight_slack(abs_dot, a_dec))
                    continue
                if m == FP8_BLOCK:
                    cands[m] = _unquantized_act_bound(self.backend, x, lin, y.dtype)
                    continue
                y64, abs_dot, alpha = mode_gemm_f64(x, w, m, recipe=self.backend.recipe, input_scale_f32=self.scale,
                                                    fp8_scale_fmt=fp8_act_scale_fmt(w))
                cands[m] = (y64, candidate_bound(self.backend, m, y64, abs_dot, alpha, k=x.shape[1], out_dtype=y.dtype))
            self._candidates[i] = cands
        return self._candidates[i]

    def modes(self) -> list[ModeCase]:
        declared = self.declared()
        own = " (on the backend's own prepared weight, which the prepare check fails)"
        return [ModeCase(self.stage.tensor(part), self.y_linear[i], declared, lambda i=i: self.candidates(i),
                         own if self.own_weight(i) is not None else "")
                for i, (part, _) in enumerate(_roles(self.stage))]

    def prepared_weights(self, ctx: JudgeContext) -> list[tuple[str, str, Tensor, object]]:
        return [(f"{self.stage.tensor(part)} weight", part or "y", dequantized_by_backend(self.backend, w), lin)
                for (part, _), w, lin in zip(_roles(self.stage), self.prepared, self.lins)]

    def quantized(self) -> tuple[QuantizedAct, QuantizedAct] | list[tuple[Fp8QuantizedAct, Fp8QuantizedAct]]:
        if self.fp8_acts:  # FP8 block-128: the backend's quantize_fp8 vs references/fp8_act.py, per rule
            return [(a, _expected_fp8_act(self.x, a.scale_rule)) for a in self.fp8_acts]
        if not self.nvfp4:
            lin = self.lins[0]
            raise Skipped(f"bytes: {lin.module} is {lin.format}; only NVFP4 activations are a boundary tensor "
                          "(its product is judged by the bound)")
        x, recipe = self.x, self.backend.recipe
        q = quantize_nvfp4(x, recipe=recipe, **nvfp4_global_scale_for(x, recipe=recipe, input_scale_f32=self.scale))
        return self.a, QuantizedAct(q.packed_u8, ref_layouts.sf_linear_to_swizzled_128x4(q.sf_u8),
                                    act_global_dec_f32(q, self.scale).reshape(1))

    def batch(self, metrics: dict) -> Batch:
        x, w = self.x, self.prepared[0]
        scale = self.scale if self.scale is not None or not self.nvfp4 else _batch_static_scale(x)

        def run(xx: Tensor) -> Tensor:
            return self.backend.dense_linear(xx, w, input_dec_scale_f32=scale)

        return row_batch(self.stage.name, x, run)

    def padding(self) -> Padding:
        if not self.nvfp4:
            lin = self.lins[0]
            raise Skipped(f"padding: {lin.module} is {lin.format}; no NVFP4 scale padding")
        m, k = self.x.shape
        real = ref_layouts.sf_linear_to_swizzled_128x4(torch.ones(m, k // 16, dtype=torch.uint8, device=self.x.device))
        return Padding(lambda act: self.backend.dense_gemm(act, self.prepared[0]), self.a, real == 0)

    def replay(self) -> Replay:
        x, w = self.x, self.prepared[0]
        x_buf = x.clone()
        s_buf = None if self.scale is None else self.scale.clone()
        muts = [("new values", lambda: x_buf.copy_((x.roll(1, 0) * -0.75).to(torch.bfloat16)))]
        if s_buf is not None:
            muts.append(("a new static scale", lambda: s_buf.mul_(1.5)))
        return Replay(lambda: self.backend.dense_linear(x_buf, w, input_dec_scale_f32=s_buf), tuple(muts))


_LINEAR_OPS = (Op.PREPARE, Op.DENSE_LINEAR)


def _ops(ctx: JudgeContext, stage: Stage, check: Check) -> tuple[Op, ...]:
    """bytes needs only the quantizer (judged on a backend that has nothing else); every other check needs
    the backend's prepare and dense_linear, and with NVFP4 weights its dense GEMM on its own quantized
    activations too."""
    lins = [_linear_of(ctx.case, role) for _, role in _roles(stage)]
    nvfp4 = _is_nvfp4(lins)
    if check is Check.BYTES:
        return (Op.QUANTIZE,) if nvfp4 else (Op.QUANTIZE_FP8,) if _is_fp8(lins) else ()
    if check is Check.PREPARE:  # and dequantize_prepared, which the check itself asks for (not an op)
        return (Op.PREPARE,)
    # both run the GEMM on the quantized boundary; a dense_linear declared other than w4a4 has its bound
    # judged on its own (its activations are no NVFP4 boundary tensor)
    w4a4 = nvfp4 and declared_mode(ctx.backend, Op.DENSE_LINEAR, "nvfp4") == "w4a4"
    if (check is Check.PADDING and nvfp4) or (check is Check.BOUND and w4a4):
        return _LINEAR_OPS + (Op.QUANTIZE, Op.DENSE_GEMM)
    return _LINEAR_OPS  # batch, sync, graph: the one-call dense_linear


def collect(ctx: JudgeContext, stage: Stage) -> DenseOutputs:
    """The ops the backend serves here (_ops); without prepare / dense_linear only the quantization."""
    b, case = ctx.backend, ctx.case
    roles = _roles(stage)
    lins = [_linear_of(case, role) for _, role in roles]
    linear = all(b.unsupported_reason(op, ctx.device) is None for op in _LINEAR_OPS)
    prepared = [b.prepare_linear(lin) for lin in lins] if linear else []
    gemm = b.unsupported_reason(Op.DENSE_GEMM, ctx.device) is None
    x = _input(case, stage).contiguous()
    if not _is_nvfp4(lins):  # FP8 / BF16: the one-call path (and FP8: the activation quantizer)
        fp8_acts = [b.quantize_fp8(x, scale_rule=rule) for rule in _fp8_scale_rules(lins)] \
            if _is_fp8(lins) and b.unsupported_reason(Op.QUANTIZE_FP8, ctx.device) is None else []
        return DenseOutputs(b, case, stage, x, lins, prepared, None, None, [], [b.dense_linear(x, w) for w in prepared],
                            fp8_acts)
    scale = _static_scale(case, roles[0][1])
    a = b.quantize(x, input_dec_scale_f32=scale) if b.unsupported_reason(Op.QUANTIZE, ctx.device) is None else None
    gemm = gemm and a is not None
    return DenseOutputs(b, case, stage, x, lins, prepared, scale, a, [b.dense_gemm(a, w) for w in prepared] if gemm else [],
                        [b.dense_linear(x, w, input_dec_scale_f32=scale) for w in prepared])


def bound(ctx: JudgeContext, stage: Stage, out: DenseOutputs, metrics: dict) -> str:
    """NVFP4: the backend's dense GEMM on its own quantized activations vs their float64 product, and its
    dense_linear (_linear_bound). FP8 / BF16: the backend's dense linear vs the float64 product of the
    references' quantized activations (DeepSeek's 1x128 act_quant) and the decoded weight, FP8 with the
    backend's declared FP8 accumulator (_unquantized_act_bound)."""
    __tracebackhide__ = True
    b, x, a = ctx.backend, out.x, out.a
    m, k = x.shape
    msgs = []
    for i, ((part, _), lin) in enumerate(zip(_roles(stage), out.lins)):
        label, key = stage.tensor(part), part or "y"
        if out.nvfp4 and not out.y_gemm:  # no NVFP4 boundary GEMM (a dense_linear declared w4a16, w4a8, bf16)
            metrics.update(nan_inf(out.y_linear[i], key))
            msgs.append(_linear_bound(b, out, i, f"{label} (dense_linear)", metrics, key))
            metrics[f"vs_high_{key}"] = stage_metrics(out.y_linear[i].double(), ctx.case.high[label].double())
            continue
        if out.nvfp4:
            y = out.y_gemm[i]
            a_sf = ref_layouts.sf_swizzled_128x4_to_linear(a.sf_swizzled_u8, rows=m, cols=k // 16)
            alpha = a.global_dec_f32.to(torch.float32).reshape(()) * lin.weight_scale_2_f32.to(torch.float32).reshape(())
            y64, abs_dot = nvfp4_gemm_f64(a.packed_u8, a_sf, lin.weight_u8, lin.weight_scale_e4m3.view(torch.uint8),
                                          alpha)
            bnd = gemm_error_bound(abs_dot, y64, alpha, k=k, u_acc=b.u_acc, out_dtype=y.dtype)
            own = out.own_weight(i)
            if own is not None:  # prepare fails this weight: the GEMM judged on the backend's own
                a64 = decode_nvfp4_block_scaled(a.packed_u8, a_sf, dtype=torch.float64)
                a_dec = a.global_dec_f32.to(torch.float32).reshape(())
                y64 = (a64 @ own.double().T) * a_dec.double()
                abs_own = a64.abs() @ own.double().abs().T
                bnd = gemm_error_bound(abs_own, y64, a_dec, k=k, u_acc=b.u_acc, out_dtype=y.dtype) + \
                    _own_weight_slack(abs_own, a_dec)
        else:
            metrics.update(nan_inf(out.y_linear[i], key))
            msgs.append(_mode_judged(out, i, label, metrics, f"bound_ratio_{key}", prefix="max |y - y64| / bound = "))
            metrics[f"vs_high_{key}"] = stage_metrics(out.y_linear[i].double(), ctx.case.high[label].double())
            continue
        metrics.update(nan_inf(y, key))
        ratio = assert_within_gemm_bound(y, y64, bnd, label=label)
        metrics[f"bound_ratio_{key}"] = ratio
        metrics[f"vs_high_{key}"] = stage_metrics(y.double(), ctx.case.high[label].double())
        msgs.append(f"{label}: max |y - y64| / bound = {ratio:.3g}")
        if out.nvfp4:  # the one-call path (quantize + GEMM, its own alpha) against the references' operands
            msgs.append(_linear_bound(b, out, i, f"{label} (dense_linear)", metrics, key))
    own = [stage.tensor(p) for i, (p, _) in enumerate(_roles(stage)) if out.own_weight(i) is not None]
    note = (f"; judged on the backend's own prepared weights of {', '.join(own)} (dequantize_prepared), which "
            "differ from the checkpoint's: the prepare check fails them") if own else ""
    return f"{'; '.join(msgs)} ({_accumulator_words(b, out.lins[0])}, K={k}, {out.lins[0].format}){note}"


def _own_weight_slack(abs_dot: Tensor, a_dec_f32: Tensor) -> Tensor:
    """What a backend's float32 decoded weight (one rounding of its value) and the kernel's float32 alpha (one
    more) may differ by from the products the kernel really forms: 3 float32 unit roundoffs of |a_dec| sum |a w|."""
    return 3 * 2.0**-24 * a_dec_f32.double().abs() * abs_dot


def _accumulator_words(backend: Backend, lin) -> str:
    if getattr(lin, "format", None) != "fp8_block128":
        return f"u_acc {backend.u_acc:.3g}"
    u, interval = declared_fp8_accumulator(backend)
    return f"u_acc {u:.3g}" + ("" if interval is None else f" promoted to fp32 every {interval} of K")


def _unquantized_act_bound(backend: Backend, x: Tensor, lin, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(y64, bound) of a dense linear whose activations are no boundary tensor (FP8 block-128, BF16): the
    float64 product of the references' quantization of x (DeepSeek's 1x128 act_quant under the scale
    rule the weight's scales imply) and the decoded weight. FP8 with a declared promotion interval:
    fp8_block_gemm_error_bound with the backend's FP8 accumulator; otherwise gemm_error_bound over K
    with u_acc (FP8: its fp8_u_acc; module docstring)."""
    ref_w = to_reference_weight(lin)
    fmt = fp8_act_scale_fmt(ref_w)
    u = backend.u_acc
    if getattr(lin, "format", None) == "fp8_block128":
        u, interval = declared_fp8_accumulator(backend)
        if interval is not None:
            act = quantize_act_fp8_1x128(x, recipe=FP8_ACT_UE8M0 if fmt == "ue8m0" else FP8_ACT_F32)
            w = _fp8_block_weight(lin)
            y64 = fp8_block_gemm_f64(act, w)
            return y64, fp8_block_gemm_error_bound(act, w, y64, u_acc=u, promotion_interval=interval,
                                                   out_dtype=out_dtype)
    a64, w64, _, _ = quantized_operands(x, ref_w, recipe=backend.recipe, fp8_scale_fmt=fmt)
    y64, abs_dot = a64 @ w64.T, a64.abs() @ w64.abs().T
    return y64, gemm_error_bound(abs_dot, y64, torch.ones((), dtype=torch.float32), k=x.shape[1], u_acc=u,
                                 out_dtype=out_dtype)


def _expected_fp8_act(x: Tensor, scale_rule: str) -> Fp8QuantizedAct:
    """references/fp8_act.py's quantization of x under the scale rule, as the boundary type."""
    q = quantize_act_fp8_1x128(x, recipe=fp8_act_recipe_for_rule(scale_rule))
    return Fp8QuantizedAct(q.e4m3_u8, q.block_dec_scale, scale_rule)


def _fp8_block_weight(lin) -> Fp8BlockScaledWeight:
    """The checkpoint's FP8 block-128 linear as the references' typed weight (V4 E8M0 `.scale` or V3
    weight_scale_inv), validated by its constructor."""
    if lin.scale_ue8m0 is not None:
        return fp8_weight_from_v4_e8m0_scale(lin.weight_e4m3, lin.scale_ue8m0, module=lin.module)
    return fp8_weight_from_v3_weight_scale_inv(lin.weight_e4m3, lin.scale_inv_f32, module=lin.module)


def _linear_bound(backend: Backend, out: DenseOutputs, i: int, label: str, metrics: dict, key: str) -> str:
    """dense_linear (the backend's single call: its own quantization, alpha and GEMM) within the bound of the
    float64 product of its declared mode (w4a4: the references' quantization of x, the recipe's bytes, which
    the bytes verdict requires of the backend's quantize, and the checkpoint weight, alpha = the activation
    decode scale (the input_scale itself when static) x weight_scale_2; references.modes for the others).
    A wrong alpha inside the call (global-scale direction, the wrong input_scale) fails here even when
    dense_gemm on the boundary is right (_mode_judged: an output of another mode is the mode check's)."""
    __tracebackhide__ = True
    return _mode_judged(out, i, label, metrics, f"bound_ratio_linear_{key}")


def _mode_judged(out: DenseOutputs, i: int, label: str, metrics: dict, metric: str, *, prefix: str = "") -> str:
    """The bound of part i's dense_linear output at the declared mode. When it fails there but the output is
    within the bound of another mode, the accumulation is right for the math it did: the bound passes, judged
    at that mode, and says so; the `mode` check fails it, naming both (one failure, where it belongs). When no
    mode matches, the declared mode's bound failure is raised."""
    __tracebackhide__ = True
    y = out.y_linear[i]
    cands = out.candidates(i)
    declared = out.declared() if out.weight_format is not None else next(iter(cands))
    if declared not in cands:
        raise AssertionError(f"{label}: declared mode {declared} is not a mode of {out.weight_format} weights "
                             f"({', '.join(cands)})")
    y64, bnd = cands[declared]
    try:
        ratio = assert_within_gemm_bound(y, y64, bnd, label=label)
    except AssertionError:
        other = next(((m, r) for m in cands if m != declared and (r := mode_ratio(y, *cands[m])) <= 1), None)
        if other is None:
            raise
        metrics[metric] = other[1]
        return (f"{label}: {prefix}{other[1]:.3g} judged as {other[0]}, the mode it matches (declared {declared}: "
                "the mode check fails it)")
    metrics[metric] = ratio
    return f"{label}: {prefix}{ratio:.3g}"


JUDGE = Judge(collect, {Check.BOUND: bound, Check.MODE: mode, Check.PREPARE: prepare}, _ops)
