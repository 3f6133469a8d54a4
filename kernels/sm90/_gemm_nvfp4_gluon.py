"""Gluon body of the decode-size (M <= 16) MMA path of kernels.sm90.gemm_nvfp4.

acc[n, m] = sum_k W[n, k] * X[m, k] with mma.sync m16n8k16 (fp16 -> fp32): the weights are
the MMA's A operand (16 rows of N by 16 k), the tokens its B operand (two n8 tiles = 16
tokens). The weights are decoded in registers straight into the A-fragment layout, with
no trip through shared memory (the Triton kernels convert the decoded tile through
STS/LDSM + barriers to reach the wgmma operand).

How (the Marlin trick): per K tile of 128 elements the packed bytes of a row form the
even-k plane (low nibbles) and the odd-k plane (high nibbles), 64 values each, one MMA
group per plane (as in the Triton kernels). Lane c = lane % 4 of a quad loads the 16
contiguous bytes p in [16c, 16c + 16) of each of its two rows (lane / 4 and + 8) in one
16-byte load. Inside a plane the physical index p = 16c + 4j + 2h + e (j < 4, h, e < 2)
is given the logical MMA index kl = 16j + 8h + 2c + e, which is exactly where the
m16n8k16 A fragment (k_width 2) keeps lane c's values: the permutation is a
reshape/permute of register indices, so the convert to the dot-operand layout is
trivial (asserted at compile time). The activations get the same permutation of k (the
fp16 planes of decode_nvfp4_to_f16_planes_kernel, natural order, loaded 32 contiguous
bytes per lane and permuted the same way), so every product W[n, k] X[m, k] meets its
partner and only the fp32 accumulation order changes.

Values and exactness are those of _gemm_nvfp4_jit: e2m1 * e4m3 * 2^-7 in fp16 (exact),
exact fp16 products, fp32 accumulation (u_acc 2^-24), 2^14 and alpha in the epilogue.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from kernels.sm90._e2m1_ptx import word_pair_to_f16x2_ptx

DECODE_UNSCALE = gl.constexpr(16384.0)


def layouts(num_warps: int, reps: int):
    """(words [BN, 4, 4] int32, activations [16, 4, 2, 16] fp16, mma) layouts, BN = 16 * num_warps * reps."""
    lw = num_warps.bit_length() - 1
    lr = reps.bit_length() - 1
    assert 1 << lw == num_warps and 1 << lr == reps
    w_words = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [8, 0, 0]] + [[16 * num_warps << i, 0, 0] for i in range(lr)],
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16 << i, 0, 0] for i in range(lw)],
        block_bases=[], shape=[16 * num_warps * reps, 4, 4])
    x_f16 = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4], [0, 0, 0, 8], [0, 0, 1, 0], [8, 0, 0, 0]],
        lane_bases=[[0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
        warp_bases=[[0, 0, 0, 0] for _ in range(lw)],
        block_bases=[], shape=[16, 4, 2, 16])
    w_split = gl.DistributedLinearLayout(  # the same registers as w_words, dims (row, c, i, e)
        reg_bases=[[0, 0, 0, 1], [0, 0, 1, 0], [8, 0, 0, 0]] + [[16 * num_warps << i, 0, 0, 0] for i in range(lr)],
        lane_bases=[[0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
        warp_bases=[[16 << i, 0, 0, 0] for i in range(lw)],
        block_bases=[], shape=[16 * num_warps * reps, 4, 2, 2])
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
    return w_words, w_split, x_f16, mma


# nibble r of two words -> one fp16x2 of e2m1 * 2^-14 (word 0 low half, word 1 high half):
# prmt pairs the words' 16-bit halves, then per nibble the sign goes to bit 15 and the three
# magnitude bits to bits 9-11 of each half (the shifts stay below 16, the masks keep the
# halves apart)
_PAIR_ASM = gl.constexpr(word_pair_to_f16x2_ptx())


@gluon.jit
def _e2m1_words_to_f16(w_i32):
    """int32 words (8 E2M1 codes, code r in bits 4r..4r+3) -> 8 fp16 tensors (nibble r) of
    e2m1 * 2^-14; pack=2 puts the values of two neighbouring words in one register."""
    return gl.inline_asm_elementwise(
        asm=_PAIR_ASM, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r", args=[w_i32],
        dtype=(gl.float16,) * 8, is_pure=True, pack=2)


@gluon.jit
def _e4m3_to_f16_x128(s):
    """E4M3 byte (int32) -> fp16 value * 2^7 (exact); 0x7F / 0xFF -> NaN."""
    h = ((s & 0x80) << 8) | ((s & 0x7F) << 7)
    f = h.to(gl.int16).to(gl.float16, bitcast=True) * 32768.0
    return gl.where((s & 0x7F) == 0x7F, float("nan"), f)


@gluon.jit
def _load_w(w_ptr, wsf_ptr, woff, srow, cc, ii, kb, CP4, BN: gl.constexpr, W_SPLIT: gl.constexpr):
    """Packed words [BN, 4, 2, 2] and scale bytes [BN, 4, 2] of the K tile at element kb."""
    w = gl.convert_layout(gl.reshape(gl.load(w_ptr + woff + kb // 8), [BN, 4, 2, 2]), W_SPLIT, assert_trivial=True)
    blk = kb // 16 + 2 * cc[:, None] + ii[None, :]
    soff = srow[:, None, None] + ((blk // 4) * 512 + blk % 4)[None, :, :]
    s = gl.load(wsf_ptr + gl.max_contiguous(gl.multiple_of(soff, [1, 1, 2]), [1, 1, 2]))
    return w, s


@gluon.jit
def _decode_w(w, s, BN: gl.constexpr, A_OP: gl.constexpr):
    """Words + scale bytes -> the A operand [BN, 128] (logical k order, see the module docstring)."""
    s16 = gl.expand_dims(_e4m3_to_f16_x128(s.to(gl.int32)), 3)
    o0, o1, o2, o3, o4, o5, o6, o7 = _e2m1_words_to_f16(w)
    v = gl.join(gl.join(gl.join(o0 * s16, o1 * s16), gl.join(o2 * s16, o3 * s16)),
                gl.join(gl.join(o4 * s16, o5 * s16), gl.join(o6 * s16, o7 * s16)))
    # dims (row, c, i, e, r0, r1, r2) -> (row, r2, r1, r0, i, c, e): kl = 16 r + 8 i + 2 c + e
    v = gl.reshape(gl.permute(v, [0, 6, 5, 4, 2, 1, 3]), [BN, 128])
    return gl.convert_layout(v, A_OP, assert_trivial=True)


@gluon.jit
def _x_to_b(x, B_OP: gl.constexpr):
    """Activation tile [16, 4, 2, 16] (tok, c, i, 2r + e; mma order) -> the B operand [128, 16]."""
    x = gl.reshape(x, [16, 4, 2, 2, 2, 2, 2])  # (tok, c, i, r2, r1, r0, e): memory offset 32c + 16i + 2r + e
    x = gl.reshape(gl.permute(x, [0, 3, 4, 5, 2, 1, 6]), [16, 128])
    return gl.convert_layout(gl.permute(x, [1, 0]), B_OP, assert_trivial=True)


@gluon.jit
def _store_mma_tile(acc, pid_n, pid_m, pid_s, N, M, alpha_ptr, out_ptr, ws_ptr, BN: gl.constexpr,
                    MMA: gl.constexpr, USE_WS: gl.constexpr):
    """Epilogue of both mma.sync kernels: the [BN weight rows, 16 tokens] tile (decode scale undone,
    exact: see _gemm_nvfp4_jit._decode) as bf16(acc * alpha) into out [M, N], or, split over K, the
    fp32 partial into its workspace slice for the fixed-order reduce."""
    rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    tm = pid_m * 16 + gl.arange(0, 16, layout=gl.SliceLayout(0, MMA))
    mask = (rn < N)[:, None] & (tm < M)[None, :]
    off = rn.to(gl.int64)[:, None] + tm.to(gl.int64)[None, :] * N
    if USE_WS:
        gl.store(ws_ptr + pid_s.to(gl.int64) * N * M + off, acc, mask=mask)
    else:
        alpha = gl.load(alpha_ptr)
        gl.store(out_ptr + off, (acc * alpha).to(gl.bfloat16), mask=mask)


@gluon.jit
def gemm_nvfp4_mma_v2_kernel(
    w_ptr, wsf_ptr, x_ptr, alpha_ptr, out_ptr, ws_ptr,
    N, M, K, KW, CP4, iters_per_split,
    W_WORDS: gl.constexpr, W_SPLIT: gl.constexpr, X_F16: gl.constexpr, MMA: gl.constexpr, BN: gl.constexpr, USE_WS: gl.constexpr,
):
    """out[m, n] (bf16, or the fp32 split-K partial) for 16 tokens per grid row. w_ptr: packed
    E2M1 [N, K/2] viewed as int32; wsf_ptr: swizzled E4M3 bytes; x_ptr: fp16 activations [M, K]
    in mma order (decode_nvfp4_to_f16_mma_order_kernel). K % 128 == 0. Grid (cdiv(N, BN),
    cdiv(M, 16), split)."""
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_s = gl.program_id(2)
    L3: gl.constexpr = gl.SliceLayout(3, W_SPLIT)
    rows = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, W_WORDS))), N - 1)
    PW: gl.constexpr = gl.SliceLayout(0, W_WORDS)  # (c, q)
    wc = gl.arange(0, 4, layout=gl.SliceLayout(1, PW))
    wq = gl.arange(0, 4, layout=gl.SliceLayout(0, PW))
    woff = (rows.to(gl.int64) * KW)[:, None, None] + (4 * wc[:, None] + wq[None, :])[None, :, :]
    woff = gl.max_contiguous(gl.multiple_of(woff, [1, 1, 4]), [1, 1, 4])
    cc = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(0, L3)))
    ii = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3)))
    rs = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3))), N - 1)
    srow = (rs // 128) * CP4 * 512 + (rs % 32) * 16 + ((rs // 32) % 4) * 4
    toks = pid_m * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, X_F16))))
    PX: gl.constexpr = gl.SliceLayout(0, X_F16)  # (c, i, 16)
    xc = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, PX)))
    xi = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, PX)))
    xr = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, PX)))
    xcol = (32 * xc[:, None] + 16 * xi[None, :])[:, :, None] + xr[None, None, :]
    xoff = toks.to(gl.int64)[:, None, None, None] * K + xcol[None]
    xoff = gl.max_contiguous(gl.multiple_of(xoff, [1, 1, 1, 16]), [1, 1, 1, 16])
    xmask = (toks < M)[:, None, None, None]
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    acc = gl.zeros([BN, 16], gl.float32, layout=MMA)
    k_iters = K // 128
    it0 = pid_s * iters_per_split
    it1 = gl.minimum(it0 + iters_per_split, k_iters)
    # unrolled by two: tile it + 1 is loaded before tile it is decoded, tile it + 2 before tile
    # it + 1 (raw words in registers, no loop-carried copies)
    w, s = _load_w(w_ptr, wsf_ptr, woff, srow, cc, ii, it0 * 128, CP4, BN, W_SPLIT)
    x = gl.load(x_ptr + xoff + it0 * 128, mask=xmask, other=0.0)
    for it in range(it0, it1 - 1, 2):
        w1, s1 = _load_w(w_ptr, wsf_ptr, woff, srow, cc, ii, (it + 1) * 128, CP4, BN, W_SPLIT)
        x1 = gl.load(x_ptr + xoff + (it + 1) * 128, mask=xmask, other=0.0)
        acc = mma_v2(_decode_w(w, s, BN, A_OP), _x_to_b(x, B_OP), acc)
        nk = gl.minimum(it + 2, it1 - 1) * 128
        w, s = _load_w(w_ptr, wsf_ptr, woff, srow, cc, ii, nk, CP4, BN, W_SPLIT)
        x = gl.load(x_ptr + xoff + nk, mask=xmask, other=0.0)
        acc = mma_v2(_decode_w(w1, s1, BN, A_OP), _x_to_b(x1, B_OP), acc)
    if (it1 - it0) % 2 == 1:
        acc = mma_v2(_decode_w(w, s, BN, A_OP), _x_to_b(x, B_OP), acc)
    _store_mma_tile(acc * DECODE_UNSCALE, pid_n, pid_m, pid_s, N, M, alpha_ptr, out_ptr, ws_ptr, BN, MMA, USE_WS)


# ---------------------------------------------------------------------------------------------
# Shared-memory ring variant: the raw weight words, their scale bytes and the 16-token fp16
# activation tile of each K tile are copied with cp.async into an NS-stage ring by all threads
# of the CTA (the activation tile once per CTA instead of once per warp), then every warp reads
# its rows' words / scales from shared memory (no bank conflicts: a warp reads 8 whole 64-byte
# rows) and the activation tile as the B operand (ldmatrix from a swizzled tile). The
# activations are stored in logical k order (decode_nvfp4_to_f16_mma_order_kernel, LOGICAL),
# so the B tile is a plain [16, 128] K-major tile. Same values, products and fp32 accumulation
# as gemm_nvfp4_mma_v2_kernel.


def smem_layouts(num_warps: int, reps: int):
    """(words [BN, 16] int32, scale bytes [BN, 8] uint8, copy layouts, shared layouts) of the ring kernel."""
    lw = num_warps.bit_length() - 1
    lr = reps.bit_length() - 1
    w_rd = gl.DistributedLinearLayout(  # w_words flattened: (row, 4c + q)
        reg_bases=[[0, 1], [0, 2], [8, 0]] + [[16 * num_warps << i, 0] for i in range(lr)],
        lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(lw)],
        block_bases=[], shape=[16 * num_warps * reps, 16])
    s_rd = gl.DistributedLinearLayout(  # L3 of w_split flattened: (row, 2c + i)
        reg_bases=[[0, 1], [8, 0]] + [[16 * num_warps << i, 0] for i in range(lr)],
        lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(lw)],
        block_bases=[], shape=[16 * num_warps * reps, 8])
    w_cp = gl.BlockedLayout([1, 4], [8, 4], [num_warps, 1], [1, 0])      # 16-byte copies of word rows
    s_cp = gl.BlockedLayout([1, 4], [32, 1], [num_warps, 1], [1, 0])     # 4-byte copies of scale words
    x_cp = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])     # 16-byte copies of fp16 rows
    w_sh = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    x_sh = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    return w_rd, s_rd, w_cp, s_cp, x_cp, w_sh, x_sh


@gluon.jit
def _issue(w_smem, s_smem, x_smem, stage, w_base, s_base, x_base, kt):
    """cp.async of K tile kt (raw words, scale bytes, activation tile) into ring stage `stage`."""
    async_copy.async_copy_global_to_shared(w_smem.index(stage), w_base + kt * 16)
    sblk = kt * 8  # first of the tile's 8 scale blocks; 4 per 4-byte word, the next word 512 B on
    async_copy.async_copy_global_to_shared(s_smem.index(stage), s_base + (sblk // 4) * 512)
    async_copy.async_copy_global_to_shared(x_smem.index(stage), x_base + kt * 128)
    async_copy.commit_group()


@gluon.jit
def gemm_nvfp4_mma_v2_smem_kernel(
    w_ptr, wsf_ptr, x_ptr, alpha_ptr, out_ptr, ws_ptr,
    N, M, K, KW, CP4, iters_per_split,
    W_SPLIT: gl.constexpr, MMA: gl.constexpr, W_RD: gl.constexpr, S_RD: gl.constexpr,
    W_CP: gl.constexpr, S_CP: gl.constexpr, X_CP: gl.constexpr, W_SH: gl.constexpr, X_SH: gl.constexpr,
    BN: gl.constexpr, NS: gl.constexpr, USE_WS: gl.constexpr,
):
    """As gemm_nvfp4_mma_v2_kernel, through an NS-stage cp.async ring. x_ptr: fp16 activations
    [M, K] in logical mma order (kl = 16r + 8i + 2c + e of each 128-K tile)."""
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_s = gl.program_id(2)
    # copy addresses (rows / tokens past the end are clamped: their results are masked at the store)
    wr = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, W_CP)), N - 1)
    wq = gl.arange(0, 16, layout=gl.SliceLayout(0, W_CP))
    w_base = w_ptr + gl.max_contiguous(gl.multiple_of((wr.to(gl.int64) * KW)[:, None] + wq[None, :], [1, 16]), [1, 16])
    sr = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, S_CP)), N - 1)
    sb = gl.arange(0, 8, layout=gl.SliceLayout(0, S_CP))
    soff = ((sr // 128) * CP4 * 512 + (sr % 32) * 16 + ((sr // 32) % 4) * 4)[:, None] + ((sb // 4) * 512 + sb % 4)[None, :]
    s_base = wsf_ptr + gl.max_contiguous(gl.multiple_of(soff, [1, 4]), [1, 4])
    xt = gl.minimum(pid_m * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, X_CP)), M - 1)
    xk = gl.arange(0, 128, layout=gl.SliceLayout(0, X_CP))
    x_base = x_ptr + gl.max_contiguous(gl.multiple_of((xt.to(gl.int64) * K)[:, None] + xk[None, :], [1, 128]), [1, 128])
    w_smem = gl.allocate_shared_memory(gl.int32, [NS, BN, 16], W_SH)
    s_smem = gl.allocate_shared_memory(gl.uint8, [NS, BN, 8], W_SH)
    x_smem = gl.allocate_shared_memory(gl.float16, [NS, 16, 128], X_SH)
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    L3: gl.constexpr = gl.SliceLayout(3, W_SPLIT)
    acc = gl.zeros([BN, 16], gl.float32, layout=MMA)
    k_iters = K // 128
    it0 = pid_s * iters_per_split
    it1 = gl.minimum(it0 + iters_per_split, k_iters)
    for j in gl.static_range(NS - 1):  # prologue (tiles past it1 re-read the last one: harmless)
        _issue(w_smem, s_smem, x_smem, j, w_base, s_base, x_base, gl.minimum(it0 + j, it1 - 1))
    for it in range(it0, it1):
        async_copy.wait_group(NS - 2)
        gl.thread_barrier()  # tile it landed for every thread; stage (it - 1) % NS is free
        st = (it - it0) % NS
        w = w_smem.index(st).load(W_RD)
        s = s_smem.index(st).load(S_RD)
        xb = x_smem.index(st).permute([1, 0]).load(B_OP)
        _issue(w_smem, s_smem, x_smem, (it - it0 + NS - 1) % NS, w_base, s_base, x_base,
               gl.minimum(it + NS - 1, it1 - 1))
        w = gl.convert_layout(gl.reshape(w, [BN, 4, 2, 2]), W_SPLIT, assert_trivial=True)
        s = gl.convert_layout(gl.reshape(s, [BN, 4, 2]), L3, assert_trivial=True)
        acc = mma_v2(_decode_w(w, s, BN, A_OP), xb, acc)
    async_copy.wait_group(0)
    _store_mma_tile(acc * DECODE_UNSCALE, pid_n, pid_m, pid_s, N, M, alpha_ptr, out_ptr, ws_ptr, BN, MMA, USE_WS)
