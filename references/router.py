"""DeepSeek MoE router reference: fp32 logits, scoring, top-k selection, hash routing, weights.

NVFP4_FACTS.md section 5 (DeepSeek's reference inference code):

    logits = x.float() @ Wg.float().T                                   [T, E] float32
    s      = sqrt(softplus(logits)) (V4) | sigmoid(logits) (V3/R1) | softmax(logits)
    ids    = top-k of (s + bias)            score-routed layers
           = tid2eid[token_ids]             V4 hash layers (no bias)
    V3 grouped top-k: experts in n_group groups; a group's score is the sum of its two
    largest biased scores; only the topk_group best groups compete.
    w      = s gathered at ids (unbiased), / their sum (renormalise), * routed_scaling_factor

Every float32 here is the float64 result (within ~1e-15 relative of the exact value)
rounded once, so the reference is the same on every device and is what a kernel
"should" produce; a kernel's own fp32 rounding shows up only at near-ties,
which the harness reports. Ties in the selection go to the lower expert id (stable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SCORING_FUNCS",
    "Routing",
    "router_logits_f32",
    "router_scores_f32",
    "select_experts_topk",
    "select_experts_hash",
    "routing_weights_f32",
    "route",
]

SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


@dataclass(frozen=True)
class Routing:
    """The router's outputs for T tokens.

    logits_f32 [T, E]; scores_f32 [T, E] (unbiased); ids_i64 [T, k] expert per slot;
    weights_f32 [T, k] (renormalised, times routed_scaling_factor); hashed: ids came
    from tid2eid.
    """

    logits_f32: Tensor
    scores_f32: Tensor
    ids_i64: Tensor
    weights_f32: Tensor
    hashed: bool


def router_logits_f32(x: Tensor, gate_weight: Tensor) -> Tensor:
    """[T, H] x [E, H] -> [T, E] float32: the exact dot products (float64) rounded once.

    bf16 x bf16 products are exact, so this is what an fp32 GEMM computes up to its
    accumulation order.
    """
    if x.dim() != 2 or gate_weight.dim() != 2 or x.shape[1] != gate_weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and gate_weight {tuple(gate_weight.shape)}: expected [T, H] and [E, H]")
    return (x.double() @ gate_weight.double().T).float()


def _softplus_f64(x: Tensor) -> Tensor:
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow, no threshold cut-off
    return torch.clamp(x, min=0) + torch.log1p(torch.exp(-x.abs()))


def router_scores_f32(logits_f32: Tensor, *, scoring: str) -> Tensor:
    """[T, E] logits -> [T, E] float32 scores (correctly rounded from float64)."""
    x = logits_f32.double()
    if scoring == "sqrtsoftplus":
        s = torch.sqrt(_softplus_f64(x))
    elif scoring == "sigmoid":
        s = torch.sigmoid(x)
    elif scoring == "softmax":
        s = torch.softmax(x, dim=-1)
    else:
        raise ValueError(f"scoring={scoring!r}: expected one of {SCORING_FUNCS}")
    return s.float()


def _stable_topk_ids(values: Tensor, k: int) -> Tensor:
    """Indices of the k largest per row, ties to the lower index (torch.topk leaves ties unspecified)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def select_experts_topk(scores_f32: Tensor, *, top_k: int, bias_f32: Tensor | None = None,
                        n_group: int | None = None, topk_group: int | None = None) -> Tensor:
    """ids [T, k] int64: top-k of scores + bias (float32 add), optionally group-limited (V3).

    Groups: E experts in n_group equal groups; group score = sum of the two largest biased
    scores of the group (amax when there is no bias); experts outside the topk_group best
    groups are excluded.
    """
    t, e = scores_f32.shape
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k={top_k}: expected 1..{e} (the number of experts)")
    biased = scores_f32 if bias_f32 is None else scores_f32 + bias_f32.float()
    if n_group and n_group > 1:
        if e % n_group or not topk_group or not 1 <= topk_group <= n_group:
            raise ValueError(f"n_group={n_group}, topk_group={topk_group}: need E={e} divisible by n_group "
                             f"and 1 <= topk_group <= n_group")
        grouped = biased.view(t, n_group, e // n_group)
        group_score = grouped.amax(-1) if bias_f32 is None else grouped.topk(2, dim=-1).values.double().sum(-1)
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=biased.device)
        keep.scatter_(1, _stable_topk_ids(group_score, topk_group), True)
        biased = biased.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    return _stable_topk_ids(biased, top_k)


def select_experts_hash(token_ids_i64: Tensor, tid2eid: Tensor, *, top_k: int) -> Tensor:
    """ids [T, k] = tid2eid[token_ids] (V4 hash layers). Token ids must index tid2eid."""
    if tid2eid.dim() != 2 or tid2eid.shape[1] != top_k:
        raise ValueError(f"tid2eid {tuple(tid2eid.shape)}: expected [vocab, top_k={top_k}]")
    if token_ids_i64.dim() != 1:
        raise ValueError(f"token_ids_i64 {tuple(token_ids_i64.shape)}: expected [T]")
    if token_ids_i64.numel() and (int(token_ids_i64.min()) < 0 or int(token_ids_i64.max()) >= tid2eid.shape[0]):
        raise ValueError(f"token_ids_i64: values must be in [0, {tid2eid.shape[0]}) to index tid2eid")
    return tid2eid.to(torch.int64)[token_ids_i64.to(tid2eid.device)]


def routing_weights_f32(scores_f32: Tensor, ids_i64: Tensor, *, routed_scaling_factor: float,
                        renormalize: bool) -> Tensor:
    """[T, k] float32: unbiased scores at ids, / their sum if renormalize, * routed_scaling_factor
    (exact in float64, rounded once)."""
    w = torch.gather(scores_f32, 1, ids_i64).double()
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return (w * routed_scaling_factor).float()


def route(x: Tensor, gate_weight: Tensor, *, scoring: str, top_k: int, routed_scaling_factor: float,
          bias_f32: Tensor | None = None, tid2eid: Tensor | None = None, token_ids_i64: Tensor | None = None,
          renormalize: bool | None = None, n_group: int | None = None, topk_group: int | None = None) -> Routing:
    """The whole router. Hash routing when tid2eid is given (then token_ids_i64 is required
    and bias must be None). renormalize defaults to DeepSeek's rule: every scoring but softmax."""
    logits = router_logits_f32(x, gate_weight)
    scores = router_scores_f32(logits, scoring=scoring)
    if tid2eid is not None:
        if token_ids_i64 is None:
            raise ValueError("token_ids_i64: required for hash routing (tid2eid given)")
        if bias_f32 is not None:
            raise ValueError("bias_f32: hash-routed layers have no selection bias")
        if token_ids_i64.shape != (x.shape[0],):
            raise ValueError(f"token_ids_i64 {tuple(token_ids_i64.shape)}: expected one id per token [T={x.shape[0]}]")
        ids = select_experts_hash(token_ids_i64, tid2eid, top_k=top_k)
    else:
        ids = select_experts_topk(scores, top_k=top_k, bias_f32=bias_f32, n_group=n_group, topk_group=topk_group)
    if renormalize is None:
        renormalize = scoring != "softmax"
    weights = routing_weights_f32(scores, ids, routed_scaling_factor=routed_scaling_factor, renormalize=renormalize)
    return Routing(logits, scores, ids, weights, hashed=tid2eid is not None)
