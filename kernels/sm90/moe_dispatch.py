"""MoE dispatch (token-expert pairs -> expert-sorted rows) and combine, on Hopper, in Triton.

Dispatch: ids [T, k] (expert per token and slot) -> a stable counting sort of the T*k pairs by
expert: expert e owns rows offsets[e] .. offsets[e+1]-1, and within an expert the pairs keep their
(token, slot) order (token-major), exactly as references.moe.dispatch's stable sort. Three launches:
  1. count:   per chunk of 128 pairs, a histogram over the experts (integer sums, no atomics);
  2. scan:    per expert, exclusive prefix of the chunk histograms in chunk order, and the totals;
  3. scatter: offsets (exclusive prefix of the totals, written by program 0) and, for each pair,
              row = offsets[e] + chunk base + rank among the chunk's earlier pairs of e.
Integer arithmetic only: deterministic, and every pair's row is fixed by the ids alone.

Capacity: buffers are sized by T * k (the caller's capacity), never by counts; the valid-token count
num_valid_tokens_i32 (int32 [1] on the device) and the ids are read only on the device. Pairs of
tokens t >= n, and ids outside [0, E), reach no expert: their row_of_pair is -1 and offsets[E]
counts only the routed pairs; those pairs fill the rows past offsets[E] (in pair order), so row_token
and row_slot always hold a permutation of all T*k pairs (every index valid).
Zero-token experts are legal (equal offsets). No host sync, graph-capturable.

Combine: out[t] = sum over slots s = 0..k-1 (in slot order) of w[t, s] * y[row_of_pair[t, s]], float32,
rounded once to bf16; without weights (the before-w2 placement) the plain sum. A fixed summation order
and no atomics: bit-deterministic and batch-invariant. Tokens t >= n and unrouted pairs give zeros.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90.quantize_grouped import next_pow2

__all__ = ["Dispatch", "dispatch", "combine", "row_of_pair_from_rows"]

_CHUNK = 128       # pairs per program of the count and scatter kernels
_SCAN_CHUNKS = 64  # chunk rows per step of the scan kernel
_SCAN_EXPERTS = 32


@dataclass(frozen=True)
class Dispatch:
    """row_token_i64 [T*k], row_slot_i64 [T*k] (token and slot of each expert-sorted row; rows past
    offsets[E] hold the unrouted pairs); offsets_i32 [E+1]; row_of_pair_i32 [T*k] (the row of pair
    t*k + s, -1 when the pair reaches no expert)."""

    row_token_i64: Tensor
    row_slot_i64: Tensor
    offsets_i32: Tensor
    row_of_pair_i32: Tensor


@dataclass(frozen=True)
class _DispatchKey:
    k: int
    has_n: bool
    e_pad: int
    c_iters: int


@functools.lru_cache(maxsize=32)
def _compile_dispatch(key: _DispatchKey):
    import triton

    from kernels.sm90._moe_dispatch_jit import dispatch_count_kernel, dispatch_scan_kernel, dispatch_scatter_kernel

    def run(ids, n_i32, e: int, out: Dispatch) -> None:
        p = ids.numel()
        n_chunks = triton.cdiv(p, _CHUNK)
        dev = ids.device
        counts = torch.empty((n_chunks, e + 1), dtype=torch.int32, device=dev)  # bucket E: no expert
        base = torch.empty((n_chunks, e + 1), dtype=torch.int32, device=dev)
        total = torch.empty((e + 1,), dtype=torch.int32, device=dev)
        n_arg = n_i32 if n_i32 is not None else total
        dispatch_count_kernel[(n_chunks,)](ids, n_arg, counts, p, e, K=key.k, HAS_N=key.has_n, CH=_CHUNK,
                                           E_PAD=key.e_pad, num_warps=4)
        dispatch_scan_kernel[(triton.cdiv(e + 1, _SCAN_EXPERTS),)](counts, base, total, n_chunks, e + 1, C_ITERS=key.c_iters,
                                                               CB=_SCAN_CHUNKS, BE=_SCAN_EXPERTS, num_warps=4)
        dispatch_scatter_kernel[(n_chunks,)](ids, n_arg, base, total, out.offsets_i32, out.row_token_i64,
                                             out.row_slot_i64, out.row_of_pair_i32, p, e, K=key.k, HAS_N=key.has_n,
                                             CH=_CHUNK, E_PAD=key.e_pad, num_warps=4)

    return run


def dispatch(ids: Tensor, num_experts: int, *, num_valid_tokens_i32: Tensor | None = None) -> Dispatch:
    """ids [T, k] int64 or int32 (contiguous, on the device) -> Dispatch (module docstring)."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids: expected an int64 or int32 [T, k] tensor, got {getattr(ids, 'dtype', type(ids))} "
                         f"{tuple(getattr(ids, 'shape', ()))}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r}: expected an int >= 1")
    if num_valid_tokens_i32 is not None and (num_valid_tokens_i32.dtype != torch.int32
                                             or num_valid_tokens_i32.numel() != 1
                                             or num_valid_tokens_i32.device != ids.device):
        raise ValueError(f"num_valid_tokens_i32: expected int32 [1] on {ids.device}")
    ids = ids.contiguous()
    t, k = ids.shape
    dev = ids.device
    p = t * k
    out = Dispatch(torch.empty((p,), dtype=torch.int64, device=dev), torch.empty((p,), dtype=torch.int64, device=dev),
                   torch.empty((num_experts + 1,), dtype=torch.int32, device=dev),
                   torch.empty((p,), dtype=torch.int32, device=dev))
    if p == 0:
        out.offsets_i32.zero_()
        return out
    n_chunks = (p + _CHUNK - 1) // _CHUNK
    key = _DispatchKey(k, num_valid_tokens_i32 is not None, max(16, next_pow2(num_experts + 1)),
                       (n_chunks + _SCAN_CHUNKS - 1) // _SCAN_CHUNKS)
    _compile_dispatch(key)(ids, num_valid_tokens_i32, num_experts, out)
    return out


@dataclass(frozen=True)
class _CombineKey:
    k: int
    has_w: bool
    has_n: bool
    bt: int = 4
    bh: int = 512


@functools.lru_cache(maxsize=32)
def _compile_combine(key: _CombineKey):
    import triton

    from kernels.sm90._moe_dispatch_jit import combine_kernel

    def run(y, row_of_pair, w, n_i32, out) -> None:
        t, h = out.shape
        combine_kernel[(triton.cdiv(t, key.bt), triton.cdiv(h, key.bh))](
            y, y.stride(0), row_of_pair, w if w is not None else y, n_i32 if n_i32 is not None else row_of_pair, out,
            t, h, K=key.k, HAS_W=key.has_w, HAS_N=key.has_n, BT=key.bt, BH=key.bh, num_warps=4)

    return run


def combine(y_rows_bf16: Tensor, row_of_pair_i32: Tensor, weights_f32: Tensor | None, *, num_tokens: int, top_k: int,
            num_valid_tokens_i32: Tensor | None = None) -> Tensor:
    """y rows [R, H] bf16 (expert order) -> out bf16 [T, H] (module docstring). row_of_pair_i32 [T*k];
    weights_f32 [T, k] or None (weights already applied before w2)."""
    if not isinstance(y_rows_bf16, Tensor) or y_rows_bf16.dtype != torch.bfloat16 or y_rows_bf16.dim() != 2 \
            or y_rows_bf16.stride(1) != 1:
        raise ValueError(f"y_rows_bf16: expected a bf16 [R, H] tensor contiguous along H, got "
                         f"{getattr(y_rows_bf16, 'dtype', type(y_rows_bf16))} {tuple(getattr(y_rows_bf16, 'shape', ()))}")
    p = num_tokens * top_k
    if row_of_pair_i32.dtype != torch.int32 or row_of_pair_i32.numel() != p or not row_of_pair_i32.is_contiguous():
        raise ValueError(f"row_of_pair_i32: expected contiguous int32 [{p}] (T={num_tokens} x k={top_k}), got "
                         f"{row_of_pair_i32.dtype} {tuple(row_of_pair_i32.shape)}")
    if weights_f32 is not None and (weights_f32.dtype != torch.float32 or tuple(weights_f32.shape) != (num_tokens, top_k)
                                    or not weights_f32.is_contiguous()):
        raise ValueError(f"weights_f32: expected contiguous float32 [{num_tokens}, {top_k}], got "
                         f"{weights_f32.dtype} {tuple(weights_f32.shape)}")
    out = torch.empty((num_tokens, y_rows_bf16.shape[1]), dtype=torch.bfloat16, device=y_rows_bf16.device)
    if out.numel():
        _compile_combine(_CombineKey(top_k, weights_f32 is not None, num_valid_tokens_i32 is not None))(
            y_rows_bf16, row_of_pair_i32, weights_f32, num_valid_tokens_i32, out)
    return out


def row_of_pair_from_rows(row_token_i64: Tensor, row_slot_i64: Tensor, top_k: int) -> Tensor:
    """int32 [R] row of each pair t*k + s, from the rows' (token, slot) (a permutation: index_put with
    unique indices, deterministic, no host sync)."""
    r = row_token_i64.numel()
    rop = torch.empty((r,), dtype=torch.int32, device=row_token_i64.device)
    rop[row_token_i64.to(torch.int64) * top_k + row_slot_i64.to(torch.int64)] = torch.arange(
        r, dtype=torch.int32, device=row_token_i64.device)
    return rop
