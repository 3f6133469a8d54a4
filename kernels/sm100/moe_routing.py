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

Valid-token count (CUDA-graph replay with fewer tokens than captured): the buffers
keep T rows (T = the captured maximum); an int32 [1] device tensor n says that tokens
t < n are real. Nothing reads n on the host and nothing is sliced by it:
- permute() sends every (token, slot) pair of a token t >= n to a sentinel expert E
  ("no expert"): the pair gets a row after the padded total of the real experts,
  which no tile of the tile -> expert table covers, so no expert GEMM sees it;
  expert offsets, padded offsets and the tile table are those of the first n tokens.
- gather_rows_bf16() copies only valid pairs (the sentinel rows stay zero).
- Permutation.valid_rows_i32 (the padded total, on the device) tells the quantizer and
  the grouped GEMMs where the real rows end, so they skip the rest of the capacity.
- combine_bf16() writes zeros for tokens t >= n (whatever their routing weights hold).
- route() maps the token ids of invalid tokens to 0 before a hash (tid2eid) lookup,
  so stale ids in the padded tail cannot index out of range.
For the valid tokens every result is bit-identical to running the first n tokens alone.
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
    valid_rows_i32 [1] (device): the padded row total, where the real experts' rows end.
    token_valid [T] bool (device) when a valid-token count was given, else None (all valid).
    """

    offsets_i64: Tensor
    padded_offsets_i64: Tensor
    row_of_pair_i64: Tensor
    tile_expert_i32: Tensor
    capacity_rows: int
    valid_rows_i32: Tensor | None = None
    token_valid: Tensor | None = None


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


def token_valid_mask(num_tokens: int, num_valid_tokens_i32: Tensor | None, device) -> Tensor | None:
    """bool [num_tokens]: t < n, compared on the device (no sync); None when n is None."""
    if num_valid_tokens_i32 is None:
        return None
    if not isinstance(num_valid_tokens_i32, Tensor):
        raise TypeError(f"num_valid_tokens_i32: expected an int32 [1] tensor on the device, "
                        f"got {type(num_valid_tokens_i32).__name__} (a Python int would be baked into a graph)")
    if num_valid_tokens_i32.dtype != torch.int32 or num_valid_tokens_i32.numel() != 1:
        raise ValueError(f"num_valid_tokens_i32: expected one int32 element, got "
                         f"{num_valid_tokens_i32.dtype} {tuple(num_valid_tokens_i32.shape)}")
    if num_valid_tokens_i32.device != torch.device(device):
        raise ValueError(f"num_valid_tokens_i32: on {num_valid_tokens_i32.device}, expected {device}")
    return torch.arange(num_tokens, device=device) < num_valid_tokens_i32.reshape(())


def route(logits_f32: Tensor, *, top_k: int, routed_scaling_factor: float, bias_f32: Tensor | None = None,
          tid2eid_i64: Tensor | None = None, token_ids_i64: Tensor | None = None,
          num_valid_tokens_i32: Tensor | None = None) -> Routing:
    """sqrt-softplus scores, top-k (biased) or hash selection, renormalised weights.

    num_valid_tokens_i32: optional int32 [1] device count n; rows >= n are still routed
    (their results are dropped by permute/combine) but their token ids are read as 0.
    """
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
        valid = token_valid_mask(logits_f32.shape[0], num_valid_tokens_i32, logits_f32.device)
        if valid is not None:  # stale ids past n must not index tid2eid out of range
            token_ids_i64 = torch.where(valid, token_ids_i64, torch.zeros_like(token_ids_i64))
        ids = tid2eid_i64[token_ids_i64].to(torch.int64)
    else:
        sel = scores if bias_f32 is None else scores + bias_f32.reshape(1, num_experts)
        ids = torch.topk(sel, top_k, dim=-1, sorted=True).indices
    w = scores.gather(1, ids)
    w = w / w.sum(dim=-1, keepdim=True) * routed_scaling_factor
    return Routing(ids_i64=ids, weights_f32=w, scores_f32=scores)


def permute(ids_i64: Tensor, num_experts: int, num_valid_tokens_i32: Tensor | None = None) -> Permutation:
    """Group the (token, slot) pairs by expert into padded-per-expert rows (graph-safe).

    ids_i64 [T, k]. With num_valid_tokens_i32 (int32 [1] on the device, n), the pairs of
    tokens t >= n go to a sentinel expert E: their rows follow the padded total of the
    real experts and belong to no tile of tile_expert_i32 (see the module docstring).
    """
    t, k = ids_i64.shape
    flat = ids_i64.reshape(-1)
    token_valid = token_valid_mask(t, num_valid_tokens_i32, flat.device)
    if token_valid is not None:
        pair_valid = token_valid.repeat_interleave(k)
        flat = torch.where(pair_valid, flat, torch.full_like(flat, num_experts))
    # Bins 0..E-1 are the experts, bin E the sentinel "no expert" (empty without a count).
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets_all = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # [E+2]
    padded_all = grouped_padded_offsets(offsets_all)  # [E+2]; padded_all[E] = the real experts' total
    order = torch.sort(flat, stable=True).indices  # pairs sorted by expert, token order kept
    sorted_ids = flat[order]
    rank = torch.arange(t * k, device=flat.device) - offsets_all[sorted_ids]
    row_sorted = padded_all[sorted_ids] + rank
    row_of_pair = torch.empty_like(row_sorted)
    row_of_pair[order] = row_sorted
    # Fits: padded total + invalid pairs <= T*k + 127*min(E, T*k) (see grouped_capacity_rows).
    capacity = grouped_capacity_rows(t * k, num_experts)
    offsets = offsets_all[: num_experts + 1]
    padded = padded_all[: num_experts + 1]
    valid_rows = padded_all[num_experts:num_experts + 1].to(torch.int32)
    return Permutation(offsets, padded, row_of_pair, tile_expert_table(padded, capacity // SF_ROW_ALIGN), capacity,
                       valid_rows, token_valid)


def gather_rows_bf16(x_bf16: Tensor, perm: Permutation, top_k: int) -> Tensor:
    """x [T, H] -> padded-per-expert rows [capacity, H]; padding rows and invalid tokens' rows are zero."""
    out = x_bf16.new_zeros(perm.capacity_rows, x_bf16.shape[1])
    token_of_pair = torch.arange(x_bf16.shape[0] * top_k, device=x_bf16.device) // top_k
    src = x_bf16[token_of_pair]
    if perm.token_valid is not None:
        src = torch.where(perm.token_valid[token_of_pair].unsqueeze(1), src, torch.zeros_like(src))
    out.index_copy_(0, perm.row_of_pair_i64, src)
    return out


def combine_bf16(expert_out_bf16: Tensor, perm: Permutation, weights_f32: Tensor) -> Tensor:
    """y[t] = sum_slot weight[t, slot] * expert_out[row of (t, slot)], float32, slot order; -> bf16 [T, H].

    The slots are added one by one (not a reduction kernel whose order could depend on T),
    so a token's bytes do not depend on how many tokens share the call. Tokens t >= n
    (perm.token_valid) are zero.
    """
    return combine_rows_bf16(expert_out_bf16, perm.row_of_pair_i64, weights_f32, token_valid=perm.token_valid)


def combine_rows_bf16(rows_bf16: Tensor, row_of_pair_i64: Tensor, weights_f32: Tensor, *,
                      token_valid: Tensor | None = None) -> Tensor:
    """combine_bf16 on any row layout: rows_bf16 [R, H], row_of_pair_i64 [T*k] (the row of pair
    p = t*k + slot), weights_f32 [T, k], token_valid bool [T] or None -> bf16 [T, H] (graph-safe)."""
    t, k = weights_f32.shape
    rows = rows_bf16[row_of_pair_i64].float().reshape(t, k, -1)
    acc = rows[:, 0] * weights_f32[:, 0:1]
    for slot in range(1, k):
        acc = acc + rows[:, slot] * weights_f32[:, slot:slot + 1]
    if token_valid is not None:
        acc = torch.where(token_valid.unsqueeze(1), acc, torch.zeros_like(acc))
    return acc.to(torch.bfloat16)
