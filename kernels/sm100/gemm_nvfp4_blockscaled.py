"""Block-scaled NVFP4 x NVFP4 GEMM for Blackwell (sm100a), written in CuTe DSL.

One kernel body, three variants (fields of CompileKey):

- dense:          out_bf16[M, N] = (A_e2m1 * SFA_e4m3) @ (B_e2m1 * SFB_e4m3)^T
                  * a_dec_scale_f32[0] * b_dec_scale_f32[0]
- grouped:        the same per expert. A holds the expert's rows concatenated,
                  each expert's rows padded to a multiple of 128 (so one 128-row
                  M tile never straddles two experts); B is [E, N, K/2]; a device
                  table tile_expert_i32[m_tile] names the expert of each M tile
                  (-1: a padding tile; it skips the MMA and writes zeros). The global decode
                  scale of B is per expert: b_dec_scale_f32[E].
- grouped_swiglu: the grouped GEMM on B = w1|w3 interleaved along N with
                  granularity tile_n/2 (see kernels.sm100.host_bridge.
                  interleave_gate_up_rows) so that one tile holds gate columns
                  [0, tile_n/2) and the matching up columns [tile_n/2, tile_n);
                  the epilogue applies the per-expert decode scales of w1 and w3
                  separately, the clamp (gate <= limit, -limit <= up <= limit)
                  and silu(gate) * up, and writes out_bf16[M, N/2].
- grouped_swiglu_nvfp4: the same L1, but h goes out as NVFP4 for L2 (recipe te):
                  h is rounded to bf16 (the bytes the unfused path would store),
                  each thread quantizes its row's 16-column blocks with the global
                  encode scale S read from a device buffer (static: 1/input_scale of
                  w2) and writes packed E2M1 [M, N/4] and the E4M3 block scales straight
                  into the 128x4 swizzled layout [M, round_up(N/32, 4)] that the L2
                  GEMM reads. Same bytes as quantize_nvfp4_1x16 on the bf16 h with S.

Math: tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.scale_vec::4X (E2M1
operands, one E4M3 scale per 16 K elements, fp32 accumulation in tensor memory).
Tiles: 128 x tile_n x 256 per pipeline stage (four K=64 MMAs). Warp roles:
warps 0-3 epilogue (TMEM -> registers -> global), warp 4 MMA, warp 5 TMA.

Operand layouts (all produced by kernels.sm100.host_bridge):
- A: uint8 [M, K/2] viewed as packed E2M1, K-major, element 2i in the low nibble.
- B: uint8 [L, N, K/2], K-major, L = 1 (dense) or E (grouped).
- SFA / SFB: the cuBLAS/CUTLASS 128x4 swizzled E4M3 bytes, rows padded to 128,
  scale columns padded to 4, per batch (expert) back to back; padding bytes 0.
- out: bf16 [ceil(M/128)*128, N_out] row-major; the caller returns the [:M] view,
  so the epilogue needs no predication (rows past M are computed on TMA's zero
  fill and never read).

Constraints checked by launch(): N % tile_n == 0, K % 64 == 0 (a multiple of the
16-element block and of the 4-column scale atom), 16-byte aligned pointers.
M, N, K, E and the number of M tiles are runtime values: one compiled kernel
serves every shape.

The global decode scales are read from device buffers inside the epilogue, so
the launch never syncs and a CUDA graph replays with new scales.

Valid rows (CUDA-graph replay with fewer tokens than captured): every variant reads
an int32 row count n from a device buffer at run time (launch's num_valid_rows_i32;
INT32_MAX when not given). An M tile starting at or past n is handled like a padding
tile (no TMA, no MMA, zeros written); in a tile that straddles n the epilogue writes
zeros for rows >= n (a select on the row coordinate before each store). The grid
stays ceil(M/128) x N/tile_n, fixed at capture.
"""



import functools
from dataclasses import dataclass

TILE_M = 128
MMA_K = 64  # K consumed by one tcgen05 block-scaled E2M1 MMA
K_PER_STAGE = 256  # four MMAs per pipeline stage
SF_VEC_SIZE = 16
EPI_N = 32  # columns per epilogue sub-tile (one tcgen05.ld 32x32b.x32 per thread)
NUM_THREADS = 192  # 4 epilogue warps, 1 MMA warp, 1 TMA warp
EPILOGUE_WARPS = (0, 1, 2, 3)
MMA_WARP = 4
TMA_WARP = 5
TMEM_COLS = 512

VARIANTS = ("dense", "grouped", "grouped_swiglu", "grouped_swiglu_nvfp4")


@dataclass(frozen=True)
class CompileKey:
    """Everything code generation reads.

    Deliberately not in the key: M, N, K, the number of experts and of M tiles,
    the swiglu limit, the pointers and the CUDA stream (all runtime arguments),
    so one compiled kernel serves every shape and every call.
    """

    variant: str = "dense"
    tile_n: int = 128
    num_stages: int = 5
    arch: str = "sm_100a"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"CompileKey.variant={self.variant!r} is not one of {VARIANTS}")
        if self.tile_n not in (128, 256):
            raise ValueError(f"CompileKey.tile_n={self.tile_n} must be 128 or 256")
        if self.swiglu and self.tile_n != 256:
            raise ValueError(f"CompileKey: {self.variant} needs tile_n=256 (128 gate + 128 up columns)")
        if not 2 <= self.num_stages <= 8:
            raise ValueError(f"CompileKey.num_stages={self.num_stages} must be in [2, 8]")
        if self.smem_bytes() > 227 * 1024:
            raise ValueError(f"CompileKey {self}: {self.smem_bytes()} bytes of shared memory exceed 227 KiB")

    @property
    def grouped(self) -> bool:
        return self.variant != "dense"

    @property
    def swiglu(self) -> bool:
        return self.variant.startswith("grouped_swiglu")

    @property
    def nvfp4_out(self) -> bool:
        return self.variant == "grouped_swiglu_nvfp4"

    @property
    def out_tile_n(self) -> int:
        return self.tile_n // 2 if self.swiglu else self.tile_n

    @property
    def interleave_granularity(self) -> int:
        """Rows of w1, then of w3, per group in the interleaved weight (grouped_swiglu)."""
        return self.tile_n // 2

    def smem_bytes(self) -> int:
        per_stage = (TILE_M + self.tile_n) * K_PER_STAGE // 2 + (TILE_M + self.tile_n) * K_PER_STAGE // SF_VEC_SIZE
        return per_stage * self.num_stages + 1024


# The shipped configurations: what CI compiles and what the backend launches.
SHIPPED_KEYS = (
    CompileKey(variant="dense", tile_n=128, num_stages=5),
    CompileKey(variant="grouped", tile_n=128, num_stages=5),
    CompileKey(variant="grouped_swiglu", tile_n=256, num_stages=4),
    CompileKey(variant="grouped_swiglu_nvfp4", tile_n=256, num_stages=4),
)


# --------------------------------------------------------------------------------------
# body
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _kernel_class():
    """The CuTe DSL kernel class; built on first use so that cutlass is imported lazily."""
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    import cutlass.memory
    import cutlass.pipeline as pipeline
    import cutlass.utils as utils
    import cutlass.utils.blackwell_helpers as sm100_utils
    import cutlass.utils.blockscaled_layout as blockscaled_utils
    from cutlass.cute.nvgpu import cpasync, tcgen05

    from kernels.sm100._ptx import ptx_ops

    ops = ptx_ops()

    e2m1 = cutlass.Float4E2M1FN
    e4m3 = cutlass.Float8E4M3FN
    bf16 = cutlass.BFloat16
    f32 = cutlass.Float32

    class BlockScaledGemmNvfp4:
        def __init__(self, key: CompileKey):
            self.key = key
            self.grouped = key.grouped
            self.swiglu = key.swiglu
            self.nvfp4_out = key.nvfp4_out
            self.tile_n = key.tile_n
            self.out_tile_n = key.out_tile_n
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
            a_dec_scale_ptr: cute.Pointer,
            b_dec_scale_ptr: cute.Pointer,
            b2_dec_scale_ptr: cute.Pointer,
            tile_expert_ptr: cute.Pointer,
            valid_rows_ptr: cute.Pointer,
            q_packed_ptr: cute.Pointer,
            q_sf_ptr: cute.Pointer,
            q_enc_scale_ptr: cute.Pointer,
            m: cutlass.Int32,
            n: cutlass.Int32,
            k: cutlass.Int32,
            num_batches: cutlass.Int32,
            swiglu_limit: cutlass.Float32,
            stream: cuda.CUstream,
        ):
            # Global tensors. Strides carry divisibility hints so TMA descriptors are legal.
            k_h = cute.assume(k, 64)
            a = cute.make_tensor(a_ptr, cute.make_layout((m, k_h, 1), stride=(k_h, 1, m * k_h)))
            b = cute.make_tensor(
                b_ptr,
                cute.make_layout((cute.assume(n, 128), k_h, num_batches),
                                 stride=(k_h, 1, cute.assume(n * k_h, 128))),
            )
            sfa = cute.make_tensor(sfa_ptr, blockscaled_utils.tile_atom_to_shape_SF(a.shape, SF_VEC_SIZE))
            sfb = cute.make_tensor(sfb_ptr, blockscaled_utils.tile_atom_to_shape_SF(b.shape, SF_VEC_SIZE))
            n_out = n // 2 if cutlass.const_expr(self.swiglu) else n
            n_out_h = cute.assume(n_out, 64)
            out = cute.make_tensor(out_ptr, cute.make_layout((m, n_out_h), stride=(n_out_h, 1)))
            a_dec_scale = cute.make_tensor(a_dec_scale_ptr, cute.make_layout(1))
            b_dec_scale = cute.make_tensor(b_dec_scale_ptr, cute.make_layout(num_batches))
            b2_dec_scale = cute.make_tensor(b2_dec_scale_ptr, cute.make_layout(num_batches))
            num_m_tiles = (m + TILE_M - 1) // TILE_M
            tile_expert = cute.make_tensor(tile_expert_ptr, cute.make_layout(num_m_tiles))
            valid_rows = cute.make_tensor(valid_rows_ptr, cute.make_layout(1))
            # NVFP4 output of h (grouped_swiglu_nvfp4; placeholders otherwise): packed codes as
            # u32 words [M, N_out/8], swizzled scale bytes, the global encode scale S.
            q_packed = cute.make_tensor(q_packed_ptr, cute.make_layout((m, n_out_h // 8), stride=(n_out_h // 8, 1)))
            q_sf_col_groups = (n_out_h // SF_VEC_SIZE + 3) // 4
            q_sf = cute.make_tensor(q_sf_ptr, cute.make_layout(num_m_tiles * TILE_M * q_sf_col_groups * 4))
            q_enc_scale = cute.make_tensor(q_enc_scale_ptr, cute.make_layout(1))

            mma_op = tcgen05.MmaMXF4NVF4Op(
                e4m3, (TILE_M, self.tile_n, MMA_K), tcgen05.CtaGroup.ONE, tcgen05.OperandSource.SMEM
            )
            tiled_mma = cute.make_tiled_mma(mma_op)
            cluster_vmnk = cute.tiled_divide(cute.make_layout((1, 1, 1)), (tiled_mma.thr_id.shape,))

            a_smem_staged = sm100_utils.make_smem_layout_a(tiled_mma, self.mma_tiler, e2m1, self.num_stages)
            b_smem_staged = sm100_utils.make_smem_layout_b(tiled_mma, self.mma_tiler, e2m1, self.num_stages)
            sfa_smem_staged = blockscaled_utils.make_smem_layout_sfa(
                tiled_mma, self.mma_tiler, SF_VEC_SIZE, self.num_stages)
            sfb_smem_staged = blockscaled_utils.make_smem_layout_sfb(
                tiled_mma, self.mma_tiler, SF_VEC_SIZE, self.num_stages)
            a_smem = cute.slice_(a_smem_staged, (None, None, None, 0))
            b_smem = cute.slice_(b_smem_staged, (None, None, None, 0))
            sfa_smem = cute.slice_(sfa_smem_staged, (None, None, None, 0))
            sfb_smem = cute.slice_(sfb_smem_staged, (None, None, None, 0))

            g2s = cpasync.CopyBulkTensorTileG2SOp(tcgen05.CtaGroup.ONE)
            tma_a, tma_a_tensor = cute.nvgpu.make_tiled_tma_atom_A(
                g2s, a, a_smem, self.mma_tiler, tiled_mma, cluster_vmnk.shape)
            tma_b, tma_b_tensor = cute.nvgpu.make_tiled_tma_atom_B(
                g2s, b, b_smem, self.mma_tiler, tiled_mma, cluster_vmnk.shape)
            # Scale bytes travel as 16-bit TMA elements (the swizzled atom is 2-byte aligned).
            tma_sfa, tma_sfa_tensor = cute.nvgpu.make_tiled_tma_atom_A(
                g2s, sfa, sfa_smem, self.mma_tiler, tiled_mma, cluster_vmnk.shape, internal_type=cutlass.Int16)
            tma_sfb, tma_sfb_tensor = cute.nvgpu.make_tiled_tma_atom_B(
                g2s, sfb, sfb_smem, self.mma_tiler, tiled_mma, cluster_vmnk.shape, internal_type=cutlass.Int16)
            self.tma_bytes_per_stage = (
                cute.size_in_bytes(e2m1, a_smem) + cute.size_in_bytes(e2m1, b_smem)
                + cute.size_in_bytes(e4m3, sfa_smem) + cute.size_in_bytes(e4m3, sfb_smem)
            )

            grid = (num_m_tiles, n // self.tile_n, 1)
            self.kernel(
                tiled_mma,
                tma_a, tma_a_tensor, tma_b, tma_b_tensor,
                tma_sfa, tma_sfa_tensor, tma_sfb, tma_sfb_tensor,
                out, a_dec_scale, b_dec_scale, b2_dec_scale, tile_expert, valid_rows, swiglu_limit,
                q_packed, q_sf, q_enc_scale, q_sf_col_groups,
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
            a_dec_scale: cute.Tensor,
            b_dec_scale: cute.Tensor,
            b2_dec_scale: cute.Tensor,
            tile_expert: cute.Tensor,
            valid_rows: cute.Tensor,
            swiglu_limit: cutlass.Float32,
            q_packed: cute.Tensor,
            q_sf: cute.Tensor,
            q_enc_scale: cute.Tensor,
            q_sf_col_groups: cutlass.Int32,
            a_smem_staged: cute.ComposedLayout,
            b_smem_staged: cute.ComposedLayout,
            sfa_smem_staged: cute.Layout,
            sfb_smem_staged: cute.Layout,
        ):
            warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            tidx, _, _ = cute.arch.thread_idx()
            tile_m, tile_n, _ = cute.arch.block_idx()

            # Which batch (expert) this M tile belongs to; -1 marks a padding tile.
            batch = cutlass.Int32(0)
            if cutlass.const_expr(self.grouped):
                batch = tile_expert[tile_m]
            # Rows of this tile below the device-side valid-row count (read here, at run time,
            # so a captured graph replays with fewer tokens). A tile with none is skipped
            # like a padding tile: no TMA, no MMA, zeros written.
            rows_in_tile = valid_rows[0] - tile_m * TILE_M
            tile_valid = (batch >= 0) & (rows_in_tile > 0)

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
            sA = smem.allocate_tensor(e2m1, a_smem_staged.outer, byte_alignment=128, swizzle=a_smem_staged.inner)
            sB = smem.allocate_tensor(e2m1, b_smem_staged.outer, byte_alignment=128, swizzle=b_smem_staged.inner)
            sSFA = smem.allocate_tensor(e4m3, sfa_smem_staged, byte_alignment=128)
            sSFB = smem.allocate_tensor(e4m3, sfb_smem_staged, byte_alignment=128)

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
                barrier_for_retrieve=pipeline.NamedBarrier(
                    barrier_id=1, num_threads=32 * (len(EPILOGUE_WARPS) + 1)),
                allocator_warp_id=EPILOGUE_WARPS[0],
            )
            epilogue_barrier = pipeline.NamedBarrier(barrier_id=2, num_threads=32 * len(EPILOGUE_WARPS))

            # Tiles of this CTA: (bM, bK, RestK), (bN, bK, RestK)
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

            # Accumulator layout in tensor memory: (MMA, MMA_M, MMA_N)
            acc_shape = tiled_mma.partition_shape_C(self.mma_tiler[:2])
            tCtAcc_fake = tiled_mma.make_fragment_C(acc_shape)

            # ---------------- TMA warp ----------------
            if warp_idx == TMA_WARP:
                if tile_valid:
                    tAgA_t = tAgA[(None, tile_m, None, 0)]
                    tBgB_t = tBgB[(None, tile_n, None, batch)]
                    tAgSFA_t = tAgSFA[(None, tile_m, None, 0)]
                    tBgSFB_t = tBgSFB[(None, tile_n, None, batch)]
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
                acc_tmem_ptr = tmem.retrieve_ptr(f32)
                tCtAcc = cute.make_tensor(acc_tmem_ptr, tCtAcc_fake.layout)
                sfa_tmem_ptr = cute.recast_ptr(
                    acc_tmem_ptr + tcgen05.find_tmem_tensor_col_offset(tCtAcc), dtype=e4m3)
                tCtSFA = cute.make_tensor(
                    sfa_tmem_ptr,
                    blockscaled_utils.make_tmem_layout_sfa(
                        tiled_mma, self.mma_tiler, SF_VEC_SIZE, cute.slice_(sfa_smem_staged, (None, None, None, 0))),
                )
                sfb_tmem_ptr = cute.recast_ptr(
                    acc_tmem_ptr + tcgen05.find_tmem_tensor_col_offset(tCtAcc)
                    + tcgen05.find_tmem_tensor_col_offset(tCtSFA),
                    dtype=e4m3,
                )
                tCtSFB = cute.make_tensor(
                    sfb_tmem_ptr,
                    blockscaled_utils.make_tmem_layout_sfb(
                        tiled_mma, self.mma_tiler, SF_VEC_SIZE, cute.slice_(sfb_smem_staged, (None, None, None, 0))),
                )

                # Scale factors go smem -> tmem with tcgen05.cp before each stage's MMAs.
                s2t_atom = cute.make_copy_atom(tcgen05.Cp4x32x128bOp(tcgen05.CtaGroup.ONE), e4m3)
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
                acc_tmem_ptr = tmem.retrieve_ptr(f32)
                tCtAcc = cute.make_tensor(acc_tmem_ptr, tCtAcc_fake.layout)

                # (128, EPI_N, 1, tile_n / EPI_N) sub-tiles of the accumulator
                tAcc_epi = cute.flat_divide(tCtAcc[((None, None), 0, 0)], (TILE_M, EPI_N))
                t2r_atom = cute.make_copy_atom(tcgen05.Ld32x32bOp(tcgen05.Repetition.x32, tcgen05.Pack.NONE), f32)
                t2r = tcgen05.make_tmem_copy(t2r_atom, tAcc_epi[(None, None, 0, 0)])
                thr_t2r = t2r.get_slice(tidx)
                tTR_tAcc = thr_t2r.partition_S(tAcc_epi)

                gOut = cute.local_tile(mOut, (TILE_M, self.out_tile_n), (tile_m, tile_n))
                gOut_epi = cute.flat_divide(gOut, (TILE_M, EPI_N))
                tTR_gOut = thr_t2r.partition_D(gOut_epi)
                # Tile-local (row, col) of each register, to zero rows at or past the valid count.
                cOut_epi = cute.flat_divide(cute.make_identity_tensor((TILE_M, self.out_tile_n)), (TILE_M, EPI_N))
                tTR_cOut = thr_t2r.partition_D(cOut_epi)

                r_acc = cute.make_rmem_tensor(tTR_gOut[(None, None, None, 0, 0)].shape, f32)
                r_acc2 = cute.make_rmem_tensor(tTR_gOut[(None, None, None, 0, 0)].shape, f32)
                r_out = cute.make_rmem_tensor(tTR_gOut[(None, None, None, 0, 0)].shape, bf16)
                store_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), bf16)

                if tile_valid:
                    # alpha = a_dec_scale * b_dec_scale, read on the device (no host sync).
                    alpha = a_dec_scale[0] * b_dec_scale[batch]
                    alpha_up = a_dec_scale[0] * b2_dec_scale[batch]
                    acc_full = acc_consumer.wait_and_advance()
                    num_out_subtiles = self.out_tile_n // EPI_N
                    for j in cutlass.range(num_out_subtiles, unroll_full=True):
                        cute.copy(t2r, tTR_tAcc[(None, None, None, 0, j)], r_acc)
                        if cutlass.const_expr(self.swiglu):
                            cute.copy(t2r, tTR_tAcc[(None, None, None, 0, j + num_out_subtiles)], r_acc2)
                        # tcgen05.ld is asynchronous: wait before the registers are read.
                        cute.arch.fence_view_async_tmem_load()
                        if cutlass.const_expr(self.swiglu):
                            for i in cutlass.range_constexpr(cute.size(r_acc)):
                                gate = cute.arch.fmin(r_acc[i] * alpha, swiglu_limit)
                                up = cute.arch.fmax(cute.arch.fmin(r_acc2[i] * alpha_up, swiglu_limit), -swiglu_limit)
                                silu = gate / (cutlass.Float32(1.0) + cute.math.exp(-gate, fastmath=False))
                                r_out[i] = (silu * up).to(bf16)
                        else:
                            for i in cutlass.range_constexpr(cute.size(r_acc)):
                                r_out[i] = (r_acc[i] * alpha).to(bf16)
                        # Rows past the valid count are defined as zero (their A rows may hold stale data).
                        tTR_cOut_j = tTR_cOut[(None, None, None, 0, j)]
                        for i in cutlass.range_constexpr(cute.size(r_out)):
                            if tTR_cOut_j[i][0] >= rows_in_tile:
                                r_out[i] = bf16(0.0)
                        if cutlass.const_expr(self.nvfp4_out):
                            # h as stored by the unfused path (bf16), quantized here for L2.
                            self._store_nvfp4(r_out, tTR_cOut_j, tile_m, tile_n, q_packed, q_sf, q_sf_col_groups,
                                              q_enc_scale[0], False)
                        else:
                            cute.copy(store_atom, r_out, tTR_gOut[(None, None, None, 0, j)])
                    acc_full.release()
                else:
                    # A padding tile of the grouped layout: write zeros, so the next stage
                    # (requantization with a dynamic amax) never reads uninitialised rows.
                    r_out.fill(0.0)
                    for j in cutlass.range(self.out_tile_n // EPI_N, unroll_full=True):
                        if cutlass.const_expr(self.nvfp4_out):
                            self._store_nvfp4(r_out, tTR_cOut[(None, None, None, 0, j)], tile_m, tile_n, q_packed,
                                              q_sf, q_sf_col_groups, f32(1.0), True)
                        else:
                            cute.copy(store_atom, r_out, tTR_gOut[(None, None, None, 0, j)])

                tmem.relinquish_alloc_permit()
                epilogue_barrier.arrive_and_wait()
                tmem.free(acc_tmem_ptr)

        def _store_nvfp4(self, r_h, t_coord, tile_m, tile_n, q_packed, q_sf, q_sf_col_groups, enc, zeros: bool):
            """Quantize (recipe te) and store one thread's EPI_N consecutive h values of one row.

            Traced inside the kernel (no dynamic control flow here). Register i of r_h is
            column t_coord[0][1] + i of row t_coord[0][0] (tcgen05.ld 32x32b: one row per
            thread, consecutive columns; checked at trace time below). zeros=True writes zero
            codes and zero scale bytes (padding tiles), as the quantizer does past its count.
            """
            assert cute.size(r_h) == EPI_N, "one row of EPI_N columns per thread expected"
            # Register i <-> column +i of one row: stride 1 along the column mode (1@1), 0 along rows.
            if str(t_coord.layout) != f"(({EPI_N},1),1,1):((1@1,0),0,0)":
                raise NotImplementedError(f"epilogue register layout {t_coord.layout}: expected one row of "
                                          f"{EPI_N} consecutive columns per thread")
            row = tile_m * TILE_M + t_coord[0][0]
            col0 = tile_n * self.out_tile_n + t_coord[0][1]
            for b in range(EPI_N // SF_VEC_SIZE):
                col = col0 + b * SF_VEC_SIZE
                if zeros:
                    sf_byte, lo, hi = cutlass.Int32(0), cutlass.Int32(0), cutlass.Int32(0)
                else:
                    y = [r_h[b * SF_VEC_SIZE + i].to(f32) for i in range(SF_VEC_SIZE)]
                    sf_byte, lo, hi = ops.te_quantize_block16_f32(y, enc)
                q_packed[(row, col // 8)] = lo
                q_packed[(row, col // 8 + 1)] = hi
                c = col // SF_VEC_SIZE
                off = (((row // TILE_M) * q_sf_col_groups + c // 4) * 512 + (row % 32) * 16
                       + ((row // 32) % 4) * 4 + c % 4)
                q_sf[off] = sf_byte.to(cutlass.Uint8)

    return BlockScaledGemmNvfp4


# --------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------


def _compile_args(key: CompileKey):
    """Placeholder arguments with the types (and alignment assumptions) the kernel is compiled for."""
    import cutlass

    from kernels.sm100._launch import fake_ptr, fake_stream

    return (
        fake_ptr("Float4E2M1FN", 16),  # a
        fake_ptr("Float4E2M1FN", 16),  # b
        fake_ptr("Float8E4M3FN", 16),  # sfa
        fake_ptr("Float8E4M3FN", 16),  # sfb
        fake_ptr("BFloat16", 16),  # out
        fake_ptr("Float32", 4),  # a_dec_scale
        fake_ptr("Float32", 4),  # b_dec_scale
        fake_ptr("Float32", 4),  # b2_dec_scale
        fake_ptr("Int32", 4),  # tile_expert
        fake_ptr("Int32", 4),  # valid_rows
        fake_ptr("Int32", 16),  # q_packed (u32 words)
        fake_ptr("Uint8", 4),  # q_sf
        fake_ptr("Float32", 4),  # q_enc_scale
        cutlass.Int32(128),
        cutlass.Int32(key.tile_n),
        cutlass.Int32(256),
        cutlass.Int32(1),
        cutlass.Float32(10.0),
        fake_stream(),
    )


@functools.lru_cache(maxsize=16)
def _compile(key: CompileKey):
    """Compile the kernel for `key` (no GPU needed; the target is key.arch)."""
    from kernels.sm100._launch import compile_for_arch

    return compile_for_arch(_kernel_class()(key), _compile_args(key), arch=key.arch)


def compile_with_ptx(key: CompileKey, dump_dir: str):
    """Compile `key` (uncached), keeping the PTX in `dump_dir`; returns (compiled, ptx_text).

    For CI inspection: the caller asserts on the tcgen05 instructions in the text.
    """
    from kernels.sm100._launch import compile_keeping_ptx

    return compile_keeping_ptx(_kernel_class()(key), _compile_args(key), arch=key.arch, dump_dir=dump_dir)


# --------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------


def _check_device_tensor(t, name: str, dtype, device, align: int = 16) -> None:
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} (same device as the activations)")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous, got strides {t.stride()}")
    if t.data_ptr() % align:
        raise ValueError(f"{name}: data pointer must be {align}-byte aligned")


def _check_operands(a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, key: CompileKey, *, rows_align: int):
    import torch

    from kernels.sm100.host_bridge import SF_BLOCK, check_packed_e2m1, round_up

    if not isinstance(a_packed_u8, torch.Tensor):
        raise TypeError(f"a_packed_u8: expected a torch.Tensor, got {type(a_packed_u8).__name__}")
    dev = a_packed_u8.device
    if dev.type != "cuda":
        raise ValueError(f"a_packed_u8: the sm100 kernels run on a CUDA device, got {dev}")
    k = check_packed_e2m1(a_packed_u8, "a_packed_u8", k=weight.k)
    if a_packed_u8.dim() != 2:
        raise ValueError(f"a_packed_u8: expected [M, K/2], got shape {tuple(a_packed_u8.shape)}")
    m = a_packed_u8.shape[0]
    if m % rows_align:
        raise ValueError(f"a_packed_u8: {m} rows must be a multiple of {rows_align} (padded-per-expert layout)")
    _check_device_tensor(a_packed_u8, "a_packed_u8", torch.uint8, dev)
    want_sf = (round_up(max(m, 1), 128), round_up(k // SF_BLOCK, 4))
    if tuple(a_sf_swizzled_u8.shape) != want_sf:
        raise ValueError(
            f"a_sf_swizzled_u8: expected 128x4 swizzled scales of shape {want_sf} for A {tuple(a_packed_u8.shape)}, "
            f"got {tuple(a_sf_swizzled_u8.shape)}"
        )
    _check_device_tensor(a_sf_swizzled_u8, "a_sf_swizzled_u8", torch.uint8, dev)
    _check_device_tensor(a_dec_scale_f32, "a_dec_scale_f32", torch.float32, dev, align=4)
    if a_dec_scale_f32.numel() != 1:
        raise ValueError(f"a_dec_scale_f32: expected one element, got shape {tuple(a_dec_scale_f32.shape)}")
    if weight.n % key.tile_n:
        raise ValueError(f"weight: N={weight.n} must be a multiple of the tile N={key.tile_n}")
    _check_device_tensor(weight.packed_u8, "weight.packed_u8", torch.uint8, dev)
    _check_device_tensor(weight.sf_swizzled_u8, "weight.sf_swizzled_u8", torch.uint8, dev)
    _check_device_tensor(weight.dec_scale_f32, "weight.dec_scale_f32", torch.float32, dev, align=4)
    return m, k


def check_valid_rows_i32(t, name: str, device) -> None:
    """A device-side row count: int32 [1] (any 1-element shape) on `device`, read only by kernels."""
    import torch

    _check_device_tensor(t, name, torch.int32, device, align=4)
    if t.numel() != 1:
        raise ValueError(f"{name}: expected one int32 element (the number of valid rows), got shape {tuple(t.shape)}")


def _launch(key: CompileKey, a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, tile_expert_i32,
            valid_rows_i32, limit: float, h_enc_scale_f32=None):
    import cutlass
    import torch

    from kernels.sm100._launch import INT32_MAX, device_i32_constant, device_ptr, launch_on_current_stream

    m, k = a_packed_u8.shape[0], 2 * a_packed_u8.shape[1]
    n = weight.n
    n_out = n // 2 if key.swiglu else n
    out_rows = (m + TILE_M - 1) // TILE_M * TILE_M
    dev = str(a_packed_u8.device)
    placeholder = device_i32_constant(0, dev)
    if key.nvfp4_out:  # h as NVFP4 for L2: packed [M, N_out/2] and 128x4 swizzled scales
        out_bf16 = placeholder
        q_packed_u8 = torch.empty(m, n_out // 2, dtype=torch.uint8, device=a_packed_u8.device)
        q_sf_u8 = torch.zeros(out_rows, (n_out // SF_VEC_SIZE + 3) // 4 * 4, dtype=torch.uint8,
                              device=a_packed_u8.device)
    else:
        out_bf16 = torch.empty(out_rows, n_out, dtype=torch.bfloat16, device=a_packed_u8.device)
        q_packed_u8 = q_sf_u8 = h_enc_scale_f32 = placeholder
    up = weight.up_dec_scale_f32 if weight.up_dec_scale_f32 is not None else weight.dec_scale_f32
    if valid_rows_i32 is None:  # every row valid (rows past M are never returned)
        valid_rows_i32 = device_i32_constant(INT32_MAX, dev)
    if m > 0:
        launch_on_current_stream(
            _compile(key),
            device_ptr(a_packed_u8, "Float4E2M1FN"), device_ptr(weight.packed_u8, "Float4E2M1FN"),
            device_ptr(a_sf_swizzled_u8, "Float8E4M3FN"), device_ptr(weight.sf_swizzled_u8, "Float8E4M3FN"),
            device_ptr(out_bf16, "BFloat16"),
            device_ptr(a_dec_scale_f32, "Float32", 4), device_ptr(weight.dec_scale_f32, "Float32", 4),
            device_ptr(up, "Float32", 4),
            device_ptr(tile_expert_i32, "Int32", 4), device_ptr(valid_rows_i32, "Int32", 4),
            device_ptr(q_packed_u8, "Int32", 16), device_ptr(q_sf_u8, "Uint8", 4),
            device_ptr(h_enc_scale_f32, "Float32", 4),
            cutlass.Int32(m), cutlass.Int32(n), cutlass.Int32(k), cutlass.Int32(weight.num_batches),
            cutlass.Float32(limit),
        )
    if key.nvfp4_out:
        return q_packed_u8, q_sf_u8
    return out_bf16[:m]


def launch_dense(a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, *, key: CompileKey = SHIPPED_KEYS[0],
                 num_valid_rows_i32=None):
    """out_bf16 [M, N] = a_dec * b_dec * (A * SFA) @ (B * SFB)^T.

    a_packed_u8 [M, K/2] K-major; a_sf_swizzled_u8 [round_up(M,128), round_up(K/16,4)]
    (host_bridge.sf_linear_to_swizzled_128x4 of the linear scales); a_dec_scale_f32
    [1] on the device; weight: host_bridge.prepare_nvfp4_weight of one linear.
    num_valid_rows_i32: optional int32 [1] on the device, n. Rows >= n of the output
    are zero and M tiles starting at or past n do no MMA; the kernel reads n at run
    time, so a graph captured for M rows replays with any n <= M (CUDA-graph token count).
    """
    from kernels.sm100._launch import device_i32_constant

    if key.variant != "dense":
        raise ValueError(f"key.variant={key.variant!r}: launch_dense needs a 'dense' key")
    if weight.num_batches != 1:
        raise ValueError(f"weight: launch_dense takes one linear, got {weight.num_batches} batches")
    _check_operands(a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, key, rows_align=1)
    if num_valid_rows_i32 is not None:
        check_valid_rows_i32(num_valid_rows_i32, "num_valid_rows_i32", a_packed_u8.device)
    unused_table = device_i32_constant(0, str(a_packed_u8.device))
    return _launch(key, a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, unused_table, num_valid_rows_i32,
                   0.0)


def launch_grouped(a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, tile_expert_i32,
                   *, swiglu_limit: float | None = None, key: CompileKey | None = None, num_valid_rows_i32=None,
                   h_global_enc_scale_f32=None):
    """MoE grouped GEMM on padded-per-expert rows (graph-safe, no host sync).

    a_packed_u8 [R, K/2] with R a multiple of 128 (each expert's rows padded to 128,
    padding rows zero); a_sf_swizzled_u8 [R, round_up(K/16,4)]; tile_expert_i32
    [R/128] from host_bridge.tile_expert_table (-1 = unused tile, its output rows
    are written as zeros); weight: [E, N, K/2] experts (prepare_nvfp4_weight), or the
    gate/up fused experts (prepare_gate_up_weight) when swiglu_limit is given.
    num_valid_rows_i32: optional int32 [1] on the device (the MoE path passes the padded
    row total, moe_routing.Permutation.valid_rows_i32): rows at or past it are zero and
    their tiles are skipped, like tiles marked -1.
    Returns bf16 [R, N] or, with SwiGLU, [R, N/2] = silu(min(g, L)) * clamp(u, -L, L).
    h_global_enc_scale_f32 (SwiGLU only): the L2 input's global encode scale S ([1] f32 on
    the device, e.g. 1/input_scale of w2); then h leaves the epilogue as NVFP4 (recipe te,
    the bytes quantize_nvfp4_1x16.launch gives for the bf16 h and S): returns
    (packed_u8 [R, N/4], sf_swizzled_u8 [R, round_up(N/32, 4)]), zero past the valid rows.
    """
    import torch

    if key is None:
        if swiglu_limit is None:
            key = SHIPPED_KEYS[1]
        else:
            key = SHIPPED_KEYS[3] if h_global_enc_scale_f32 is not None else SHIPPED_KEYS[2]
    if (swiglu_limit is not None) != key.swiglu:
        raise ValueError(f"swiglu_limit={swiglu_limit!r} does not match key.variant={key.variant!r}")
    if (h_global_enc_scale_f32 is not None) != key.nvfp4_out:
        raise ValueError(f"h_global_enc_scale_f32 {'given' if h_global_enc_scale_f32 is not None else 'missing'}: "
                         f"key.variant={key.variant!r} (NVFP4 output of h needs grouped_swiglu_nvfp4 and S)")
    if key.swiglu:
        if weight.up_dec_scale_f32 is None or weight.interleave_granularity != key.interleave_granularity:
            raise ValueError(
                f"weight: the SwiGLU GEMM needs w1|w3 interleaved with granularity {key.interleave_granularity} "
                "(host_bridge.prepare_gate_up_weight)"
            )
        if not swiglu_limit > 0:
            raise ValueError(f"swiglu_limit={swiglu_limit!r} must be positive")
    elif key.variant != "grouped":
        raise ValueError(f"key.variant={key.variant!r}: launch_grouped needs a grouped key")
    m, _ = _check_operands(a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, key, rows_align=TILE_M)
    _check_device_tensor(tile_expert_i32, "tile_expert_i32", torch.int32, a_packed_u8.device, align=4)
    if tile_expert_i32.numel() != m // TILE_M:
        raise ValueError(f"tile_expert_i32: expected {m // TILE_M} entries (one per 128-row tile), "
                         f"got {tile_expert_i32.numel()}")
    if num_valid_rows_i32 is not None:
        check_valid_rows_i32(num_valid_rows_i32, "num_valid_rows_i32", a_packed_u8.device)
    if h_global_enc_scale_f32 is not None:
        _check_device_tensor(h_global_enc_scale_f32, "h_global_enc_scale_f32", torch.float32, a_packed_u8.device,
                             align=4)
        if h_global_enc_scale_f32.numel() != 1:
            raise ValueError(f"h_global_enc_scale_f32: expected one element, got {tuple(h_global_enc_scale_f32.shape)}")
    return _launch(key, a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, tile_expert_i32,
                   num_valid_rows_i32, float(swiglu_limit or 0.0), h_global_enc_scale_f32)
