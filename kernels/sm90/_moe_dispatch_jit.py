"""Triton bodies of kernels.sm90.moe_dispatch (imported lazily by its _compile)."""

import triton
import triton.language as tl

from kernels.sm90._swiglu_requant_jit import f32_to_bf16_rne


@triton.jit
def _pairs(ids_ptr, n_ptr, c, P, E, K: tl.constexpr, HAS_N: tl.constexpr, CH: tl.constexpr):
    """Pairs c*CH .. c*CH+CH-1 (pair i = token i // K, slot i % K): (i, bucket int32, valid). A pair is
    valid when its token is below the valid-token count and 0 <= id < E; its bucket is its expert.
    Invalid pairs go to bucket E (after every expert), pairs past P to bucket -1 (none)."""
    i = c * CH + tl.arange(0, CH)
    in_range = i < P
    e = tl.load(ids_ptr + i, mask=in_range, other=-1).to(tl.int32)
    valid = in_range & (e >= 0) & (e < E)
    if HAS_N:
        valid = valid & (i // K < tl.load(n_ptr))
    return i, tl.where(valid, e, tl.where(in_range, E, -1)), valid


@triton.jit
def dispatch_count_kernel(ids_ptr, n_ptr, counts_ptr, P, E,
                          K: tl.constexpr, HAS_N: tl.constexpr, CH: tl.constexpr, E_PAD: tl.constexpr):
    """counts[c, b] = pairs of chunk c in bucket b (b = 0..E; E: no expert), integer sums: exact, no atomics."""
    c = tl.program_id(0)
    _, e, _ = _pairs(ids_ptr, n_ptr, c, P, E, K, HAS_N, CH)
    ei = tl.arange(0, E_PAD)
    hist = tl.sum((e[:, None] == ei[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + c * (E + 1) + ei, hist, mask=ei <= E)


@triton.jit
def dispatch_scan_kernel(counts_ptr, base_ptr, total_ptr, n_chunks, E,
                         C_ITERS: tl.constexpr, CB: tl.constexpr, BE: tl.constexpr):
    """For experts pid*BE ..: base[c, e] = sum of counts[c', e] over chunks c' < c (exclusive scan in
    chunk order), total[e] = sum over all chunks."""
    ei = tl.program_id(0) * BE + tl.arange(0, BE)
    e_ok = ei < E
    carry = tl.zeros((BE,), dtype=tl.int32)
    for it in range(C_ITERS):
        ci = it * CB + tl.arange(0, CB)
        m = (ci < n_chunks)[:, None] & e_ok[None, :]
        cnt = tl.load(counts_ptr + ci[:, None] * E + ei[None, :], mask=m, other=0)
        incl = tl.cumsum(cnt, axis=0)
        tl.store(base_ptr + ci[:, None] * E + ei[None, :], incl - cnt + carry[None, :], mask=m)
        carry += tl.sum(cnt, axis=0)
    tl.store(total_ptr + ei, carry, mask=e_ok)


@triton.jit
def dispatch_scatter_kernel(ids_ptr, n_ptr, base_ptr, total_ptr, offsets_ptr, row_token_ptr, row_slot_ptr,
                            row_of_pair_ptr, P, E,
                            K: tl.constexpr, HAS_N: tl.constexpr, CH: tl.constexpr, E_PAD: tl.constexpr):
    """row of pair i = start[b] + base[chunk, b] + (pairs of bucket b before i in the chunk): bucket-major,
    pair (token-major) order within a bucket: a stable counting sort. Expert e's rows are offsets[e] ..
    offsets[e+1]-1; the unrouted pairs (bucket E) fill the rows past offsets[E], so row_token / row_slot
    are a permutation of all pairs, and their row_of_pair is -1 (combine skips them)."""
    c = tl.program_id(0)
    i, e, valid = _pairs(ids_ptr, n_ptr, c, P, E, K, HAS_N, CH)
    placed = e >= 0
    ei = tl.arange(0, E_PAD)
    tot = tl.load(total_ptr + ei, mask=ei <= E, other=0)
    incl = tl.cumsum(tot, axis=0)
    start = incl - tot
    first = c == 0  # program 0 writes the offsets (every program derives them the same way)
    tl.store(offsets_ptr + ei + 1, incl, mask=(ei < E) & first)
    tl.store(offsets_ptr + ei, tl.zeros((E_PAD,), tl.int32), mask=(ei == 0) & first)
    off_e = tl.sum(tl.where(ei[None, :] == e[:, None], start[None, :], 0), axis=1)
    base = tl.load(base_ptr + c * (E + 1) + e, mask=placed, other=0)
    j = tl.arange(0, CH)
    before = (e[None, :] == e[:, None]) & (j[None, :] < j[:, None]) & placed[None, :]
    rank = tl.sum(before.to(tl.int32), axis=1)
    row = off_e + base + rank
    tl.store(row_token_ptr + row, i // K, mask=placed)
    tl.store(row_slot_ptr + row, i % K, mask=placed)
    tl.store(row_of_pair_ptr + i, tl.where(valid, row, -1), mask=placed)


@triton.jit
def combine_kernel(y_ptr, stride_y, row_of_pair_ptr, w_ptr, n_ptr, out_ptr, T, H,
                   K: tl.constexpr, HAS_W: tl.constexpr, HAS_N: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    """out[t] = sum over slots s = 0..K-1, in that order, of w[t, s] * y[row_of_pair[t, s]] (float32, one
    rounding to bf16 at the end); pairs with row -1 and tokens t >= n contribute nothing (zero rows)."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    t_ok = t < T
    if HAS_N:
        live = t_ok & (t < tl.load(n_ptr))
    else:
        live = t_ok
    h_ok = h < H
    acc = tl.zeros((BT, BH), dtype=tl.float32)
    for s in tl.static_range(K):
        row = tl.load(row_of_pair_ptr + t * K + s, mask=live, other=-1)
        ok = live & (row >= 0)
        y = tl.load(y_ptr + row.to(tl.int64)[:, None] * stride_y + h[None, :], mask=ok[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + t * K + s, mask=ok, other=0.0)
            acc += w[:, None] * y
        else:
            acc += y
    tl.store(out_ptr + t.to(tl.int64)[:, None] * H + h[None, :], f32_to_bf16_rne(acc),
             mask=t_ok[:, None] & h_ok[None, :])
