"""Gluon body of the large-token path's register-fed variant (kernels.sm90.grouped_gemm_nvfp4.BigWgmmaKey; issue 25).

The large-token path (CompileKey.big, _grouped_gemm_nvfp4_big_jit) with the register-fed structure of
_grouped_gemm_nvfp4_wgmma: the BN weight rows of an expert are the wgmma A operand, decoded from a cp.async ring
straight into the A-fragment registers (the wgmma kernel's own helpers: _weight_bases, _issue, _store_scales,
_decode_a; no shared-memory round trip of the decoded weights), and the B operand is a [BT, 128] fp16 token tile of
the activations decoded once per GEMM in the k128 layout (grouped_act_decode_planes_kernel with TILE128: per K tile
64 even k, then 64 odd k), brought by TMA into a 4-stage ring with one mbarrier a stage. No activation decode in the
loop. BT 64 or 128 tokens (the wgmma N), BN = 16 * warps * R_WG weight rows: R_WG (BigWgmmaKey.rows_per_wg) row
blocks of 16 * warps rows, one 64-row wgmma tile per warpgroup each, so a token tile brought in by TMA feeds R_WG
wgmmas (R_WG 2: half the token-tile traffic per weight row).

Bits: A column L = 64 n + b holds k = 2 b + n (the wgmma kernel's order: L < 64 the even k, L >= 64 the odd k), and
B column L of the k128 layout holds the same k, so one wgmma over K = 128 issues the present path's 8 k16 steps
(steps 0-3 over the even k, 4-7 over the odd k) with the same fp16 values, in one fp32 accumulation chain over the K
tiles; the epilogue is the wgmma kernel's (_epilogue: the Triton kernel's float32 expressions). So every output
element sees the present per-element MMA sequence: the same bytes (GPU tests in test_sm90_grouped_gemm.py).

Pipeline, per K tile it (one CTA barrier; the loop is unrolled by 4 so every ring index is static):
  wait for weight ring tiles it, it + 1 (cp.async) ; barrier
  read ring stage it % 4 (weight halves), the converted scales of tile it, the scale bytes of tile it + 1
  cp.async weight tile it + 3 into the stage tile it - 1 used; TMA of token tile it + 2 into the B stage of
  tile it - 2 (its wgmma finished: every warpgroup waited for it in tile it - 1, before this barrier)
  convert tile it + 1's scales; decode the A operand of tile it (registers)
  wait for token tile it (mbarrier); async wgmma of tile it; wait until only it is in flight (tile it - 1 done).
So the MMA of tile it runs while tile it + 1's weights are decoded. The A registers of tile it - 1 are kept alive
until that wait (a dependency of the wait), as the hardware reads them while the wgmma runs.

R_WG 2 (_big_k_step_r2): the same barrier, reads and copies, then per tile it, staggered by one row block:
  decode block 0 (rows 0 .. BNB - 1 of the stage); wait for token tile it; async wgmma (block 0, tile it);
  wait until one wgmma is in flight (block 1 of tile it - 1 done: its A registers free);
  decode block 1 (rows BNB .. BN - 1); async wgmma (block 1, tile it); wait until one is in flight (block 0 done).
So one 64-row wgmma is always in flight while the next block decodes, and only two blocks' A registers are alive
(block 0 of tile it, block 1 of tile it - 1). Both blocks' wgmmas in flight during the next tile's decode (the
R_WG 1 order with two wgmmas) keeps four alive: 255 registers and 64-72 bytes of stack at BT 64 (CPU compile).
At BT 128 (two [64, 128] fp32 accumulators a warpgroup: 128 registers) the copy addresses of the weight ring are
int32 offsets from the expert's two base pointers (_weight_offsets / _issue_w; with K % 128 == 0, the row stride
HW = 32 K_ITERS a constant) instead of _weight_bases' 64-bit pointer tensors: the same addresses in fewer registers,
so ptxas keeps everything the K loop reads in registers (255, 0-8 bytes of stack used only outside the loop; the
pointer tensors needed 24-48 bytes, reloaded inside the loop). Every other key runs the unchanged instructions.
Each block is its own [BNB, BT] accumulator and is its own K = 128 wgmma chain over the K tiles in order (the R_WG 1
sequence), and its epilogue is _epilogue's for column tile R_WG pid_n + b of BNB rows: the same bits.

Token rows past the planes come zero-filled by TMA; rows of the next expert inside a tile land in token columns the
epilogue masks (an output element depends only on its own token and weight row).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from kernels.sm90._grouped_gemm_nvfp4_wgmma import (_alloc_weight_ring, _decode_a, _epilogue, _issue, _schedule,
                                                    _store_scales, _weight_bases, _weight_index, _zero_tile,
                                                    grouped_wgmma_layouts)

XS = 4  # token-tile ring stages (prefetch distance XS - 2 = 2 tiles)


def big_wgmma_layouts(num_warps: int, bt: int, wvec: int, e_pad: int) -> dict:
    """The wgmma kernel's layouts (grouped_wgmma_layouts) with the MMA's N = bt tokens (64 or 128) and the token
    tile's NVMMA shared layout (X_SH, also the host tensor descriptor's)."""
    assert bt in (64, 128), bt
    lay = grouped_wgmma_layouts(num_warps, 64, wvec, e_pad)
    lay["MMA"] = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, bt, 16])
    for name in ("X4",):  # the activation-decode layout of the wgmma kernel: unused here
        lay.pop(name)
    return lay


@gluon.jit
def _x_issue(x_desc, xs, bars, r0, kt, K_ITERS: gl.constexpr, BT: gl.constexpr, J: gl.constexpr):
    """TMA of token tile kt ([BT, 128] at row r0, column 128 kt) into B stage J, completing on mbarrier J (nothing
    past the last tile)."""
    ok = kt < K_ITERS
    mbarrier.expect(bars.index(J), BT * 128 * 2, pred=ok)
    tma.async_copy_global_to_shared(x_desc, [r0, kt * 128], bars.index(J), xs[J], pred=ok)


@gluon.jit
def _weight_offsets(w_ptr, wsf_ptr, e64, pid_n, N, HW, CP4, NP, W_CP: gl.constexpr, S_CP: gl.constexpr,
                    WVEC: gl.constexpr, BN: gl.constexpr):
    """_weight_bases' copy addresses as the expert's two base pointers (scalars) and int32 element offsets
    (w_off [BN, 32], s_off [BN, 8]; the same addresses, fewer registers a thread: one word an offset, not a
    64-bit pointer), with wvec0 / scol."""
    wr, wcol, s_off, wvec0, scol = _weight_index(pid_n, N, CP4, W_CP, S_CP, WVEC, BN)
    w_off = (wr * HW)[:, None] + wcol[None, :]
    return (w_ptr + e64 * N * HW, wsf_ptr + e64 * NP * CP4 * 4, w_off, s_off), wvec0, scol


@gluon.jit
def _issue_w(w_dst, s_dst, wsrc, wvec0, scol, kt, K_ITERS: gl.constexpr, HW, CP4, K_TAIL: gl.constexpr,
             WVEC: gl.constexpr):
    """_issue with the copy sources wsrc: (w_base, s_base) pointer tensors (_weight_bases; _issue itself), or
    (w_e, s_e, w_off, s_off) from _weight_offsets (the same addresses: base + offset + the tile's)."""
    if len(wsrc) == 2:
        _issue(w_dst, s_dst, wsrc[0], wsrc[1], wvec0, scol, kt, K_ITERS, HW, CP4, K_TAIL)
    else:
        gl.static_assert(not K_TAIL, "_weight_offsets' copies have no K-tail masks")
        w_off = gl.max_contiguous(gl.multiple_of(wsrc[2] + kt * 32, [1, WVEC // 2]), [1, WVEC // 2])
        s_off = gl.max_contiguous(gl.multiple_of(wsrc[3] + kt * 2 * 512, [1, 4]), [1, 4])
        if kt < K_ITERS:  # (no K tail here: _weight_offsets serves K % 128 == 0 only)
            async_copy.async_copy_global_to_shared(w_dst, wsrc[0] + w_off)
            async_copy.async_copy_global_to_shared(s_dst, wsrc[1] + s_off)
        async_copy.commit_group()


@gluon.jit
def _big_k_step(it, acc, a_prev, rings, s16_cur, s16_nxt, xs, bars, x_desc, r0, w_base, s_base, wvec0, scol, HW, CP4,
                H_RD: gl.constexpr, H4: gl.constexpr, S_CV: gl.constexpr, SD_RD: gl.constexpr, A_OP: gl.constexpr,
                K_ITERS: gl.constexpr, K_TAIL: gl.constexpr, BN: gl.constexpr, BT: gl.constexpr, J: gl.constexpr,
                W_FRAG: gl.constexpr):
    """K tile it (it % 4 == J; see the module docstring)."""
    w_cur = rings[2 * J]
    s_nxt = rings[2 * ((J + 1) % 4) + 1]
    w_iss, s_iss = rings[2 * ((J + 3) % 4)], rings[2 * ((J + 3) % 4) + 1]
    async_copy.wait_group(1)  # weight tiles it and it + 1 landed (this thread's copies)
    gl.thread_barrier()  # ... every thread's; scales of tile it stored; every warpgroup's wgmma of tile it - 2 done
    wh = w_cur.load(H_RD)
    sd = s16_cur.load(SD_RD)
    sb = s_nxt.load(S_CV)
    _issue(w_iss, s_iss, w_base, s_base, wvec0, scol, it + 3, K_ITERS, HW, CP4, K_TAIL)
    _x_issue(x_desc, xs, bars, r0, it + 2, K_ITERS, BT, (J + 2) % 4)
    _store_scales(sb, s16_nxt, it + 1, HW, S_CV, K_TAIL)
    a = _decode_a(wh, sd, H4, A_OP, BN, W_FRAG)
    mbarrier.wait(bars.index(J), (it // 4) & 1)  # token tile it landed
    acc = warpgroup_mma(a, xs[J].permute([1, 0]), acc, is_async=True)
    acc, a_prev = warpgroup_mma_wait(1, deps=[acc, a_prev])  # tile it - 1's wgmma done: its A registers free
    return acc, a


@gluon.jit
def _big_k_step_r2(it, acc0, acc1, a1_prev, rings, s16_cur, s16_nxt, xs, bars, x_desc, r0, wsrc, wvec0, scol,
                   HW, CP4, H_RD: gl.constexpr, H4: gl.constexpr, S_CV: gl.constexpr, SD_RD: gl.constexpr,
                   A_OP: gl.constexpr, K_ITERS: gl.constexpr, K_TAIL: gl.constexpr, BNB: gl.constexpr,
                   BT: gl.constexpr, J: gl.constexpr, WVEC: gl.constexpr, W_FRAG: gl.constexpr):
    """K tile it (it % 4 == J) of two row blocks (R_WG 2; block b: rows b BNB .. of the ring stage, the converted
    scales and the accumulator acc<b>), both on token tile it, staggered by one block (see the module docstring):
    block 0's wgmma is issued, then the wait for block 1 of tile it - 1, then block 1 decoded and issued, then the wait
    for block 0 of tile it. Returns block 1's A registers (alive until the next tile's first wait)."""
    w_cur = rings[2 * J]
    s_nxt = rings[2 * ((J + 1) % 4) + 1]
    w_iss, s_iss = rings[2 * ((J + 3) % 4)], rings[2 * ((J + 3) % 4) + 1]
    async_copy.wait_group(1)  # weight tiles it and it + 1 landed (this thread's copies)
    gl.thread_barrier()  # ... every thread's; scales of tile it stored; every wgmma of tile it - 2 done
    wh = w_cur.slice(0, BNB).load(H_RD)
    sd = s16_cur.slice(0, BNB).load(SD_RD)
    sb = s_nxt.load(S_CV)
    _issue_w(w_iss, s_iss, wsrc, wvec0, scol, it + 3, K_ITERS, HW, CP4, K_TAIL, WVEC)
    _x_issue(x_desc, xs, bars, r0, it + 2, K_ITERS, BT, (J + 2) % 4)
    _store_scales(sb, s16_nxt, it + 1, HW, S_CV, K_TAIL)
    a0 = _decode_a(wh, sd, H4, A_OP, BNB, W_FRAG)
    mbarrier.wait(bars.index(J), (it // 4) & 1)  # token tile it landed
    acc0 = warpgroup_mma(a0, xs[J].permute([1, 0]), acc0, is_async=True)
    # block 1 of tile it - 1 done (its A registers free); block 0 of tile it in flight
    acc0, acc1, a1_prev = warpgroup_mma_wait(1, deps=[acc0, acc1, a1_prev])
    # block 1 of tile it (its ring rows and scales stay unwritten until the next tile's barrier)
    a1 = _decode_a(w_cur.slice(BNB, BNB).load(H_RD), s16_cur.slice(BNB, BNB).load(SD_RD), H4, A_OP, BNB, W_FRAG)
    acc1 = warpgroup_mma(a1, xs[J].permute([1, 0]), acc1, is_async=True)
    acc0, acc1, a0 = warpgroup_mma_wait(1, deps=[acc0, acc1, a0])  # block 0 of tile it done; block 1 in flight
    return acc0, acc1, a1


@gluon.jit(do_not_specialize=["RCAP", "adec_stride", "hdec_stride", "limit"])
def grouped_gemm_nvfp4_big_wgmma_kernel(
    w_ptr, wsf_ptr, x_desc, adec_ptr, wdec_ptr, off_ptr, out_ptr, out2_ptr, hsf_ptr, hdec_ptr,
    E, N, HW, CP4, RCAP, NP, adec_stride, hdec_stride, limit, OUT_CP,
    H_RD: gl.constexpr, H4: gl.constexpr, S_CV: gl.constexpr, SD_RD: gl.constexpr, W_CP: gl.constexpr,
    S_CP: gl.constexpr, RING_SH: gl.constexpr, S_SH: gl.constexpr, X_SH: gl.constexpr, MMA: gl.constexpr,
    EPI_L: gl.constexpr, EPI_GU: gl.constexpr, SCHED: gl.constexpr,
    K_ITERS: gl.constexpr, K_TAIL: gl.constexpr, WVEC: gl.constexpr, EPI: gl.constexpr, BN: gl.constexpr,
    BT: gl.constexpr, E_P: gl.constexpr, CLAMP: gl.constexpr, ONE_SIXTH: gl.constexpr, FMAX: gl.constexpr,
    R_WG: gl.constexpr, W_FRAG: gl.constexpr,
):
    """grouped_gemm_nvfp4_wgmma_kernel's contract for the weights (w_ptr [E, N, K/4] i16, wsf_ptr u8 128x4 per
    expert, HW = K / 4) and outputs; x_desc: a tensor descriptor (block [BT, 128], layout X_SH) of the activations
    decoded in the k128 layout, fp16 [RP, K_ITERS * 128]. Grid = BigWgmmaKey.grid programs, N tile fastest. W_FRAG:
    the weights in the fragment order (Sm90GroupedWeight.fragment_order; the same A operand)."""
    NT = gl.cdiv(N, BN)
    pid = gl.program_id(0)
    pid_n = pid % NT
    t = pid // NT
    is_tile, e, row0, cnt_e, off_e, pad_e, off_end, z = _schedule(off_ptr, t, E, BT, E_P, SCHED)
    e64 = e.to(gl.int64)
    I = N // 2
    if is_tile:
        if R_WG == 2 and BT == 128 and not K_TAIL:  # int32 offsets from the expert's base pointers (_weight_offsets)
            wsrc, wvec0, scol = _weight_offsets(w_ptr, wsf_ptr, e64, pid_n, N, K_ITERS * 32, CP4, NP, W_CP, S_CP, WVEC,
                                                BN)
        else:
            w_base, s_base, wvec0, scol = _weight_bases(w_ptr, wsf_ptr, e64, pid_n, N, HW, CP4, NP, W_CP, S_CP, WVEC,
                                                        BN)
            wsrc = (w_base, s_base)
        rings, s16 = _alloc_weight_ring(BN, RING_SH, S_SH)  # the wgmma kernel's weight ring and scale buffers
        xs = (gl.allocate_shared_memory(gl.float16, [BT, 128], X_SH),
              gl.allocate_shared_memory(gl.float16, [BT, 128], X_SH),
              gl.allocate_shared_memory(gl.float16, [BT, 128], X_SH),
              gl.allocate_shared_memory(gl.float16, [BT, 128], X_SH))
        bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(4):
            mbarrier.init(bars.index(j), count=1)
        fence_async_shared()  # the initialised barriers visible to the async proxy (TMA) before the first copy
        r0 = off_e + row0  # first global row of the token tile
        A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        BNB: gl.constexpr = BN // R_WG  # rows of one row block (one 64-row wgmma tile per warpgroup)
        if R_WG == 1:
            acc = gl.zeros([BN, BT], gl.float32, layout=MMA)
            a_prev = gl.zeros([BN, 128], gl.float16, layout=A_OP)
        else:  # two row blocks: rows 0 .. BNB - 1 and BNB .. BN - 1, an accumulator each
            acc0 = gl.zeros([BNB, BT], gl.float32, layout=MMA)
            acc1 = gl.zeros([BNB, BT], gl.float32, layout=MMA)
            a1_prev = gl.zeros([BNB, 128], gl.float16, layout=A_OP)
        for j in gl.static_range(3):  # prologue: weight tiles 0, 1, 2 into stages 0, 1, 2
            _issue_w(rings[2 * j], rings[2 * j + 1], wsrc, wvec0, scol, j, K_ITERS, HW, CP4, K_TAIL, WVEC)
        gl.thread_barrier()  # the barriers initialised for every thread before a TMA can complete on them
        for j in gl.static_range(2):  # token tiles 0, 1 into B stages 0, 1
            _x_issue(x_desc, xs, bars, r0, j, K_ITERS, BT, j)
        async_copy.wait_group(2)
        gl.thread_barrier()  # ring tile 0 in for every thread
        _store_scales(rings[1].load(S_CV), s16[0], 0, HW, S_CV, K_TAIL)
        # the loop runs from two trips on (one constant trip, K 512 .. 639, failed Triton 3.6's lowering to LLVM, as
        # in the wgmma kernel); the rest of the tiles unrolled after it
        LOOP: gl.constexpr = K_ITERS // 4 if K_ITERS >= 8 else 0
        if R_WG == 1:
            for it4 in range(0, LOOP):  # unrolled by 4: static ring stages and double-buffer roles (s16[j % 2])
                for j in gl.static_range(4):
                    acc, a_prev = _big_k_step(4 * it4 + j, acc, a_prev, rings, s16[j % 2], s16[(j + 1) % 2], xs, bars,
                                              x_desc, r0, w_base, s_base, wvec0, scol, HW, CP4, H_RD, H4, S_CV, SD_RD,
                                              A_OP, K_ITERS, K_TAIL, BN, BT, j, W_FRAG)
            if K_ITERS - 4 * LOOP != 0:  # (every wgmma done before the tail: else ptxas serializes all of them, C7513)
                acc, a_prev = warpgroup_mma_wait(0, deps=[acc, a_prev])
            for j in gl.static_range(K_ITERS - 4 * LOOP):  # the last tiles (tile index % 4 == j % 4)
                acc, a_prev = _big_k_step(4 * LOOP + j, acc, a_prev, rings, s16[j % 2], s16[(j + 1) % 2], xs,
                                          bars, x_desc, r0, w_base, s_base, wvec0, scol, HW, CP4, H_RD, H4, S_CV, SD_RD,
                                          A_OP, K_ITERS, K_TAIL, BN, BT, j % 4, W_FRAG)
            acc = warpgroup_mma_wait(0, deps=[acc, a_prev])[0]
        else:
            for it4 in range(0, LOOP):  # the same unrolled loop, two row blocks a tile
                for j in gl.static_range(4):
                    acc0, acc1, a1_prev = _big_k_step_r2(
                        4 * it4 + j, acc0, acc1, a1_prev, rings, s16[j % 2], s16[(j + 1) % 2], xs, bars,
                        x_desc, r0, wsrc, wvec0, scol, HW, CP4, H_RD, H4, S_CV, SD_RD, A_OP, K_ITERS,
                        K_TAIL, BNB, BT, j, WVEC, W_FRAG)
            if K_ITERS - 4 * LOOP != 0:  # (as above: every wgmma done before the tail)
                acc0, acc1, a1_prev = warpgroup_mma_wait(0, deps=[acc0, acc1, a1_prev])
            for j in gl.static_range(K_ITERS - 4 * LOOP):
                acc0, acc1, a1_prev = _big_k_step_r2(
                    4 * LOOP + j, acc0, acc1, a1_prev, rings, s16[j % 2], s16[(j + 1) % 2], xs,
                    bars, x_desc, r0, wsrc, wvec0, scol, HW, CP4, H_RD, H4, S_CV, SD_RD, A_OP, K_ITERS,
                    K_TAIL, BNB, BT, j % 4, WVEC, W_FRAG)
            acc0, acc1 = warpgroup_mma_wait(0, deps=[acc0, acc1, a1_prev])[:2]
        async_copy.wait_group(0)
        for j in gl.static_range(4):
            mbarrier.invalidate(bars.index(j))
        if R_WG == 1:
            _epilogue(acc, e64, pid_n, row0, cnt_e, off_e, pad_e, adec_ptr, wdec_ptr, out_ptr, out2_ptr, hsf_ptr,
                      hdec_ptr, N, I, adec_stride, hdec_stride, limit, OUT_CP, EPI_L, EPI_GU, EPI, BN, BT, CLAMP,
                      ONE_SIXTH, FMAX)
        else:  # row block b is column tile R_WG pid_n + b of BNB rows (the epilogues' gate/up pairs, quant blocks)
            _epilogue(acc0, e64, R_WG * pid_n, row0, cnt_e, off_e, pad_e, adec_ptr, wdec_ptr, out_ptr, out2_ptr,
                      hsf_ptr, hdec_ptr, N, I, adec_stride, hdec_stride, limit, OUT_CP, EPI_L, EPI_GU, EPI, BNB, BT,
                      CLAMP, ONE_SIXTH, FMAX)
            _epilogue(acc1, e64, R_WG * pid_n + 1, row0, cnt_e, off_e, pad_e, adec_ptr, wdec_ptr, out_ptr, out2_ptr,
                      hsf_ptr, hdec_ptr, N, I, adec_stride, hdec_stride, limit, OUT_CP, EPI_L, EPI_GU, EPI, BNB, BT,
                      CLAMP, ONE_SIXTH, FMAX)
    else:
        _zero_tile(z, off_end, pid_n, out_ptr, out2_ptr, N, RCAP, EPI_L, EPI, BN, BT)
