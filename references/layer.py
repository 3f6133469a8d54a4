"""One DeepSeek-V4 decoder layer's verified parts, run stage by stage in either reference mode.

`moe_block` and `attention_projections` return every named stage tensor (an ordered
dict), in "emulated" mode (what a faithful NVFP4 kernel computes, references.linear) or
"high" mode (unquantized activations, dequantized weights, float64). Comparing the two
per stage is the format's own loss (DESIGN.md "Stages", way 3).

Stage names come from references.stages (the stage table); emulated mode adds the quantized
bytes of each quantization under the table's names.

The attention core (sparse attention, indexer, compressor, rotary) is not emulated:
wo_a consumes `attn_core_out` when given, else q (same shape [T, heads * head_dim]) as
a stand-in, so the output projections see realistic operands. The emulated wo_a quantizes
its input to the weight's format (what a kernel with an NVFP4/FP8 wo_a does); DeepSeek's
own code runs that einsum on unquantized bf16 o, which a BF16 wo_a weight reproduces.

moe.out follows DeepSeek's MoE.forward: routed sum and shared expert accumulated in fp32,
rounded once (emulated: the exact sum of the bf16 expert outputs, rounded once to bf16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from references import moe
from references.codecs import round_f64_to
from references.linear import (
    FP8_SCALE_FMTS,
    MODES,
    Fp8Block128Weight,
    Nvfp4Weight,
    Weight,
    grouped_linear,
    linear,
    rms_norm,
)
from references.recipes import TE, Recipe
from references.router import route
from references.stages import (
    ATTN_KV_NORM, ATTN_Q_NORM, ATTN_WKV, ATTN_WO_A, ATTN_WO_B, ATTN_WQ_A, ATTN_WQ_B, INDEXER_WQ_B, MOE_ACT_QUANT,
    MOE_COMBINE, MOE_L1, MOE_L2, MOE_OUT, MOE_REQUANT, MOE_SWIGLU, ROUTER, SHARED_EXPERT,
)

__all__ = ["MoeSpec", "MoeWeights", "AttnSpec", "AttnWeights", "RunOptions", "moe_block", "attention_projections"]


@dataclass(frozen=True)
class MoeSpec:
    """Hyper-parameters of one MoE block. renormalize None: DeepSeek's rule (all but softmax).
    shared_swiglu_limit: the shared expert's clamp ("routed" = the same as swiglu_limit)."""

    top_k: int
    scoring: str
    routed_scaling_factor: float
    swiglu_limit: float | None
    renormalize: bool | None = None
    n_group: int | None = None
    topk_group: int | None = None
    shared_swiglu_limit: float | None | str = "routed"


@dataclass(frozen=True)
class MoeWeights:
    """gate_weight [E, H] (bf16); gate_bias_f32 [E] or None; tid2eid [vocab, k] or None (hash
    layer); experts: the routed stack; shared: (w1, w3, w2) or None."""

    gate_weight: Tensor
    gate_bias_f32: Tensor | None
    tid2eid: Tensor | None
    experts: moe.ExpertStack
    shared: tuple[Weight, Weight, Weight] | None


@dataclass(frozen=True)
class AttnSpec:
    n_heads: int
    head_dim: int
    o_groups: int
    o_lora_rank: int
    eps: float = 1e-6


@dataclass(frozen=True)
class AttnWeights:
    wq_a: Weight
    wkv: Weight
    wq_b: Weight
    wo_a: Weight
    wo_b: Weight
    q_norm: Tensor
    kv_norm: Tensor
    indexer_wq_b: Weight | None = None  # V4's indexer query projection, where the checkpoint has it


@dataclass(frozen=True)
class RunOptions:
    """recipe: the NVFP4 activation quantizer; act_scale: "dynamic" (amax on the fly) or "static"
    (the checkpoint's input_scale); weight_placement: "after_w2" (kernels) or "before_w2"
    (DeepSeek's reference); fp8_scale_fmt: the FP8 activation block-scale format."""

    recipe: Recipe = field(default=TE)
    act_scale: str = "dynamic"
    weight_placement: str = "after_w2"
    fp8_scale_fmt: str = "ue8m0"

    def __post_init__(self) -> None:
        if self.act_scale not in ("dynamic", "static"):
            raise ValueError(f"act_scale={self.act_scale!r}: expected 'dynamic' or 'static'")
        if self.weight_placement not in moe.PLACEMENTS:
            raise ValueError(f"weight_placement={self.weight_placement!r}: expected one of {moe.PLACEMENTS}")
        if self.fp8_scale_fmt not in FP8_SCALE_FMTS:
            raise ValueError(f"fp8_scale_fmt={self.fp8_scale_fmt!r}: expected one of {FP8_SCALE_FMTS}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")


def moe_block(x: Tensor, w: MoeWeights, spec: MoeSpec, *, mode: str, options: RunOptions = RunOptions(),
              token_ids_i64: Tensor | None = None) -> dict[str, Tensor]:
    """The MoE block of one layer on x [T, H] (bf16, the ffn_norm output). Every stage tensor.

    Routing is computed once from x (identical in both modes: the router is not quantized),
    so the modes differ only by quantization. Hash layers (w.tid2eid) need token_ids_i64.
    """
    _check_mode(mode)
    r = route(x, w.gate_weight, scoring=spec.scoring, top_k=spec.top_k,
              routed_scaling_factor=spec.routed_scaling_factor, bias_f32=w.gate_bias_f32, tid2eid=w.tid2eid,
              token_ids_i64=token_ids_i64, renormalize=spec.renormalize, n_group=spec.n_group,
              topk_group=spec.topk_group)
    out: dict[str, Tensor] = {ROUTER.tensor("logits"): r.logits_f32, ROUTER.tensor("scores"): r.scores_f32,
                              ROUTER.tensor("ids"): r.ids_i64, ROUTER.tensor("weights"): r.weights_f32}
    ex = w.experts
    d = moe.dispatch(r.ids_i64, ex.num_experts)
    rows = x[d.token_of_row_i64]
    before = options.weight_placement == "before_w2"
    row_weight = r.weights_f32[d.token_of_row_i64, d.slot_of_row_i64] if before else None
    static = options.act_scale == "static"
    if mode == "emulated":
        s1 = moe.max_input_dec_scale_f32([ex.w1, ex.w3], "experts.w1/w3") if static else None
        a = moe.act_quant(rows, d.offsets_i64, recipe=options.recipe, act_scale=options.act_scale, input_scale_f32=s1)
        out.update(_quant_tensors(MOE_ACT_QUANT, a))
    else:
        a = rows.double()
        out[MOE_ACT_QUANT.name] = a
    gate, up = moe.l1(a, d.offsets_i64, ex, mode=mode)
    h = moe.swiglu(gate, up, limit=spec.swiglu_limit, row_weight_f32=row_weight, mode=mode)
    out.update({MOE_L1.tensor("gate"): gate, MOE_L1.tensor("up"): up, MOE_SWIGLU.name: h})
    if mode == "emulated":
        s2 = moe.max_input_dec_scale_f32([ex.w2], "experts.w2") if static else None
        a2 = moe.requant(h, d.offsets_i64, recipe=options.recipe, act_scale=options.act_scale, input_scale_f32=s2)
        out.update(_quant_tensors(MOE_REQUANT, a2))
    else:
        a2 = h
        out[MOE_REQUANT.name] = h
    y_rows = moe.l2(a2, d.offsets_i64, ex, mode=mode)
    routed_f64 = moe.combine(y_rows, d, None if before else r.weights_f32, mode="high")  # exact sum
    out.update({MOE_L2.name: y_rows,
                MOE_COMBINE.name: routed_f64 if mode == "high" else round_f64_to(routed_f64, torch.bfloat16)})
    # DeepSeek accumulates the routed sum and the shared expert in fp32 and rounds once (y.type_as(x)):
    # moe.out is the exact routed sum plus the shared expert's bf16 output, rounded once
    total = routed_f64
    if w.shared is not None:
        limit = spec.swiglu_limit if spec.shared_swiglu_limit == "routed" else spec.shared_swiglu_limit
        sh = moe.shared_expert(x, *w.shared, mode=mode, recipe=options.recipe, act_scale=options.act_scale,
                               swiglu_limit=limit, fp8_scale_fmt=options.fp8_scale_fmt)
        out.update({f"{SHARED_EXPERT}.{k}": v for k, v in sh.items()})
        total = total + sh["l2"].double()
    out[MOE_OUT.name] = total if mode == "high" else round_f64_to(total, torch.bfloat16)
    return out


def _quant_tensors(stage, a: moe.ActQuant) -> dict[str, Tensor]:
    """A quantization stage's value (dequantized, float64) and its bytes under the QUANT_FIELDS names."""
    return {stage.name: a.value(), stage.tensor("packed_u8"): a.packed_u8, stage.tensor("sf_u8"): a.sf_u8,
            stage.tensor("global_dec_f32"): a.global_dec_f32}


def _static_shared(ws: list[Weight], options: RunOptions) -> Tensor | None:
    """max input_scale of linears sharing one activation quantization (fused GEMM), static mode."""
    if options.act_scale != "static" or not all(isinstance(w, Nvfp4Weight) for w in ws):
        return None
    return moe.max_input_dec_scale_f32(ws, f"{ATTN_WQ_A.name}/{ATTN_WKV.name}")


def attention_projections(x: Tensor, w: AttnWeights, spec: AttnSpec, *, mode: str,
                          options: RunOptions = RunOptions(), attn_core_out: Tensor | None = None) -> dict[str, Tensor]:
    """The attention projections on x [T, H] (bf16, the attn_norm output). Every stage tensor.

    wq_a and wkv share one activation quantization (the fused GEMM: static scale = the max
    of their input_scales); q = wq_b(q_norm(wq_a(x))); kv = kv_norm(wkv(x)); wo_a is applied
    per output group (einsum "tgd,grd->tgr") on one quantization of the whole [T, heads*hd]
    input; wo_b maps the [T, groups*rank] result to [T, H].
    """
    _check_mode(mode)
    kw = dict(mode=mode, recipe=options.recipe, act_scale=options.act_scale, fp8_scale_fmt=options.fp8_scale_fmt)
    fused_scale = _static_shared([w.wq_a, w.wkv], options)
    qr, acts = linear(x, w.wq_a, input_scale_f32=fused_scale, **kw)
    kv, _ = linear(x, w.wkv, input_scale_f32=fused_scale, **kw)
    out: dict[str, Tensor] = {ATTN_WQ_A.name: qr, ATTN_WKV.name: kv}
    out.update({ATTN_WQ_A.act_quant(k): v for k, v in acts.items()})  # one quantization feeds wq_a and wkv
    qn = rms_norm(qr, w.q_norm, eps=spec.eps, mode=mode)
    kvn = rms_norm(kv, w.kv_norm, eps=spec.eps, mode=mode)
    q, acts_b = linear(qn, w.wq_b, **kw)
    out.update({ATTN_Q_NORM.name: qn, ATTN_KV_NORM.name: kvn, ATTN_WQ_B.name: q})
    out.update({ATTN_WQ_B.act_quant(k): v for k, v in acts_b.items()})
    if w.indexer_wq_b is not None:  # the indexer's queries: the same q_norm output, its own quantization
        iq, acts_i = linear(qn, w.indexer_wq_b, **kw)
        out[INDEXER_WQ_B.name] = iq
        out.update({INDEXER_WQ_B.act_quant(k): v for k, v in acts_i.items()})
    o = q if attn_core_out is None else attn_core_out
    g, r = spec.o_groups, spec.o_lora_rank
    d = spec.n_heads * spec.head_dim // g
    if o.dim() != 2 or o.shape[1] != g * d:
        raise ValueError(f"attn_core_out {tuple(o.shape)}: expected [T, {g * d}] (heads * head_dim)")
    if (w.wo_a.n, w.wo_a.k) != (g * r, d):
        raise ValueError(f"wo_a [{w.wo_a.n}, {w.wo_a.k}]: expected [o_groups * o_lora_rank, heads * head_dim / "
                         f"o_groups] = [{g * r}, {d}]")
    block = 128 if isinstance(w.wo_a, Fp8Block128Weight) else 16
    if isinstance(w.wo_a, (Fp8Block128Weight, Nvfp4Weight)) and d % block:
        raise ValueError(f"wo_a: the group width {d} must be a multiple of the {block}-element activation "
                         "block, else one block would straddle two groups")
    oa, acts = grouped_linear(o, w.wo_a, groups=g, mode=mode, recipe=options.recipe, act_scale=options.act_scale,
                              fp8_scale_fmt=options.fp8_scale_fmt)
    out.update({ATTN_WO_A.act_quant(k): v for k, v in acts.items()})
    y, acts_o = linear(oa, w.wo_b, **kw)
    out.update({ATTN_WO_A.name: oa, ATTN_WO_B.name: y})
    out.update({ATTN_WO_B.act_quant(k): v for k, v in acts_o.items()})
    return out
