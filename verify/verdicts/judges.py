"""Kernel verdicts for every stage of the stage table, through the backend protocol.

Teacher forcing (DESIGN "Stages"): each stage's op gets the reference layer's own input to that
stage (its emulated output of the stage before, the reference routing), so a failed verdict
blames exactly one stage. The backend prepares its weights from the checkpoint's bytes with its
own host code (`prepare_*`); the expected results come from references/ on the same bytes.

Checks (references.stages.Check; DESIGN "Verdicts"):
  bytes     quantized activations: codes equal as values (+0 == -0), swizzled scale bytes equal
            (padding included: it must be zero), global decode scale bit-equal;
  bound     GEMMs / combine: every element within the rigorous accumulation bound of the float64
            result on the same quantized operands (ratio <= 1, the backend's declared u_acc);
  rounding  SwiGLU h: within one bf16 ulp of the exact value (a faithful rounding);
  ids       router: expert ids equal; where the reference's k-th and (k+1)-th selection values are
            closer than their fp32 error bound the difference is a near-tie, reported, not failed
            (an exact tie is not a near-tie: the lower expert id wins, as in the reference);
  weights   router: weights within the fp32 error bound of the reference's, on tokens whose ids agree;
  exact     dispatch: rows, slots and offsets identical;
  batch     a token's output bits do not depend on the other tokens (its row alone vs in the batch);
  sync      (CUDA) the stage under torch.cuda.set_sync_debug_mode("error");
  graph     (CUDA) captured once, replayed after new values and scales were written in place:
            bit-equal to eager on the new inputs; a capture error is a failed verdict.
A stage the backend does not serve is a verdict with status "not served" and the backend's reason.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from references import layouts as ref_layouts
from references import moe as ref_moe
from references.gemm import (
    gamma, gemm_error_bound, grouped_gemm_error_bound, half_ulp, nvfp4_gemm_f64,
    nvfp4_grouped_gemm_f64,
)
from references.layer import RunOptions
from references.router import Routing
from references.codecs import e2m1_codes_to_f32, e4m3_bytes_to_f32
from references.nvfp4 import (
    block_scale_bytes, decode_nvfp4_block_scaled, e2m1_codes_with_scale, quantize_nvfp4, unpack_e2m1x2_low_first,
)
from references.linear import act_global_dec_f32, nvfp4_global_scale_for, quantized_operands
from references.stages import (
    DENSE_MLP_STAGES, FUSED_INPUT_ROLES, INPUT_ATTN, INPUT_FFN, MOE_BLOCK_STAGES, SHARED_STAGES, Check, Op, Stage, STAGES, MOE_ACT_QUANT, MOE_BLOCK, MOE_COMBINE, MOE_L1, MOE_L1_FUSED,
    MOE_L2, MOE_REQUANT, MOE_SWIGLU, ROUTER, DISPATCH,
)
from verify.assertions import (
    assert_bits_equal, assert_bytes_equal, assert_codes_equal_as_values, assert_within_gemm_bound,
    assert_within_ulps, describe_e4m3, first_mismatch,
)
from verify.backends.base import Backend
from verify.backends.emulator import fp8_act_scale_fmt
from verify.backends.protocol import Dispatched, QuantizedAct
from verify.reference_layer import to_reference_weight
from verify.metrics import stage_metrics
from verify.verdicts.routing import router_verdict

__all__ = ["Verdict", "LayerCase", "STATUSES", "stage_verdicts", "applicable_stages", "check_quantized",
           "expected_grouped_quant", "grouped_f64", "moe_block_bound"]

STATUSES = ("pass", "fail", "not served", "skipped")


@dataclass
class Verdict:
    """One (stage, check) verdict. status: pass / fail / not served (the backend lacks the op here)
    / skipped (the check does not apply: no CUDA device, a non-NVFP4 weight, ...)."""

    stage: str
    check: str
    status: str
    message: str = ""
    metrics: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def as_dict(self) -> dict:
        return {"stage": self.stage, "check": self.check, "status": self.status, "message": self.message,
                "metrics": self.metrics}


@dataclass
class LayerCase:
    """Everything a layer's verdicts need: the checkpoint layer (loader types), its inputs, the
    reference layer's emulated and high-precision stage tensors, the run options and the MoE spec."""

    layer: object            # verify.checkpoint.LayerWeights
    schema: str
    x_attn: Tensor
    x_ffn: Tensor
    token_ids_i64: Tensor | None
    emulated: dict[str, Tensor]
    high: dict[str, Tensor]
    options: RunOptions
    moe_spec: object | None  # references.layer.MoeSpec
    prepared: dict = field(default_factory=dict)

    @property
    def static(self) -> bool:
        return self.options.act_scale == "static"

    @property
    def device(self) -> torch.device:
        return self.x_ffn.device


def applicable_stages(case: LayerCase) -> list[Stage]:
    """The kernel stages of the table that this layer has (schema, MoE or dense MLP, shared expert)."""
    lw = case.layer
    out = []
    for s in STAGES:
        if not s.kernel or case.schema not in s.schemas:
            continue
        if s in MOE_BLOCK_STAGES and lw.experts is None:
            continue
        if s in SHARED_STAGES and lw.shared_experts is None:
            continue
        if s in DENSE_MLP_STAGES and lw.dense_mlp is None:
            continue
        out.append(s)
    return out


# ============================================================================= helpers


def _fail_or_pass(stage: str, check: Check, fn: Callable[[], str], metrics: dict | None = None) -> Verdict:
    """Run an assertion block; its AssertionError message becomes a failed verdict."""
    metrics = {} if metrics is None else metrics
    try:
        msg = fn()
    except AssertionError as exc:
        return Verdict(stage, check.value, "fail", f"{stage} {check.value}: {exc}", metrics)
    except NotImplementedError as exc:  # the backend refuses this case (its reason), e.g. a router it lacks
        return Verdict(stage, check.value, "not served", str(exc), {"unsupported": str(exc)})
    return Verdict(stage, check.value, "pass", msg, metrics)


def _quant_act_from_reference(case: LayerCase, stage: Stage, offsets_i64: Tensor) -> QuantizedAct:
    """The reference's quantized activations of `stage` in the boundary representation."""
    e = case.emulated
    sf, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(e[stage.tensor("sf_u8")], offsets_i64)
    return QuantizedAct(e[stage.tensor("packed_u8")], sf, e[stage.tensor("global_dec_f32")].to(torch.float32))


def _reference_dispatch(case: LayerCase) -> ref_moe.Dispatch:
    return ref_moe.dispatch(case.emulated[ROUTER.tensor("ids")], case.layer.experts.w1.weight_u8.shape[0])


def _static_expert_scales(case: LayerCase) -> tuple[Tensor | None, Tensor | None]:
    if not case.static:
        return None, None
    ex = case.layer.experts
    s1 = torch.stack([ex.w1.input_scale_f32, ex.w3.input_scale_f32]).amax(0).to(torch.float32)
    return s1, ex.w2.input_scale_f32.to(torch.float32)


def check_quantized(stage: str, got: QuantizedAct, exp: QuantizedAct) -> str:
    __tracebackhide__ = True
    assert_codes_equal_as_values(got.packed_u8, exp.packed_u8, label=f"{stage} codes")
    sf = got.sf_swizzled_u8
    rows = exp.sf_swizzled_u8.shape[0]
    if sf.dim() == 2 and sf.shape[0] > rows and sf.shape[1:] == exp.sf_swizzled_u8.shape[1:]:
        # a capacity-sized buffer (its row count fixed at capture): the rows past the experts' padded
        # tiles must be zero like all padding, then the rest compares byte for byte
        assert_bytes_equal(sf[rows:], torch.zeros_like(sf[rows:]), label=f"{stage} swizzled scales past the last "
                           f"expert's tiles (rows {rows}..{sf.shape[0] - 1})", describe=describe_e4m3)
        sf = sf[:rows]
    assert_bytes_equal(sf, exp.sf_swizzled_u8, label=f"{stage} swizzled scales (padding included)",
                       describe=describe_e4m3)
    assert_bits_equal(got.global_dec_f32.reshape(-1).to(torch.float32).cpu(),
                      exp.global_dec_f32.reshape(-1).to(torch.float32).cpu(), label=f"{stage} global decode scale")
    return "codes, scale bytes and global scale equal the emulator's"


def expected_grouped_quant(backend: Backend, rows: Tensor, offsets_i64: Tensor, scale: Tensor | None) -> QuantizedAct:
    """references' grouped quantization (the backend's recipe) in the boundary representation."""
    a = ref_moe.act_quant(rows, offsets_i64, recipe=backend.recipe, act_scale="static" if scale is not None else "dynamic",
                          input_scale_f32=scale)
    sf, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(a.sf_u8, offsets_i64)
    return QuantizedAct(a.packed_u8, sf, a.global_dec_f32)


def grouped_f64(backend: Backend, a: QuantizedAct, offsets_i64: Tensor, w, out_dtype) -> tuple[Tensor, Tensor]:
    """(y64, bound) of one grouped GEMM on the boundary activations a and the checkpoint weight w."""
    k = a.k
    a_sf = ref_layouts.sf_grouped_swizzled_128x4_to_linear(a.sf_swizzled_u8, offsets_i64, cols=k // 16)
    alpha = (a.global_dec_f32.to(torch.float32).reshape(-1) * w.weight_scale_2_f32.to(torch.float32).reshape(-1))
    y64, abs_dot = nvfp4_grouped_gemm_f64(a.packed_u8, a_sf, w.weight_u8, w.weight_scale_e4m3.view(torch.uint8),
                                          offsets_i64, alpha)
    return y64, grouped_gemm_error_bound(abs_dot, y64, alpha, offsets_i64, k=k, u_acc=backend.u_acc, out_dtype=out_dtype)


def _grouped_bound_check(stage: str, backend: Backend, a: QuantizedAct, offsets_i64: Tensor, w, y: Tensor,
                         label: str) -> tuple[str, dict]:
    """y (one grouped GEMM's output) against the float64 product of the same quantized operands."""
    __tracebackhide__ = True
    y64, bound = grouped_f64(backend, a, offsets_i64, w, y.dtype)
    counts = _nan_inf(y, label)
    ratio = assert_within_gemm_bound(y, y64, bound, label=f"{stage} {label}")
    return f"{label}: max |y - y64| / bound = {ratio:.3g}", {f"bound_ratio_{label}": ratio, **counts}


def _nan_inf(y: Tensor, label: str) -> dict[str, int]:
    """NaN / Inf counts of a stage output (a NaN also fails the bound; both are reported)."""
    return {f"nan_count_{label}": int(torch.isnan(y).sum()), f"inf_count_{label}": int(torch.isinf(y).sum())}


def _unsupported(backend: Backend, stage: Stage, op: Op, device: torch.device) -> Verdict | None:
    reason = backend.unsupported_reason(op, device)
    if reason:
        return Verdict(stage.name, "*", "not served", reason, {"unsupported": reason})
    return None


def _expand(v: Verdict, stage: Stage) -> list[Verdict]:
    """One 'not served' / 'skipped' verdict per check of the stage."""
    return [Verdict(stage.name, c.value, v.status, v.message, dict(v.metrics)) for c in stage.checks]


def _cuda_only(stage: str, check: Check, case: LayerCase, backend: Backend) -> Verdict | None:
    if case.device.type != "cuda":
        return Verdict(stage, check.value, "skipped", f"{check.value}: needs a CUDA device (running on {case.device})")
    if not getattr(backend, "graph_safe", True):
        return Verdict(stage, check.value, "skipped",
                       f"{check.value}: the {backend.name} backend is a reference with host syncs by design")
    return None


def _bits(out: object) -> Tensor:
    """Every output tensor of an op (tensor, tuple, boundary dataclass) as one flat uint8 tensor."""
    if isinstance(out, Tensor):
        return out.contiguous().reshape(-1).view(torch.uint8)
    if isinstance(out, (tuple, list)):
        return torch.cat([_bits(o) for o in out])
    if hasattr(out, "__dataclass_fields__"):  # its tensors; plain Python fields (top_k, ...) are not device output
        return torch.cat([_bits(v) for v in (getattr(out, f) for f in out.__dataclass_fields__)
                          if not isinstance(v, (int, float, str, type(None)))])
    raise TypeError(f"cannot compare op output of type {type(out).__name__}")


def _probes(stage: Stage, backend: Backend, case: LayerCase, forward: Callable[[], object],
            mutations: list[tuple[str, Callable[[], None]]]) -> list[Verdict]:
    """The stage's sync and graph verdicts (CUDA only): forward() reads its inputs from buffers that
    the mutations rewrite in place."""
    out = []
    for check in (Check.SYNC, Check.GRAPH):
        if check not in stage.checks:
            continue
        skip = _cuda_only(stage.name, check, case, backend)
        if skip:
            out.append(skip)
        elif check is Check.SYNC:
            out.append(_sync_probe(stage.name, forward))
        else:
            out.append(_graph_probe(stage.name, forward, mutations))
    return out


def _graph_probe(stage: str, forward: Callable[[], object], mutations: list[tuple[str, Callable[[], None]]]) -> Verdict:
    """Warm up, capture forward() once (at capacity), then for each mutation: write the new inputs in
    place, replay, and require the graph's outputs bit-equal to an eager call on the same inputs."""
    done: list[str] = []
    stream = torch.cuda.current_stream()
    try:
        forward()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        rng = torch.cuda.default_generators[torch.cuda.current_device()]
        rng_before = rng.clone_state()
        try:
            with torch.cuda.graph(graph):
                y_graph = forward()
        except BaseException:
            # a capture that never ended leaves the default CUDA generator registered as capturing: every
            # later torch.randn(device="cuda") outside capture raises ("Offset increment outside graph
            # capture encountered unexpectedly"); its state from before the capture is put back
            rng.graphsafe_set_state(rng_before)
            raise
        finally:
            # torch.cuda.graph's __exit__ leaves its capture stream current when capture_end raises (a
            # capture the forward invalidated): every later "eager" call would then run on the shared
            # capture stream, and a stream-escaping bug in a later probe would go unseen
            torch.cuda.set_stream(stream)
        for name, mutate in mutations:
            mutate()
            graph.replay()
            torch.cuda.synchronize()
            y_eager = forward()
            g_bits, e_bits = _bits(y_graph), _bits(y_eager)
            diff = int((g_bits != e_bits).sum()) if g_bits.shape == e_bits.shape else -1
            if diff:
                return Verdict(stage, "graph", "fail", f"{stage} graph: after {name}, replay differs from eager in "
                               f"{diff} of {e_bits.numel()} output bytes (replays before it matched: {done or 'none'})",
                               {"differing_bytes": diff, "mutation": name})
            done.append(name)
    except Exception as exc:  # noqa: BLE001 - a capture failure is a verdict, not a crash
        return Verdict(stage, "graph", "fail", f"{stage} graph: capture/replay failed after {done or 'capture'}: "
                       f"{type(exc).__name__}: {exc}", {"traceback": traceback.format_exc(limit=3)})
    return Verdict(stage, "graph", "pass", f"captured once; replays bit-equal to eager after {', '.join(done)}",
                   {"mutations": done})


def _sync_probe(stage: str, forward: Callable[[], object]) -> Verdict:
    forward()  # compile and cache outside the probe
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        forward()
    except RuntimeError as exc:
        return Verdict(stage, "sync", "fail", f"{stage} sync: the forward path synchronizes with the host: {exc}")
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return Verdict(stage, "sync", "pass", "no host synchronization")


def _batch_check(stage: str, run: Callable[[Tensor], Tensor], x: Tensor, rows: tuple[int, ...] = (0, -1)) -> Verdict:
    """Rows verified alone must have the bits they have inside the batch."""
    def check() -> str:
        __tracebackhide__ = True
        full = run(x)
        for r in rows:
            r = r % x.shape[0]
            alone = run(x[r:r + 1].contiguous())
            assert_bits_equal(alone.cpu(), full[r:r + 1].cpu(), label=f"{stage} row {r} alone vs in a batch of "
                                                                       f"{x.shape[0]}")
        return f"rows {sorted({r % x.shape[0] for r in rows})} alone are bit-equal to the batch of {x.shape[0]}"

    return _fail_or_pass(stage, Check.BATCH, check)


# ============================================================================= dense linears


def _dense_roles(stage: Stage) -> list[tuple[str | None, str]]:
    """(part, weight role) of a dense linear stage: shared.l1 -> [("gate", "shared.w1"), ("up", "shared.w3")]."""
    if stage.parts:
        return list(zip(stage.parts, stage.weights))
    return [(None, stage.weights[0])]


def _linear_of(case: LayerCase, role: str):
    group, name = role.split(".", 1)
    lw = case.layer
    if group == "attn":
        return lw.attention[name]
    mlp = {"shared": lw.shared_experts, "dense": lw.dense_mlp}[group]
    return getattr(mlp, name)


def _fused_partner(role: str) -> str | None:
    group = next((g for g in FUSED_INPUT_ROLES if role in g), ())
    return next((r for r in group if r != role), None)


def _dense_input(case: LayerCase, stage: Stage) -> Tensor:
    if stage.input == INPUT_ATTN:
        return case.x_attn
    if stage.input == INPUT_FFN:
        return case.x_ffn
    return case.emulated[stage.input].to(torch.bfloat16)


def _static_dense_scale(case: LayerCase, role: str) -> Tensor | None:
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


def _dense_stage(backend: Backend, case: LayerCase, stage: Stage) -> list[Verdict]:
    roles = _dense_roles(stage)
    lins = [_linear_of(case, role) for _, role in roles]
    x = _dense_input(case, stage).contiguous()
    nvfp4 = all(getattr(lin, "format", None) == "nvfp4" for lin in lins)
    scale = _static_dense_scale(case, roles[0][1]) if nvfp4 else None
    if nvfp4:  # judged whenever the backend quantizes, also one without a GEMM
        bytes_verdict = _dense_bytes(backend, stage, x, scale)
    else:
        bytes_verdict = Verdict(stage.name, Check.BYTES.value, "skipped", f"bytes: {lins[0].module} is "
                                f"{lins[0].format}; only NVFP4 activations are a boundary tensor (its product is "
                                "judged by the bound)")
    not_served = next((v for op in (Op.PREPARE, Op.DENSE_LINEAR)
                       if (v := _unsupported(backend, stage, op, case.device))), None)
    if not_served is None:
        try:
            prepared = [backend.prepare_linear(lin) for lin in lins]
        except NotImplementedError as exc:
            not_served = Verdict(stage.name, "*", "not served", str(exc), {"unsupported": str(exc)})
    if not_served is not None:
        return [bytes_verdict if v.check == Check.BYTES.value else v for v in _expand(not_served, stage)]
    verdicts: list[Verdict] = [bytes_verdict]
    verdicts.append(_dense_bound(backend, case, stage, x, roles, lins, prepared, scale, nvfp4))
    batch_scale = scale if scale is not None or not nvfp4 else _batch_static_scale(x)
    verdicts.append(_batch_check(stage.name, lambda xx: backend.dense_linear(xx, prepared[0],
                                                                             input_dec_scale_f32=batch_scale), x))
    if nvfp4:
        a = backend.quantize(x, input_dec_scale_f32=scale)
        m, k = x.shape
        real = ref_layouts.sf_linear_to_swizzled_128x4(torch.ones(m, k // 16, dtype=torch.uint8, device=x.device))
        verdicts.append(_padding_check(stage, lambda act: backend.dense_gemm(act, prepared[0]), a, real == 0))
    else:
        verdicts.append(Verdict(stage.name, Check.PADDING.value, "skipped",
                                f"padding: {lins[0].module} is {lins[0].format}; no NVFP4 scale padding"))
    verdicts += _dense_cuda_probes(backend, case, stage, x, prepared[0], scale)
    return verdicts


def _dense_bytes(backend: Backend, stage: Stage, x: Tensor, scale: Tensor | None) -> Verdict:
    def bytes_check() -> str:
        __tracebackhide__ = True
        got = backend.quantize(x, input_dec_scale_f32=scale)
        q = quantize_nvfp4(x, recipe=backend.recipe,
                           **nvfp4_global_scale_for(x, recipe=backend.recipe, input_scale_f32=scale))
        exp = QuantizedAct(q.packed_u8, ref_layouts.sf_linear_to_swizzled_128x4(q.sf_u8),
                           act_global_dec_f32(q, scale).reshape(1))
        return check_quantized(stage.name, got, exp)

    reason = backend.unsupported_reason(Op.QUANTIZE, x.device)
    if reason:
        return Verdict(stage.name, Check.BYTES.value, "not served", reason)
    return _fail_or_pass(stage.name, Check.BYTES, bytes_check)


def _dense_bound(backend: Backend, case: LayerCase, stage: Stage, x: Tensor, roles, lins, prepared,
                 scale: Tensor | None, nvfp4: bool) -> Verdict:
    """NVFP4: the backend's dense GEMM on its own quantized activations vs their float64 product.
    FP8 / BF16: the backend's dense linear vs the float64 product of the references' quantized
    activations (DeepSeek's 1x128 act_quant) and the decoded weight, with the same bound."""
    metrics: dict = {}

    def bound_check() -> str:
        __tracebackhide__ = True
        m, k = x.shape
        msgs = []
        a = backend.quantize(x, input_dec_scale_f32=scale) if nvfp4 else None
        for (part, _), lin, w in zip(roles, lins, prepared):
            label = stage.tensor(part)
            if nvfp4:
                y = backend.dense_gemm(a, w)
                a_sf = ref_layouts.sf_swizzled_128x4_to_linear(a.sf_swizzled_u8, rows=m, cols=k // 16)
                alpha = a.global_dec_f32.to(torch.float32).reshape(()) * lin.weight_scale_2_f32.to(torch.float32).reshape(())
                y64, abs_dot = nvfp4_gemm_f64(a.packed_u8, a_sf, lin.weight_u8, lin.weight_scale_e4m3.view(torch.uint8),
                                              alpha)
            else:
                y = backend.dense_linear(x, w)
                ref_w = to_reference_weight(lin)
                a64, w64, _, _ = quantized_operands(x, ref_w, recipe=backend.recipe, fp8_scale_fmt=fp8_act_scale_fmt(ref_w))
                y64, abs_dot = a64 @ w64.T, a64.abs() @ w64.abs().T
                alpha = torch.ones((), dtype=torch.float32)
            bound = gemm_error_bound(abs_dot, y64, alpha, k=k, u_acc=backend.u_acc, out_dtype=y.dtype)
            metrics.update(_nan_inf(y, part or "y"))
            ratio = assert_within_gemm_bound(y, y64, bound, label=label)
            metrics[f"bound_ratio_{part or 'y'}"] = ratio
            metrics[f"vs_high_{part or 'y'}"] = stage_metrics(y.double(), case.high[label].double())
            msgs.append(f"{label}: max |y - y64| / bound = {ratio:.3g}")
            if nvfp4:  # the one-call path (quantize + GEMM, its own alpha) against the references' operands
                msgs.append(_dense_linear_bound(backend, x, lin, w, scale, f"{label} (dense_linear)", metrics,
                                                part or "y"))
        return f"{'; '.join(msgs)} (u_acc {backend.u_acc:.3g}, K={k}, {lins[0].format})"

    return _fail_or_pass(stage.name, Check.BOUND, bound_check, metrics)


def _dense_linear_bound(backend: Backend, x: Tensor, lin, w, scale: Tensor | None, label: str, metrics: dict,
                        key: str) -> str:
    """dense_linear (the backend's single call: its own quantization, alpha and GEMM) within the bound of the
    float64 product of the references' quantization of x (the recipe's bytes, which the bytes verdict
    requires of the backend's quantize) and the checkpoint weight, alpha = the activation decode scale (the
    input_scale itself when static) x weight_scale_2. A wrong alpha inside the call (global-scale
    direction, the wrong input_scale) fails here even when dense_gemm on the boundary is right."""
    __tracebackhide__ = True
    m, k = x.shape
    q = quantize_nvfp4(x, recipe=backend.recipe, **nvfp4_global_scale_for(x, recipe=backend.recipe,
                                                                            input_scale_f32=scale))
    alpha = act_global_dec_f32(q, scale).to(torch.float32).reshape(()) * \
        lin.weight_scale_2_f32.to(torch.float32).reshape(())
    y64, abs_dot = nvfp4_gemm_f64(q.packed_u8, q.sf_u8, lin.weight_u8, lin.weight_scale_e4m3.view(torch.uint8), alpha)
    y = backend.dense_linear(x, w, input_dec_scale_f32=scale)
    bound = gemm_error_bound(abs_dot, y64, alpha, k=k, u_acc=backend.u_acc, out_dtype=y.dtype)
    ratio = assert_within_gemm_bound(y, y64, bound, label=label)
    metrics[f"bound_ratio_linear_{key}"] = ratio
    return f"{label}: {ratio:.3g}"


def _batch_static_scale(x: Tensor) -> Tensor:
    """For the batch check in dynamic mode: the whole batch's global scale as a static decode scale,
    so a row alone is quantized with the same scale it has inside the batch (dynamic amax over a
    different batch would legitimately change the bits)."""
    amax = torch.amax(x.abs()).to(torch.float32)
    return (amax / 2688.0).reshape(1).to(torch.float32)


def _dense_cuda_probes(backend: Backend, case: LayerCase, stage: Stage, x: Tensor, w, scale: Tensor | None) -> list[Verdict]:
    out = []
    for check in (Check.SYNC, Check.GRAPH):
        skip = _cuda_only(stage.name, check, case, backend)
        if skip:
            out.append(skip)
            continue
        x_buf = x.clone()
        s_buf = None if scale is None else scale.clone()

        def forward() -> Tensor:
            return backend.dense_linear(x_buf, w, input_dec_scale_f32=s_buf)

        if check is Check.SYNC:
            out.append(_sync_probe(stage.name, forward))
        else:
            def new_values() -> None:
                x_buf.copy_((x.roll(1, 0) * -0.75).to(torch.bfloat16))

            def new_scale() -> None:
                s_buf.mul_(1.5)

            muts = [("new values", new_values)] + ([("a new static scale", new_scale)] if s_buf is not None else [])
            out.append(_graph_probe(stage.name, forward, muts))
    return out


# ============================================================================= MoE stages


def _router_verdicts(backend: Backend, case: LayerCase) -> list[Verdict]:
    """ids and weights by verify.verdicts.router_verdict (near-ties within the fp32 score bound are
    reported, not failed; exact ties must go to the lower id); hash layers compare ids exactly."""
    v = _unsupported(backend, ROUTER, Op.ROUTER, case.device)
    if v:
        return _expand(v, ROUTER)
    lw, spec, e = case.layer, case.moe_spec, case.emulated
    hashed = lw.router.tid2eid_i64 is not None
    prep = backend.prepare_router(lw.router, spec)
    tok = case.token_ids_i64 if hashed else None
    r = backend.router(case.x_ffn, prep, token_ids_i64=tok)
    ref = Routing(e[ROUTER.tensor("logits")], e[ROUTER.tensor("scores")], e[ROUTER.tensor("ids")],
                  e[ROUTER.tensor("weights")], hashed=hashed)
    rv = router_verdict(ref, r.ids_i64, r.weights_f32, x=case.x_ffn, gate_weight=lw.router.gate_weight_bf16,
                        bias_f32=None if hashed else lw.router.gate_bias_f32, scoring=spec.scoring,
                        routed_scaling_factor=spec.routed_scaling_factor,
                        renormalize=spec.renormalize if spec.renormalize is not None else spec.scoring != "softmax",
                        n_group=spec.n_group, topk_group=spec.topk_group)
    metrics = {"tokens": rv.tokens, "identical": rv.identical, "near_ties": rv.near_ties,
               "topk_overlap": rv.topk_overlap, "max_weight_ratio": rv.max_weight_ratio}

    def ids_check() -> str:
        __tracebackhide__ = True
        if rv.mismatched_tokens:
            t = rv.mismatched_tokens[0]
            raise AssertionError(f"{len(rv.mismatched_tokens)}{'+' if len(rv.mismatched_tokens) == 16 else ''} of "
                                 f"{rv.tokens} tokens select other experts; first token {t}: got ids "
                                 f"{r.ids_i64[t].tolist()}, expected {ref.ids_i64[t].tolist()}; {rv.summary()}")
        return f"{rv.identical}/{rv.tokens} tokens identical, {rv.near_ties} near-ties (reported)"

    def weights_check() -> str:
        __tracebackhide__ = True
        if rv.weight_violations:
            raise AssertionError(f"{rv.weight_violations} routing weights outside the fp32 bound (max ratio "
                                 f"{rv.max_weight_ratio:.3g}); {rv.summary()}")
        return f"routing weights within the fp32 bound (max ratio {rv.max_weight_ratio:.3g})"

    x_buf = case.x_ffn.clone()
    probes = _probes(ROUTER, backend, case, lambda: backend.router(x_buf, prep, token_ids_i64=tok), [
        ("new values", lambda: x_buf.copy_((case.x_ffn.roll(1, 0) * -0.75).to(torch.bfloat16))),
        ("every token alike", lambda: x_buf.copy_(case.x_ffn[:1].expand_as(x_buf)))])
    return [_fail_or_pass(ROUTER.name, Check.IDS, ids_check, metrics),
            _fail_or_pass(ROUTER.name, Check.WEIGHTS, weights_check, dict(metrics)), *probes]


def _moe_verdicts(backend: Backend, case: LayerCase) -> list[Verdict]:
    lw, spec, e = case.layer, case.moe_spec, case.emulated
    d = _reference_dispatch(case)
    off_i64, off_i32 = d.offsets_i64, d.offsets_i64.to(torch.int32)
    s1, s2 = _static_expert_scales(case)
    out: list[Verdict] = []
    # ---- dispatch
    v = _unsupported(backend, DISPATCH, Op.DISPATCH, case.device)
    if v:
        out += _expand(v, DISPATCH)
    else:
        got = backend.dispatch(e[ROUTER.tensor("ids")], d.num_experts)

        def dispatch_check() -> str:
            __tracebackhide__ = True
            assert_bytes_equal(got.offsets_i32.to(torch.int32).view(torch.uint8).cpu(),
                               off_i32.view(torch.uint8).cpu(), label=f"{DISPATCH.name} offsets (int32 bytes)")
            for name, g, x in (("token", got.row_token_i64, d.token_of_row_i64), ("slot", got.row_slot_i64,
                                                                                  d.slot_of_row_i64)):
                bad = first_mismatch(g.to(torch.int64).cpu() != x.cpu())
                if bad:
                    raise AssertionError(f"row {bad[0]}: {name} {int(g.reshape(-1)[bad[0]])}, expected {int(x[bad[0]])}")
            return f"{d.token_of_row_i64.numel()} rows and {d.num_experts + 1} offsets identical"

        out.append(_fail_or_pass(DISPATCH.name, Check.EXACT, dispatch_check))
        ids = e[ROUTER.tensor("ids")]
        ids_buf = ids.clone()
        out += _probes(DISPATCH, backend, case, lambda: backend.dispatch(ids_buf, d.num_experts), [
            ("a new routing", lambda: ids_buf.copy_(ids.roll(1, 0))),
            ("every token to the same experts (zero-token experts)", lambda: ids_buf.copy_(ids[:1].expand_as(ids)))])
    # ---- prepare the experts once (the backend's own host code)
    experts = None
    if backend.unsupported_reason(Op.GROUPED_GEMM, case.device) is None:
        experts = backend.prepare_experts(lw.experts)
    rows = case.x_ffn[d.token_of_row_i64]
    # ---- act_quant
    v = _unsupported(backend, MOE_ACT_QUANT, Op.GROUPED_QUANTIZE, case.device)
    if v:
        out += _expand(v, MOE_ACT_QUANT)
    else:
        out.append(_fail_or_pass(MOE_ACT_QUANT.name, Check.BYTES, lambda: check_quantized(
            MOE_ACT_QUANT.name, backend.grouped_quantize(rows, off_i32, input_dec_scale_f32=s1),
            expected_grouped_quant(backend, rows, off_i64, s1))))
        rows_buf = rows.clone()
        out += _probes(MOE_ACT_QUANT, backend, case,
                       lambda: backend.grouped_quantize(rows_buf, off_i32, input_dec_scale_f32=s1),
                       [("new values", lambda: rows_buf.copy_((rows.roll(1, 0) * -0.75).to(torch.bfloat16)))])
    # ---- l1
    a1 = _quant_act_from_reference(case, MOE_ACT_QUANT, off_i64)
    v = _unsupported(backend, MOE_L1, Op.GROUPED_GEMM, case.device)
    if v:
        out += _expand(v, MOE_L1)
    else:
        metrics: dict = {}

        def l1_check() -> str:
            __tracebackhide__ = True
            gate, up = backend.grouped_gemm(a1, off_i32, experts, layer="l1")
            m1, x1 = _grouped_bound_check(MOE_L1.name, backend, a1, off_i64, lw.experts.w1, gate, "gate")
            m2, x2 = _grouped_bound_check(MOE_L1.name, backend, a1, off_i64, lw.experts.w3, up, "up")
            metrics.update(x1, **x2)
            return f"{m1}; {m2} (u_acc {backend.u_acc:.3g}, K={a1.k})"

        out.append(_fail_or_pass(MOE_L1.name, Check.BOUND, l1_check, metrics))
        out += _grouped_gemm_extras(MOE_L1, backend, case, experts, a1, off_i64, "l1")
    # ---- swiglu + requant (one op, two verdicts: h, then the bytes of h's quantization)
    v = _unsupported(backend, MOE_SWIGLU, Op.SWIGLU_REQUANT, case.device)
    if v:
        out += _expand(v, MOE_SWIGLU) + _expand(Verdict(MOE_REQUANT.name, "*", v.status, v.message), MOE_REQUANT)
    else:
        gate, up = e[MOE_L1.tensor("gate")], e[MOE_L1.tensor("up")]
        before = case.options.weight_placement == "before_w2"
        row_w = e[ROUTER.tensor("weights")][d.token_of_row_i64, d.slot_of_row_i64] if before else None
        h, a2 = backend.swiglu_requant(gate, up, off_i32, swiglu_limit=spec.swiglu_limit, row_weight_f32=row_w,
                                       input_dec_scale_f32=s2)
        h64 = ref_moe.swiglu(gate, up, limit=spec.swiglu_limit, row_weight_f32=row_w, mode="high")

        def swiglu_check() -> str:
            __tracebackhide__ = True
            assert_within_ulps(h, h64, ulps=1.0, label=f"{MOE_SWIGLU.name} h ({h.dtype}) vs exact")
            return f"h within one {h.dtype} ulp of the exact clamped SwiGLU ({h.numel()} elements)"

        out.append(_fail_or_pass(MOE_SWIGLU.name, Check.ROUNDING, swiglu_check))
        out.append(_fail_or_pass(MOE_REQUANT.name, Check.BYTES, lambda: check_quantized(
            MOE_REQUANT.name, a2, expected_grouped_quant(backend, h.to(torch.bfloat16), off_i64, s2))))
        g_buf, u_buf = gate.clone(), up.clone()
        out += _probes(MOE_REQUANT, backend, case, lambda: backend.swiglu_requant(
            g_buf, u_buf, off_i32, swiglu_limit=spec.swiglu_limit, row_weight_f32=row_w, input_dec_scale_f32=s2),
            [("new values", lambda: (g_buf.mul_(-0.5), u_buf.mul_(1.5)))])
    # ---- l1_fused: only backends that have a fused L1 (the interval rule needs a static h scale)
    v = _unsupported(backend, MOE_L1_FUSED, Op.L1_FUSED, case.device)
    if v:
        out += _expand(v, MOE_L1_FUSED)
    elif not case.static:
        out.append(Verdict(MOE_L1_FUSED.name, Check.INTERVAL.value, "skipped",
                           "interval: a fused L1 quantizes h with the static w2 input_scale (a dynamic amax of h is "
                           "not known inside the L1 epilogue); judged in the static runs"))
    else:
        out.append(_l1_fused_verdict(backend, case, experts, a1, off_i64, off_i32, s2))
        a1_buf = _clone_act(a1)
        out += _probes(MOE_L1_FUSED, backend, case, lambda: backend.l1_fused(
            a1_buf, off_i32, experts, swiglu_limit=spec.swiglu_limit, input_dec_scale_f32=s2),
            [("new values (every code negated)", lambda: a1_buf.packed_u8.copy_(a1.packed_u8 ^ 0x88))])
    # ---- l2
    a2_ref = _quant_act_from_reference(case, MOE_REQUANT, off_i64)
    v = _unsupported(backend, MOE_L2, Op.GROUPED_GEMM, case.device)
    if v:
        out += _expand(v, MOE_L2)
    else:
        metrics2: dict = {}

        def l2_check() -> str:
            __tracebackhide__ = True
            y = backend.grouped_gemm(a2_ref, off_i32, experts, layer="l2")
            msg, x = _grouped_bound_check(MOE_L2.name, backend, a2_ref, off_i64, lw.experts.w2, y, "y")
            metrics2.update(x)
            return f"{msg} (u_acc {backend.u_acc:.3g}, K={a2_ref.k})"

        out.append(_fail_or_pass(MOE_L2.name, Check.BOUND, l2_check, metrics2))
        out += _grouped_gemm_extras(MOE_L2, backend, case, experts, a2_ref, off_i64, "l2")
    # ---- combine
    v = _unsupported(backend, MOE_COMBINE, Op.COMBINE, case.device)
    if v:
        out += _expand(v, MOE_COMBINE)
    else:
        before = case.options.weight_placement == "before_w2"
        weights = None if before else e[ROUTER.tensor("weights")]
        y_rows = e[MOE_L2.name]
        top_k = d.row_of_pair_i64.shape[1]
        got = backend.combine(y_rows, Dispatched(d.token_of_row_i64, d.slot_of_row_i64, off_i32, top_k), weights)

        def combine_check() -> str:
            __tracebackhide__ = True
            terms = y_rows.double()[d.row_of_pair_i64]  # [T, k, H]
            if weights is not None:
                terms = terms * weights.double()[..., None]
            exact = terms.sum(1)
            acc = gamma(d.row_of_pair_i64.shape[1] + 1, backend.u_acc) * terms.abs().sum(1)
            bound = acc + half_ulp(exact.abs() + acc, got.dtype)
            ratio = assert_within_gemm_bound(got, exact, bound, label=f"{MOE_COMBINE.name} output")
            return f"max |y - exact| / bound = {ratio:.3g} (k={d.row_of_pair_i64.shape[1]})"

        out.append(_fail_or_pass(MOE_COMBINE.name, Check.BOUND, combine_check))
        y_buf = y_rows.clone()
        w_buf = None if weights is None else weights.clone()
        disp = Dispatched(d.token_of_row_i64, d.slot_of_row_i64, off_i32, top_k)

        def new_weights() -> None:
            if w_buf is not None:
                w_buf.copy_(weights.flip(1))

        out += _probes(MOE_COMBINE, backend, case, lambda: backend.combine(y_buf, disp, w_buf), [
            ("new values", lambda: y_buf.mul_(-0.5)), ("new routing weights", new_weights)])
    # ---- the whole block as one call
    out += _moe_block_verdicts(backend, case, experts)
    return out


def _padding_check(stage: Stage, run: Callable[[QuantizedAct], object], a: QuantizedAct, pad: Tensor) -> Verdict:
    """Kernels never read scale padding (DESIGN "Non-negotiables"): the activations' swizzled scale
    padding filled with 0xFF, then 0x7F (E4M3 NaN), must leave every output bit unchanged."""
    def check() -> str:
        __tracebackhide__ = True
        n_pad = int(pad.sum())
        if n_pad == 0:
            return "no padding in this shape (rows a multiple of 128, K/16 of 4): nothing to read"
        clean = _bits(run(a))
        for byte in (0xFF, 0x7F):
            sf = a.sf_swizzled_u8.clone()
            sf[pad] = byte
            dirty = _bits(run(QuantizedAct(a.packed_u8, sf, a.global_dec_f32)))
            bad = torch.nonzero(dirty != clean)
            if bad.numel():
                raise AssertionError(f"0x{byte:02X} in the {n_pad} padding bytes of the scale buffer changed "
                                     f"{bad.shape[0]} output bytes (first at byte {int(bad[0, 0])}): the kernel "
                                     "reads scale padding")
        return f"0xFF and 0x7F in the {n_pad} padding bytes change no output bit"

    return _fail_or_pass(stage.name, Check.PADDING, check)


def _clone_act(a: QuantizedAct) -> QuantizedAct:
    return QuantizedAct(a.packed_u8.clone(), a.sf_swizzled_u8.clone(), a.global_dec_f32.clone())


def _grouped_gemm_extras(stage: Stage, backend: Backend, case: LayerCase, experts, a: QuantizedAct, off_i64: Tensor,
                         layer: str) -> list[Verdict]:
    """Batch invariance (one expert's rows alone give the bits they have among all experts' rows) and
    the sync / graph probes (new codes, new global scales) of a grouped GEMM stage."""
    off_i32 = off_i64.to(torch.int32)

    def run(act: QuantizedAct, off: Tensor):
        return backend.grouped_gemm(act, off, experts, layer=layer)

    def batch_check() -> str:
        __tracebackhide__ = True
        counts = (off_i64[1:] - off_i64[:-1]).tolist()
        e = max(range(len(counts)), key=lambda i: (counts[i] > 0, -i if counts[i] > 0 else 0))
        lo, hi = int(off_i64[e]), int(off_i64[e + 1])
        sub_off = torch.zeros_like(off_i64)
        sub_off[e + 1:] = hi - lo
        sf_lin = ref_layouts.sf_grouped_swizzled_128x4_to_linear(a.sf_swizzled_u8, off_i64, cols=a.k // 16)
        sub = QuantizedAct(a.packed_u8[lo:hi].contiguous(),
                           ref_layouts.sf_grouped_linear_to_swizzled_128x4(sf_lin[lo:hi], sub_off)[0], a.global_dec_f32)
        full, alone = run(a, off_i32), run(sub, sub_off.to(torch.int32))
        full = full if isinstance(full, tuple) else (full,)
        alone = alone if isinstance(alone, tuple) else (alone,)
        for f, s_ in zip(full, alone):
            assert_bits_equal(s_.cpu(), f[lo:hi].cpu(), label=f"{stage.name} expert {e}'s {hi - lo} rows alone vs among "
                                                               f"{int(off_i64[-1])} rows")
        return f"expert {e}'s {hi - lo} rows alone are bit-equal to the same rows among all {int(off_i64[-1])}"

    out = [_fail_or_pass(stage.name, Check.BATCH, batch_check)]
    real, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(
        torch.ones(int(off_i64[-1]), a.k // 16, dtype=torch.uint8, device=off_i64.device), off_i64)
    pad = torch.ones_like(a.sf_swizzled_u8, dtype=torch.bool)
    pad[:real.shape[0]] = real == 0
    out.append(_padding_check(stage, lambda act: run(act, off_i32), a, pad))
    a_buf = _clone_act(a)
    out += _probes(stage, backend, case, lambda: run(a_buf, off_i32), [
        ("new values (every code negated)", lambda: a_buf.packed_u8.copy_(a.packed_u8 ^ 0x88)),
        ("new global scales", lambda: a_buf.global_dec_f32.mul_(2.0))])
    return out


_SILU_ARGMIN = -1.2784645427610738  # silu(g) = g * sigmoid(g) is smallest here (silu' = 0)


def _swiglu_interval(g_lo: Tensor, g_hi: Tensor, u_lo: Tensor, u_hi: Tensor, limit: float | None) -> tuple[Tensor, Tensor]:
    """[h_lo, h_hi] of silu(min(g, L)) * clamp(u, -L, L) over g in [g_lo, g_hi], u in [u_lo, u_hi] (float64)."""
    def silu(g):
        g = torch.clamp(g, max=limit) if limit else g
        return g * torch.sigmoid(g)

    s_cand = [silu(g_lo), silu(g_hi)]
    inside = (g_lo < _SILU_ARGMIN) & (g_hi > _SILU_ARGMIN)
    s_min = torch.where(inside, silu(torch.full_like(g_lo, _SILU_ARGMIN)), torch.minimum(*s_cand))
    s_lo, s_hi = s_min, torch.maximum(*s_cand)
    if limit:
        u_lo, u_hi = torch.clamp(u_lo, -limit, limit), torch.clamp(u_hi, -limit, limit)
    corners = torch.stack([s_lo * u_lo, s_lo * u_hi, s_hi * u_lo, s_hi * u_hi])
    return corners.amin(0), corners.amax(0)


def _nonempty_experts(offsets: Tensor):
    """(expert, first row, end row) of every expert that has rows, from int offsets [E+1] (read once)."""
    bounds = offsets.tolist()
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if lo != hi]


def _l1_fused_verdict(backend: Backend, case: LayerCase, experts, a1: QuantizedAct, off_i64: Tensor, off_i32: Tensor,
                      s2: Tensor) -> Verdict:
    """The interval rule (DESIGN "Verdicts"): the fused kernel's h is not visible, so each scale byte must
    lie between the bytes of the smallest and largest block amax the L1 bound allows, and each code
    between the codes (under the kernel's own scale byte) of the interval's ends; codes whose interval
    straddles a rounding boundary are counted and reported."""
    lw, spec = case.layer, case.moe_spec
    got = backend.l1_fused(a1, off_i32, experts, swiglu_limit=spec.swiglu_limit, input_dec_scale_f32=s2)
    g64, bg = grouped_f64(backend, a1, off_i64, lw.experts.w1, torch.float32)
    u64, bu = grouped_f64(backend, a1, off_i64, lw.experts.w3, torch.float32)
    h_lo, h_hi = _swiglu_interval(g64 - bg, g64 + bg, u64 - bu, u64 + bu, spec.swiglu_limit)
    # the kernel may round h to bf16 before quantizing it: widen by one bf16 ulp
    h_lo = h_lo - 2 * half_ulp(h_lo.abs(), torch.bfloat16)
    h_hi = h_hi + 2 * half_ulp(h_hi.abs(), torch.bfloat16)
    r, n = h_lo.shape
    blocks_lo, blocks_hi = h_lo.view(r, n // 16, 16), h_hi.view(r, n // 16, 16)
    straddles_zero = (blocks_lo <= 0) & (blocks_hi >= 0)
    amax_lo = torch.where(straddles_zero, 0.0, torch.minimum(blocks_lo.abs(), blocks_hi.abs())).amax(-1)
    amax_hi = torch.maximum(blocks_lo.abs(), blocks_hi.abs()).amax(-1)
    sf_got = ref_layouts.sf_grouped_swizzled_128x4_to_linear(got.sf_swizzled_u8, off_i64, cols=n // 16)
    codes_got = unpack_e2m1x2_low_first(got.packed_u8).view(r, n // 16, 16)
    byte_lo = torch.empty_like(sf_got)
    byte_hi = torch.empty_like(sf_got)
    val_lo = torch.empty(r, n // 16, 16, dtype=torch.float32, device=h_lo.device)
    val_hi = torch.empty_like(val_lo)
    for e, lo, hi in _nonempty_experts(off_i64):
        g = nvfp4_global_scale_for(h_lo[lo:lo + 1].float(), recipe=backend.recipe, input_scale_f32=s2[e])
        gs = next(iter(g.values()))
        kw = dict(recipe=backend.recipe, global_scale_f32=gs)
        byte_lo[lo:hi] = block_scale_bytes(amax_lo[lo:hi].float(), **kw)
        byte_hi[lo:hi] = block_scale_bytes(amax_hi[lo:hi].float(), **kw)
        # codes of the interval's ends under the kernel's own scale bytes (round toward the end: the
        # float32 end may round; the exact interval is inside [lo rounded down, hi rounded up])
        val_lo[lo:hi] = e2m1_codes_to_f32(e2m1_codes_with_scale(_f32_down(blocks_lo[lo:hi]), sf_got[lo:hi], **kw))
        val_hi[lo:hi] = e2m1_codes_to_f32(e2m1_codes_with_scale(_f32_up(blocks_hi[lo:hi]), sf_got[lo:hi], **kw))
    val_got = e2m1_codes_to_f32(codes_got)
    metrics = {"codes_in_straddling_intervals": int((val_lo != val_hi).sum()),
               "scale_bytes_with_two_choices": int((byte_lo != byte_hi).sum())}

    def check() -> str:
        __tracebackhide__ = True
        bad_s = (sf_got < byte_lo) | (sf_got > byte_hi)
        if bad_s.any():
            i, idx = first_mismatch(bad_s)
            raise AssertionError(f"scale byte at (row, block) {idx}: got {describe_e4m3(int(sf_got[idx]))}, allowed "
                                 f"{describe_e4m3(int(byte_lo[idx]))} .. {describe_e4m3(int(byte_hi[idx]))} "
                                 f"({int(bad_s.sum())} of {bad_s.numel()} outside)")
        bad_c = (val_got < val_lo) | (val_got > val_hi)
        if bad_c.any():
            i, idx = first_mismatch(bad_c)
            raise AssertionError(f"code at (row, block, element) {idx}: got value {float(val_got[idx])}, allowed "
                                 f"{float(val_lo[idx])} .. {float(val_hi[idx])} (h in [{float(blocks_lo[idx]):.6g}, "
                                 f"{float(blocks_hi[idx]):.6g}]; {int(bad_c.sum())} of {bad_c.numel()} outside)")
        assert_bits_equal(got.global_dec_f32.reshape(-1).float().cpu(), s2.reshape(-1).float().cpu(),
                          label="global decode scale (the w2 input_scale)")
        return (f"every scale byte and code is one a value inside the L1 bound gives; {metrics['codes_in_straddling_intervals']} "
                f"codes and {metrics['scale_bytes_with_two_choices']} scale bytes had two choices")

    return _fail_or_pass(MOE_L1_FUSED.name, Check.INTERVAL, check, metrics)


def _f32_down(x64: Tensor) -> Tensor:
    """float64 -> the largest float32 <= x."""
    f = x64.float()
    return torch.where(f.double() > x64, torch.nextafter(f, torch.full_like(f, -float("inf"))), f)


def _f32_up(x64: Tensor) -> Tensor:
    f = x64.float()
    return torch.where(f.double() < x64, torch.nextafter(f, torch.full_like(f, float("inf"))), f)


def _deq_interval(h_lo: Tensor, h_hi: Tensor, recipe, g_lo: Tensor, g_hi: Tensor) -> tuple[Tensor, Tensor]:
    """[lo, hi] of the dequantized value (code x block scale x 1/S) that an enc-recipe quantizer gives h
    [R, N] for any h inside [h_lo, h_hi] and any encode scale S inside [g_lo, g_hi] (float32 0-d): the block
    scale byte lies between the bytes of the block amax bounds at the S ends (monotone in both), the code
    is monotone in h and, for a fixed byte, in h * S (non-decreasing in S for h > 0, non-increasing for
    h < 0), and 1/S is monotone; every candidate byte between the two ends is tried."""
    r, n = h_lo.shape
    b_lo, b_hi = h_lo.view(r, n // 16, 16), h_hi.view(r, n // 16, 16)
    straddles_zero = (b_lo <= 0) & (b_hi >= 0)
    amax_lo = torch.where(straddles_zero, 0.0, torch.minimum(b_lo.abs(), b_hi.abs())).amax(-1).float()
    amax_hi = torch.maximum(b_lo.abs(), b_hi.abs()).amax(-1).float()
    byte_lo = block_scale_bytes(amax_lo, recipe=recipe, global_scale_f32=g_lo).to(torch.int16)
    byte_hi = block_scale_bytes(amax_hi, recipe=recipe, global_scale_f32=g_hi).to(torch.int16)
    d_lo = torch.reciprocal(g_hi.float()).double()  # the float32 1/S the GEMM folds into alpha
    d_hi = torch.reciprocal(g_lo.float()).double()
    x_lo, x_hi = _f32_down(b_lo), _f32_up(b_hi)
    lo = torch.full_like(b_lo, float("inf"))
    hi = torch.full_like(b_hi, float("-inf"))
    for step in range(int((byte_hi - byte_lo).max()) + 1 if byte_lo.numel() else 0):
        byte = torch.minimum(byte_lo + step, byte_hi).to(torch.uint8)
        sc = e4m3_bytes_to_f32(byte).double()[..., None]
        vals = [e2m1_codes_to_f32(e2m1_codes_with_scale(xx, byte, recipe=recipe, global_scale_f32=gg)).double()
                for xx in (x_lo, x_hi) for gg in (g_lo, g_hi)]
        v_min, v_max = torch.minimum(vals[0], vals[1]), torch.maximum(vals[2], vals[3])
        corners = torch.stack([v * sc * d for v in (v_min, v_max) for d in (d_lo, d_hi)])
        lo, hi = torch.minimum(lo, corners.amin(0)), torch.maximum(hi, corners.amax(0))
    return lo.view(r, n), hi.view(r, n)


def moe_block_bound(backend: Backend, case: LayerCase, y_block: Tensor, backend_ids: Tensor | None = None) -> str:
    """The whole MoE block against the emulator's operands (teacher forced on the reference routing): its
    hidden intermediates (L1 output, h, the requantized h) are not visible, so each output element must lie
    in the interval the format and the bounds allow: L1 within its accumulation bound, h the clamped SwiGLU
    of that (and one bf16 rounding), the requantization of h any choice an interval of h and of its global
    scale allows (the interval rule), L2 within its bound on that interval, the combine within its bound
    with the fp32 router weights' error. A wrong alpha, a wrong global scale or the wrong input_scale
    anywhere in the block moves outputs far outside. Tokens whose experts the backend's own router (the
    router op on the same input, `backend_ids`) chose differently from the reference are not expected to
    match and are left out, counted in the message; the router verdict judges them (near-ties allowed).
    Every token left out is a failure: the bound would then judge nothing."""
    __tracebackhide__ = True
    lw, spec, e = case.layer, case.moe_spec, case.emulated
    if backend.recipe.global_convention != "enc":
        raise NotImplementedError(f"moe.block bound: recipe {backend.recipe.name} takes a decode global scale; "
                                  "the block interval is written for encode-scale recipes (te, vllm)")
    d = _reference_dispatch(case)
    off64 = d.offsets_i64
    rows = case.x_ffn[d.token_of_row_i64]
    ex = lw.experts
    s1, s2 = _static_expert_scales(case)  # per expert, as the emulator's moe_block (None: dynamic)
    a1 = expected_grouped_quant(backend, rows, off64, s1)
    g64, bg = grouped_f64(backend, a1, off64, ex.w1, torch.float32)
    u64, bu = grouped_f64(backend, a1, off64, ex.w3, torch.float32)
    h_lo, h_hi = _swiglu_interval(g64 - bg, g64 + bg, u64 - bu, u64 + bu, spec.swiglu_limit)
    h_lo = h_lo - 2 * half_ulp(h_lo.abs(), torch.bfloat16)
    h_hi = h_hi + 2 * half_ulp(h_hi.abs(), torch.bfloat16)
    if s2 is not None:  # static: expert e's h quantized with S = 1/s2[e]
        q_lo, q_hi = torch.empty_like(h_lo), torch.empty_like(h_hi)
        for x, lo, hi in _nonempty_experts(off64):
            g = next(iter(nvfp4_global_scale_for(h_lo[:1].float(), recipe=backend.recipe,
                                                 input_scale_f32=s2[x]).values())).reshape(())
            q_lo[lo:hi], q_hi[lo:hi] = _deq_interval(h_lo[lo:hi], h_hi[lo:hi], backend.recipe, g, g)
    else:  # dynamic: S = 2688/amax(h) over all rows, amax somewhere inside the interval's amax bounds
        amax_lo = torch.where((h_lo <= 0) & (h_hi >= 0), 0.0, torch.minimum(h_lo.abs(), h_hi.abs())).max()
        amax_hi = torch.maximum(h_lo.abs(), h_hi.abs()).max()
        g_at = [next(iter(nvfp4_global_scale_for(_f32_up(a.reshape(1)) if i else _f32_down(a.reshape(1)),
                                                 recipe=backend.recipe, input_scale_f32=None).values()))
                for i, a in enumerate((amax_lo, amax_hi))]
        g_lo, g_hi = torch.minimum(*g_at), torch.maximum(*g_at)  # S falls as amax grows
        q_lo, q_hi = _deq_interval(h_lo, h_hi, backend.recipe, g_lo.reshape(()), g_hi.reshape(()))
    # L2 on the interval (per expert), its accumulation bound and alpha's float32 rounding
    w2 = ex.w2
    mid, rad, mag = (q_lo + q_hi) / 2, (q_hi - q_lo) / 2, torch.maximum(q_lo.abs(), q_hi.abs())
    k2 = mid.shape[1]
    y_mid = torch.zeros(mid.shape[0], w2.weight_u8.shape[-2], dtype=torch.float64, device=mid.device)
    y_rad = torch.zeros_like(y_mid)
    for x, lo, hi in _nonempty_experts(off64):
        wd = decode_nvfp4_block_scaled(w2.weight_u8[x], w2.weight_scale_e4m3[x].view(torch.uint8),
                                       dtype=torch.float64) * w2.weight_scale_2_f32[x].double()
        y_mid[lo:hi] = mid[lo:hi] @ wd.T
        # accumulation, plus alpha's float32 rounding and the epilogue's float32 product (2 x 2^-24)
        y_rad[lo:hi] = rad[lo:hi] @ wd.abs().T + (gamma(k2, backend.u_acc) + 2.0**-23) * (mag[lo:hi] @ wd.abs().T)
    y_rad = y_rad + half_ulp(y_mid.abs() + y_rad, torch.bfloat16)  # the L2 output in bf16
    # combine (after w2) with the reference routing weights; the kernel's fp32 weights are within
    # gamma(k + 4, 2^-24) of them (s / sum(s) * scale: k adds, a divide, a multiply)
    w = e[ROUTER.tensor("weights")].double()
    k = w.shape[1]
    pair_mid, pair_rad = y_mid[d.row_of_pair_i64], y_rad[d.row_of_pair_i64]  # [T, k, H]
    w_err = gamma(k + 4, 2.0**-24) * w.abs()
    out_mid = (pair_mid * w[..., None]).sum(1)
    mag_terms = (pair_mid.abs() + pair_rad) * (w.abs() + w_err)[..., None]
    out_rad = (pair_rad * w.abs()[..., None]).sum(1) + (pair_mid.abs() * w_err[..., None]).sum(1) \
        + gamma(k + 1, backend.u_acc) * mag_terms.sum(1)
    out_rad = out_rad + half_ulp(out_mid.abs() + out_rad, y_block.dtype)
    ref_ids = e[ROUTER.tensor("ids")].to(y_block.device)
    keep = torch.ones(y_block.shape[0], dtype=torch.bool, device=y_block.device)
    if backend_ids is not None:
        keep = (backend_ids.to(ref_ids).sort(dim=1).values == ref_ids.sort(dim=1).values).all(dim=1)
    left_out = int((~keep).sum())
    if left_out == y_block.shape[0]:
        raise AssertionError(f"{MOE_BLOCK.name} bound: the backend's router chose other experts than the reference "
                             f"for all {left_out} tokens; nothing left to judge (see the router verdict)")
    ratio = assert_within_gemm_bound(y_block[keep], out_mid[keep], out_rad[keep],
                                     label=f"{MOE_BLOCK.name} output vs the interval of the emulator's operands")
    skipped = f"; {left_out} token(s) the backend's router routed otherwise left out" if left_out else ""
    return (f"every output within the block interval (max |y - mid| / radius = {ratio:.3g}; "
            f"{'static' if case.static else 'dynamic'} scales, K1={a1.k}, K2={k2}{skipped})")


def _moe_block_verdicts(backend: Backend, case: LayerCase, experts=None) -> list[Verdict]:
    """experts: the stack the stage verdicts already prepared (prepared once per layer), or None."""
    v = _unsupported(backend, MOE_BLOCK, Op.MOE_BLOCK, case.device)
    if v:
        return _expand(v, MOE_BLOCK)
    lw, spec = case.layer, case.moe_spec
    router = backend.prepare_router(lw.router, spec)
    experts = experts if experts is not None else backend.prepare_experts(lw.experts)
    hashed = lw.router.tid2eid_i64 is not None
    kw = dict(swiglu_limit=spec.swiglu_limit, weight_placement=case.options.weight_placement,
              act_scale=case.options.act_scale)

    def run(x: Tensor, ids: Tensor | None) -> Tensor:
        return backend.moe_block(x, router, experts, token_ids_i64=ids if hashed else None, **kw)

    out = []
    if case.static:
        ids = case.token_ids_i64

        def batch_check() -> str:
            __tracebackhide__ = True
            full = run(case.x_ffn, ids)
            alone = run(case.x_ffn[:1].contiguous(), None if ids is None else ids[:1])
            assert_bits_equal(alone.cpu(), full[:1].cpu(), label=f"{MOE_BLOCK.name} token 0 alone vs in a batch of "
                                                                 f"{case.x_ffn.shape[0]}")
            return f"token 0 alone is bit-equal to token 0 in the batch of {case.x_ffn.shape[0]}"

        out.append(_fail_or_pass(MOE_BLOCK.name, Check.BATCH, batch_check))
    else:
        out.append(Verdict(MOE_BLOCK.name, Check.BATCH.value, "skipped",
                           "batch: with a dynamic per-tensor global scale a token's bits depend on the batch's amax "
                           "by design; verified in the static runs"))
    try:
        y = run(case.x_ffn, case.token_ids_i64)
    except NotImplementedError as exc:  # e.g. a static case the block call cannot express
        return [Verdict(MOE_BLOCK.name, c.value, "not served", str(exc), {"unsupported": str(exc)})
                for c in MOE_BLOCK.checks]
    out[-1].metrics["drift_vs_reference_combine"] = stage_metrics(y.double(), case.emulated[MOE_COMBINE.name].double())
    if Check.BOUND in MOE_BLOCK.checks:
        if case.options.weight_placement != "after_w2":
            out.append(Verdict(MOE_BLOCK.name, Check.BOUND.value, "skipped", "bound: the block interval is written "
                               "for the after_w2 placement (routing weights in the combine)"))
        else:
            ids_b = backend.router(case.x_ffn, router, token_ids_i64=case.token_ids_i64 if hashed else None).ids_i64
            out.append(_fail_or_pass(MOE_BLOCK.name, Check.BOUND, lambda: moe_block_bound(backend, case, y, ids_b)))
    for check in (Check.SYNC, Check.GRAPH):
        skip = _cuda_only(MOE_BLOCK.name, check, case, backend)
        if skip:
            out.append(skip)
            continue
        x_buf = case.x_ffn.clone()
        t = x_buf.shape[0]
        valid = getattr(backend, "supports_valid_tokens", False)
        n_buf = torch.full((1,), t, dtype=torch.int32, device=x_buf.device) if valid else None

        def forward() -> Tensor:
            return backend.moe_block(x_buf, router, experts, token_ids_i64=case.token_ids_i64 if hashed else None,
                                     num_valid_tokens_i32=n_buf, **kw)

        if check is Check.SYNC:
            out.append(_sync_probe(MOE_BLOCK.name, forward))
            continue

        def new_values() -> None:  # new values and so a new routing
            x_buf.copy_((case.x_ffn.roll(1, 0) * -0.75).to(torch.bfloat16))

        def one_hot_expert() -> None:  # every token alike: top-k experts take all rows, the rest none
            x_buf.copy_(case.x_ffn[:1].expand_as(x_buf))

        def one_token() -> None:
            x_buf.copy_(case.x_ffn)
            n_buf.fill_(1)

        muts = [("new values (a new routing; in dynamic runs new global scales)", new_values),
                ("every token alike (one hot expert set, zero-token experts)", one_hot_expert)]
        if valid:
            muts.append((f"a token count of 1 (captured at {t})", one_token))
        v = _graph_probe(MOE_BLOCK.name, forward, muts)
        if not valid and v.status == "pass":
            v.message += "; token-count replay not probed: the backend's MoE block takes no valid-token count"
        out.append(v)
    return out


# ============================================================================= the layer


def stage_verdicts(backend: Backend, case: LayerCase) -> list[Verdict]:
    """Every verdict of the layer's kernel stages, in table order; each verdict's time is in its metrics."""
    out: list[Verdict] = []
    has_moe = case.layer.experts is not None
    for stage in applicable_stages(case):
        t0 = time.perf_counter()
        if stage.op is Op.DENSE_LINEAR:
            vs = _dense_stage(backend, case, stage)
        elif stage is ROUTER and has_moe:
            vs = _router_verdicts(backend, case)
        elif stage is DISPATCH and has_moe:
            vs = _moe_verdicts(backend, case)  # dispatch .. moe.block: one pass (shared dispatch and experts)
        else:
            continue
        dt = time.perf_counter() - t0
        for v in vs:
            v.metrics.setdefault("seconds", dt / max(1, len(vs)))
        out += vs
    order = {s.name: i for i, s in enumerate(STAGES)}
    return sorted(out, key=lambda v: order.get(v.stage, len(order)))
