"""DeepSeek MoE router on Hopper, in Triton: fp32 logits, score, top-k (or hash) ids, weights.

    logits = x @ Wg^T               bf16 x bf16 products (exact), float32 accumulation (tl.dot)
    s      = sqrt(softplus(logits))   ("sqrtsoftplus", V4) | sigmoid(logits) ("sigmoid", V3)
             evaluated in float64 from the float32 logits and rounded once to float32
    ids    = top-k of (s + bias)      float32 add; ties to the lower expert id (a stable descending
                                      sort's order: references.router)
           | V3 group-limited top-k   (n_group groups; group score = sum of its two largest biased
                                      scores, or its max without a bias; only the topk_group best
                                      groups compete; group ties to the lower group id)
           | tid2eid[token_ids]       hash layers (no bias); a token id outside [0, vocab) gives ids -1
                                      (dispatch routes such pairs nowhere)
    weights = s at the ids, / their float32 sum in slot order (renormalize), * routed_scaling_factor

Two launches: the logits GEMM, then one program per 4 tokens for scores, selection and weights. The
logits GEMM has one tile shape (64 tokens x 64 experts x 64 of H) and one float32 summation order
for every T: H in chunks of CHUNK_TILES tiles, each chunk summed from zero, the chunk sums added in
chunk order. When the token x expert tiles alone would leave most SMs idle (small T), each chunk is
its own program (split-K) and the top-k launch adds the chunk sums in the same order; the bits are
the same either way, so a token's logits, ids and weights never depend on the other tokens or on T. Deterministic, no host sync, graph-capturable; every T
reuses the compiled kernels (T is a runtime argument). Softmax scoring is not provided
(unsupported_reason).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90.quantize_grouped import next_pow2
from kernels.sm90._env import triton_interpreting as _interpreted

__all__ = ["SCORINGS", "CompileKey", "launch", "unsupported_reason"]

SCORINGS = {"sqrtsoftplus": 0, "sigmoid": 1}
_BT, _BE, _BK = 64, 64, 64
_TOPK_TOKENS = 4
_CHUNKS = 16        # H is summed in (at most) this many chunks of whole BK tiles
_SPLIT_BELOW = 132  # split-K when the token x expert tiles are fewer than the H200's SMs


def unsupported_reason(*, scoring: str, num_experts: int, top_k: int, n_group: int | None,
                       topk_group: int | None) -> str | None:
    """None when launch() computes this router, else a sentence saying why not."""
    if scoring not in SCORINGS:
        return f"sm90: router scoring {scoring!r} is not provided (has {', '.join(SCORINGS)})"
    if not 1 <= top_k <= num_experts:
        return f"sm90: top_k={top_k} must be in 1..{num_experts}"
    if n_group and n_group > 1:
        if not topk_group or not 1 <= topk_group <= n_group or num_experts % n_group:
            return f"sm90: n_group={n_group}, topk_group={topk_group}: need E={num_experts} divisible by n_group " \
                   "and 1 <= topk_group <= n_group"
        if num_experts != next_pow2(num_experts) or n_group != next_pow2(n_group):
            return (f"sm90: group-limited top-k needs a power-of-two expert count and group count (the kernel "
                    f"reshapes the expert vector into groups); got E={num_experts}, n_group={n_group}")
    return None


@dataclass(frozen=True)
class CompileKey:
    """Codegen inputs (T, E, H, vocab and the scaling factor are runtime arguments; the logits GEMM's
    chunking of H is a constexpr of H; split: one program per chunk, the top-k launch adds them)."""

    top_k: int
    scoring: int
    has_bias: bool
    hashed: bool
    renormalize: bool
    n_group: int
    topk_group: int
    e_pad: int
    chunk_tiles: int
    n_chunks: int
    split: bool



@functools.lru_cache(maxsize=32)
def _compile(key: CompileKey):
    import triton

    from kernels.sm90._moe_router_jit import router_logits_kernel, router_topk_kernel

    def run(x, w, bias, tid2eid, tok, rsf: float, logits, ids, weights) -> None:
        t, h = x.shape
        e = w.shape[0]
        n_part = key.n_chunks if key.split else 0
        part = torch.empty((key.n_chunks, t, e), dtype=torch.float32, device=x.device) if key.split else logits
        router_logits_kernel[(triton.cdiv(e, _BE), triton.cdiv(t, _BT), key.n_chunks if key.split else 1)](
            x, x.stride(0), w, w.stride(0), part, t, e, h, CHUNK_TILES=key.chunk_tiles,
            CHUNKS_PER_PROG=1 if key.split else key.n_chunks, BT=_BT, BE=_BE, BK=_BK,
            F32_OPERANDS=_interpreted(), num_warps=4)
        router_topk_kernel[(triton.cdiv(t, _TOPK_TOKENS),)](
            logits, part, bias if bias is not None else logits, tid2eid if tid2eid is not None else ids,
            tok if tok is not None else ids, ids, weights, t, e, tid2eid.shape[0] if tid2eid is not None else 0, rsf,
            TOP_K=key.top_k, SCORING=key.scoring, HAS_BIAS=key.has_bias, HASH=key.hashed, RENORM=key.renormalize,
            N_GROUP=key.n_group, TOPK_GROUP=key.topk_group, BT=_TOPK_TOKENS, E_PAD=key.e_pad,
            K_PAD=next_pow2(key.top_k), N_PART=n_part, num_warps=4)

    return run


def launch(x_bf16: Tensor, gate_weight_bf16: Tensor, *, top_k: int, routed_scaling_factor: float,
           scoring: str = "sqrtsoftplus", bias_f32: Tensor | None = None, tid2eid: Tensor | None = None,
           token_ids_i64: Tensor | None = None, renormalize: bool = True, n_group: int | None = None,
           topk_group: int | None = None, split_k: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, H] bf16, gate [E, H] bf16 -> (ids int64 [T, k], weights float32 [T, k], logits float32 [T, E])
    (module docstring). Hash routing when tid2eid [vocab, k] (int32/int64) is given, with token_ids_i64 [T].
    split_k: None chooses by shape; True / False force it (tests: both give the same bits)."""
    for name, t in (("x_bf16", x_bf16), ("gate_weight_bf16", gate_weight_bf16)):
        if not isinstance(t, Tensor) or t.dtype != torch.bfloat16 or t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"{name}: expected a bf16 2-d tensor contiguous along H, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if x_bf16.shape[1] != gate_weight_bf16.shape[1] or x_bf16.device != gate_weight_bf16.device:
        raise ValueError(f"x_bf16 {tuple(x_bf16.shape)} and gate_weight_bf16 {tuple(gate_weight_bf16.shape)}: "
                         "expected [T, H] and [E, H] on one device")
    t, h = x_bf16.shape
    e = gate_weight_bf16.shape[0]
    why = unsupported_reason(scoring=scoring, num_experts=e, top_k=top_k, n_group=n_group, topk_group=topk_group)
    if why:
        raise NotImplementedError(why)
    dev = x_bf16.device
    if tid2eid is not None:
        if bias_f32 is not None:
            raise ValueError("bias_f32: hash-routed layers have no selection bias")
        if tid2eid.dim() != 2 or tid2eid.shape[1] != top_k or tid2eid.dtype not in (torch.int32, torch.int64) \
                or not tid2eid.is_contiguous() or tid2eid.device != dev:
            raise ValueError(f"tid2eid: expected contiguous int32/int64 [vocab, top_k={top_k}] on {dev}, got "
                             f"{tid2eid.dtype} {tuple(tid2eid.shape)} on {tid2eid.device}")
        if token_ids_i64 is None or token_ids_i64.shape != (t,) or token_ids_i64.dtype != torch.int64 \
                or token_ids_i64.device != dev:
            raise ValueError(f"token_ids_i64: hash routing needs int64 [T={t}] on {dev}")
    if bias_f32 is not None and (bias_f32.dtype != torch.float32 or bias_f32.numel() != e or bias_f32.device != dev):
        raise ValueError(f"bias_f32: expected float32 [{e}] on {dev}")
    ids = torch.empty((t, top_k), dtype=torch.int64, device=dev)
    weights = torch.empty((t, top_k), dtype=torch.float32, device=dev)
    logits = torch.empty((t, e), dtype=torch.float32, device=dev)
    if t == 0:
        return ids, weights, logits
    grouped = bool(n_group and n_group > 1) and tid2eid is None
    k_tiles = (h + _BK - 1) // _BK
    chunk_tiles = (k_tiles + _CHUNKS - 1) // _CHUNKS
    n_chunks = (k_tiles + chunk_tiles - 1) // chunk_tiles
    if split_k is None:
        split_k = n_chunks > 1 and ((t + _BT - 1) // _BT) * ((e + _BE - 1) // _BE) < _SPLIT_BELOW
    key = CompileKey(top_k, SCORINGS[scoring], bias_f32 is not None, tid2eid is not None, bool(renormalize),
                     int(n_group) if grouped else 1, int(topk_group) if grouped else 1, max(16, next_pow2(e)),
                     chunk_tiles, n_chunks, bool(split_k))
    _compile(key)(x_bf16, gate_weight_bf16, None if bias_f32 is None else bias_f32.contiguous(), tid2eid,
                  token_ids_i64.contiguous() if token_ids_i64 is not None else None, float(routed_scaling_factor),
                  logits, ids, weights)
    return ids, weights, logits
