"""Kernel verdicts on a checkpoint layer's dense NVFP4 stages (DESIGN.md "Stages" and "Verdicts").

Each dense NVFP4 linear of a layer (attention projections wq_a, wkv, wq_b, wo_b and the
shared expert's w1, w3, w2 when they are NVFP4) is run through a backend on the reference
layer's own input to that stage (teacher forcing), so a verdict blames exactly one stage:

  quantize  the backend's codes and swizzled scale bytes equal the emulator's with the
            backend's recipe and the same global encode scale (codes as values, +0 == -0;
            strict byte differences reported);
  gemm      the backend's bf16 output on ITS OWN quantized activation is within the rigorous
            accumulation bound of the float64 product (bound ratio <= 1, u_acc declared by the
            backend);
  sync      (CUDA) an eager quantize + GEMM under torch.cuda.set_sync_debug_mode("error"): any
            host synchronization in the stage raises and is reported with the stage's name;
  graph     (CUDA) quantize + GEMM captured in a CUDA graph, inputs mutated in place (new
            values, new global scale and alpha), replayed: bit-equal to eager on the new inputs.
            A capture error is a failed verdict carrying the error, never a crash.

Weights go to the backend as checkpoint bytes; their scales are swizzled with the references'
128x4 layout (the layout every backend's dense GEMM takes, DESIGN "Backends").
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
from torch import Tensor

from references.gemm import bound_ratio, gemm_error_bound, nvfp4_gemm_f64
from references.layouts import sf_linear_to_swizzled_128x4, sf_swizzled_128x4_to_linear
from references.linear import Nvfp4Weight
from references.nvfp4 import global_enc_scale_from_dec, quantize_nvfp4, te_global_enc_scale
from verify.assertions import assert_bytes_equal, assert_codes_equal_as_values, describe_e4m3
from verify.backend import Backend, Op
from verify.metrics import stage_metrics

__all__ = ["DENSE_STAGES", "CHECKS", "DenseStage", "Verdict", "dense_nvfp4_stages", "layer_dense_stages", "layer_dense_weights", "run_check"]

# stage -> (input stage in the reference run, weight role)
DENSE_STAGES: dict[str, tuple[str, str]] = {
    "attn.wq_a": ("input.x_attn", "attn.wq_a"),
    "attn.wkv": ("input.x_attn", "attn.wkv"),
    "attn.wq_b": ("attn.q_norm", "attn.wq_b"),
    "attn.wo_b": ("attn.wo_a", "attn.wo_b"),
    "shared.l1.gate": ("input.x_ffn", "shared.w1"),
    "shared.l1.up": ("input.x_ffn", "shared.w3"),
    "shared.l2": ("shared.swiglu", "shared.w2"),
}
CHECKS = ("quantize", "gemm", "sync", "graph")


@dataclass(frozen=True)
class DenseStage:
    """x_bf16 [M, K]: the reference's input to the stage; weight: the checkpoint's NVFP4 weight;
    input_scale_f32: the static activation decode scale, or None (dynamic); emulated / high: the
    reference's outputs of this stage in both modes."""

    name: str
    x_bf16: Tensor
    weight: Nvfp4Weight
    input_scale_f32: Tensor | None
    emulated: Tensor
    high: Tensor


@dataclass
class Verdict:
    stage: str
    check: str
    passed: bool
    message: str = ""
    metrics: dict = field(default_factory=dict)


def dense_nvfp4_stages(weights: dict[str, object], inputs: dict[str, Tensor], emulated: dict[str, Tensor],
                       high: dict[str, Tensor], *, static: bool) -> dict[str, DenseStage]:
    """The layer's dense NVFP4 stages. weights: role -> references weight ("attn.wq_a", "shared.w1", ...);
    inputs: {"input.x_attn", "input.x_ffn"} bf16; emulated / high: the reference layer's stage tensors."""
    out = {}
    for name, (src, role) in DENSE_STAGES.items():
        w = weights.get(role)
        if not isinstance(w, Nvfp4Weight) or name not in emulated:
            continue
        x = inputs[src] if src.startswith("input.") else emulated[src]
        scale = None
        if static:
            partner = {"attn.wq_a": "attn.wkv", "attn.wkv": "attn.wq_a", "shared.w1": "shared.w3",
                       "shared.w3": "shared.w1"}.get(role)
            fused = partner is not None and isinstance(weights.get(partner), Nvfp4Weight)
            scales = [w.input_scale_f32] + ([weights[partner].input_scale_f32] if fused else [])
            scale = torch.stack(scales).amax(0)  # a fused GEMM shares one activation scale (max)
        out[name] = DenseStage(name, x.to(torch.bfloat16), w, scale, emulated[name], high[name])
    return out


def layer_dense_weights(ckpt, layer) -> dict[str, object]:
    """role -> references weight for the layer's attention projections and shared expert."""
    from verify.reference_layer import attn_weights_from, to_reference_weight  # noqa: PLC0415

    weights: dict[str, object] = {}
    if ckpt.config.schema == "deepseek_v4":
        a = attn_weights_from(layer)
        weights.update({"attn.wq_a": a.wq_a, "attn.wkv": a.wkv, "attn.wq_b": a.wq_b, "attn.wo_b": a.wo_b})
    if layer.shared_experts is not None:
        m = layer.shared_experts
        weights.update({"shared.w1": to_reference_weight(m.w1), "shared.w3": to_reference_weight(m.w3),
                        "shared.w2": to_reference_weight(m.w2)})
    return weights


def layer_dense_stages(ckpt, layer, inputs, options, *, emulated: dict[str, Tensor] | None = None,
                       high: dict[str, Tensor] | None = None) -> dict[str, DenseStage]:
    """The layer's dense NVFP4 stages with their inputs; runs the reference layer (both modes) unless
    its outputs are given."""
    from verify.reference_layer import run_reference_layer  # noqa: PLC0415

    if emulated is None:
        emulated = run_reference_layer(ckpt, layer, inputs, mode="emulated", options=options)
    if high is None:
        high = run_reference_layer(ckpt, layer, inputs, mode="high", options=options)
    x = {"input.x_attn": inputs.x_attn_bf16, "input.x_ffn": inputs.x_ffn_bf16}
    return dense_nvfp4_stages(layer_dense_weights(ckpt, layer), x, emulated, high,
                              static=options.act_scale == "static")


def _enc_and_dec_scale(x_bf16: Tensor, input_scale_f32: Tensor | None) -> tuple[Tensor, Tensor]:
    """(S, D) of the activation: static S = 1/input_scale and D = input_scale; dynamic S = 2688/amax
    and D = 1/S (float32)."""
    if input_scale_f32 is not None:
        d = input_scale_f32.to(torch.float32).reshape(1)
        return global_enc_scale_from_dec(d), d
    s = te_global_enc_scale(torch.amax(x_bf16.abs()).to(torch.float32)).reshape(1)
    return s, torch.reciprocal(s)


def _weight_operands(w: Nvfp4Weight) -> tuple[Tensor, Tensor]:
    return w.packed_u8, sf_linear_to_swizzled_128x4(w.sf_u8)


def _quantize_check(backend: Backend, st: DenseStage) -> Verdict:
    s, _ = _enc_and_dec_scale(st.x_bf16, st.input_scale_f32)
    packed, sf_swz = backend.quantize_nvfp4(st.x_bf16, s)
    q = quantize_nvfp4(st.x_bf16, recipe=backend.recipe, global_enc_scale_f32=s.reshape(()))
    expected_sf = sf_linear_to_swizzled_128x4(q.sf_u8)
    metrics = {"strict_code_byte_diffs": int((packed.cpu() != q.packed_u8.cpu()).sum()) if packed.shape == q.packed_u8.shape else -1,
               "saturated_blocks": int((q.sf_u8 == 0x7E).sum()), "blocks": q.sf_u8.numel()}
    try:
        assert_codes_equal_as_values(packed, q.packed_u8, label=f"{st.name} codes ({backend.name} vs emulator {backend.recipe})")
        assert_bytes_equal(sf_swz, expected_sf, label=f"{st.name} swizzled scales", describe=describe_e4m3)
    except AssertionError as exc:
        return Verdict(st.name, "quantize", False, str(exc), metrics)
    return Verdict(st.name, "quantize", True, "codes and scale bytes equal the emulator", metrics)


def _gemm_once(backend: Backend, st: DenseStage) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    s, d = _enc_and_dec_scale(st.x_bf16, st.input_scale_f32)
    a, a_sf = backend.quantize_nvfp4(st.x_bf16, s)
    alpha = (d * st.weight.global_dec_f32.to(torch.float32).reshape(1)).reshape(())
    w_packed, w_sf = _weight_operands(st.weight)
    return backend.gemm_nvfp4(a, a_sf, w_packed, w_sf, alpha), a, a_sf, alpha


def _gemm_check(backend: Backend, st: DenseStage) -> Verdict:
    y, a, a_sf, alpha = _gemm_once(backend, st)
    m, k = st.x_bf16.shape
    a_sf_lin = sf_swizzled_128x4_to_linear(a_sf, rows=m, cols=k // 16)
    y64, abs_dot = nvfp4_gemm_f64(a, a_sf_lin, st.weight.packed_u8, st.weight.sf_u8, alpha)
    bound = gemm_error_bound(abs_dot, y64, alpha, k=k, u_acc=backend.u_acc)
    ratio = float(bound_ratio(y, y64, bound)) if y.numel() else 0.0
    metrics = {"bound_ratio": ratio, "u_acc": backend.u_acc,
               "vs_emulator": stage_metrics(y.float(), st.emulated.float()),
               "loss_vs_high": stage_metrics(y.double(), st.high.double())}
    ok = ratio <= 1.0 and not torch.isnan(y).any()
    msg = f"max |y - y64| / bound = {ratio:.3g} (u_acc {backend.u_acc:.3g}, K={k})"
    return Verdict(st.name, "gemm", bool(ok), msg if ok else f"{st.name}: outside the accumulation bound: {msg}", metrics)


def _graph_check(backend: Backend, st: DenseStage) -> Verdict:
    if st.x_bf16.device.type != "cuda":
        return Verdict(st.name, "graph", True, "skipped: CUDA graphs need a CUDA device", {"skipped": True})
    w_packed, w_sf = _weight_operands(st.weight)
    w_dec = st.weight.global_dec_f32.to(torch.float32).reshape(1)
    x_buf = st.x_bf16.clone()
    s_buf, d = _enc_and_dec_scale(x_buf, st.input_scale_f32)
    alpha_buf = (d * w_dec).reshape(())

    def forward() -> Tensor:
        a, a_sf = backend.quantize_nvfp4(x_buf, s_buf)
        return backend.gemm_nvfp4(a, a_sf, w_packed, w_sf, alpha_buf)

    try:
        forward()  # compile / warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph = forward()
        x_new = (st.x_bf16.roll(1, 0) * -0.75).to(torch.bfloat16)  # new values, new amax, new sign pattern
        s_new, d_new = _enc_and_dec_scale(x_new, st.input_scale_f32)
        x_buf.copy_(x_new)
        s_buf.copy_(s_new)
        alpha_buf.copy_((d_new * w_dec).reshape(()))
        graph.replay()
        torch.cuda.synchronize()
        y_eager = forward()
        diff = int((y_graph.view(torch.int16) != y_eager.view(torch.int16)).sum())
    except Exception as exc:  # noqa: BLE001 - a capture failure is a verdict, not a crash
        return Verdict(st.name, "graph", False, f"{st.name}: capture/replay failed: {type(exc).__name__}: {exc}",
                       {"traceback": traceback.format_exc(limit=3)})
    ok = diff == 0
    msg = "replay with new values and scales is bit-equal to eager" if ok else \
        f"{st.name}: graph replay differs from eager in {diff} of {y_eager.numel()} elements"
    return Verdict(st.name, "graph", ok, msg, {"differing_elements": diff})


def _sync_check(backend: Backend, st: DenseStage) -> Verdict:
    if st.x_bf16.device.type != "cuda":
        return Verdict(st.name, "sync", True, "skipped: needs a CUDA device", {"skipped": True})
    _gemm_once(backend, st)  # compile and cache outside the probe
    torch.cuda.synchronize()
    s, d = _enc_and_dec_scale(st.x_bf16, st.input_scale_f32)
    alpha = (d * st.weight.global_dec_f32.to(torch.float32).reshape(1)).reshape(())
    w_packed, w_sf = _weight_operands(st.weight)
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        a, a_sf = backend.quantize_nvfp4(st.x_bf16, s)
        backend.gemm_nvfp4(a, a_sf, w_packed, w_sf, alpha)
    except RuntimeError as exc:
        return Verdict(st.name, "sync", False, f"{st.name}: the forward path synchronizes with the host: {exc}")
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return Verdict(st.name, "sync", True, "no host synchronization in quantize + GEMM")


_CHECKS = {"quantize": (_quantize_check, Op.QUANTIZE), "gemm": (_gemm_check, Op.DENSE_GEMM),
           "sync": (_sync_check, Op.DENSE_GEMM),
           "graph": (_graph_check, Op.DENSE_GEMM)}


def run_check(backend: Backend, st: DenseStage, check: str) -> Verdict:
    """One verdict. A backend that cannot run the op here gives a failed verdict naming the reason
    (callers that want a skip ask backend.unsupported_reason first)."""
    fn, op = _CHECKS[check]
    reason = backend.unsupported_reason(op, st.x_bf16.device)
    if reason:
        return Verdict(st.name, check, False, f"unsupported: {reason}", {"unsupported": reason})
    if backend.recipe.global_convention != "enc":
        raise ValueError(f"backend {backend.name}: recipe {backend.recipe} takes a decode global scale; the "
                         "backend interface passes an encode scale")
    return fn(backend, st)
