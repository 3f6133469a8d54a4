"""Kernel body of kernels.sm100.gemm_fp8_blockscaled (CuTe DSL; imports cutlass, so it is
imported only by that module's compile step). Layouts, math and constraints: that module's
docstring.

Warp roles (192 threads): warps 0-3 epilogue (TMEM -> registers -> global bf16), warp 4
issues the MMAs, warp 5 issues the TMA loads. One CTA computes one 128 x tile_n output tile
over all of K; pipeline stages hold 128 of K (four K=32 MMAs, one UE8M0 scale column of 4
per row = one 128-block scale replicated).
"""

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.memory
import cutlass.pipeline as pipeline
import cutlass.utils.blackwell_helpers as sm100_utils
import cutlass.utils.blockscaled_layout as blockscaled_utils
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, tcgen05

from kernels.sm100.gemm_fp8_blockscaled import (
    EPI_N,
    EPILOGUE_WARPS,
    K_ALIGN,
    K_PER_STAGE,
    MMA_K,
    MMA_WARP,
    NUM_THREADS,
    SF_VEC_SIZE,
    TILE_M,
    TMA_WARP,
    TMEM_COLS,
    CompileKey,
)

E4M3 = cutlass.Float8E4M3FN
UE8M0 = cutlass.Float8E8M0FNU
BF16 = cutlass.BFloat16
F32 = cutlass.Float32


class BlockScaledGemmFp8:
    """out_bf16[M, N] = (A_e4m3 * SFA_ue8m0) @ (B_e4m3 * SFB_ue8m0)^T, one scale per 32 of K."""

    def __init__(self, key: CompileKey):
        self.key = key
        self.tile_n = key.tile_n
        self.num_stages = key.num_stages
        self.mma_tiler = (TILE_M, key.tile_n, K_PER_STAGE)

    @cute.jit
    def __call__(
        self,
        a_ptr: cute.Pointer,
        b_ptr: cute.Pointer,
        sfa_ptr: cute.Pointer,
        sfb_ptr: cute.Pointer,
        out_ptr: cute.Pointer,
        valid_rows_ptr: cute.Pointer,
        m: cutlass.Int32,
        n: cutlass.Int32,
        k: cutlass.Int32,
        stream: cuda.CUstream,
    ):
        # K-major operands; the row stride (K bytes) carries its divisibility so TMA is legal.
        k_h = cute.assume(k, K_ALIGN)
        a = cute.make_tensor(a_ptr, cute.make_layout((m, k_h, 1), stride=(k_h, 1, m * k_h)))
        b = cute.make_tensor(b_ptr, cute.make_layout((n, k_h, 1), stride=(k_h, 1, n * k_h)))
        # Scale factors: the 128x4 atom per (128 rows, 4 scale columns = 128 of K), over the
        # buffers' padded extents (rows to 128, K to whole 128-blocks: a partial last K block has
        # its full atom, replicated), so every atom the tiles touch is in bounds.
        k_sf = (k + K_PER_STAGE - 1) // K_PER_STAGE * K_PER_STAGE
        m_sf = (m + TILE_M - 1) // TILE_M * TILE_M
        n_sf = (n + TILE_M - 1) // TILE_M * TILE_M
        sfa = cute.make_tensor(sfa_ptr, blockscaled_utils.tile_atom_to_shape_SF((m_sf, k_sf, 1), SF_VEC_SIZE))
        sfb = cute.make_tensor(sfb_ptr, blockscaled_utils.tile_atom_to_shape_SF((n_sf, k_sf, 1), SF_VEC_SIZE))
        n_h = cute.assume(n, 8)
        out = cute.make_tensor(out_ptr, cute.make_layout((m, n_h), stride=(n_h, 1)))
        valid_rows = cute.make_tensor(valid_rows_ptr, cute.make_layout(1))

        mma_op = tcgen05.MmaMXF8F6F4Op(
            E4M3, E4M3, (TILE_M, self.tile_n, MMA_K), tcgen05.CtaGroup.ONE, tcgen05.OperandSource.SMEM,
            OperandMajorMode.K, OperandMajorMode.K,
        )
        tiled_mma = cute.make_tiled_mma(mma_op)
        cluster_vmnk = cute.tiled_divide(cute.make_layout((1, 1, 1)), (tiled_mma.thr_id.shape,))

        a_smem_staged = sm100_utils.make_smem_layout_a(tiled_mma, self.mma_tiler, E4M3, self.num_stages)
        b_smem_staged = sm100_utils.make_smem_layout_b(tiled_mma, self.mma_tiler, E4M3, self.num_stages)
        sfa_smem_staged = blockscaled_utils.make_smem_layout_sfa(tiled_mma, self.mma_tiler, SF_VEC_SIZE,
                                                                 self.num_stages)
        sfb_smem_staged = blockscaled_utils.make_smem_layout_sfb(tiled_mma, self.mma_tiler, SF_VEC_SIZE,
                                                                 self.num_stages)
        a_smem = cute.slice_(a_smem_staged, (None, None, None, 0))
        b_smem = cute.slice_(b_smem_staged, (None, None, None, 0))
        sfa_smem = cute.slice_(sfa_smem_staged, (None, None, None, 0))
        sfb_smem = cute.slice_(sfb_smem_staged, (None, None, None, 0))

        g2s = cpasync.CopyBulkTensorTileG2SOp(tcgen05.CtaGroup.ONE)
        tma_a, tma_a_tensor = cute.nvgpu.make_tiled_tma_atom_A(
            g2s, a, a_smem, self.mma_tiler, tiled_mma, cluster_vmnk.shape)
        tma_b, tma_b_tensor = cute.nvgpu.make_tiled_tma_atom_B(
            g2s, b, b_smem, self.mma_tiler, tiled_mma, cluster_vmnk.shape)
        # Scale bytes travel as 16-bit TMA elements (the 128x4 atom is 2-byte aligned).
        tma_sfa, tma_sfa_tensor = cute.nvgpu.make_tiled_tma_atom_A(
            g2s, sfa, sfa_smem, self.mma_tiler, tiled_mma, cluster_vmnk.shape, internal_type=cutlass.Int16)
        tma_sfb, tma_sfb_tensor = cute.nvgpu.make_tiled_tma_atom_B(
            g2s, sfb, sfb_smem, self.mma_tiler, tiled_mma, cluster_vmnk.shape, internal_type=cutlass.Int16)
        # Out-of-bounds boxes (rows past M or N, K past its end) are zero-filled and still
        # count their full bytes.
        self.tma_bytes_per_stage = (
            cute.size_in_bytes(E4M3, a_smem) + cute.size_in_bytes(E4M3, b_smem)
            + cute.size_in_bytes(UE8M0, sfa_smem) + cute.size_in_bytes(UE8M0, sfb_smem)
        )

        grid = ((m + TILE_M - 1) // TILE_M, (n + self.tile_n - 1) // self.tile_n, 1)
        self.kernel(
            tiled_mma,
            tma_a, tma_a_tensor, tma_b, tma_b_tensor,
            tma_sfa, tma_sfa_tensor, tma_sfb, tma_sfb_tensor,
            out, valid_rows, m, n,
            a_smem_staged, b_smem_staged, sfa_smem_staged, sfb_smem_staged,
        ).launch(grid=grid, block=[NUM_THREADS, 1, 1], cluster=(1, 1, 1), stream=stream)

    @cute.kernel
    def kernel(
        self,
        tiled_mma: cute.TiledMma,
        tma_a: cute.CopyAtom, mA: cute.Tensor,
        tma_b: cute.CopyAtom, mB: cute.Tensor,
        tma_sfa: cute.CopyAtom, mSFA: cute.Tensor,
        tma_sfb: cute.CopyAtom, mSFB: cute.Tensor,
        mOut: cute.Tensor,
        valid_rows: cute.Tensor,
        m: cutlass.Int32,
        n: cutlass.Int32,
        a_smem_staged: cute.ComposedLayout,
        b_smem_staged: cute.ComposedLayout,
        sfa_smem_staged: cute.Layout,
        sfb_smem_staged: cute.Layout,
    ):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        tile_m, tile_n, _ = cute.arch.block_idx()

        # Rows of this tile that are stored (< M) and, of those, computed (< the device-side
        # valid-row count, read at run time so a captured graph replays with fewer tokens).
        rows_stored = m - tile_m * TILE_M
        rows_valid = valid_rows[0] - tile_m * TILE_M
        tile_valid = rows_valid > 0

        if warp_idx == TMA_WARP:
            cpasync.prefetch_descriptor(tma_a)
            cpasync.prefetch_descriptor(tma_b)
            cpasync.prefetch_descriptor(tma_sfa)
            cpasync.prefetch_descriptor(tma_sfb)

        @cute.struct
        class SharedStorage:
            ab_mbar: cute.struct.MemRange[cutlass.Int64, self.num_stages * 2]
            acc_mbar: cute.struct.MemRange[cutlass.Int64, 2]
            tmem_base: cutlass.Int32

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sA = smem.allocate_tensor(E4M3, a_smem_staged.outer, byte_alignment=128, swizzle=a_smem_staged.inner)
        sB = smem.allocate_tensor(E4M3, b_smem_staged.outer, byte_alignment=128, swizzle=b_smem_staged.inner)
        sSFA = smem.allocate_tensor(UE8M0, sfa_smem_staged, byte_alignment=128)
        sSFB = smem.allocate_tensor(UE8M0, sfb_smem_staged, byte_alignment=128)

        ab_producer, ab_consumer = pipeline.PipelineTmaUmma.create(
            barrier_storage=storage.ab_mbar.data_ptr(),
            num_stages=self.num_stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
            tx_count=self.tma_bytes_per_stage,
        ).make_participants()
        acc_producer, acc_consumer = pipeline.PipelineUmmaAsync.create(
            barrier_storage=storage.acc_mbar.data_ptr(),
            num_stages=1,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 32 * len(EPILOGUE_WARPS)),
        ).make_participants()

        tmem = cutlass.memory.TmemAllocator(
            storage.tmem_base.ptr,
            barrier_for_retrieve=pipeline.NamedBarrier(barrier_id=1, num_threads=32 * (len(EPILOGUE_WARPS) + 1)),
            allocator_warp_id=EPILOGUE_WARPS[0],
        )
        epilogue_barrier = pipeline.NamedBarrier(barrier_id=2, num_threads=32 * len(EPILOGUE_WARPS))

        # This CTA's tiles: (bM, bK, RestK), (bN, bK, RestK)
        gA = cute.local_tile(mA, cute.slice_(self.mma_tiler, (None, 0, None)), (None, None, None))
        gB = cute.local_tile(mB, cute.slice_(self.mma_tiler, (0, None, None)), (None, None, None))
        gSFA = cute.local_tile(mSFA, cute.slice_(self.mma_tiler, (None, 0, None)), (None, None, None))
        gSFB = cute.local_tile(mSFB, cute.slice_(self.mma_tiler, (0, None, None)), (None, None, None))
        k_tile_cnt = cute.size(gA, mode=[3])

        thr_mma = tiled_mma.get_slice(0)
        tCgA = thr_mma.partition_A(gA)
        tCgB = thr_mma.partition_B(gB)
        tCgSFA = thr_mma.partition_A(gSFA)
        tCgSFB = thr_mma.partition_B(gSFB)

        one = cute.make_layout(1)
        tAsA, tAgA = cpasync.tma_partition(tma_a, 0, one, cute.group_modes(sA, 0, 3), cute.group_modes(tCgA, 0, 3))
        tBsB, tBgB = cpasync.tma_partition(tma_b, 0, one, cute.group_modes(sB, 0, 3), cute.group_modes(tCgB, 0, 3))
        tAsSFA, tAgSFA = cpasync.tma_partition(
            tma_sfa, 0, one, cute.group_modes(sSFA, 0, 3), cute.group_modes(tCgSFA, 0, 3))
        tBsSFB, tBgSFB = cpasync.tma_partition(
            tma_sfb, 0, one, cute.group_modes(sSFB, 0, 3), cute.group_modes(tCgSFB, 0, 3))
        tAsSFA = cute.filter_zeros(tAsSFA)
        tAgSFA = cute.filter_zeros(tAgSFA)
        tBsSFB = cute.filter_zeros(tBsSFB)
        tBgSFB = cute.filter_zeros(tBgSFB)

        acc_shape = tiled_mma.partition_shape_C(self.mma_tiler[:2])
        tCtAcc_fake = tiled_mma.make_fragment_C(acc_shape)

        # ---------------- TMA warp ----------------
        if warp_idx == TMA_WARP:
            if tile_valid:
                tAgA_t = tAgA[(None, tile_m, None, 0)]
                tBgB_t = tBgB[(None, tile_n, None, 0)]
                tAgSFA_t = tAgSFA[(None, tile_m, None, 0)]
                tBgSFB_t = tBgSFB[(None, tile_n, None, 0)]
                for kt in cutlass.range(k_tile_cnt):
                    slot = ab_producer.acquire_and_advance()
                    cute.copy(tma_a, tAgA_t[(None, kt)], tAsA[(None, slot.index)], tma_bar_ptr=slot.barrier)
                    cute.copy(tma_b, tBgB_t[(None, kt)], tBsB[(None, slot.index)], tma_bar_ptr=slot.barrier)
                    cute.copy(tma_sfa, tAgSFA_t[(None, kt)], tAsSFA[(None, slot.index)], tma_bar_ptr=slot.barrier)
                    cute.copy(tma_sfb, tBgSFB_t[(None, kt)], tBsSFB[(None, slot.index)], tma_bar_ptr=slot.barrier)
                ab_producer.tail()

        # ---------------- MMA warp ----------------
        if warp_idx == MMA_WARP:
            tmem.wait_for_alloc()
            acc_tmem_ptr = tmem.retrieve_ptr(F32)
            tCtAcc = cute.make_tensor(acc_tmem_ptr, tCtAcc_fake.layout)
            sfa_tmem_ptr = cute.recast_ptr(acc_tmem_ptr + tcgen05.find_tmem_tensor_col_offset(tCtAcc), dtype=UE8M0)
            tCtSFA = cute.make_tensor(
                sfa_tmem_ptr,
                blockscaled_utils.make_tmem_layout_sfa(tiled_mma, self.mma_tiler, SF_VEC_SIZE, _stage0(
                    sfa_smem_staged)),
            )
            sfb_tmem_ptr = cute.recast_ptr(
                acc_tmem_ptr + tcgen05.find_tmem_tensor_col_offset(tCtAcc)
                + tcgen05.find_tmem_tensor_col_offset(tCtSFA),
                dtype=UE8M0,
            )
            tCtSFB = cute.make_tensor(
                sfb_tmem_ptr,
                blockscaled_utils.make_tmem_layout_sfb(tiled_mma, self.mma_tiler, SF_VEC_SIZE, _stage0(
                    sfb_smem_staged)),
            )

            # Scale factors go smem -> tmem (tcgen05.cp) before each stage's MMAs.
            s2t_atom = cute.make_copy_atom(tcgen05.Cp4x32x128bOp(tcgen05.CtaGroup.ONE), UE8M0)
            tCtSFA_c = cute.filter_zeros(tCtSFA)
            s2t_sfa = tcgen05.make_s2t_copy(s2t_atom, tCtSFA_c)
            thr_s2t_sfa = s2t_sfa.get_slice(0)
            tSsSFA = tcgen05.get_s2t_smem_desc_tensor(s2t_sfa, thr_s2t_sfa.partition_S(cute.filter_zeros(sSFA)))
            tStSFA = thr_s2t_sfa.partition_D(tCtSFA_c)
            tCtSFB_c = cute.filter_zeros(tCtSFB)
            s2t_sfb = tcgen05.make_s2t_copy(s2t_atom, tCtSFB_c)
            thr_s2t_sfb = s2t_sfb.get_slice(0)
            tSsSFB = tcgen05.get_s2t_smem_desc_tensor(s2t_sfb, thr_s2t_sfb.partition_S(cute.filter_zeros(sSFB)))
            tStSFB = thr_s2t_sfb.partition_D(tCtSFB_c)

            tCrA = tiled_mma.make_fragment_A(sA)
            tCrB = tiled_mma.make_fragment_B(sB)
            num_k_blocks = cute.size(tCrA, mode=[2])

            if tile_valid:
                acc_slot = acc_producer.acquire_and_advance()
                tiled_mma.set(tcgen05.Field.ACCUMULATE, False)
                for kt in cutlass.range(k_tile_cnt):
                    stage = ab_consumer.wait_and_advance()
                    cute.copy(s2t_sfa, tSsSFA[(None, None, None, None, stage.index)], tStSFA)
                    cute.copy(s2t_sfb, tSsSFB[(None, None, None, None, stage.index)], tStSFB)
                    for kb in cutlass.range(num_k_blocks, unroll_full=True):
                        tiled_mma.set(tcgen05.Field.SFA, tCtSFA[(None, None, kb)].iterator)
                        tiled_mma.set(tcgen05.Field.SFB, tCtSFB[(None, None, kb)].iterator)
                        cute.gemm(tiled_mma, tCtAcc, tCrA[(None, None, kb, stage.index)],
                                  tCrB[(None, None, kb, stage.index)], tCtAcc)
                        tiled_mma.set(tcgen05.Field.ACCUMULATE, True)
                    stage.release()
                acc_slot.commit()

        # ---------------- epilogue warps ----------------
        if warp_idx < MMA_WARP:
            tmem.allocate(TMEM_COLS)
            tmem.wait_for_alloc()
            acc_tmem_ptr = tmem.retrieve_ptr(F32)
            tCtAcc = cute.make_tensor(acc_tmem_ptr, tCtAcc_fake.layout)

            # (128, EPI_N, 1, tile_n / EPI_N) sub-tiles of the accumulator; tcgen05.ld 32x32b:
            # thread t of the 4 warps holds row t, EPI_N consecutive columns.
            tAcc_epi = cute.flat_divide(tCtAcc[((None, None), 0, 0)], (TILE_M, EPI_N))
            t2r_atom = cute.make_copy_atom(tcgen05.Ld32x32bOp(tcgen05.Repetition.x32, tcgen05.Pack.NONE), F32)
            t2r = tcgen05.make_tmem_copy(t2r_atom, tAcc_epi[(None, None, 0, 0)])
            thr_t2r = t2r.get_slice(tidx)
            tTR_tAcc = thr_t2r.partition_S(tAcc_epi)

            # The output tile as a view whose out-of-bounds part (rows >= M, columns >= N) is
            # never stored: full sub-tiles with a vector copy, the edge one element by element.
            gOut = cute.local_tile(mOut, (TILE_M, self.tile_n), (tile_m, tile_n))
            gOut_epi = cute.flat_divide(gOut, (TILE_M, EPI_N))
            tTR_gOut = thr_t2r.partition_D(gOut_epi)
            cOut_epi = cute.flat_divide(cute.make_identity_tensor((TILE_M, self.tile_n)), (TILE_M, EPI_N))
            tTR_cOut = thr_t2r.partition_D(cOut_epi)

            r_acc = cute.make_rmem_tensor(tTR_gOut[(None, None, None, 0, 0)].shape, F32)
            r_out = cute.make_rmem_tensor(tTR_gOut[(None, None, None, 0, 0)].shape, BF16)
            store_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), BF16)
            cols_left = n - tile_n * self.tile_n

            if tile_valid:
                acc_full = acc_consumer.wait_and_advance()
                for j in cutlass.range(self.tile_n // EPI_N, unroll_full=True):
                    cute.copy(t2r, tTR_tAcc[(None, None, None, 0, j)], r_acc)
                    # tcgen05.ld is asynchronous: wait before the registers are read.
                    cute.arch.fence_view_async_tmem_load()
                    for i in cutlass.range_constexpr(cute.size(r_acc)):
                        r_out[i] = r_acc[i].to(BF16)
                    tTR_cOut_j = tTR_cOut[(None, None, None, 0, j)]
                    # Rows past the valid count are defined as zero (their A rows may be stale).
                    if tTR_cOut_j[0][0] >= rows_valid:
                        r_out.fill(0.0)
                    self._store_subtile(store_atom, r_out, tTR_gOut[(None, None, None, 0, j)], tTR_cOut_j,
                                        rows_stored, cols_left)
                acc_full.release()
            else:
                # A tile wholly past the valid rows: no MMA ran; its stored rows are zeros.
                r_out.fill(0.0)
                for j in cutlass.range(self.tile_n // EPI_N, unroll_full=True):
                    self._store_subtile(store_atom, r_out, tTR_gOut[(None, None, None, 0, j)],
                                        tTR_cOut[(None, None, None, 0, j)], rows_stored, cols_left)

            tmem.relinquish_alloc_permit()
            epilogue_barrier.arrive_and_wait()
            tmem.free(acc_tmem_ptr)

    @cute.jit
    def _store_subtile(self, store_atom, r_out, g_sub, c_sub, rows_stored, cols_left):
        """Store one thread's EPI_N columns of one row: nothing for rows >= M, a vector store when
        all EPI_N columns are < N, else element by element up to N (the partial last N tile)."""
        # Register i <-> column col0 + i of one row (stride 1 along columns, 0 along rows):
        # checked at trace time, since the predicates below rely on it.
        if cutlass.const_expr(str(c_sub.layout) != f"(({EPI_N},1),1,1):((1@1,0),0,0)"):
            raise NotImplementedError(f"epilogue register layout {c_sub.layout}: expected one row of "
                                      f"{EPI_N} consecutive columns per thread")
        row = c_sub[0][0]
        col0 = c_sub[0][1]
        if row < rows_stored:
            if col0 + EPI_N <= cols_left:
                cute.copy(store_atom, r_out, g_sub)
            else:
                for i in cutlass.range_constexpr(cute.size(r_out)):
                    if col0 + i < cols_left:
                        g_sub[i] = r_out[i]


def _stage0(staged: cute.Layout) -> cute.Layout:
    """One pipeline stage of a staged scale-factor smem layout."""
    return cute.slice_(staged, (None, None, None, 0))
