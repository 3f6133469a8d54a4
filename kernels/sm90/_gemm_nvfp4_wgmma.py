"""Gluon body of the M < 256 path of kernels.sm90.gemm_nvfp4 (K % 128 == 0): one GEMM kernel.

acc[n, t] = sum_k W[n, k] X[t, k] with wgmma (fp16 x fp16 -> fp32): the weights are the
register A operand (64 rows of N per warpgroup), the BT tokens the shared-memory B operand
("swap AB": the decode-sized M sits on the MMA's N side, 8..64 wide).

- Weights: per 128-K tile, the raw words (BN x 64 B) and their scale bytes go through an
  NS-stage cp.async ring; each thread reads back the 16 bytes of each of its two rows
  (rows r and r + 8 of its warp's 16, lane c = lane % 4 of a quad holds bytes
  [16c, 16c + 16)) and decodes them in registers. Physical element 32c + 16i + 8e + r of
  the tile (word 4c + 2i + e, nibble r) gets the logical MMA index kl = 16r + 8i + 2c + e,
  which is exactly where the wgmma / mma.sync A fragment (k_width 2) keeps lane c's
  values, so the decoded tile is the A operand without a shared-memory round trip (the
  converts are register renamings, asserted trivial at compile time). The activations
  get the same permutation of k, so every product W[n, k] X[t, k] meets its partner and
  only the fp32 accumulation order changes.
- Activations (B tile, [BT, 128] fp16, NVMMA swizzled): either decoded once per GEMM by
  _gemm_nvfp4_jit.decode_nvfp4_to_f16_kernel (MMA_ORDER) and copied through the ring
  (X_F16), or decoded in every CTA from the packed words loaded one tile ahead into a
  double-buffered B tile. Either way one barrier per K tile covers the ring, the B tile
  and the previous wgmma.
- Split K (for routed keys the chunks of gemm_nvfp4.chunk_plan: one CTA a chunk): each CTA of a
  split writes its fp32 partial to the workspace (tile-major: a [BN, BT] block a tile and split, so the addresses
  are a base and fixed offsets; [SPLIT, M, N] offsets took 230 registers at BT 64, this 162), then takes a
  ticket on its output tile's counter (acq_rel, gpu scope, after a CTA barrier); the CTA
  drawing the last ticket sums the SPLIT partials in split order 0..SPLIT-1 (the same
  order whichever CTA is last: deterministic), applies alpha, writes bf16 and resets the
  counter to zero for the next launch (CUDA-graph replay included). No reduce kernel.
  SPLIT == 1 with several chunks (iters_per_split < k_iters): the CTA walks every chunk of its tile, each chain from
  +0, the chunk sums (x 2^14) added in chunk order, the first being the total: the same operations as the reduce
  above, so the same bits, without partials in memory (a second accumulator: 139 registers at BT 64).

Values: E2M1 codes become fp16 e2m1 * 2^-14 by bit moves (_e2m1_ptx), times the block
scale as fp16 e4m3 * 2^7, so both operands hold e2m1 * e4m3 * 2^-7 (exact in fp16: at
most 2 + 4 significant bits, within fp16's range); their products are exact, the wgmma
accumulates in fp32 (u_acc = 2^-24), and 2^14 (exact) and alpha are applied in the
epilogue, then one rounding to bf16.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

from kernels.sm90._consts import DECODE_UNSCALE as _DECODE_UNSCALE
from kernels.sm90._e2m1_ptx import word_pair_to_f16x2_ptx

DECODE_UNSCALE = gl.constexpr(_DECODE_UNSCALE)
# nibble r of two words -> one fp16x2 of e2m1 * 2^-14 (word 0 low half, word 1 high half): prmt pairs
# the words' 16-bit halves, then per nibble the sign goes to bit 15 and the magnitude to bits 9-11
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


def wgmma_layouts(num_warps: int, reps: int, bt: int):
    """Layouts of gemm_nvfp4_wgmma_kernel for BN = 16 * num_warps * reps weight rows and BT tokens."""
    lw = num_warps.bit_length() - 1
    lr = reps.bit_length() - 1
    assert 1 << lw == num_warps and 1 << lr == reps and num_warps % 4 == 0
    assert bt in (8, 16, 32, 64)
    bn = 16 * num_warps * reps
    row_regs = [[16 * num_warps << i, 0] for i in range(lr)]
    w_rd = gl.DistributedLinearLayout(  # weight words (row, 4c + 2i + e): lane c of a quad holds 16 B of rows r, r + 8
        reg_bases=[[0, 1], [0, 2], [8, 0]] + row_regs,
        lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(lw)],
        block_bases=[], shape=[bn, 16])
    s_rd = gl.DistributedLinearLayout(  # weight scale bytes (row, 2c + i), the same threads
        reg_bases=[[0, 1], [8, 0]] + row_regs,
        lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(lw)],
        block_bases=[], shape=[bn, 8])
    w_split = gl.DistributedLinearLayout(  # w_rd as (row, c, i, e)
        reg_bases=[[0, 0, 0, 1], [0, 0, 1, 0], [8, 0, 0, 0]] + [[16 * num_warps << i, 0, 0, 0] for i in range(lr)],
        lane_bases=[[0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
        warp_bases=[[16 << i, 0, 0, 0] for i in range(lw)],
        block_bases=[], shape=[bn, 4, 2, 2])
    # activation words (tok, c, i, e) of one tile: each thread a word pair (e) of one block (tok, c, i);
    # the bt * 8 blocks are spread over lanes then warps, the rest in registers
    lt = bt.bit_length() - 1
    blk_bits = [[0, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0]] + [[1 << j, 0, 0, 0] for j in range(lt)]
    nthr = 5 + lw
    thr, regs = blk_bits[:nthr], blk_bits[nthr:]
    thr += [[0, 0, 0, 0]] * (nthr - len(thr))  # fewer blocks than threads: the rest repeat
    x_split = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1]] + regs, lane_bases=thr[:5], warp_bases=thr[5:],
        block_bases=[], shape=[bt, 4, 2, 2])
    x_cp = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])     # 16-byte copies of fp16 rows
    w_cp = gl.BlockedLayout([1, 4], [8, 4], [num_warps, 1], [1, 0])      # 16-byte copies of word rows
    s_cp = gl.BlockedLayout([1, 4], [32, 1], [num_warps, 1], [1, 0])     # 4-byte copies of scale words
    ring_sh = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    x_sh = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, bt, 16])
    return dict(W_RD=w_rd, S_RD=s_rd, W_SPLIT=w_split, X_SPLIT=x_split, W_CP=w_cp, S_CP=s_cp, X_CP=x_cp, RING_SH=ring_sh,
                X_SH=x_sh, MMA=mma)


@gluon.jit
def _decode_tile(w, s, R: gl.constexpr):
    """Words [R, 4, 2, 2] (row, c, i, e) + scale bytes [R, 4, 2] -> fp16 [R, 128] in logical k order
    kl = 16r + 8i + 2c + e (values e2m1 * e4m3 * 2^-7, exact)."""
    s16 = gl.expand_dims(_e4m3_to_f16_x128(s.to(gl.int32)), 3)
    o0, o1, o2, o3, o4, o5, o6, o7 = _e2m1_words_to_f16(w)
    v = gl.join(gl.join(gl.join(o0 * s16, o1 * s16), gl.join(o2 * s16, o3 * s16)),
                gl.join(gl.join(o4 * s16, o5 * s16), gl.join(o6 * s16, o7 * s16)))
    # dims (row, c, i, e, r0, r1, r2) -> (row, r2, r1, r0, i, c, e)
    return gl.reshape(gl.permute(v, [0, 6, 5, 4, 2, 1, 3]), [R, 128])


@gluon.jit
def _issue(w_smem, s_smem, x_smem, stage, w_base, s_base, x_base, kt, it1, X_F16: gl.constexpr):
    """cp.async of K tile kt (raw weight words, their scale bytes and, if X_F16, the fp16 activation
    tile) into ring stage `stage`; nothing is copied for kt >= it1 (the group is still committed,
    so the wait_group counts stay uniform)."""
    if kt < it1:
        async_copy.async_copy_global_to_shared(w_smem.index(stage), w_base + kt * 16)
        async_copy.async_copy_global_to_shared(s_smem.index(stage), s_base + kt * 2 * 512)  # 8 blocks: 2 words
        if X_F16:
            async_copy.async_copy_global_to_shared(x_smem.index(stage), x_base + kt * 128)
    async_copy.commit_group()


@gluon.jit
def _load_x(xp_ptr, xsf_ptr, xoff, xsoff, kt):
    """Packed activation words [BT, 4, 2, 2] and scale bytes [BT, 4, 2] of K tile kt."""
    return gl.load(xp_ptr + xoff + kt * 16), gl.load(xsf_ptr + xsoff + kt * 2 * 512)


@gluon.jit
def _k_tile(it, it0, it1, acc, xw, xs, w_smem, s_smem, x_smem, w_base, s_base, x_base, xp_ptr, xsf_ptr, xoff, xsoff,
            W_RD: gl.constexpr, S_RD: gl.constexpr, W_SPLIT: gl.constexpr, L3W: gl.constexpr, A_OP: gl.constexpr,
            BN: gl.constexpr, BT: gl.constexpr, NS: gl.constexpr, X_F16: gl.constexpr):
    """K tile `it` of the CTA's tiles it0 .. it1 - 1: ring tile in, the tile NS - 1 ahead issued, the B tile (decoded
    one tile ahead unless X_F16), the weights decoded into the A operand, acc += wgmma. Returns (acc, xw, xs): the
    activation words of the next tile to decode (unchanged when X_F16)."""
    i = it - it0
    async_copy.wait_group(NS - 2)
    fence_async_shared()  # cp.async data and this thread's B-tile stores, before the wgmma (async proxy)
    gl.thread_barrier()  # ring tile it (and B tile it) in for every thread; the last wgmma done everywhere
    w = w_smem.index(i % NS).load(W_RD)
    s = s_smem.index(i % NS).load(S_RD)
    _issue(w_smem, s_smem, x_smem, (i + NS - 1) % NS, w_base, s_base, x_base, it + NS - 1, it1, X_F16)
    if X_F16:
        b = x_smem.index(i % NS)
    else:  # B tile it + 1 (past it1: unused), from the words loaded one tile ahead
        x_smem.index((i + 1) % 2).store(_decode_tile(xw, xs, BT))
        xw, xs = _load_x(xp_ptr, xsf_ptr, xoff, xsoff, gl.minimum(it + 2, it1 - 1))
        b = x_smem.index(i % 2)
    w = gl.convert_layout(gl.reshape(w, [BN, 4, 2, 2]), W_SPLIT, assert_trivial=True)
    s = gl.convert_layout(gl.reshape(s, [BN, 4, 2]), L3W, assert_trivial=True)
    a = gl.convert_layout(_decode_tile(w, s, BN), A_OP, assert_trivial=True)
    acc = warpgroup_mma(a, b.permute([1, 0]), acc)
    return acc, xw, xs


@gluon.jit
def gemm_nvfp4_wgmma_kernel(
    w_ptr, wsf_ptr, xp_ptr, xsf_ptr, alpha_ptr, out_ptr, ws_ptr, ctr_ptr,
    N, M, KW, CP4, k_iters, iters_per_split,
    W_RD: gl.constexpr, S_RD: gl.constexpr, W_SPLIT: gl.constexpr, X_SPLIT: gl.constexpr,
    W_CP: gl.constexpr, S_CP: gl.constexpr, X_CP: gl.constexpr, RING_SH: gl.constexpr, X_SH: gl.constexpr,
    MMA: gl.constexpr, BN: gl.constexpr, BT: gl.constexpr, NS: gl.constexpr, SPLIT: gl.constexpr,
    X_F16: gl.constexpr,
):
    """out[t, n] = bf16(alpha * sum_k W[n, k] X[t, k]) for a [BN, BT] tile. w_ptr / xp_ptr: packed E2M1
    [N, K/2] / [M, K/2] viewed as int32 (KW = K / 8 words a row); wsf_ptr / xsf_ptr: their 128x4-swizzled
    E4M3 scale bytes (CP4 = K / 64 column groups); K % 128 == 0. Grid (cdiv(N, BN), cdiv(M, BT), SPLIT);
    SPLIT > 1 needs ws_ptr (fp32 [SPLIT, M, N]) and ctr_ptr (int32, one zero per output tile)."""
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_s = gl.program_id(2)
    # weight copy addresses (rows past N are clamped: their outputs are masked at the store)
    wr = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, W_CP)), N - 1)
    wq = gl.arange(0, 16, layout=gl.SliceLayout(0, W_CP))
    w_base = w_ptr + gl.max_contiguous(gl.multiple_of((wr.to(gl.int64) * KW)[:, None] + wq[None, :], [1, 16]), [1, 16])
    sr = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, S_CP)), N - 1)
    sb = gl.arange(0, 8, layout=gl.SliceLayout(0, S_CP))
    soff = ((sr // 128) * CP4 * 512 + (sr % 32) * 16 + ((sr // 32) % 4) * 4)[:, None] + ((sb // 4) * 512 + sb % 4)[None, :]
    s_base = wsf_ptr + gl.max_contiguous(gl.multiple_of(soff, [1, 4]), [1, 4])
    w_smem = gl.allocate_shared_memory(gl.int32, [NS, BN, 16], RING_SH)
    s_smem = gl.allocate_shared_memory(gl.uint8, [NS, BN, 8], RING_SH)
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    L3W: gl.constexpr = gl.SliceLayout(3, W_SPLIT)
    # the CTA's 128-K tiles: chunk pid_s of the plan (iters_per_split tiles a chunk), or every chunk (SPLIT == 1)
    it0 = pid_s * iters_per_split
    if SPLIT == 1:
        it1 = k_iters
    else:
        it1 = gl.minimum(it0 + iters_per_split, k_iters)
    if X_F16:
        # pre-decoded fp16 activations [M, K] (logical order): their [BT, 128] tile rides in the ring
        xt = gl.minimum(pid_m * BT + gl.arange(0, BT, layout=gl.SliceLayout(1, X_CP)), M - 1)
        xk = gl.arange(0, 128, layout=gl.SliceLayout(0, X_CP))
        x_base = xp_ptr + gl.max_contiguous(gl.multiple_of((xt.to(gl.int64) * KW * 8)[:, None] + xk[None, :],
                                                           [1, 128]), [1, 128])
        x_smem = gl.allocate_shared_memory(gl.float16, [NS, BT, 128], X_SH)
        xw, xs, xoff, xsoff = 0, 0, 0, 0  # unused (no in-kernel activation decode)
    else:
        # packed activations, decoded here: word 4c + 2i + e of token t's tile row, scale byte of block 2c + i
        L3: gl.constexpr = gl.SliceLayout(3, X_SPLIT)
        xt = gl.minimum(pid_m * BT + gl.arange(0, BT, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3))), M - 1)
        xc = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(0, L3)))
        xi = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3)))
        xblk = 2 * xc[:, None] + xi[None, :]  # [4, 2]
        xe = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, X_SPLIT))))
        xoff = (xt.to(gl.int64) * KW)[:, None, None, None] + (2 * xblk)[None, :, :, None] + xe[None, None, None, :]
        xoff = gl.max_contiguous(gl.multiple_of(xoff, [1, 1, 1, 2]), [1, 1, 1, 2])
        xsoff = ((xt // 128) * CP4 * 512 + (xt % 32) * 16 + ((xt // 32) % 4) * 4)[:, None, None] \
            + ((xblk // 4) * 512 + xblk % 4)[None, :, :]
        x_base = w_base  # unused
        x_smem = gl.allocate_shared_memory(gl.float16, [2, BT, 128], X_SH)  # B tiles it and it + 1
    for j in gl.static_range(NS - 1):  # prologue: tiles it0 .. it0 + NS - 2
        _issue(w_smem, s_smem, x_smem, j, w_base, s_base, x_base, it0 + j, it1, X_F16)
    if not X_F16:  # (an empty split, it0 >= it1, loads the last tile and adds nothing)
        xw, xs = _load_x(xp_ptr, xsf_ptr, xoff, xsoff, gl.minimum(it0, it1 - 1))
        x_smem.index(0).store(_decode_tile(xw, xs, BT))
        xw, xs = _load_x(xp_ptr, xsf_ptr, xoff, xsoff, gl.minimum(it0 + 1, it1 - 1))
    if SPLIT == 1:
        # one CTA walks every chunk of the plan: each chain from +0, the chunk sums (x 2^14) added in chunk order
        # (the first is the total): the ops the ticket reduce of a split over the same chunks performs
        total = gl.zeros([BN, BT], gl.float32, layout=MMA)
        for c0 in range(it0, it1, iters_per_split):
            acc = gl.zeros([BN, BT], gl.float32, layout=MMA)
            for it in range(c0, gl.minimum(c0 + iters_per_split, it1)):
                acc, xw, xs = _k_tile(it, it0, it1, acc, xw, xs, w_smem, s_smem, x_smem, w_base, s_base, x_base,
                                      xp_ptr, xsf_ptr, xoff, xsoff, W_RD, S_RD, W_SPLIT, L3W, A_OP, BN, BT, NS, X_F16)
            if c0 == it0:
                total = acc * DECODE_UNSCALE
            else:
                total = total + acc * DECODE_UNSCALE
        acc = total
    else:  # one chunk a CTA
        acc = gl.zeros([BN, BT], gl.float32, layout=MMA)
        for it in range(it0, it1):
            acc, xw, xs = _k_tile(it, it0, it1, acc, xw, xs, w_smem, s_smem, x_smem, w_base, s_base, x_base,
                                  xp_ptr, xsf_ptr, xoff, xsoff, W_RD, S_RD, W_SPLIT, L3W, A_OP, BN, BT, NS, X_F16)
        acc = acc * DECODE_UNSCALE
    async_copy.wait_group(0)

    rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    tm = pid_m * BT + gl.arange(0, BT, layout=gl.SliceLayout(0, MMA))
    mask = (rn < N)[:, None] & (tm < M)[None, :]
    off = rn.to(gl.int64)[:, None] + tm.to(gl.int64)[None, :] * N
    alpha = gl.load(alpha_ptr)
    if SPLIT == 1:
        gl.store(out_ptr + off, (acc * alpha).to(gl.bfloat16), mask=mask)
    else:
        # partials tile-major: split sp of output tile (pid_n, pid_m) is a [BN, BT] block at ws_ptr + (sp * tiles +
        # tile) * BN * BT (fp32, row r at r * BT): offsets fixed per register, few address registers to keep
        tile = pid_n * gl.num_programs(1) + pid_m
        tiles = gl.num_programs(0) * gl.num_programs(1)
        loc = (gl.arange(0, BN, layout=gl.SliceLayout(1, MMA)) * BT)[:, None] \
            + gl.arange(0, BT, layout=gl.SliceLayout(0, MMA))[None, :]
        ws_tile = ws_ptr + tile.to(gl.int64) * (BN * BT)
        step = tiles.to(gl.int64) * (BN * BT)  # one split's partials
        gl.store(ws_tile + pid_s * step + loc, acc, mask=mask)
        gl.thread_barrier()  # every thread's partial is written before the ticket releases them
        ticket = gl.atomic_add(ctr_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:  # the last CTA of this tile: all partials are visible
            total = gl.load(ws_tile + loc, mask=mask, other=0.0, cache_modifier=".cg")
            for sp in range(1, SPLIT):  # a loop, not unrolled: SPLIT loads in flight would cost registers
                total += gl.load(ws_tile + sp * step + loc, mask=mask, other=0.0, cache_modifier=".cg")
            gl.store(out_ptr + off, (total * alpha).to(gl.bfloat16), mask=mask)
            gl.atomic_xchg(ctr_ptr + tile, 0, sem="relaxed", scope="gpu")
