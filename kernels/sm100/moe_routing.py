"""Routing, permutation and combine for the sm100 MoE path (graph-safe torch ops).

No fused kernel here: these are a few small torch ops whose output sizes depend only
on Python ints (tokens, top-k, experts), so they capture in a CUDA graph, replay with
new routing and never read a device value on the host. A fused kernel is only worth
adding if measured faster on a B200 (not done: no B200 here).

DeepSeek-V4 router (NVFP4_FACTS.md section 5):
  logits = x.float() @ Wg.float().T                (bf16 inputs, fp32 products/accumulation)
  s      = sqrt(softplus(logits))
  ids    = top-k of (s + bias)   or   tid2eid[token_ids] (hash layers, no bias)
  w      = s[ids] / sum(s[ids]) * routed_scaling_factor
Combine applies the routing weight AFTER w2 (production convention), in float32,
summing each token's k expert outputs in slot order (deterministic, no atomics).
The DeepSeek reference multiplies the weight into h before w2: a small, reported
difference, not hidden here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm100.host_bridge import SF_ROW_ALIGN, grouped_capacity_rows, grouped_padded_offsets, tile_expert_table


@dataclass(frozen=True)
class Routing:
    """Top-k routing of T tokens. ids_i64 [T, k]; weights_f32 [T, k] (renormalised, scaled)."""

    ids_i64: Tensor
    weights_f32: Tensor
    scores_f32: Tensor  # [T, E] sqrt(softplus(logits))


@dataclass(frozen=True)
class Permutation:
    """Where each (token, slot) pair lives in the padded-per-expert activation rows.

    offsets_i64 [E+1]: unpadded expert offsets; padded_offsets_i64 [E+1]; row_of_pair_i64
    [T*k] (pair p = t*k + slot); tile_expert_i32 [capacity/128]; capacity_rows: a Python int.
    """

    offsets_i64: Tensor
    padded_offsets_i64: Tensor
    row_of_pair_i64: Tensor
    tile_expert_i32: Tensor
    capacity_rows: int


def router_logits_f32(x_bf16: Tensor, gate_weight_bf16: Tensor) -> Tensor:
    """[T, H] bf16 x [E, H] bf16 -> [T, E] float32 logits (bf16 products are exact in fp32)."""
    if x_bf16.dtype != torch.bfloat16:
        raise TypeError(f"x_bf16: expected bfloat16, got {x_bf16.dtype}")
    if gate_weight_bf16.dtype != torch.bfloat16:
        raise TypeError(f"gate_weight_bf16: expected bfloat16, got {gate_weight_bf16.dtype}")
    if x_bf16.dim() != 2 or gate_weight_bf16.dim() != 2 or x_bf16.shape[1] != gate_weight_bf16.shape[1]:
        raise ValueError(f"x_bf16 {tuple(x_bf16.shape)} and gate_weight_bf16 {tuple(gate_weight_bf16.shape)}: "
                         "expected [T, H] and [E, H]")
    return torch.nn.functional.linear(x_bf16.float(), gate_weight_bf16.float())


def route(logits_f32: Tensor, *, top_k: int, routed_scaling_factor: float, bias_f32: Tensor | None = None,
          tid2eid_i64: Tensor | None = None, token_ids_i64: Tensor | None = None) -> Routing:
    """sqrt-softplus scores, top-k (biased) or hash selection, renormalised weights."""
    if logits_f32.dtype != torch.float32 or logits_f32.dim() != 2:
        raise TypeError(f"logits_f32: expected float32 [T, E], got {logits_f32.dtype} {tuple(logits_f32.shape)}")
    num_experts = logits_f32.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, {num_experts}]")
    scores = torch.sqrt(torch.nn.functional.softplus(logits_f32))
    if tid2eid_i64 is not None:
        if bias_f32 is not None:
            raise ValueError("bias_f32: hash layers (tid2eid_i64) take no bias")
        if token_ids_i64 is None or token_ids_i64.shape != (logits_f32.shape[0],):
            raise ValueError("token_ids_i64: hash routing needs one token id per row of logits_f32")
        if tid2eid_i64.dim() != 2 or tid2eid_i64.shape[1] != top_k:
            raise ValueError(f"tid2eid_i64: expected [vocab, {top_k}], got {tuple(tid2eid_i64.shape)}")
        ids = tid2eid_i64[token_ids_i64].to(torch.int64)
    else:
        sel = scores if bias_f32 is None else scores + bias_f32.reshape(1, num_experts)
        ids = torch.topk(sel, top_k, dim=-1, sorted=True).indices
    w = scores.gather(1, ids)
    w = w / w.sum(dim=-1, keepdim=True) * routed_scaling_factor
    return Routing(ids_i64=ids, weights_f32=w, scores_f32=scores)


def permute(ids_i64: Tensor, num_experts: int) -> Permutation:
    """Group the (token, slot) pairs by expert into padded-per-expert rows (graph-safe)."""
    t, k = ids_i64.shape
    flat = ids_i64.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    padded = grouped_padded_offsets(offsets)
    order = torch.sort(flat, stable=True).indices  # pairs sorted by expert, token order kept
    sorted_ids = flat[order]
    rank = torch.arange(t * k, device=flat.device) - offsets[sorted_ids]
    row_sorted = padded[sorted_ids] + rank
    row_of_pair = torch.empty_like(row_sorted)
    row_of_pair[order] = row_sorted
    capacity = grouped_capacity_rows(t * k, num_experts)
    return Permutation(offsets, padded, row_of_pair, tile_expert_table(padded, capacity // SF_ROW_ALIGN), capacity)


def gather_rows_bf16(x_bf16: Tensor, perm: Permutation, top_k: int) -> Tensor:
    """x [T, H] -> padded-per-expert rows [capacity, H]; padding rows are zero."""
    out = x_bf16.new_zeros(perm.capacity_rows, x_bf16.shape[1])
    token_of_pair = torch.arange(x_bf16.shape[0] * top_k, device=x_bf16.device) // top_k
    out.index_copy_(0, perm.row_of_pair_i64, x_bf16[token_of_pair])
    return out


def combine_bf16(expert_out_bf16: Tensor, perm: Permutation, weights_f32: Tensor) -> Tensor:
    """y[t] = sum_slot weight[t, slot] * expert_out[row of (t, slot)], float32, slot order; -> bf16 [T, H]."""
    t, k = weights_f32.shape
    rows = expert_out_bf16[perm.row_of_pair_i64].float().reshape(t, k, -1)
    return (rows * weights_f32.unsqueeze(-1)).sum(dim=1).to(torch.bfloat16)
