"""The routed MoE block on Hopper as one capturable call:
router -> dispatch -> act_quant -> L1 (+ SwiGLU + requant) -> L2 -> combine.

    ids, w   = moe_router.launch(x)                     fp32 logits, scores, top-k / hash, weights
    d        = moe_dispatch.dispatch(ids, n)            expert-sorted rows, device offsets
    a        = quantize_grouped.launch(x, row_token)    gathered from x (no permuted copy), te
    h        = grouped_l1_swiglu_requant(a, w13)        static, after_w2: A1's fused L1 epilogue
             | swiglu_requant.launch(grouped_gemm_l1(a, w13))  otherwise (the routing weight goes
                                                        into h for before_w2)
    y_rows   = grouped_gemm(h, w2)                      bf16
    out      = moe_dispatch.combine(y_rows, w)          fixed slot order, float32, one rounding

Static activation scales are per expert: L1 quantizes expert e's rows with max(w1, w3).input_scale[e],
L2 with w2.input_scale[e] (what the emulator's block does). Dynamic: S = 2688 / amax on the device
(x's valid tokens for L1, h's routed rows for L2).

Capacity: every buffer is sized by T (x's rows) and T * top_k; num_valid_tokens_i32 (int32 [1] on the
device) says how many of the T tokens are real: tokens t >= n reach no expert and their output rows are
zero, so a CUDA graph captured at capacity T replays any n <= T (and any routing) without a host sync
or a recompilation. Each step is deterministic (no float atomics; fixed reduction orders), so a replay
is bit-identical to an eager call on the same inputs, and a token's output does not depend on the
other tokens when the activation scales are static.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90 import moe_dispatch, moe_router, quantize_grouped, swiglu_requant
from kernels.sm90 import grouped_gemm_nvfp4 as gg

__all__ = ["MoeRouter", "MoeExperts", "prepare_router", "prepare_moe_experts", "launch", "PLACEMENTS", "ACT_SCALES"]

PLACEMENTS = ("after_w2", "before_w2")
ACT_SCALES = ("dynamic", "static")
# L2 launched as a programmatic dependent of the L1 launch before it (grouped_gemm's pdl: its schedule and weight
# prologue overlap L1's tail where the register-fed kernel serves T; the same bits). Safe here: the offsets come
# from dispatch, complete before L1 (launched normally) started.
L2_PDL = True


@dataclass(frozen=True)
class MoeRouter:
    """gate_weight_bf16 [E, H]; bias_f32 [E] or None; tid2eid [vocab, k] or None (hash layer); the rest
    as moe_router.launch takes it."""

    gate_weight_bf16: Tensor
    bias_f32: Tensor | None
    tid2eid: Tensor | None
    top_k: int
    routed_scaling_factor: float
    scoring: str = "sqrtsoftplus"
    renormalize: bool = True
    n_group: int | None = None
    topk_group: int | None = None

    @property
    def num_experts(self) -> int:
        return self.gate_weight_bf16.shape[0]


def prepare_router(gate_weight_bf16: Tensor, bias_f32: Tensor | None, tid2eid: Tensor | None, *, top_k: int,
                   routed_scaling_factor: float, scoring: str, renormalize: bool, n_group: int | None,
                   topk_group: int | None) -> MoeRouter:
    """Host, once per layer: contiguous device copies; NotImplementedError when moe_router lacks the router."""
    e = gate_weight_bf16.shape[0]
    why = moe_router.unsupported_reason(scoring=scoring, num_experts=e, top_k=top_k,
                                        n_group=None if tid2eid is not None else n_group, topk_group=topk_group)
    if why:
        raise NotImplementedError(why)
    return MoeRouter(gate_weight_bf16.contiguous(), None if bias_f32 is None else bias_f32.to(torch.float32).contiguous(),
                     None if tid2eid is None else tid2eid.contiguous(), int(top_k), float(routed_scaling_factor),
                     scoring, bool(renormalize), n_group, topk_group)


@dataclass(frozen=True)
class MoeExperts:
    """w13: the interleaved gate/up stack (grouped_gemm_nvfp4.prepare_gate_up); w2: the down stack
    (prepare_experts); l1_input_dec_scale_f32 / l2_input_dec_scale_f32: float32 [E] static activation
    decode scales (max of w1/w3 input_scale per expert; w2's), None when the checkpoint lacks them."""

    w13: gg.Sm90GroupedWeight
    w2: gg.Sm90GroupedWeight
    l1_input_dec_scale_f32: Tensor | None
    l2_input_dec_scale_f32: Tensor | None

    @property
    def num_experts(self) -> int:
        return self.w2.num_experts


def prepare_moe_experts(w1: tuple, w3: tuple, w2: tuple) -> MoeExperts:
    """Host, once per layer. Each argument: (weight_u8 [E, N, K/2], weight_scale_e4m3 [E, N, K/16],
    weight_scale_2_f32 [E], input_scale_f32 [E] or None) of one checkpoint stack."""
    w13 = gg.prepare_gate_up(w1[0], w1[1], w1[2], w3[0], w3[1], w3[2])
    p2 = gg.prepare_experts(w2[0], w2[1], w2[2])
    e = p2.num_experts
    s1 = s2 = None
    if w1[3] is not None and w3[3] is not None:
        s1 = torch.maximum(w1[3].to(torch.float32).reshape(e), w3[3].to(torch.float32).reshape(e)).contiguous()
    if w2[3] is not None:
        s2 = w2[3].to(torch.float32).reshape(e).contiguous()
    return MoeExperts(w13, p2, s1, s2)


def route(x_bf16: Tensor, router: MoeRouter, token_ids_i64: Tensor | None) -> tuple[Tensor, Tensor]:
    """(ids int64 [T, k], weights float32 [T, k]) of moe_router.launch."""
    ids, w, _ = moe_router.launch(x_bf16, router.gate_weight_bf16, top_k=router.top_k,
                                  routed_scaling_factor=router.routed_scaling_factor, scoring=router.scoring,
                                  bias_f32=router.bias_f32, tid2eid=router.tid2eid,
                                  token_ids_i64=token_ids_i64 if router.tid2eid is not None else None,
                                  renormalize=router.renormalize,
                                  n_group=router.n_group, topk_group=router.topk_group)
    return ids, w


def launch(x_bf16: Tensor, router: MoeRouter, experts: MoeExperts, *, swiglu_limit: float | None,
           weight_placement: str = "after_w2", act_scale: str = "dynamic", token_ids_i64: Tensor | None = None,
           num_valid_tokens_i32: Tensor | None = None, fused_l1: bool = True) -> Tensor:
    """x [T, H] bf16 -> the routed experts' output bf16 [T, H] (module docstring). fused_l1: use the fused
    L1 + SwiGLU + requant kernel where it applies (static scales, after_w2); False: always the unfused path."""
    if weight_placement not in PLACEMENTS:
        raise ValueError(f"weight_placement={weight_placement!r}: expected one of {PLACEMENTS}")
    if act_scale not in ACT_SCALES:
        raise ValueError(f"act_scale={act_scale!r}: expected one of {ACT_SCALES}")
    if not isinstance(router, MoeRouter) or not isinstance(experts, MoeExperts):
        raise TypeError(f"router / experts: expected MoeRouter / MoeExperts (prepare_router / prepare_moe_experts), "
                        f"got {type(router).__name__} / {type(experts).__name__}")
    if router.num_experts != experts.num_experts:
        raise ValueError(f"router has {router.num_experts} experts, experts {experts.num_experts}")
    if num_valid_tokens_i32 is not None and (not isinstance(num_valid_tokens_i32, Tensor)
                                             or num_valid_tokens_i32.dtype != torch.int32
                                             or num_valid_tokens_i32.numel() != 1
                                             or num_valid_tokens_i32.device != x_bf16.device):
        raise ValueError(f"num_valid_tokens_i32: expected int32 [1] on {x_bf16.device}")
    static = act_scale == "static"
    s1, s2 = experts.l1_input_dec_scale_f32, experts.l2_input_dec_scale_f32
    if static and (s1 is None or s2 is None):
        raise NotImplementedError("sm90: act_scale='static' needs the experts' input_scale (w1/w3 and w2), "
                                  "which the checkpoint lacks")
    t = x_bf16.shape[0]
    k, e = router.top_k, experts.num_experts
    ids, weights = route(x_bf16, router, token_ids_i64)
    d = moe_dispatch.dispatch(ids, e, num_valid_tokens_i32=num_valid_tokens_i32)
    a_packed, a_sf, a_dec = quantize_grouped.launch(
        x_bf16, d.offsets_i32, input_dec_scale_f32=s1 if static else None, row_token=d.row_token_i64,
        rows_cap=t * k, num_valid_tokens_i32=num_valid_tokens_i32)
    before = weight_placement == "before_w2"
    if static and not before and fused_l1:
        h_packed, h_sf, h_dec = gg.grouped_l1_swiglu_requant(a_packed, a_sf, a_dec, d.offsets_i32, experts.w13,
                                                             swiglu_limit=swiglu_limit, h_input_dec_scale_f32=s2)
    else:
        gate, up = gg.grouped_gemm_l1(a_packed, a_sf, a_dec, d.offsets_i32, experts.w13)
        row_w = weights.reshape(-1)[d.row_token_i64 * k + d.row_slot_i64] if before else None
        _, (h_packed, h_sf, h_dec) = swiglu_requant.launch(gate, up, d.offsets_i32, swiglu_limit=swiglu_limit,
                                                           row_weight_f32=row_w,
                                                           input_dec_scale_f32=s2 if static else None)
    y_rows = gg.grouped_gemm(h_packed, h_sf, h_dec, d.offsets_i32, experts.w2, pdl=L2_PDL)
    return moe_dispatch.combine(y_rows, d.row_of_pair_i32, None if before else weights.contiguous(), num_tokens=t,
                                top_k=k, num_valid_tokens_i32=num_valid_tokens_i32)
