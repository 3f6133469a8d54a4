"""Dense NVFP4 GEMM on Hopper (Triton / Gluon): y_bf16[M, N] = alpha * A[M, K] @ B[N, K]^T.

A and B are NVFP4 in checkpoint layout: packed E2M1 [rows, K/2] uint8 (element 2i in
the low nibble) and E4M3 block scales (one per 16 elements along K) in the 128x4
swizzled layout ([Rp, Cp] uint8, Rp = rows rounded up to 128, Cp = K/16 rounded up to
4). alpha_f32 is a 1-element float32 GPU tensor (the product of the two global decode
scales); it is read on the device, never on the host.

Hopper has no FP4 tensor cores: E2M1 codes are decoded in registers and multiplied by
their E4M3 block scale (exact in fp16), then fp16 wgmma with fp32 accumulation; alpha
is applied to the fp32 accumulator in the epilogue, then one rounding to bf16. This is
the W4A4 math of a Blackwell block-scaled MMA up to the accumulation order.

Batch invariance (DESIGN: a token's bits do not depend on M). K % 128 == 0: chunk_plan(N, K) cuts K's 128-element
tiles into chunks; an output element is, at every M, the chunks' k16 wgmma chains (each from +0, over its tiles in
the register-fed kernel's logical k order, below) added in chunk order in fp32, times 2^14 and alpha, one rounding.
Two kernels compute exactly that (CompileKey.for_shape):
- M < 1024: the Gluon wgmma kernel (_gemm_nvfp4_wgmma): "swap AB", the weights decoded in registers straight into the
  wgmma's A operand (64 rows of N per warpgroup), the tokens the B operand (8..64 wide, several token tiles above
  64: 32 wide where the last 64-token tile would be at most half full, 64 < M < 256, and the CTAs walk every
  chunk); one CTA a chunk, the chunk sums added in chunk order by the tile's last CTA (tickets), or (split 1, where
  _walks_every_chunk says so: mostly M > 64 with many output tiles, and M >= 256) each CTA walks every chunk
  itself, restarting its chain at each chunk and adding the chunk sums in the same order. The activations are
  decoded once per GEMM into fp16 by a small Triton kernel first (act_f16), except at M <= 2 and at M <= 16 with
  N <= 2048, where each CTA decodes its own (the same values).
- M >= 1024: both operands decoded once to fp16 in that logical order (decode_pair: one launch), then the persistent
  Gluon fp16 GEMM (_gemm_f16_gluon: TMA ring, producer warp) with a chunk and a total accumulator (128 x 128
  tiles; 128 x 256 when K is one chunk).
K % 128 != 0 (no V4 shape): the predecode path at every M, one chain over K in natural order. use_asm=False
(arithmetic decode, for tests) takes the predecode path at every M.
Per-call buffers (split-K partials, decoded operands) come from torch.empty, so under
CUDA-graph capture they come from the graph's pool; nothing syncs with the host.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90._consts import BLOCK, SMEM_BLOCK_MAX
from kernels.sm90._tickets import Tickets, tile_tickets

__all__ = ["CompileKey", "chunk_plan", "launch"]

_NUM_SMS_H200 = 132
_CHUNK_SMS = 132  # the chunk plan's SM count: a constant, so the summation order does not depend on the device
_PREDECODE_MIN_M = 1024
_WALK_MIN_TILES = 96  # output tiles (64 weight rows x BT tokens) from which a CTA walks every chunk above M 64
_DECODE_TILE = (64, 256)


def _split_k(tiles: int, k_iters: int, ctas: int, max_split: int | None = None) -> int:
    """How many K splits bring `tiles` output tiles to about `ctas` CTAs (at most k_iters, and
    max_split): 1 when the tiles alone fill the GPU. Every split gets at least one K tile."""
    if tiles >= ctas:
        return 1
    want = min(-(-ctas // tiles), k_iters, max_split or k_iters)
    per = -(-k_iters // want)
    return -(-k_iters // per)


def _token_tile(m: int) -> int:
    """The wgmma kernel's BT: the smallest of 8, 16, 32, 64 tokens that holds M (64-token tiles above 64)."""
    return next(b for b in (8, 16, 32, 64) if b >= min(m, 64))


def _routed_token_tile(m: int, n: int) -> int:
    """The routed wgmma key's BT: _token_tile, except 32-token tiles for 64 < M < 256 when the last 64-token tile would
    be at most half full (M % 64 in 1 .. 32: fewer padded tokens for one more weight decode a row tile) and the
    32-token tiles give >= _WALK_MIN_TILES output tiles (so the CTAs walk every chunk: the only form measured with
    them). H100 (session 13, NOTES.md): at M 65 / 80 / 96 / 160 the walking kernel with BT 32 was the fastest
    bit-equal candidate on 15 of 16 shapes (M 96, 7168 x 16384: 110.3 us routed against 142.3 before); at M 200 BT 32
    beat BT 64 on all four shapes (40.8 / 96.4 / 54.1 / 233.9 against 57.6 / 117.8 / 62.8 / 247.4 us, two calls); at M
    112 and 127 (last tile more than half full) BT 64 stayed ahead. The bits do not depend on BT (every candidate
    bit-equal)."""
    if 64 < m < 256 and 1 <= m % 64 <= 32 and -(-n // 64) * -(-m // 32) >= _WALK_MIN_TILES:
        return 32
    return _token_tile(m)


def _walks_every_chunk(m: int, n: int, k: int) -> bool:
    """Whether the wgmma key of an M < _PREDECODE_MIN_M GEMM has each CTA walk every chunk (split 1) rather than one
    chunk a CTA (split = chunks): the same bits either way. From the H100 sweep (session 12, NOTES.md): walking wins
    from M 256 on (over the chunked fp16 GEMM too, up to M 512), and above M 64 once there are >= _WALK_MIN_TILES
    output tiles of 64 x _routed_token_tile(M, N); at M 64 (one token tile, the CTA's K walked serially) only for
    K <= 4096; below M 64 never."""
    tiles = -(-n // 64) * -(-m // _routed_token_tile(m, n))
    if m >= 256:
        return True
    if m < 64 or tiles < _WALK_MIN_TILES:
        return False
    return m > 64 or k <= 4096


def chunk_plan(n: int, k: int) -> tuple[int, int]:
    """(tiles_per_chunk, n_chunks): K's 128-element tiles (K % 128 == 0) cut into n_chunks chunks of tiles_per_chunk
    (the last may be shorter), a function of N and K only, so every M sums an output element in the same order.
    Sized for decode (M <= 16 on 132 SMs, the H200 sweeps in NOTES.md): one CTA of 64 weight rows a chunk, about 4
    CTAs an SM at N <= 2048 and 6 above, at most 32 chunks."""
    k_iters = k // 128
    split = _split_k(-(-n // 64), k_iters, (4 if n <= 2048 else 6) * _CHUNK_SMS, 32)
    per = -(-k_iters // split)
    return per, -(-k_iters // per)


@dataclass(frozen=True)
class CompileKey:
    """Everything codegen reads. M, N, K, strides and the per-split iteration count are runtime arguments; `split`
    is in the key because the launch grid and the ticket reduce depend on it."""

    block_x: int  # wgmma: BN weight rows a CTA (16 * num_warps * wgmma); predecode: the fp16 GEMM's BM
    block_y: int  # wgmma: BT tokens a CTA (8, 16, 32, 64); predecode: the fp16 GEMM's BN
    num_warps: int
    num_stages: int
    split: int  # wgmma: CTAs along K (the partials added in order by the last ticket; 1: a CTA walks every chunk)
    use_asm: bool = True  # the inline-PTX E2M1 decode (False: the arithmetic one, same values; predecode only)
    predecode: bool = False  # both operands decoded to fp16, then the Gluon fp16 GEMM
    act_f16: bool = False  # wgmma: activations decoded once per GEMM (fp16, mma order) instead of in every CTA
    wgmma: int = 0  # 1..: the Gluon wgmma path, K % 128 == 0 (value = 64-row wgmma tiles per warpgroup)
    decode_pair: bool = False  # predecode: both operands decoded in one launch (the same bytes)
    # 128-K tiles per chunk of chunk_plan (0: one chain over K, or for an explicit wgmma key K split evenly).
    # wgmma: each CTA of the split sums one chunk (split = the number of chunks), or with split 1 one CTA sums every
    # chunk of its tile in order (the same operations, no partials); predecode: the fp16 GEMM restarts
    # its chain every chunk and adds the chunk sums in order (needs mma_order and 128 x 128 tiles)
    chunk: int = 0
    mma_order: bool = False  # predecode: operands decoded in the wgmma path's logical k order (K % 128 == 0)

    @staticmethod
    def for_shape(m: int, n: int, k: int, *, use_asm: bool = True) -> "CompileKey":
        """The routed key. Batch invariant (DESIGN: a token's bits do not depend on M): at every M an output
        element is the same sequence of fp32 operations. K % 128 == 0: chunk_plan(N, K)'s chunks, each a chain of
        k16 wgmma steps from +0 over the 128-K tiles' logical MMA order, the chunk sums added in chunk order; M <
        1024 by the register-fed wgmma kernel (one CTA a chunk, the partials added by the last ticket, or one CTA
        walking every chunk of its tile: _walks_every_chunk), M >= 1024 by
        the predecode path (operands decoded in that order, the Gluon fp16 GEMM with a chunk and a total
        accumulator: 128 x 128 tiles when there is more than one chunk). Other K: the predecode path at every M,
        one chain in natural k order. use_asm=False (arithmetic decode) takes the predecode path at every M: the
        same values, so the same bits."""
        if k % 128:
            return CompileKey.predecode_gluon(use_asm=use_asm)
        per, chunks = chunk_plan(n, k)
        if m < _PREDECODE_MIN_M and use_asm:
            # activations decoded once per GEMM (act_f16) except at M <= 2 and at M <= 16 with N <= 2048 (in-kernel
            # decode 10.5 against 11.0 us at M = 16, tied at M = 3; H200 sweep, NOTES.md); the bits do not depend on it
            # one CTA a chunk (the partials added by the tile's last CTA), or each CTA walking every chunk itself
            # (split 1: no partials, the same adds) where that was faster (_walks_every_chunk)
            return CompileKey(block_x=64, block_y=_routed_token_tile(m, n), num_warps=4, num_stages=3,
                              split=1 if _walks_every_chunk(m, n, k) else chunks,
                              act_f16=m > 16 or (m > 2 and n > 2048), wgmma=1, chunk=per)
        if chunks == 1:
            return CompileKey.predecode_gluon(mma_order=True, use_asm=use_asm)
        return CompileKey.predecode_gluon(block_n=128, mma_order=True, chunk=per, use_asm=use_asm)

    @staticmethod
    def predecode_gluon(*, block_m: int = 128, block_n: int = 256, stages: int = 4, decode_pair: bool = True,
                        mma_order: bool = False, chunk: int = 0, use_asm: bool = True) -> "CompileKey":
        """The predecode path with the Gluon fp16 GEMM (block_m x block_n tiles, 64-wide K stages, 8 warps and a
        producer warp; chunk: chunk_plan's tiles per chunk, 0 for one chain)."""
        return CompileKey(block_x=block_m, block_y=block_n, num_warps=8, num_stages=stages, split=1, use_asm=use_asm,
                          predecode=True, decode_pair=decode_pair, chunk=chunk, mma_order=mma_order)

    @staticmethod
    def _wgmma(m: int, n: int, k: int, num_sms: int = _NUM_SMS_H200, *, warps: int = 4, reps: int = 1,
               per_sm: int = 4, stages: int = 3, max_split: int = 32, act_f16: bool = False) -> "CompileKey":
        # An explicit wgmma key for tests and benchmarks (not routed: its split follows M, so its bits do): weights
        # decoded in registers into the wgmma A operand (64 rows per warpgroup, reps tiles), the BT tokens the B
        # tile (decoded in every CTA, or once per GEMM when act_f16), split-K reduced in-kernel; split K until
        # ~per_sm CTAs per SM (at most max_split)
        bt = _token_tile(m)
        bn = 16 * warps * reps
        tiles = -(-n // bn) * -(-m // bt)
        split = _split_k(tiles, k // 128, per_sm * num_sms, max_split)
        return CompileKey(block_x=bn, block_y=bt, num_warps=warps, num_stages=stages, split=split, act_f16=act_f16,
                          wgmma=reps)


def _check_key(key: CompileKey) -> None:
    """One ValueError naming the first field of `key` the kernels cannot build (before anything compiles)."""
    if key.predecode == bool(key.wgmma):
        raise ValueError(f"CompileKey.predecode: {key.predecode} with wgmma {key.wgmma}; a key is one of the two "
                         "paths (predecode, or wgmma >= 1)")
    if key.chunk < 0:
        raise ValueError(f"CompileKey.chunk: {key.chunk}, expected >= 0 (128-K tiles a chunk, 0: none)")
    if key.wgmma:
        for field, got, ok in (("block_x", key.block_x, (16 * key.num_warps * key.wgmma,)),
                               ("block_y", key.block_y, (8, 16, 32, 64)), ("num_warps", key.num_warps, (4, 8)),
                               ("use_asm", key.use_asm, (True,)), ("mma_order", key.mma_order, (False,)),
                               ("decode_pair", key.decode_pair, (False,))):
            if got not in ok:
                raise ValueError(f"CompileKey.{field}: {got} with wgmma {key.wgmma}, expected one of {ok}")
        if key.num_stages < 2 or key.split < 1:
            raise ValueError(f"CompileKey.num_stages: {key.num_stages} (split {key.split}); the cp.async ring needs "
                             ">= 2 stages and a split >= 1")
        return
    for field, got, ok in (("num_warps", key.num_warps, (8,)), ("split", key.split, (1,)),
                           ("block_x", key.block_x, (128, 256)), ("block_y", key.block_y, (128, 256)),
                           ("act_f16", key.act_f16, (False,))):
        if got not in ok:
            raise ValueError(f"CompileKey.{field}: {got} with predecode, expected one of {ok}")
    if key.chunk and (key.block_x, key.block_y) != (128, 128):
        raise ValueError(f"CompileKey.chunk: {key.chunk} with {key.block_x} x {key.block_y} tiles; a chunked fp16 GEMM "
                         f"keeps two accumulators (chunk and total), 128 x 128 tiles only")
    if key.chunk and not key.mma_order:
        raise ValueError(f"CompileKey.chunk: {key.chunk} without mma_order; chunks follow the wgmma path's order")
    if key.block_x == key.block_y == 256:
        raise ValueError("CompileKey.block_x: 256 x 256 tiles need 256 accumulator registers a math thread; "
                         "the fp16 GEMM takes 128 x 128, 128 x 256 or 256 x 128")
    ring = key.num_stages * ((key.block_x + key.block_y) * 64 * 2 + 16)  # fp16 tiles, ready / empty barriers
    if key.num_stages < 2 or ring > SMEM_BLOCK_MAX:
        raise ValueError(f"CompileKey.num_stages: {key.num_stages} stages of {key.block_x} x {key.block_y} fp16 tiles "
                         f"need {ring} B of shared memory (at least 2 stages, at most {SMEM_BLOCK_MAX} B)")


@functools.lru_cache(maxsize=64)
def _compile(key: CompileKey):
    """The launcher for `key` (Triton compiles each kernel on its first launch: warm up
    before CUDA-graph capture)."""
    _check_key(key)
    return _predecode_launcher(key) if key.predecode else _wgmma_launcher(key)


def _predecode_launcher(key: CompileKey):
    """The predecode path: both operands decoded to fp16 (one launch or two), then the Gluon fp16 GEMM; the two
    steps are also attributes of the launcher (decode_operands, f16_gemm) for the bench's split of the time."""
    import triton
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from kernels.sm90._gemm_f16_gluon import gemm_f16_alpha_gluon_kernel, gluon_operand_layouts
    from kernels.sm90._gemm_nvfp4_jit import decode_nvfp4_pair_to_f16_kernel, decode_nvfp4_to_f16_kernel

    def decode_f16(p, sf, rows, k, cp4):
        out = torch.empty((rows, k), dtype=torch.float16, device=p.device)
        br, bk = _DECODE_TILE
        decode_nvfp4_to_f16_kernel[(triton.cdiv(rows, br), triton.cdiv(k, bk))](
            p, sf.view(torch.int32), out, rows, k // 2, cp4, BLOCK_R=br, BLOCK_K=bk, USE_ASM=key.use_asm,
            MMA_ORDER=key.mma_order, num_warps=4)
        return out

    def decode_pair(a_p, a_sf, m, b_p, b_sf, n, k, cp4):
        """decode_f16 of both operands in one launch (decode_nvfp4_pair_to_f16_kernel: the same bytes)."""
        a16 = torch.empty((m, k), dtype=torch.float16, device=a_p.device)
        b16 = torch.empty((n, k), dtype=torch.float16, device=a_p.device)
        br, bk = _DECODE_TILE
        decode_nvfp4_pair_to_f16_kernel[(triton.cdiv(m, br) + triton.cdiv(n, br), triton.cdiv(k, bk))](
            a_p, a_sf.view(torch.int32), a16, m, b_p, b_sf.view(torch.int32), b16, n, k // 2, cp4,
            BLOCK_R=br, BLOCK_K=bk, USE_ASM=key.use_asm, MMA_ORDER=key.mma_order, num_warps=4)
        return a16, b16

    def decode_operands(a_p, a_sf, b_p, b_sf):
        """The predecode path's step 1: (A16 [M, K], B16 [N, K]) fp16, one launch or two (key.decode_pair)."""
        m, n, k, cp4 = a_p.shape[0], b_p.shape[0], a_p.shape[1] * 2, a_sf.shape[1] // 4
        if key.mma_order and k % 128:
            raise ValueError(f"gemm_nvfp4: the key {key} decodes in the wgmma order, which needs K % 128 == 0, "
                             f"got K = {k}")
        if key.decode_pair:
            return decode_pair(a_p, a_sf, m, b_p, b_sf, n, k, cp4)
        return decode_f16(a_p, a_sf, m, k, cp4), decode_f16(b_p, b_sf, n, k, cp4)

    f16_layouts = gluon_operand_layouts(key.block_x, key.block_y)

    def f16_gemm(a16, b16, alpha_f32, out_bf16):
        """out_bf16 = bf16((a16 @ b16^T * 2^14) * alpha) by the Gluon fp16 GEMM (chunked when key.chunk)."""
        m, n = out_bf16.shape
        k = b16.shape[1]
        tiles = triton.cdiv(m, key.block_x) * triton.cdiv(n, key.block_y)
        # host descriptors: kernel parameters, so a captured graph replays them
        a_desc = TensorDescriptor.from_tensor(a16, [key.block_x, 64], f16_layouts[0])
        b_desc = TensorDescriptor.from_tensor(b16, [key.block_y, 64], f16_layouts[1])
        gemm_f16_alpha_gluon_kernel[(min(tiles, _num_sms(out_bf16.device)),)](
            a_desc, b_desc, alpha_f32, out_bf16, m, n, k, 2 * key.chunk, BM=key.block_x, BN=key.block_y,
            NS=key.num_stages, GROUP_M=8, CHUNKED=key.chunk > 0, num_warps=8)

    def run(a_packed_u8, a_sf_u8, b_packed_u8, b_sf_u8, alpha_f32, out_bf16) -> None:
        # decode each operand once (exact fp16, 4 bytes per element of traffic), then the pipelined fp16 GEMM
        a16, b16 = decode_operands(a_packed_u8, a_sf_u8, b_packed_u8, b_sf_u8)
        f16_gemm(a16, b16, alpha_f32, out_bf16)

    run.decode_operands = decode_operands  # the two steps apart, for the bench's split of the time
    run.f16_gemm = f16_gemm
    return run


def _wgmma_launcher(key: CompileKey):
    """The register-fed wgmma path: (the activation decode when act_f16, then) one GEMM kernel with the split-K
    partials added by each output tile's last CTA."""
    import triton

    from kernels.sm90._gemm_nvfp4_jit import decode_nvfp4_to_f16_kernel
    from kernels.sm90._gemm_nvfp4_wgmma import gemm_nvfp4_wgmma_kernel, wgmma_layouts

    wg_layouts = wgmma_layouts(key.num_warps, key.wgmma, key.block_y)

    def run(a_packed_u8, a_sf_u8, b_packed_u8, b_sf_u8, alpha_f32, out_bf16) -> None:
        # weight decode + wgmma + split-K reduce (in-kernel tickets) in one kernel, after the activation decode
        # kernel when act_f16
        m, n = out_bf16.shape
        k = a_packed_u8.shape[1] * 2
        cp4 = a_sf_u8.shape[1] // 4
        if k % 128:
            raise ValueError(f"gemm_nvfp4: the wgmma key {key} needs K % 128 == 0, got K = {k}")
        k_iters = k // 128
        per = key.chunk or triton.cdiv(k_iters, key.split)
        if key.split not in (1, triton.cdiv(k_iters, per)):
            raise ValueError(f"gemm_nvfp4: the wgmma key {key} cuts K = {k} into {triton.cdiv(k_iters, per)} "
                             f"chunks of {per} tiles, not its split {key.split}")
        grid = (triton.cdiv(n, key.block_x), triton.cdiv(m, key.block_y), key.split)
        if key.split > 1:  # fp32 partials, tile-major [split, tiles, BN x BT] (per call: a CUDA graph takes them
            # from its pool)
            ws = torch.empty((key.split, grid[0] * grid[1], key.block_x * key.block_y), dtype=torch.float32,
                             device=out_bf16.device)
            ctr = _tile_tickets(out_bf16.device, grid[0] * grid[1])
        else:
            ws = ctr = out_bf16
        x = a_packed_u8.view(torch.int32)
        if key.act_f16:  # activations decoded once (fp16, logical mma order), copied into the ring
            x = torch.empty((m, k), dtype=torch.float16, device=out_bf16.device)
            decode_nvfp4_to_f16_kernel[(triton.cdiv(m, 16), k // 128)](
                a_packed_u8, a_sf_u8.view(torch.int32), x, m, k // 2, cp4, BLOCK_R=16, BLOCK_K=128, USE_ASM=True,
                MMA_ORDER=True, num_warps=4)
        gemm_nvfp4_wgmma_kernel[grid](
            b_packed_u8.view(torch.int32), b_sf_u8, x, a_sf_u8, alpha_f32, out_bf16,
            ws, ctr, n, m, k // 8, cp4, k_iters, per, **wg_layouts,
            BN=key.block_x, BT=key.block_y, NS=key.num_stages, SPLIT=key.split, X_F16=key.act_f16,
            num_warps=key.num_warps)

    return run


_tickets: dict[torch.device, Tickets] = {}


def _tile_tickets(device: torch.device, tiles: int) -> Tensor:
    """`tiles` zeroed split-K ticket counters for one launch of the wgmma path (see kernels.sm90._tickets)."""
    return tile_tickets(_tickets, "gemm_nvfp4", device, tiles)


def _check_operand(name: str, packed: Tensor, sf: Tensor, k: int | None) -> int:
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"{name}_packed_u8: expected a 2-d torch.uint8 tensor [rows, K/2], got "
                         f"{getattr(packed, 'dtype', type(packed))} {tuple(getattr(packed, 'shape', ()))}")
    if not packed.is_contiguous():
        raise ValueError(f"{name}_packed_u8: must be contiguous (K-major), got strides {packed.stride()}")
    rows, kk = packed.shape[0], packed.shape[1] * 2
    if kk == 0 or kk % BLOCK:
        raise ValueError(f"{name}_packed_u8: K = 2 * {packed.shape[1]} = {kk} must be a positive multiple of {BLOCK}")
    if k is not None and kk != k:
        raise ValueError(f"{name}_packed_u8: K = {kk} does not match A's K = {k}")
    if isinstance(sf, Tensor) and sf.dtype == torch.float8_e4m3fn:
        sf = sf.view(torch.uint8)
    rp, cp = (rows + 127) // 128 * 128, (kk // BLOCK + 3) // 4 * 4
    if not isinstance(sf, Tensor) or sf.dtype != torch.uint8 or sf.numel() != rp * cp or not sf.is_contiguous():
        raise ValueError(f"{name}_sf_swizzled_u8: expected a contiguous uint8 128x4-swizzled buffer of "
                         f"{rp}x{cp} bytes for {rows} rows and K={kk}, got "
                         f"{getattr(sf, 'dtype', type(sf))} {tuple(getattr(sf, 'shape', ()))}")
    return kk


def _check_device(name: str, packed: Tensor, sf: Tensor) -> None:
    if packed.device != sf.device or not packed.is_cuda:
        raise ValueError(f"{name}: packed on {packed.device}, scales on {sf.device}; both must be on one CUDA device")


def launch(a_packed_u8: Tensor, a_sf_swizzled_u8: Tensor, b_packed_u8: Tensor, b_sf_swizzled_u8: Tensor,
           alpha_f32: Tensor, *, use_asm: bool = True, check: bool = True,
           key: CompileKey | None = None) -> Tensor:
    """y_bf16 [M, N] = alpha * dec(A) @ dec(B)^T. Any M >= 0; K a multiple of 16 (ValueError otherwise)."""
    if check:
        k = _check_operand("a", a_packed_u8, a_sf_swizzled_u8, None)
        _check_operand("b", b_packed_u8, b_sf_swizzled_u8, k)
        _check_device("a", a_packed_u8, a_sf_swizzled_u8)
        _check_device("b", b_packed_u8, b_sf_swizzled_u8)
        if (not isinstance(alpha_f32, Tensor) or alpha_f32.dtype != torch.float32 or alpha_f32.numel() != 1
                or alpha_f32.device != a_packed_u8.device):
            raise ValueError("alpha_f32: expected a 1-element torch.float32 tensor on the operands' device")
        if b_packed_u8.device != a_packed_u8.device:
            raise ValueError(f"b_packed_u8: on {b_packed_u8.device}, A on {a_packed_u8.device}")
    m, n, k = a_packed_u8.shape[0], b_packed_u8.shape[0], a_packed_u8.shape[1] * 2
    out = torch.empty((m, n), dtype=torch.bfloat16, device=a_packed_u8.device)
    if m == 0 or n == 0:
        return out
    a_sf = a_sf_swizzled_u8.view(torch.uint8).reshape((m + 127) // 128 * 128, -1)
    b_sf = b_sf_swizzled_u8.view(torch.uint8).reshape((n + 127) // 128 * 128, -1)
    if key is None:  # an explicit key is for benchmarks exploring configs
        key = CompileKey.for_shape(m, n, k, use_asm=use_asm)
    _compile(key)(
        a_packed_u8, a_sf, b_packed_u8, b_sf, alpha_f32.reshape(()), out)
    return out


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _NUM_SMS_H200
    return torch.cuda.get_device_properties(device).multi_processor_count
