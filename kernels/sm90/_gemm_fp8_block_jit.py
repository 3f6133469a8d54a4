"""Triton body of kernels.sm90.gemm_fp8_block (imported lazily by its _compile)."""

import triton
import triton.language as tl

from kernels.sm90._quantize_fp8_1x128_jit import quantize_rows_1x128


@triton.jit
def round_f32_to_bf16_bits(y):
    """float32 -> the float32 value of its bf16 rounding (RNE on the bit pattern; NaN stays a quiet NaN),
    so the following .to(tl.bfloat16) is exact: the same bits on the GPU and in the interpreter (whose
    own float32 -> bf16 cast truncates)."""
    b = y.to(tl.uint32, bitcast=True)
    r = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
    r = tl.where(y != y, b | 0x00400000, r)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def ue8m0_u8_to_f32(b):
    """UE8M0 byte -> float32 2^(b-127) (byte 0 the subnormal 2^-127, 0xFF NaN), exact."""
    e = b.to(tl.int32)
    bits = tl.where(e > 0, e << 23, 0x00400000)
    bits = tl.where(e == 0xFF, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _group_dot(w_rows, a_rows, n_ok, t_ok, kk, g, K, G, n0, t0, codes_rows, qscale_row, EVEN_K: tl.constexpr,
               SPLIT: tl.constexpr, SWAP: tl.constexpr, TMA: tl.constexpr, FUSED_Q: tl.constexpr,
               AS_UE8M0: tl.constexpr, Q_RECIP: tl.constexpr, Q_NAN_PROPAGATE: tl.constexpr,
               Q_AMAX_FLOOR: tl.constexpr):
    """The FP8 tensor-core dot of 128-K group g, from zero: [BN, BT] (SWAP) or [BT, BN]. Codes past K, rows
    past N / M and (SPLIT) groups past G load as zero: masked loads, or (TMA) tensor-descriptor loads of the
    tiles at rows n0 / t0, whose out-of-bounds elements the copy engine fills with zero (the same operands).
    FUSED_Q: a_rows points at the bf16 / fp16 / fp32 activation rows, quantized here (quantize_rows_1x128: the
    quantizer's operations), its bytes and scales written by the programs of the first weight tile; returns
    (dot, the group's activation decode scales float32 [BT]); else (dot, 0.0)."""
    k0 = g * 128
    if TMA:
        w8 = w_rows.load([n0, k0])
        a8 = a_rows.load([t0, k0])
    elif FUSED_Q:
        w_ok = n_ok[:, None]
        x_ok = t_ok[:, None]
        if not EVEN_K:
            k_ok = (k0 + kk) < K
            w_ok = w_ok & k_ok[None, :]
            x_ok = x_ok & k_ok[None, :]
        if SPLIT:
            w_ok = w_ok & (g < G)
            x_ok = x_ok & (g < G)
        w8 = tl.load(w_rows + k0, mask=w_ok, other=0).to(tl.float8e4nv, bitcast=True)
        x = tl.load(a_rows + k0, mask=x_ok, other=0.0).to(tl.float32)
        codes, stored, sa_q = quantize_rows_1x128(x, AS_UE8M0, Q_RECIP, Q_NAN_PROPAGATE, Q_AMAX_FLOOR)
        # the first weight tile's programs write the activation's bytes and scales (each group once)
        first = n0 == 0
        tl.store(codes_rows + k0, codes, mask=x_ok & first)
        tl.store(qscale_row + g, stored, mask=t_ok & (g < G) & first)
        a8 = codes.to(tl.float8e4nv, bitcast=True)
    else:
        w_ok = n_ok[:, None]
        a_ok = t_ok[:, None]
        if not EVEN_K:
            k_ok = (k0 + kk) < K
            w_ok = w_ok & k_ok[None, :]
            a_ok = a_ok & k_ok[None, :]
        if SPLIT:
            w_ok = w_ok & (g < G)
            a_ok = a_ok & (g < G)
        w8 = tl.load(w_rows + k0, mask=w_ok, other=0).to(tl.float8e4nv, bitcast=True)
        a8 = tl.load(a_rows + k0, mask=a_ok, other=0).to(tl.float8e4nv, bitcast=True)
    if SWAP:
        d = tl.dot(w8, tl.trans(a8))
    else:
        d = tl.dot(a8, tl.trans(w8))
    if FUSED_Q:
        sa_out = sa_q
    else:
        sa_out = 0.0
    return d, sa_out


@triton.jit
def _group_sigma(sw_ptrs, sa_row, sa_q, n_ok, t_ok, g, G, AS_UE8M0: tl.constexpr, SWAP: tl.constexpr,
                 WS_VEC: tl.constexpr, FUSED_Q: tl.constexpr):
    """f32(sa[t, g] * sw[n // 128, g]) shaped to broadcast over the dot. WS_VEC (tiles wider than 128 weight
    rows): one weight scale per row, else the tile's one scale; the product is the same either way."""
    if FUSED_Q:  # the prologue's scales (rows past M and groups past G: their codes are zero)
        sa = sa_q
    else:
        sa = tl.load(sa_row + g, mask=t_ok & (g < G), other=0)
        if AS_UE8M0:
            sa = ue8m0_u8_to_f32(sa)
    if WS_VEC:
        sw = tl.load(sw_ptrs + g, mask=n_ok & (g < G), other=0.0)
        if SWAP:
            sigma = sa[None, :] * sw[:, None]
        else:
            sigma = sa[:, None] * sw[None, :]
    else:
        sw = tl.load(sw_ptrs + g, mask=g < G, other=0.0)
        if SWAP:
            sigma = (sa * sw)[None, :]
        else:
            sigma = (sa * sw)[:, None]
    return sigma


@triton.jit
def _promote(total, part, d, sigma, g, G, CHUNK_BLOCKS: tl.constexpr, CHUNKED: tl.constexpr):
    """Group g's dot scaled into the float32 sums: the chunk sum `part` from zero in group order, added to
    `total` at the chunk's end (CHUNKED), else straight into `total`."""
    if CHUNKED:
        part += d * sigma
        end = ((g + 1) % CHUNK_BLOCKS == 0) | (g + 1 == G)
        total = tl.where(end, total + part, total)
        part = tl.where(end, 0.0, part)
    else:
        total += d * sigma
    return total, part


@triton.jit
def gemm_fp8_block_kernel(
    w_ptr, a_ptr, ws_ptr, as_ptr, out_ptr,
    M, N, K, G, stride_wn, stride_am, stride_as, stride_om, stride_oc,
    BN: tl.constexpr, BT: tl.constexpr, N_ITER: tl.constexpr, CHUNK_BLOCKS: tl.constexpr, SPLIT: tl.constexpr,
    CHUNKED: tl.constexpr, EVEN_K: tl.constexpr,
    AS_UE8M0: tl.constexpr, SWAP: tl.constexpr, GROUP_T: tl.constexpr, WS_VEC: tl.constexpr = False,
    PIPE: tl.constexpr = False, TMA: tl.constexpr = False,
    FUSED_Q: tl.constexpr = False, Q_RECIP: tl.constexpr = False, Q_NAN_PROPAGATE: tl.constexpr = False,
    Q_AMAX_FLOOR: tl.constexpr = 0.0, WS: tl.constexpr = False, codes_ptr=None, qscale_ptr=None,
    TICKET: tl.constexpr = False, N_CHUNKS: tl.constexpr = 1, REDUCE_UNROLL: tl.constexpr = 1, y_ptr=None,
    ctr_ptr=None,
):
    """out^T tile [BN weight rows, BT tokens] (SWAP: weights the wgmma's M side; else the out tile
    [BT, BN], tokens the M side) = sum over the 128-K groups g of
    dot(W[n, g], A[t, g]) * (sa[t, g] * sw[n // 128, g]), in float32.

    Summation order, the same for every M, tile and split: the groups are cut into chunks of
    CHUNK_BLOCKS consecutive groups (a function of N and K only); inside a chunk the scaled group
    dots are added from zero in group order (one tensor-core dot per group: the promotion to float32
    every 128 of K), and the chunk sums are added from zero in chunk order. SPLIT: this program owns
    the one chunk program_id(2) and writes its float32 sum to out (the partials [chunks, M, N]); the
    reduce kernel adds them in chunk order. Otherwise the program walks all chunks and writes bf16.
    TMA: w_ptr and a_ptr are tensor descriptors (float8e4nv [N, K] / [M, K], blocks [BN, 128] / [BT, 128]).
    FUSED_Q: a_ptr is the unquantized activation [M, K] (row stride stride_am); the kernel quantizes each
    group (recipe: AS_UE8M0, Q_RECIP, Q_NAN_PROPAGATE, Q_AMAX_FLOOR) and writes codes u8 [M, K] to codes_ptr
    and scales [M, G] to qscale_ptr (as_ptr unused); the GEMM's operands and so its bits are the same as
    after the separate quantizer.
    PIPE: the next group's dot is issued before the current one is scaled and added (software pipelined
    so the tensor cores can run under the promotion math); the same operations in the same order.
    TICKET (with SPLIT): the chunk partials are reduced here, not by chunk_reduce_kernel: after storing its
    partial the program takes a ticket on its output tile's counter (ctr_ptr[tile], int32, zero before the
    launch); the program drawing the last one adds the N_CHUNKS partials in chunk order from zero (the reduce
    kernel's operations), writes bf16 to y_ptr and resets the counter (_ticket_reduce).
    WS: the group loop is tl.range(warp_specialize=True): Triton's automatic warp specialization (sm_90 with
    num_warps=4: a TMA producer warpgroup and two math warpgroups of 64 token rows, 12 warps; each math
    warpgroup runs this loop body on its rows, the same operations in the same order). The interpreter
    ignores the flag (it runs the plain loop).
    """
    # grouped raster (bits unchanged, L2 reuse): programs walk GROUP_T token tiles x all weight tiles,
    # so a wave re-reads each weight tile from L2 instead of HBM for up to GROUP_T token tiles
    num_n = tl.cdiv(N, BN)
    pid = tl.program_id(1) * num_n + tl.program_id(0)
    width = GROUP_T * num_n
    first_t = (pid // width) * GROUP_T
    rows_t = tl.minimum(tl.cdiv(M, BT) - first_t, GROUP_T)
    pid_t = first_t + (pid % width) % rows_t
    pid_n = (pid % width) // rows_t
    n = pid_n * BN + tl.arange(0, BN)
    t = pid_t * BT + tl.arange(0, BT)
    n_ok = n < N
    t_ok = t < M
    kk = tl.arange(0, 128)
    n0 = pid_n * BN
    t0 = pid_t * BT
    if TMA:
        w_rows = w_ptr
        a_rows = a_ptr
    else:
        w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn + kk[None, :]
        a_rows = a_ptr + t.to(tl.int64)[:, None] * stride_am + kk[None, :]
    if WS_VEC:
        sw_ptrs = ws_ptr + (n // 128) * G
    else:
        sw_ptrs = ws_ptr + ((pid_n * BN) // 128) * G
    sa_row = as_ptr + t.to(tl.int64) * stride_as
    if FUSED_Q:
        codes_rows = codes_ptr + t.to(tl.int64)[:, None] * K + kk[None, :]
        qscale_row = qscale_ptr + t.to(tl.int64) * G
    else:
        codes_rows = sa_row
        qscale_row = sa_row
    # N_ITER (CHUNK_BLOCKS when SPLIT, else all G groups) is a constexpr: the interpreter cannot run a
    # loop bounded by a runtime scalar. In SPLIT mode the last chunk's groups past G are masked off.
    g_lo = tl.program_id(2) * CHUNK_BLOCKS if SPLIT else 0
    if SWAP:
        total = tl.zeros((BN, BT), dtype=tl.float32)
    else:
        total = tl.zeros((BT, BN), dtype=tl.float32)
    part = tl.zeros_like(total)
    if PIPE:
        d, sa_q = _group_dot(w_rows, a_rows, n_ok, t_ok, kk, g_lo, K, G, n0, t0, codes_rows, qscale_row, EVEN_K,
                             SPLIT, SWAP, TMA, FUSED_Q, AS_UE8M0, Q_RECIP, Q_NAN_PROPAGATE, Q_AMAX_FLOOR)
        for i in range(1, N_ITER):
            d_next, sa_next = _group_dot(w_rows, a_rows, n_ok, t_ok, kk, g_lo + i, K, G, n0, t0, codes_rows,
                                         qscale_row, EVEN_K, SPLIT, SWAP, TMA, FUSED_Q, AS_UE8M0, Q_RECIP,
                                         Q_NAN_PROPAGATE, Q_AMAX_FLOOR)
            sigma = _group_sigma(sw_ptrs, sa_row, sa_q, n_ok, t_ok, g_lo + i - 1, G, AS_UE8M0, SWAP, WS_VEC, FUSED_Q)
            total, part = _promote(total, part, d, sigma, g_lo + i - 1, G, CHUNK_BLOCKS, CHUNKED)
            d = d_next
            sa_q = sa_next
        sigma = _group_sigma(sw_ptrs, sa_row, sa_q, n_ok, t_ok, g_lo + N_ITER - 1, G, AS_UE8M0, SWAP, WS_VEC,
                             FUSED_Q)
        total, part = _promote(total, part, d, sigma, g_lo + N_ITER - 1, G, CHUNK_BLOCKS, CHUNKED)
    else:
        for i in tl.range(0, N_ITER, warp_specialize=WS):
            g = g_lo + i
            d, sa_q = _group_dot(w_rows, a_rows, n_ok, t_ok, kk, g, K, G, n0, t0, codes_rows, qscale_row, EVEN_K,
                                 SPLIT, SWAP, TMA, FUSED_Q, AS_UE8M0, Q_RECIP, Q_NAN_PROPAGATE, Q_AMAX_FLOOR)
            sigma = _group_sigma(sw_ptrs, sa_row, sa_q, n_ok, t_ok, g, G, AS_UE8M0, SWAP, WS_VEC, FUSED_Q)
            total, part = _promote(total, part, d, sigma, g, G, CHUNK_BLOCKS, CHUNKED)
    if SWAP:
        o = out_ptr + t.to(tl.int64)[None, :] * stride_om + n[:, None]
        o_ok = n_ok[:, None] & t_ok[None, :]
    else:
        o = out_ptr + t.to(tl.int64)[:, None] * stride_om + n[None, :]
        o_ok = t_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(o + tl.program_id(2).to(tl.int64) * stride_oc, total, mask=o_ok)
        if TICKET:
            tile0 = t0.to(tl.int64) * stride_om + n0  # the tile's first element; int32 offsets inside it
            if SWAP:
                off = (t - t0)[None, :] * stride_om + (n - n0)[:, None]
            else:
                off = (t - t0)[:, None] * stride_om + (n - n0)[None, :]
            _ticket_reduce(out_ptr + tile0, y_ptr + tile0, off, o_ok, ctr_ptr + pid, stride_oc, N_CHUNKS,
                           REDUCE_UNROLL)
    else:
        tl.store(o, round_f32_to_bf16_bits(total).to(tl.bfloat16), mask=o_ok)


@triton.jit
def _ticket_reduce(part_base, y_base, off, ok, ctr, stride_oc, N_CHUNKS: tl.constexpr, UNROLL: tl.constexpr):
    """The in-kernel split-K reduce of one output tile: part_base + off are chunk 0's partials of the tile
    (off: int32 offsets inside the tile, so no 64-bit pointer tile stays live), y_base + off its bf16
    outputs, ctr its ticket counter. Every program of the tile stores its partial first; the CTA barrier
    puts every thread's stores before the ticket, which one thread takes with an acq_rel atomic at gpu scope
    (release: the partials are visible to whoever draws a later ticket; acquire: the last drawer sees every
    earlier one's). Whichever program arrives last adds the partials from zero in chunk order 0..N_CHUNKS-1,
    exactly as chunk_reduce_kernel does (so the bits do not depend on the arrival order), loading at L2 (.cg:
    never a stale L1 line), then resets the counter for the next launch or graph replay. UNROLL 4 (small
    tiles): four chunks' loads are issued before their four additions (one L2 round trip per four chunks);
    a chunk past N_CHUNKS is neither loaded nor added."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ctr, 1, sem="acq_rel", scope="gpu")
    if ticket == N_CHUNKS - 1:
        total = tl.zeros(off.shape, dtype=tl.float32)
        p = part_base
        s64 = tl.full((), 0, tl.int64) + stride_oc  # M * N: chunk c at c * s64 (64-bit: 3 * M * N may pass 2^31)
        if UNROLL == 4:
            for c in range(0, N_CHUNKS, 4):
                x0 = tl.load(p + off, mask=ok, other=0.0, cache_modifier=".cg")
                x1 = tl.load(p + s64 + off, mask=ok & (c + 1 < N_CHUNKS), other=0.0, cache_modifier=".cg")
                x2 = tl.load(p + 2 * s64 + off, mask=ok & (c + 2 < N_CHUNKS), other=0.0, cache_modifier=".cg")
                x3 = tl.load(p + 3 * s64 + off, mask=ok & (c + 3 < N_CHUNKS), other=0.0, cache_modifier=".cg")
                total += x0
                total = tl.where(c + 1 < N_CHUNKS, total + x1, total)
                total = tl.where(c + 2 < N_CHUNKS, total + x2, total)
                total = tl.where(c + 3 < N_CHUNKS, total + x3, total)
                p += 4 * s64
        else:
            for _ in range(0, N_CHUNKS):
                total += tl.load(p + off, mask=ok, other=0.0, cache_modifier=".cg")
                p += s64
        tl.store(y_base + off, round_f32_to_bf16_bits(total).to(tl.bfloat16), mask=ok)
        tl.atomic_xchg(ctr, 0, sem="relaxed", scope="gpu")


@triton.jit
def chunk_reduce_kernel(part_ptr, out_ptr, numel, N_CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    """out_bf16[i] = bf16(((0 + p[0, i]) + p[1, i]) + ...): the chunk sums in chunk order, as the
    unsplit kernel adds them."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < numel
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    off = i
    for _ in range(0, N_CHUNKS):
        total += tl.load(part_ptr + off, mask=ok, other=0.0)
        off += numel
    tl.store(out_ptr + i, round_f32_to_bf16_bits(total).to(tl.bfloat16), mask=ok)
