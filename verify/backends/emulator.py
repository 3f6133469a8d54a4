"""The emulator backend: references/ served through the backend protocol, every op, any device.

Numerics modes (references.modes): the emulator computes any mode a GEMM can have. Its dense_linear computes
the mode it declares for the weight's format (`modes`, default w4a4 / fp8_block: the references' emulated
linear); EmulatorBackend(modes={"nvfp4": NumericsMode.W4A16}) is a W4A16 emulator, and the `mode` check
compares any backend's output with each of these. dense_gemm and grouped_gemm take NVFP4 activations
(protocol.QuantizedAct): w4a4 by construction. `dequantize_prepared` decodes its prepared weights (the
references' typed weights: no repack) back for the `prepare` check.

Also `run_moe_block`: the routed MoE block composed from any backend's stage ops (the emulator's
own block, and the oracle a production block is compared with bit for bit in the sm90 tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from references import layouts as ref_layouts
from references import moe as ref_moe
from references.codecs import round_f64_to
from references.fp8_act import FP8_ACT_F32, FP8_ACT_UE8M0, quantize_act_fp8_1x128
from references.layer import MoeSpec
from references.linear import Bf16Weight, Fp8Block128Weight, Nvfp4Weight, Weight, dequantize_weight_f64, \
    grouped_linear as ref_grouped_linear, linear as ref_linear, weight_experts
from references.modes import grouped_linear_mode_gemm_f64, linear_in_mode
from references.mtp import Mxfp4ExpertStack, mxfp4_grouped_linear
from references.mxfp4 import Mxfp4Weight
from references.nvfp4 import decode_nvfp4_block_scaled
from references.recipes import Recipe, recipe_by_name
from references.router import route
from references.stages import Op
from verify.backends.base import Backend
from verify.backends.protocol import FP8_SCALE_RULES, BackendProtocol, Dispatched, Fp8QuantizedAct, NumericsMode, \
    QuantizedAct, RoutingOut
from verify.checkpoint import GatedMlp, Linear, Mxfp4Linear, Router
from verify.checkpoint import fp8_act_scale_fmt  # re-exported: the rule the weight implies
from verify.provenance import REFERENCE_BUILD, static_recorder
from verify.reference_layer import to_reference_weight

__all__ = ["EmulatorBackend", "run_moe_block", "weight_format_of", "fp8_act_scale_fmt", "fp8_act_recipe_for_rule", "U_FP64"]

U_FP64 = 2.0**-53  # float64 accumulation of exact products: the emulator's GEMMs


@dataclass(frozen=True)
class _EmulatorRouter:
    gate_weight_bf16: Tensor
    gate_bias_f32: Tensor | None
    tid2eid_i64: Tensor | None
    spec: MoeSpec


def _offsets_i64(offsets_i32: Tensor) -> Tensor:
    return offsets_i32.to(torch.int64)


class EmulatorBackend(Backend):
    """The references served through the protocol: every op, any device. GEMMs are exact products
    summed in float64 and rounded once: u_acc = 2^-53, what verify.accumulator measures (a looser
    declaration would be refused)."""

    name = "emulator"
    u_acc = U_FP64
    accumulator = "float64 (exact products summed in float64, rounded once to the output dtype)"
    # its FP8 GEMMs too: float64 over all of K, rounded once (no float32 promotion), so the FP8 bound
    # stays gemm_error_bound over K with 2^-53 (verify.verdicts.judges.dense)
    fp8_u_acc = U_FP64
    fp8_promotion_interval = None
    graph_safe = False  # a reference: host reads (offsets, counts) by design, never captured
    supports_valid_tokens = True
    # the MTP block's MXFP4 experts take FP8 1x128 activations (references.mtp: W4A8), not NVFP4 ones
    modes = MappingProxyType({"mxfp4": NumericsMode.W4A8})

    def __init__(self, recipe: Recipe | str = "te", *, modes: dict | None = None) -> None:
        self.recipe = recipe_by_name(recipe) if isinstance(recipe, str) else recipe
        if modes is not None:  # (op, weight_format) or weight_format -> NumericsMode (Backend.modes)
            self.modes = {k: NumericsMode(v) for k, v in modes.items()}

    def computed_mode(self, op: Op, weight_format: str) -> NumericsMode:
        """The mode its GEMMs compute: the declared one (a planted test backend overrides this to lie)."""
        return self.numerics_mode(op, weight_format)

    # ---------------------------------------------------------------- prepare check

    def dequantize_prepared(self, prepared: Weight | ref_moe.ExpertStack, *,
                            experts: range | None = None) -> Tensor | dict[str, Tensor]:
        """Its prepared weights (the references' typed weights, checkpoint layout) dequantized: float32
        [N, K], or {"w1", "w3", "w2": [E, N, K]} for the experts (one rounding of the exact float64 value);
        experts: only that range of the stacks ([len(experts), N, K])."""
        if isinstance(prepared, ref_moe.ExpertStack):
            pick = (lambda w: w) if experts is None else (lambda w: weight_experts(w, experts))
            return {r: dequantize_weight_f64(pick(getattr(prepared, r))).float() for r in ("w1", "w3", "w2")}
        if experts is not None:
            raise ValueError(f"experts={experts}: {type(prepared).__name__} is a dense weight, not an expert stack")
        return dequantize_weight_f64(prepared).float()

    def launch_recorder(self):
        """Provenance: every op is references/ code in torch ("reference"; verify.provenance)."""
        return static_recorder(REFERENCE_BUILD)

    # ---------------------------------------------------------------- prepare

    def prepare_linear(self, lin: Linear) -> Weight:
        return to_reference_weight(lin)

    def prepare_experts(self, experts: GatedMlp) -> ref_moe.ExpertStack | Mxfp4ExpertStack:
        """NVFP4 stacks -> the references' ExpertStack; MXFP4 stacks (the MTP block's experts) -> Mxfp4ExpertStack
        (the E8M0 bytes validated: 0xFF refused)."""
        ws = (experts.w1, experts.w3, experts.w2)
        if all(isinstance(w, Mxfp4Linear) for w in ws):
            return Mxfp4ExpertStack(*(Mxfp4Weight(w.weight_u8, w.scale_ue8m0, w.module) for w in ws))
        return ref_moe.ExpertStack(*(to_reference_weight(w) for w in ws))

    def prepare_router(self, router: Router, spec: MoeSpec) -> _EmulatorRouter:
        return _EmulatorRouter(router.gate_weight_bf16, router.gate_bias_f32, router.tid2eid_i64, spec)

    # ---------------------------------------------------------------- quantization

    def quantize(self, x_bf16: Tensor, *, input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        offsets = torch.tensor([0, x_bf16.shape[0]], dtype=torch.int64, device=x_bf16.device)
        scale = None if input_dec_scale_f32 is None else input_dec_scale_f32.reshape(1)
        a = ref_moe.act_quant(x_bf16, offsets, recipe=self.recipe, act_scale="dynamic" if scale is None else "static",
                              input_scale_f32=scale)
        return QuantizedAct(a.packed_u8, ref_layouts.sf_linear_to_swizzled_128x4(a.sf_u8), a.global_dec_f32)

    def grouped_quantize(self, rows_bf16: Tensor, offsets_i32: Tensor, *,
                         input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        off = _offsets_i64(offsets_i32)
        a = ref_moe.act_quant(rows_bf16, off, recipe=self.recipe,
                              act_scale="dynamic" if input_dec_scale_f32 is None else "static",
                              input_scale_f32=input_dec_scale_f32)
        sf, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(a.sf_u8, off)
        return QuantizedAct(a.packed_u8, sf, a.global_dec_f32)

    def quantize_fp8(self, x_bf16: Tensor, *, scale_rule: str) -> Fp8QuantizedAct:
        """references.fp8_act: FP8_ACT_UE8M0 ("ue8m0_ceil") or FP8_ACT_F32 ("f32"), x / s, NaN propagated."""
        q = quantize_act_fp8_1x128(x_bf16, recipe=fp8_act_recipe_for_rule(scale_rule))
        return Fp8QuantizedAct(q.e4m3_u8, q.block_dec_scale, scale_rule)

    # ---------------------------------------------------------------- GEMMs

    @staticmethod
    def _act(a: QuantizedAct, offsets_i64: Tensor) -> ref_moe.ActQuant:
        sf = ref_layouts.sf_grouped_swizzled_128x4_to_linear(a.sf_swizzled_u8, offsets_i64, cols=a.k // 16)
        return ref_moe.ActQuant(a.packed_u8, sf, a.global_dec_f32, offsets_i64)

    def dense_gemm(self, a: QuantizedAct, w: Weight) -> Tensor:
        if not isinstance(w, Nvfp4Weight):
            raise TypeError(f"dense_gemm: weight must be NVFP4, got {type(w).__name__}")
        m = a.packed_u8.shape[0]
        sf = ref_layouts.sf_swizzled_128x4_to_linear(a.sf_swizzled_u8, rows=m, cols=a.k // 16)
        x = decode_nvfp4_block_scaled(a.packed_u8, sf, dtype=torch.float64)
        b = decode_nvfp4_block_scaled(w.packed_u8, w.sf_u8, dtype=torch.float64)
        alpha = a.global_dec_f32.to(torch.float32).reshape(()) * w.global_dec_f32.to(torch.float32).reshape(())
        return round_f64_to((x @ b.T) * alpha.double(), torch.bfloat16)  # one rounding (torch's cast rounds twice)

    def grouped_gemm(self, a: QuantizedAct, offsets_i32: Tensor, experts: ref_moe.ExpertStack, *,
                     layer: str) -> Tensor | tuple[Tensor, Tensor]:
        off = _offsets_i64(offsets_i32)
        act = self._act(a, off)
        if layer == "l1":
            return ref_moe.l1(act, off, experts, mode="emulated")
        if layer == "l2":
            return ref_moe.l2(act, off, experts, mode="emulated")
        raise ValueError(f"layer={layer!r}: expected 'l1' or 'l2'")

    def swiglu_requant(self, gate: Tensor, up: Tensor, offsets_i32: Tensor, *, swiglu_limit: float | None,
                       row_weight_f32: Tensor | None = None,
                       input_dec_scale_f32: Tensor | None = None) -> tuple[Tensor, QuantizedAct]:
        h = ref_moe.swiglu(gate, up, limit=swiglu_limit, row_weight_f32=row_weight_f32, mode="emulated")
        return h, self.grouped_quantize(h, offsets_i32, input_dec_scale_f32=input_dec_scale_f32)

    def l1_fused(self, a: QuantizedAct, offsets_i32: Tensor, experts: ref_moe.ExpertStack, *,
                 swiglu_limit: float | None, input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        gate, up = self.grouped_gemm(a, offsets_i32, experts, layer="l1")
        return self.swiglu_requant(gate, up, offsets_i32, swiglu_limit=swiglu_limit,
                                   input_dec_scale_f32=input_dec_scale_f32)[1]

    # ---------------------------------------------------------------- routing

    def router(self, x_bf16: Tensor, router: _EmulatorRouter, *, token_ids_i64: Tensor | None = None) -> RoutingOut:
        s = router.spec
        r = route(x_bf16, router.gate_weight_bf16, scoring=s.scoring, top_k=s.top_k,
                  routed_scaling_factor=s.routed_scaling_factor, bias_f32=router.gate_bias_f32,
                  tid2eid=router.tid2eid_i64, token_ids_i64=token_ids_i64 if router.tid2eid_i64 is not None else None,
                  renormalize=s.renormalize, n_group=s.n_group, topk_group=s.topk_group)
        return RoutingOut(r.ids_i64, r.weights_f32)

    def dispatch(self, ids_i64: Tensor, num_experts: int) -> Dispatched:
        d = ref_moe.dispatch(ids_i64, num_experts)
        return Dispatched(d.token_of_row_i64, d.slot_of_row_i64, d.offsets_i64.to(torch.int32), ids_i64.shape[1])

    def combine(self, y_rows_bf16: Tensor, d: Dispatched, weights_f32: Tensor | None) -> Tensor:
        t, k = _pairs_shape(d)
        ref_d = _reference_dispatch(d, t, k)
        return ref_moe.combine(y_rows_bf16, ref_d, weights_f32, mode="emulated")

    # ---------------------------------------------------------------- whole calls

    def dense_linear(self, x_bf16: Tensor, w: Weight, *, input_dec_scale_f32: Tensor | None = None) -> Tensor:
        """NVFP4 (static / dynamic), FP8 block-128 (activation scales as the weight stores its own:
        E8M0 for V4, float32 for V3) or BF16 weight -> bf16 [M, N], in the mode it computes for the weight's
        format (module docstring; w4a4 / fp8_block: the references' emulated linear)."""
        fmt = weight_format_of(w)
        mode = None if fmt is None else self.computed_mode(Op.DENSE_LINEAR, fmt)
        if mode not in (None, NumericsMode.W4A4, NumericsMode.FP8_BLOCK):
            return linear_in_mode(x_bf16, w, mode.value, recipe=self.recipe, input_scale_f32=input_dec_scale_f32,
                                  fp8_scale_fmt=fp8_act_scale_fmt(w))
        y, _ = ref_linear(x_bf16, w, mode="emulated", recipe=self.recipe, input_scale_f32=input_dec_scale_f32,
                          fp8_scale_fmt=fp8_act_scale_fmt(w))
        return y

    def grouped_dense_linear(self, x_bf16: Tensor, w: Weight, *, groups: int,
                             input_dec_scale_f32: Tensor | None = None) -> Tensor:
        """DeepSeek-V4's wo_a: references.linear.grouped_linear (what the reference layer's emulated attn.wo_a
        computes: x quantized once as a whole, each group's columns times its row block, one rounding), or, for a
        mode other than w4a4 / fp8_block, references.modes.grouped_linear_mode_gemm_f64 rounded once."""
        fmt = weight_format_of(w)
        mode = None if fmt is None else self.computed_mode(Op.GROUPED_DENSE_LINEAR, fmt)
        kw = dict(recipe=self.recipe, input_scale_f32=input_dec_scale_f32, fp8_scale_fmt=fp8_act_scale_fmt(w))
        if mode not in (None, NumericsMode.W4A4, NumericsMode.FP8_BLOCK):
            return round_f64_to(grouped_linear_mode_gemm_f64(x_bf16, w, mode.value, groups=groups, **kw)[0],
                                torch.bfloat16)
        return ref_grouped_linear(x_bf16, w, groups=groups, mode="emulated", **kw)[0]

    def grouped_linear_mxfp4(self, rows_bf16: Tensor, offsets_i32: Tensor, experts: Mxfp4ExpertStack, *,
                             layer: str) -> Tensor | tuple[Tensor, Tensor]:
        """references.mtp.mxfp4_grouped_linear: rows FP8 1x128 (UE8M0, rounded up), exact products summed in
        float64, rounded once to bf16; l1 -> (gate, up), l2 -> y."""
        if not isinstance(experts, Mxfp4ExpertStack):
            raise TypeError(f"grouped_linear_mxfp4: experts must be an MXFP4 stack, got {type(experts).__name__}")
        off = _offsets_i64(offsets_i32)
        if layer == "l1":
            return (mxfp4_grouped_linear(rows_bf16, off, experts.w1, mode="emulated"),
                    mxfp4_grouped_linear(rows_bf16, off, experts.w3, mode="emulated"))
        if layer == "l2":
            return mxfp4_grouped_linear(rows_bf16, off, experts.w2, mode="emulated")
        raise ValueError(f"layer={layer!r}: expected 'l1' or 'l2'")

    def moe_block(self, x_bf16: Tensor, router: _EmulatorRouter, experts: ref_moe.ExpertStack, *,
                  swiglu_limit: float | None, weight_placement: str, act_scale: str,
                  token_ids_i64: Tensor | None = None, num_valid_tokens_i32: Tensor | None = None) -> Tensor:
        if num_valid_tokens_i32 is not None:  # the reference reads the count on the host (not graph-safe)
            n = int(num_valid_tokens_i32.reshape(-1)[0])
            out = torch.zeros_like(x_bf16)
            if n:
                out[:n] = self.moe_block(x_bf16[:n], router, experts, swiglu_limit=swiglu_limit,
                                         weight_placement=weight_placement, act_scale=act_scale,
                                         token_ids_i64=None if token_ids_i64 is None else token_ids_i64[:n])
            return out
        return run_moe_block(self, x_bf16, router, experts, swiglu_limit=swiglu_limit,
                             weight_placement=weight_placement, act_scale=act_scale,
                             static_scales=_emulator_static_scales(experts) if act_scale == "static" else None,
                             token_ids_i64=token_ids_i64)


def weight_format_of(w: Weight) -> str | None:
    """protocol.WEIGHT_FORMATS name of a references weight (None: BF16, which has one mode)."""
    if isinstance(w, Nvfp4Weight):
        return "nvfp4"
    if isinstance(w, Fp8Block128Weight):
        return "fp8_block"
    if isinstance(w, Bf16Weight):
        return None
    raise TypeError(f"weight: expected a references.linear weight, got {type(w).__name__}")


def fp8_act_recipe_for_rule(scale_rule: str):
    """The references' FP8 1x128 activation recipe of a protocol scale rule: "ue8m0_ceil" -> FP8_ACT_UE8M0
    (DeepSeek's reference act_quant, V4), "f32" -> FP8_ACT_F32 (amax/448, x / s). ValueError otherwise."""
    recipes = {"ue8m0_ceil": FP8_ACT_UE8M0, "f32": FP8_ACT_F32}
    if scale_rule not in recipes:
        raise ValueError(f"scale_rule={scale_rule!r}: expected one of {FP8_SCALE_RULES}")
    return recipes[scale_rule]


def _emulator_static_scales(experts: ref_moe.ExpertStack) -> tuple[Tensor, Tensor]:
    return (ref_moe.max_input_dec_scale_f32([experts.w1, experts.w3], "experts.w1/w3"),
            ref_moe.max_input_dec_scale_f32([experts.w2], "experts.w2"))


def _pairs_shape(d: Dispatched) -> tuple[int, int]:
    if d.top_k is not None:
        return d.row_token_i64.numel() // d.top_k, d.top_k
    k = int(d.row_slot_i64.max()) + 1 if d.row_slot_i64.numel() else 1
    return d.row_token_i64.numel() // k, k


def _reference_dispatch(d: Dispatched, t: int, k: int) -> ref_moe.Dispatch:
    """The references' Dispatch record of a boundary Dispatched (row_of_pair rebuilt)."""
    row_of_pair = torch.empty(t * k, dtype=torch.int64, device=d.row_token_i64.device)
    row_of_pair[d.row_token_i64 * k + d.row_slot_i64] = torch.arange(t * k, device=d.row_token_i64.device)
    counts = d.offsets_i32[1:] - d.offsets_i32[:-1]
    expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts.to(torch.int64))
    return ref_moe.Dispatch(d.row_token_i64, d.row_slot_i64, expert_of_row, d.offsets_i32.to(torch.int64),
                            row_of_pair.view(t, k))


def run_moe_block(backend: BackendProtocol, x_bf16: Tensor, router: object, experts: object, *,
                  swiglu_limit: float | None, weight_placement: str, act_scale: str,
                  static_scales: tuple[Tensor, Tensor] | None, token_ids_i64: Tensor | None = None) -> Tensor:
    """The routed MoE block composed from a backend's stage ops: router -> dispatch -> act_quant
    -> l1 -> swiglu+requant -> l2 -> combine. static_scales: (l1, l2) per-expert decode scales."""
    r = backend.router(x_bf16, router, token_ids_i64=token_ids_i64)
    num_experts = _num_experts(experts)
    d = backend.dispatch(r.ids_i64, num_experts)
    rows = x_bf16[d.row_token_i64]
    s1, s2 = static_scales if static_scales is not None else (None, None)
    a = backend.grouped_quantize(rows, d.offsets_i32, input_dec_scale_f32=s1)
    gate, up = backend.grouped_gemm(a, d.offsets_i32, experts, layer="l1")
    before = weight_placement == "before_w2"
    row_w = r.weights_f32[d.row_token_i64, d.row_slot_i64] if before else None
    _, a2 = backend.swiglu_requant(gate, up, d.offsets_i32, swiglu_limit=swiglu_limit, row_weight_f32=row_w,
                                   input_dec_scale_f32=s2)
    y = backend.grouped_gemm(a2, d.offsets_i32, experts, layer="l2")
    return backend.combine(y, d, None if before else r.weights_f32)


def _num_experts(experts: object) -> int:
    n = getattr(experts, "num_experts", None)
    if n is None:
        raise TypeError(f"{type(experts).__name__}: prepared experts must expose num_experts")
    return int(n)
