"""Triton bodies of kernels.sm90.moe_router (imported lazily by its _compile)."""

import triton
import triton.language as tl


@triton.jit
def router_logits_kernel(x_ptr, stride_x, w_ptr, stride_w, out_ptr, T, E, H,
                         CHUNK_TILES: tl.constexpr, CHUNKS_PER_PROG: tl.constexpr, BT: tl.constexpr,
                         BE: tl.constexpr, BK: tl.constexpr, F32_OPERANDS: tl.constexpr):
    """logits[t, e] = sum_h x[t, h] w[e, h]: bf16 x bf16 products (exact), float32 accumulation in one
    fixed order for every T and every launch shape: H is cut into chunks of CHUNK_TILES tiles of BK;
    each chunk is summed from zero in K order (tl.dot), and the chunk sums are added in chunk order,
    ((p0 + p1) + p2) + ... Program (e tile, t tile, c) sums chunks c * CHUNKS_PER_PROG onwards: with
    every chunk in one program it writes the logits; with one chunk per program it writes the chunk
    sum p_c to out[c] (split-K for small T, where the expert x token tiles alone leave SMs idle) and
    router_topk_kernel adds them in chunk order: the same float32 operations, so the same bits."""
    pid_e = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_c = tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    e = pid_e * BE + tl.arange(0, BE)
    total = tl.zeros((BT, BE), dtype=tl.float32)
    for c in range(CHUNKS_PER_PROG):
        acc = tl.zeros((BT, BE), dtype=tl.float32)
        for kt in range(CHUNK_TILES):
            k = ((pid_c * CHUNKS_PER_PROG + c) * CHUNK_TILES + kt) * BK + tl.arange(0, BK)
            k_ok = k < H
            a = tl.load(x_ptr + t.to(tl.int64)[:, None] * stride_x + k[None, :],
                        mask=(t < T)[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + e.to(tl.int64)[None, :] * stride_w + k[:, None],
                        mask=(e < E)[None, :] & k_ok[:, None], other=0.0)
            if F32_OPERANDS:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        total += acc
    out = out_ptr + pid_c.to(tl.int64) * T * E + t.to(tl.int64)[:, None] * E + e[None, :]
    tl.store(out, total, mask=(t < T)[:, None] & (e < E)[None, :])


@triton.jit
def _scores_f32(logits, SCORING: tl.constexpr):
    """float32 scores from float32 logits, evaluated in float64 and rounded once (as the reference):
    sqrtsoftplus: sqrt(max(l, 0) + log1p(e^-|l|)); sigmoid: 1 / (1 + e^-l). log1p(z) = log(u) z / (u - 1),
    u = 1 + z (accurate for small z: the rounding of u cancels)."""
    l = logits.to(tl.float64)
    if SCORING == 0:
        z = tl.exp(-tl.abs(l))
        u = 1.0 + z
        lp = tl.where(u == 1.0, z, tl.log(u) * z / (u - 1.0))
        s = tl.sqrt(tl.maximum(l, 0.0) + lp)
    else:
        s = 1.0 / (1.0 + tl.exp(-l))
    return s.to(tl.float32)


@triton.jit
def router_topk_kernel(logits_ptr, part_ptr, bias_ptr, tid2eid_ptr, tok_ptr, ids_ptr, w_ptr, T, E, vocab, rsf,
                       TOP_K: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, HASH: tl.constexpr,
                       RENORM: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                       BT: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr, N_PART: tl.constexpr):
    """Per token (logits from logits_ptr, or, N_PART > 0, the sum of N_PART chunk sums at part_ptr): scores, then ids = top-k of scores + bias (ties to the lower expert id: each step takes
    the largest value and, among equal ones, the smallest id, as a stable descending sort does),
    optionally limited to the TOPK_GROUP best of N_GROUP groups (group score: sum of the group's two
    largest biased scores, float64; its max without a bias), or ids = tid2eid[token id] (HASH);
    weights = scores at the ids, / their float32 sum in slot order (RENORM), * rsf."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = t < T
    ei = tl.arange(0, E_PAD)
    e_ok = ei < E
    lidx = t.to(tl.int64)[:, None] * E + ei[None, :]
    if N_PART > 0:  # split-K logits: the chunk sums in chunk order (router_logits_kernel), then stored
        l = tl.zeros((BT, E_PAD), dtype=tl.float32)  # 0 + p0 + ...: as the one-program sum (-0 included)
        for c in range(N_PART):
            l += tl.load(part_ptr + c * T * E + lidx, mask=t_ok[:, None] & e_ok[None, :], other=0.0)
        tl.store(logits_ptr + lidx, l, mask=t_ok[:, None] & e_ok[None, :])
    else:
        l = tl.load(logits_ptr + lidx, mask=t_ok[:, None] & e_ok[None, :], other=0.0)
    s = _scores_f32(l, SCORING)
    neg_inf = float("-inf")
    if HASH:
        tok = tl.load(tok_ptr + t, mask=t_ok, other=-1)
        tok_ok = t_ok & (tok >= 0) & (tok < vocab)
    else:
        if HAS_BIAS:
            b = tl.load(bias_ptr + ei, mask=e_ok, other=0.0)
            biased = s + b[None, :]
        else:
            biased = s
        biased = tl.where(e_ok[None, :], biased, neg_inf)
        if N_GROUP > 1:
            GS: tl.constexpr = E_PAD // N_GROUP
            gv = tl.reshape(biased, (BT, N_GROUP, GS))
            gi = tl.arange(0, GS)
            m1 = tl.max(gv, axis=2)
            i1 = tl.min(tl.where(gv == m1[:, :, None], gi[None, None, :], GS), axis=2)
            if HAS_BIAS:
                m2 = tl.max(tl.where(gi[None, None, :] == i1[:, :, None], neg_inf, gv), axis=2)
                gscore = m1.to(tl.float64) + m2.to(tl.float64)
            else:
                gscore = m1.to(tl.float64)
            gidx = tl.arange(0, N_GROUP)
            keep = tl.zeros((BT, N_GROUP), dtype=tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                gm = tl.max(gscore, axis=1)
                gsel = tl.min(tl.where(gscore == gm[:, None], gidx[None, :], N_GROUP), axis=1)
                hit = gidx[None, :] == gsel[:, None]
                keep = keep | hit
                gscore = tl.where(hit, float("-inf"), gscore)
            keep_e = tl.reshape(tl.broadcast_to(keep[:, :, None], (BT, N_GROUP, GS)), (BT, E_PAD))
            biased = tl.where(keep_e, biased, neg_inf)
    kp = tl.arange(0, K_PAD)
    ids_acc = tl.zeros((BT, K_PAD), dtype=tl.int64)
    s_acc = tl.zeros((BT, K_PAD), dtype=tl.float32)
    total = tl.zeros((BT,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        if HASH:
            idx = tl.load(tid2eid_ptr + tok * TOP_K + j, mask=tok_ok, other=-1).to(tl.int32)
        else:
            m = tl.max(biased, axis=1)
            idx = tl.min(tl.where(biased == m[:, None], ei[None, :], E_PAD), axis=1)
            biased = tl.where(ei[None, :] == idx[:, None], neg_inf, biased)
        sj = tl.sum(tl.where(ei[None, :] == idx[:, None], s, 0.0), axis=1)
        total += sj  # float32, slot order
        ids_acc = tl.where(kp[None, :] == j, idx.to(tl.int64)[:, None], ids_acc)
        s_acc = tl.where(kp[None, :] == j, sj[:, None], s_acc)
    if RENORM:
        w = tl.div_rn(s_acc, tl.broadcast_to(total[:, None], (BT, K_PAD))) * rsf
    else:
        w = s_acc * rsf
    out = t.to(tl.int64)[:, None] * TOP_K + kp[None, :]
    m_out = t_ok[:, None] & (kp < TOP_K)[None, :]
    tl.store(ids_ptr + out, ids_acc, mask=m_out)
    tl.store(w_ptr + out, w, mask=m_out)
