"""Dense FP8 block-scaled GEMM on Hopper (Triton): y_bf16[M, N] = A[M, K] @ W[N, K]^T with

    A = E4M3 codes a_u8 [M, K] x a decode scale per 1x128 group, a_scale [M, ceil(K/128)]
        (uint8 UE8M0 bytes, value 2^(b-127), or float32: kernels.sm90.quantize_fp8_1x128's output);
    W = E4M3 codes w_u8 [N, K] x a float32 decode scale per 128x128 block, w_block_dec_f32
        [ceil(N/128), ceil(K/128)] (prepared on the host from the checkpoint's encoding:
        kernels.sm90.fp8_linear.prepare_fp8_weight).

Math (DeepGEMM's structure on Hopper; written here from the idea): for every 128-K group g the
FP8 tensor cores (wgmma on float8e4nv) compute the group's code dot product T_g from zero; it is
promoted at once: acc_f32 += T_g * f32(sa[m, g] * sw[n // 128, g]). So the narrow tensor-core
accumulator (about 14 bits on Hopper, NVFP4_FACTS 5b) only ever sums 128 products; U_ACC and
PROMOTION_INTERVAL below are what the bound (references.fp8_gemm.fp8_block_gemm_error_bound)
must be told. The float32 sum is rounded once to bf16 (RNE).

Summation order (deterministic and batch-invariant): the groups are cut into chunks by
chunk_plan(N, K), a function of N and K only; the scaled group dots of a chunk are added from zero
in group order, and the chunk sums from zero in chunk order. Small grids (few tokens) run one
program per chunk and add the chunk partials in chunk order, in a second kernel (reduce="kernel")
or in the program of each output tile that arrives last (reduce="ticket": one launch, kernels.sm90._tickets);
large grids walk the chunks in one program. All give the same bits, so a row's result depends
neither on M nor on the split. The kernel is "swap AB": the weights are the MMA's M side (64 rows per warpgroup, so
every tile is a wgmma), the tokens its N side (16..128 wide, padded with zero rows). Partial K
(K % 128 != 0, e.g. 576) is masked in the loads; no scale beyond ceil(K/128) is read.

A config may name the Gluon kernel instead (CompileKey.gluon, kernels.sm90._gemm_fp8_block_gluon: token-major
tiles for M >= 128, a TMA ring with mbarriers, the next group's asynchronous wgmma in flight while the current one
is promoted): the same operations per element in the same order, so the same bits.

Per-call buffers (the chunk partials) come from torch.empty, so under CUDA-graph capture they come
from the graph's pool; nothing syncs with the host. The ticket counters of reduce="ticket" are made
once per device by the first such launch, outside capture (kernels.sm90._tickets). With TRITON_INTERPRET=1
it runs on CPU tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90._consts import SMEM_BLOCK_MAX
from kernels.sm90._env import triton_interpreting as _interpreting
from kernels.sm90._tickets import Tickets, tile_tickets

__all__ = ["U_ACC", "PROMOTION_INTERVAL", "ACCUMULATOR", "CompileKey", "chunk_plan", "constexprs", "gluon_constexprs",
           "gluon_operand_layouts", "launch",
           "fused_key", "launch_fused", "without_ws", "REDUCES", "WIDE_BN", "triton_tile", "wide_shared_bytes",
           "launch_warps"]

# The FP8 wgmma accumulator inside one 128-K group: about 14 significant bits (measured for cuBLASLt's
# FP8 paths on the H100, issue 23); rounding not known, so the truncation reading (u = 2^(1-14)) is
# declared. The accumulator probe (verify/accumulator.py) measures what the kernel keeps.
U_ACC = 2.0**-13
PROMOTION_INTERVAL = 128
ACCUMULATOR = "fp8 wgmma (~14 bits) per 128 of K, promoted to fp32"

GROUP = 128
_NUM_SMS_H200 = 132
_CHUNK_TARGET_CTAS = 2 * _NUM_SMS_H200  # a constant, not the device's SM count: the bits stay device-independent
_REDUCE_BLOCK = 1024
_GROUP_T = 8  # token tiles per raster group (L2 reuse of the weight tiles; the bits do not depend on it)
# how a split GEMM's chunk partials become the output: "kernel" (chunk_reduce_kernel, a second launch) or
# "ticket" (the last program of each output tile adds them in the same kernel: one launch)
REDUCES = ("kernel", "ticket")
WIDE_BN = 192  # the producer-warp Gluon kernel's wide tile (CompileKey.producer)
_SMEM_BLOCK_MAX = SMEM_BLOCK_MAX - 1024  # the H100's / H200's opt-in shared memory per block, less Triton's static 1 KB


def wide_shared_bytes(block_t: int, num_stages: int, chunked: bool) -> int:
    """Shared memory of gemm_fp8_block_gluon_wide_kernel: a ring stage holds the [block_t, 128] token block and the
    [128, 128] + [64, 128] weight pieces (E4M3), two mbarriers; the running totals [block_t, 128 + 64] float32
    when one program walks several chunks."""
    return num_stages * ((block_t + WIDE_BN) * GROUP + 16) + (block_t * WIDE_BN * 4 if chunked else 0)



def chunk_plan(n: int, k: int) -> tuple[int, int]:
    """(chunk_blocks, n_chunks): the 128-K groups cut into chunks so that a single token's GEMM has
    about 264 programs of 64 weight rows x one chunk. Depends on N and K only (batch invariance)."""
    groups = -(-k // GROUP)
    want = max(1, min(groups, -(-_CHUNK_TARGET_CTAS // -(-n // 64))))
    chunk_blocks = -(-groups // want)
    return chunk_blocks, -(-groups // chunk_blocks)


@dataclass(frozen=True)
class CompileKey:
    """Everything codegen reads. M, N and strides are runtime arguments, so not here. The group loop's
    trip count is a constexpr (the interpreter cannot run a loop bounded by a runtime scalar), so K's
    chunk plan is in the key: `chunk_blocks` and `n_chunks` from chunk_plan(N, K), `groups` =
    ceil(K/128); `chunked` (more than one chunk: two accumulators) and `even_k` (no K mask) follow."""

    block_n: int
    block_t: int
    num_warps: int
    num_stages: int
    split: bool
    groups: int
    chunk_blocks: int
    n_chunks: int
    even_k: bool
    act_scale_ue8m0: bool
    swap: bool = True  # weights on the wgmma's M side (64 rows per warpgroup); False: tokens there (BT >= 64)
    group_t: int = _GROUP_T  # token tiles per raster group (L2 reuse; the bits do not depend on it)
    pipe: bool = False  # next group's dot issued before the current one is promoted (same operations, same order)
    tma: bool = False  # operand tiles by tensor-descriptor (TMA) loads, zero-filled past the edges (same operands)
    # the activation quantized in the GEMM's prologue (launch_fused: x in, y + codes + scales out; the same
    # operands as quantize_fp8_1x128 then launch); the recipe's other fields, read only when fused_q
    fused_q: bool = False
    q_recip: bool = False
    q_nan_propagate: bool = False
    q_amax_floor: float = 0.0
    # Triton's automatic warp specialization of the group loop (tl.range(warp_specialize=True)): on sm_90 the
    # pass turns num_warps=4 into 12 warps (a TMA producer warpgroup and two math warpgroups of 64 token rows
    # each, setmaxnreg, mbarriers), so one group's promotion overlaps the other warpgroup's wgmma. Only with
    # num_warps=4 (at 8 the pass leaves the loop as it is), token-major 128-token tiles (a 64-token tile is
    # computed twice, once per math warpgroup) and TMA loads. The same operations per element, same order.
    ws: bool = False
    # split only: who adds the chunk partials in chunk order. "kernel": chunk_reduce_kernel, a second launch;
    # "ticket": the program of each output tile that takes the last ticket, in the GEMM's launch (the same
    # additions in the same order, so the same bits; counters in kernels.sm90._tickets). An unsplit key has "kernel".
    reduce: str = "kernel"
    # the Gluon kernel (kernels.sm90._gemm_fp8_block_gluon; token-major tiles for M >= 128): TMA ring with
    # mbarriers, asynchronous wgmma with the next group's dot in flight while the current one is promoted; the
    # same operations per element in the same order (the same bits). Needs swap=False, tma, block_t 64 / 128 on
    # block_t // 16 warps, block_n 64 / 128, no pipe / fused_q / ws, reduce "kernel"; num_stages is its ring depth.
    gluon: bool = False
    # with gluon, unsplit: the persistent Gluon kernel (one program per SM walks output tiles in raster order, its
    # (tile, group) pairs one flat sequence: the next tile's loads and first wgmma overlap a tile's last promotion
    # and store); the same operations per tile (same bits)
    persistent: bool = False
    # with gluon, not persistent, block_n 64: the three-accumulator loop (gemm_fp8_block_gluon_acc3_kernel: group 0
    # done before the loop, then three groups an iteration, each promotion while a later group's wgmma runs, a done
    # accumulator across the back edge); the same promotions in the same order (same bits). block_n 128 spills (four
    # 64-register tiles a thread: three accumulators and the sum; sm_90a compile, 2026-12-07)
    acc3: bool = False
    # with gluon, not persistent, not acc3: a producer warp (gemm_fp8_block_gluon_producer_kernel, gl.warp_specialize:
    # one extra warp issues the tile's TMA loads into the ring, empty / ready mbarriers per stage; the kernel's warps
    # run the two-accumulator wgmma loop and the promotions); the same operations in the same order (same bits).
    # With block_n 192 (WIDE_BN): gemm_fp8_block_gluon_wide_kernel, 192 weight rows a tile as a 128-row and a 64-row
    # piece (each inside one weight-scale block), one accumulator per piece (the two-accumulator loop would not fit
    # the registers); the token tile loaded once feeds 1.5x the MMA of the 128-wide tile (same bits)
    producer: bool = False
    # with block_n 192: the two math warpgroups as two partitions of their own (gemm_fp8_block_gluon_dual_kernel,
    # launched with 4 warps a partition: num_warps stays the 8 math warps), each with its own 64-token block in the
    # ring and its own running totals, each releasing a stage by itself (no barrier between them: one promotes while
    # the other's wgmmas run); the same operations in the same order (same bits)
    dual: bool = False

    def __post_init__(self) -> None:
        # whole 128-row weight-scale blocks per tile (one scale, or one per row when wider than 128), and a
        # wgmma M side of 64 rows per warpgroup
        if self.block_n == WIDE_BN:
            self._check_wide()
        elif (128 % self.block_n if self.block_n <= 128 else self.block_n % 128) or self.block_n < 16:
            raise ValueError(f"CompileKey: block_n={self.block_n} must divide 128 or be a multiple of 128 "
                             f"({WIDE_BN}: Gluon with producer only)")
        if self.group_t < 1:
            raise ValueError(f"CompileKey: group_t={self.group_t} must be >= 1")
        if self.fused_q and self.tma:
            raise ValueError("CompileKey: fused_q loads the unquantized activation by pointer: tma must be off")
        if self.ws and (self.swap or not self.tma or self.pipe or self.fused_q or self.num_warps != 4
                        or self.block_t != 128):
            raise ValueError(f"CompileKey: ws needs swap=False, tma, no pipe / fused_q, num_warps=4 and "
                             f"block_t=128, got swap={self.swap} tma={self.tma} pipe={self.pipe} "
                             f"fused_q={self.fused_q} num_warps={self.num_warps} block_t={self.block_t}")
        if self.reduce not in REDUCES:
            raise ValueError(f"CompileKey: reduce={self.reduce!r} must be one of {REDUCES}")
        if self.reduce == "ticket" and (not self.split or self.ws):
            raise ValueError(f"CompileKey: reduce='ticket' needs split and no ws, got split={self.split} ws={self.ws}")
        if self.gluon and (self.swap or not self.tma or self.pipe or self.fused_q or self.ws or self.reduce != "kernel"
                           or self.block_t not in (64, 128) or self.block_n not in (64, 128, WIDE_BN)
                           or self.num_warps != self.block_t // 16 or self.num_stages < 2):
            raise ValueError(f"CompileKey: gluon needs swap=False, tma, no pipe / fused_q / ws, reduce='kernel', "
                             f"block_t 64 / 128 on block_t // 16 warps, block_n 64 / 128 ({WIDE_BN} with producer) "
                             f"and num_stages >= 2, got "
                             f"{self.config()}")
        if self.persistent and (not self.gluon or self.split):
            raise ValueError(f"CompileKey: persistent needs gluon and no split, got gluon={self.gluon} "
                             f"split={self.split}")
        if self.acc3 and (not self.gluon or self.persistent or self.block_n != 64):
            raise ValueError(f"CompileKey: acc3 needs gluon, not persistent and block_n=64 (three accumulators and the "
                             f"sums in registers), got gluon={self.gluon} persistent={self.persistent} "
                             f"block_n={self.block_n}")
        if self.dual and self.block_n != WIDE_BN:
            raise ValueError(f"CompileKey: dual needs block_n={WIDE_BN} (the wide tile's two warpgroups), got "
                             f"block_n={self.block_n}")
        if self.producer and (not self.gluon or self.persistent or self.acc3):
            raise ValueError(f"CompileKey: producer needs gluon, not persistent and not acc3, got gluon={self.gluon} "
                             f"persistent={self.persistent} acc3={self.acc3}")
        m_side = self.block_n if self.swap else self.block_t
        if m_side % 64 or m_side // 64 > (2 if self.ws else 1) * (self.num_warps // 4):
            raise ValueError(f"CompileKey: the wgmma M side ({'block_n' if self.swap else 'block_t'}={m_side}) must be "
                             f"64 rows per warpgroup of num_warps={self.num_warps}")

    def _check_wide(self) -> None:
        """block_n WIDE_BN: the producer-warp Gluon kernel only (gemm_fp8_block_gluon_wide_kernel) on 128 tokens
        (two math warpgroups: the size compiled and tested), its ring (token block and both weight pieces a stage)
        and, when it walks several chunks in one program, both pieces' float32 running totals within the 227 KB of
        shared memory a block may have."""
        if not (self.gluon and self.producer) or self.swap or self.persistent or self.acc3 or self.block_t != 128:
            raise ValueError(f"CompileKey: block_n={WIDE_BN} needs gluon and producer (not persistent, not acc3, not "
                             f"swap) and block_t=128, got gluon={self.gluon} producer={self.producer} persistent="
                             f"{self.persistent} acc3={self.acc3} swap={self.swap} block_t={self.block_t}")
        smem = wide_shared_bytes(self.block_t, self.num_stages, self.chunked and not self.split)
        if smem > _SMEM_BLOCK_MAX:
            raise ValueError(f"CompileKey: block_n={WIDE_BN} with block_t={self.block_t} and num_stages="
                             f"{self.num_stages}{' chunked' if self.chunked and not self.split else ''} needs "
                             f"{smem} bytes of shared memory (at most {_SMEM_BLOCK_MAX})")

    @property
    def chunked(self) -> bool:
        return self.n_chunks > 1

    @staticmethod
    def heuristic(m: int, n: int, k: int, *, act_scale_ue8m0: bool, num_sms: int = _NUM_SMS_H200) -> "CompileKey":
        """The untuned choice (shapes the committed table lacks). Tiles from CPU compiles for sm_90a (ptxas
        register reports): 64 weight rows x 16..64 tokens on one warpgroup for decode sizes (80 / 134 / 227
        registers, no spills); 128 x 64 on two warpgroups for batches (194 registers, 222 with two
        accumulators; 128 x 128 spilled: the per-token scales of the swapped layout sit along the wgmma's
        N, 32 of them per thread). Every choice keeps the summation order (module docstring)."""
        chunk_blocks, n_chunks = chunk_plan(n, k)
        chunked = n_chunks > 1
        if m <= 64:
            bt = 16 if m <= 16 else (32 if m <= 32 else 64)
            bn, warps, stages = 64, 4, 4
        else:
            bn, bt, warps, stages = 128, 64, 8, 4
        split = chunked and -(-n // bn) * -(-m // bt) < num_sms
        return CompileKey(block_n=bn, block_t=bt, num_warps=warps, num_stages=stages, split=split,
                          groups=-(-k // GROUP), chunk_blocks=chunk_blocks, n_chunks=n_chunks, even_k=k % GROUP == 0,
                          act_scale_ue8m0=act_scale_ue8m0)

    @staticmethod
    def from_config(n: int, k: int, cfg: dict, *, act_scale_ue8m0: bool) -> "CompileKey":
        """The key of a tunable config (gemm_fp8_block_configs: block_n, block_t, num_warps, num_stages,
        split, swap, group_t, pipe, tma, fused_q, ws, reduce; a field the config lacks takes the key's default)
        at N, K; the summation-order fields come from chunk_plan(N, K), so every config gives the same bits.
        `split` (and with it reduce="ticket") is dropped where the plan has one chunk."""
        chunk_blocks, n_chunks = chunk_plan(n, k)
        split = bool(cfg["split"]) and n_chunks > 1
        return CompileKey(block_n=cfg["block_n"], block_t=cfg["block_t"], num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"], split=split,
                          groups=-(-k // GROUP), chunk_blocks=chunk_blocks, n_chunks=n_chunks, even_k=k % GROUP == 0,
                          act_scale_ue8m0=act_scale_ue8m0, swap=cfg.get("swap", True),
                          group_t=cfg.get("group_t", _GROUP_T), pipe=cfg.get("pipe", False),
                          tma=cfg.get("tma", False), fused_q=cfg.get("fused_q", False), ws=cfg.get("ws", False),
                          reduce=cfg.get("reduce", "kernel") if split else "kernel", gluon=cfg.get("gluon", False),
                          persistent=cfg.get("persistent", False), acc3=cfg.get("acc3", False),
                          producer=cfg.get("producer", False), dual=cfg.get("dual", False))

    def config(self) -> dict:
        """The tunable fields (the inverse of from_config)."""
        return {"block_n": self.block_n, "block_t": self.block_t, "num_warps": self.num_warps,
                "num_stages": self.num_stages, "split": self.split, "swap": self.swap, "group_t": self.group_t,
                "pipe": self.pipe, "tma": self.tma, "fused_q": self.fused_q, "ws": self.ws, "reduce": self.reduce,
                "gluon": self.gluon, "persistent": self.persistent, "acc3": self.acc3,
                "producer": self.producer, "dual": self.dual}

    @staticmethod
    def for_shape(m: int, n: int, k: int, *, act_scale_ue8m0: bool, num_sms: int = _NUM_SMS_H200) -> "CompileKey":
        """The committed config of (N, K) at M's bucket (kernels.sm90.gemm_fp8_block_configs, the sweep's
        winners), else the heuristic. Chosen on the host from the shape alone (graph safe). Batch invariance
        holds across buckets: every config keeps chunk_plan(N, K)'s summation order."""
        from kernels.sm90.gemm_fp8_block_configs import lookup

        cfg = lookup(m, n, k)
        if cfg is None:
            return CompileKey.heuristic(m, n, k, act_scale_ue8m0=act_scale_ue8m0, num_sms=num_sms)
        return CompileKey.from_config(n, k, cfg, act_scale_ue8m0=act_scale_ue8m0)


def constexprs(key: CompileKey) -> dict:
    """The kernel's constexpr arguments for `key` (the launcher and the sm_90a compile test).

    A split program owns one chunk, so it sums the chunk's groups from +0 in one accumulator (CHUNKED
    off: no second register tile). That is the unsplit kernel's chunk sum `part` exactly: the unsplit one
    then adds 0 + part, which equals part since a sum started at +0 is never -0 (round to nearest). So the
    partials, and the reduce's sum of them in chunk order, have the same bits. TICKET: that sum is done by
    the tile's last program (the same additions: _ticket_reduce)."""
    return dict(BN=key.block_n, BT=key.block_t, N_ITER=key.chunk_blocks if key.split else key.groups,
                CHUNK_BLOCKS=key.chunk_blocks, SPLIT=key.split, CHUNKED=key.chunked and not key.split,
                EVEN_K=key.even_k,
                AS_UE8M0=key.act_scale_ue8m0, SWAP=key.swap, GROUP_T=key.group_t, WS_VEC=key.block_n > 128,
                PIPE=key.pipe, TMA=key.tma, FUSED_Q=key.fused_q, Q_RECIP=key.q_recip,
                Q_NAN_PROPAGATE=key.q_nan_propagate, Q_AMAX_FLOOR=key.q_amax_floor, WS=key.ws,
                TICKET=key.split and key.reduce == "ticket", N_CHUNKS=key.n_chunks,
                REDUCE_UNROLL=4 if key.block_n * key.block_t <= 16 * 32 * key.num_warps else 1)


def gluon_constexprs(key: CompileKey) -> dict:
    """The Gluon kernel's constexpr arguments for `key` (launcher and sm_90a compile test): a split program sums
    its one chunk in one accumulator, as in constexprs; the persistent kernel has no SPLIT."""
    const = dict(BN=key.block_n, BM=key.block_t, NS=key.num_stages, CHUNK_BLOCKS=key.chunk_blocks,
                 CHUNKED=key.chunked and not key.split, AS_UE8M0=key.act_scale_ue8m0, GROUP_T=key.group_t)
    return const if key.persistent else dict(const, SPLIT=key.split)


def gluon_operand_layouts(key: CompileKey):
    """The shared layouts of the Gluon kernel's TMA blocks: (weights [block_n, 128], activations [block_t, 128]); the
    192-wide tile's weight pieces [128, 128] and [64, 128] share one (the same 128-byte swizzle)."""
    from triton.experimental.gluon import language as gl

    return tuple(gl.NVMMASharedLayout.get_default_for([rows, GROUP], gl.float8e4nv)
                 for rows in (128 if key.block_n == WIDE_BN else key.block_n, 64 if key.dual else key.block_t))


def launch_warps(key: CompileKey) -> int:
    """num_warps of the Gluon launch: the key's math warps, or 4 for a dual key (its default partition: the other
    math warpgroup and the producer warp are worker partitions)."""
    return 4 if key.dual else key.num_warps


WS_EXPERIMENT_ENV = "NVFP4V_FP8_WS_EXPERIMENT"


def _refuse_ws_on_a_device(key: CompileKey) -> None:
    """CompileKey.ws compiles for sm_90a (verify/tests/test_sm90_fp8_compile.py) but gave no result on an H200
    (Triton 3.6, 2026-12-06: a bits test silent for 60 s twice, a sweep silent for 230 s): a launch on a device
    is refused unless the experiment switch is set. The interpreter runs the loop unspecialized."""
    if key.ws and not _interpreting() and os.environ.get(WS_EXPERIMENT_ENV) != "1":
        raise RuntimeError(f"key: ws=True (the warp-specialized group loop) gave no result on an H200 under Triton "
                           f"3.6; set {WS_EXPERIMENT_ENV}=1 to launch it anyway (experiment only)")


@functools.lru_cache(maxsize=64)
def _compile(key: CompileKey):
    """The launcher for `key` (Triton compiles each kernel on its first launch: warm up before
    CUDA-graph capture)."""
    import triton

    _refuse_ws_on_a_device(key)
    if key.gluon:
        return _compile_gluon(key)

    from kernels.sm90._gemm_fp8_block_jit import chunk_reduce_kernel, gemm_fp8_block_kernel

    def run(a_u8: Tensor, a_scale: Tensor, w_u8: Tensor, w_dec_f32: Tensor, out_bf16: Tensor,
            x: Tensor | None = None):
        """fused_q: x [M, K] is quantized in the prologue into a_u8 / a_scale (outputs)."""
        m, k = a_u8.shape
        n = w_u8.shape[0]
        grid = (triton.cdiv(n, key.block_n), triton.cdiv(m, key.block_t), key.n_chunks if key.split else 1)
        dst = torch.empty((key.n_chunks, m, n), dtype=torch.float32, device=a_u8.device) if key.split else out_bf16
        w_arg, a_arg = w_u8, a_u8
        if key.tma:  # host descriptors: kernel parameters, so a captured graph replays them as they are
            from triton.tools.tensor_descriptor import TensorDescriptor

            w_arg = TensorDescriptor.from_tensor(w_u8.view(torch.float8_e4m3fn), [key.block_n, GROUP])
            a_arg = TensorDescriptor.from_tensor(a_u8.view(torch.float8_e4m3fn), [key.block_t, GROUP])
        extra, stride_am = {}, a_u8.stride(0)
        if key.fused_q:
            a_arg, extra, stride_am = x, {"codes_ptr": a_u8, "qscale_ptr": a_scale}, x.stride(0)
        ticket = key.split and key.reduce == "ticket"
        if ticket:  # the tile's last program writes out_bf16 (one counter per output tile: grid[0] x grid[1])
            extra.update(y_ptr=out_bf16, ctr_ptr=_tile_tickets(a_u8.device, grid[0] * grid[1]))
        compiled = gemm_fp8_block_kernel[grid](
            w_arg, a_arg, w_dec_f32, a_scale, dst,
            m, n, k, key.groups, w_u8.stride(0), stride_am, a_scale.stride(0), n, m * n,
            **constexprs(key), **extra, num_warps=key.num_warps, num_stages=key.num_stages,
        )
        if key.split and not ticket:
            chunk_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
                dst, out_bf16, m * n, N_CHUNKS=key.n_chunks, BLOCK=_REDUCE_BLOCK, num_warps=4)
        return compiled

    return run


def _compile_gluon(key: CompileKey):
    """The launcher of the Gluon kernel for `key` (host tensor descriptors: kernel parameters, graph safe; a split
    key's chunk partials reduced by chunk_reduce_kernel, as the Triton path's reduce="kernel")."""
    import triton
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from kernels.sm90._gemm_fp8_block_gluon import (gemm_fp8_block_gluon_acc3_kernel, gemm_fp8_block_gluon_kernel,
                                                    gemm_fp8_block_gluon_persistent_kernel,
                                                    gemm_fp8_block_gluon_dual_kernel,
                                                    gemm_fp8_block_gluon_producer_kernel,
                                                    gemm_fp8_block_gluon_wide_kernel)
    from kernels.sm90._gemm_fp8_block_jit import chunk_reduce_kernel

    w_layout, a_layout = gluon_operand_layouts(key)
    const = gluon_constexprs(key)

    def run(a_u8: Tensor, a_scale: Tensor, w_u8: Tensor, w_dec_f32: Tensor, out_bf16: Tensor, x: Tensor | None = None):
        m, k = a_u8.shape
        n = w_u8.shape[0]
        grid = (triton.cdiv(n, key.block_n), triton.cdiv(m, key.block_t), key.n_chunks if key.split else 1)
        dst = torch.empty((key.n_chunks, m, n), dtype=torch.float32, device=a_u8.device) if key.split else out_bf16
        w_fp8 = w_u8.view(torch.float8_e4m3fn)
        # dual: the token tile as two 64-row blocks, one per math partition
        a_desc = TensorDescriptor.from_tensor(a_u8.view(torch.float8_e4m3fn),
                                              [64 if key.dual else key.block_t, GROUP], a_layout)
        if key.persistent:  # one program per SM at most (the bits do not depend on the grid)
            sms = _num_sms(a_u8.device.index or 0)
            w_desc = TensorDescriptor.from_tensor(w_fp8, [key.block_n, GROUP], w_layout)
            return gemm_fp8_block_gluon_persistent_kernel[(min(grid[0] * grid[1], sms),)](
                w_desc, a_desc, w_dec_f32, a_scale, out_bf16, m, n, key.groups, a_scale.stride(0), n,
                **const, num_warps=key.num_warps)
        if key.block_n == WIDE_BN:  # the two weight pieces' blocks (_gemm_fp8_block_gluon._wide_rows)
            kernel = gemm_fp8_block_gluon_dual_kernel if key.dual else gemm_fp8_block_gluon_wide_kernel
            w_descs = [TensorDescriptor.from_tensor(w_fp8, [rows, GROUP], w_layout) for rows in (128, 64)]
        else:
            kernel = (gemm_fp8_block_gluon_acc3_kernel if key.acc3 else gemm_fp8_block_gluon_producer_kernel
                      if key.producer else gemm_fp8_block_gluon_kernel)
            w_descs = [TensorDescriptor.from_tensor(w_fp8, [key.block_n, GROUP], w_layout)]
        compiled = kernel[grid](
            *w_descs, a_desc, w_dec_f32, a_scale, dst, m, n, key.groups, a_scale.stride(0), n, m * n,
            **const, num_warps=launch_warps(key))
        if key.split:
            chunk_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
                dst, out_bf16, m * n, N_CHUNKS=key.n_chunks, BLOCK=_REDUCE_BLOCK, num_warps=4)
        return compiled

    return run


_tickets: dict[torch.device, Tickets] = {}


def _tile_tickets(device: torch.device, tiles: int) -> Tensor:
    """`tiles` zeroed split-K ticket counters for one reduce="ticket" launch (see kernels.sm90._tickets)."""
    return tile_tickets(_tickets, "gemm_fp8_block", device, tiles)


def compiled_resources(key: CompileKey) -> tuple[int, int] | None:
    """(registers, spilled bytes) of the GEMM kernel compiled for `key` (after a launch; the sweep refuses
    spilling configs), or None where unknown (interpreter, not launched)."""
    info = _LAST_COMPILED.get(key)
    if info is None or not hasattr(info, "n_regs"):
        return None
    return int(info.n_regs), int(info.n_spills)


_LAST_COMPILED: dict = {}


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_inputs(a_u8: Tensor, a_scale: Tensor, w_u8: Tensor, w_block_dec_f32: Tensor) -> None:
    for name, t in (("a_u8", a_u8), ("w_u8", w_u8)):
        if not isinstance(t, Tensor) or t.dtype not in (torch.uint8, torch.float8_e4m3fn) or t.dim() != 2:
            raise ValueError(f"{name}: expected 2-d E4M3 bytes (uint8 or float8_e4m3fn), got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if t.stride(1) != 1:
            raise ValueError(f"{name}: rows must be contiguous along K (stride(1) == 1), got strides {t.stride()}")
    m, k = a_u8.shape
    n, kw = w_u8.shape
    if k != kw or k == 0:
        raise ValueError(f"w_u8: K={kw} does not match a_u8's K={k} (or K = 0)")
    g = -(-k // GROUP)
    if a_scale.dtype not in (torch.uint8, torch.float32) or tuple(a_scale.shape) != (m, g) or a_scale.stride(1) != 1:
        raise ValueError(f"a_scale: expected uint8 (UE8M0) or float32 [{m}, {g}] with stride(1) == 1, got "
                         f"{a_scale.dtype} {tuple(a_scale.shape)}")
    if (w_block_dec_f32.dtype != torch.float32 or tuple(w_block_dec_f32.shape) != (-(-n // GROUP), g)
            or not w_block_dec_f32.is_contiguous()):
        raise ValueError(f"w_block_dec_f32: expected contiguous float32 [{-(-n // GROUP)}, {g}], got "
                         f"{w_block_dec_f32.dtype} {tuple(w_block_dec_f32.shape)}")
    devs = {t.device for t in (a_u8, a_scale, w_u8, w_block_dec_f32)}
    if len(devs) != 1:
        raise ValueError(f"a_u8, a_scale, w_u8, w_block_dec_f32: on different devices {sorted(map(str, devs))}")
    if a_u8.device.type != "cuda" and not _interpreting():
        raise ValueError(f"a_u8: expected CUDA tensors (or TRITON_INTERPRET=1), got {a_u8.device}")


def without_ws(key: CompileKey) -> CompileKey:
    """`key` without warp specialization: the same tile on two warpgroups of 4 warps (8 warps; the bits do
    not depend on it)."""
    return dataclasses.replace(key, ws=False, num_warps=max(key.num_warps, 8)) if key.ws else key


def _tma_ok(a_u8: Tensor, w_u8: Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in (a_u8, w_u8))


def launch(a_u8: Tensor, a_scale: Tensor, w_u8: Tensor, w_block_dec_f32: Tensor, *, key: CompileKey | None = None,
           check: bool = True) -> Tensor:
    """bf16 [M, N] = (a codes x 1x128 scales) @ (w codes x 128x128 scales)^T (module docstring).

    key: an explicit CompileKey (tests); by default CompileKey.for_shape. M may be 0.
    """
    if check:
        _check_inputs(a_u8, a_scale, w_u8, w_block_dec_f32)
    m, k = a_u8.shape
    n = w_u8.shape[0]
    out = torch.empty((m, n), dtype=torch.bfloat16, device=a_u8.device)
    if m == 0 or n == 0:
        return out
    if key is not None and (key.groups, key.chunk_blocks, key.n_chunks) != (-(-k // GROUP), *chunk_plan(n, k)):
        raise ValueError(f"key: groups/chunk_blocks/n_chunks {key.groups}/{key.chunk_blocks}/{key.n_chunks} do not "
                         f"match "
                         f"N={n}, K={k} (chunk_plan gives {chunk_plan(n, k)})")
    if key is None:
        sms = _num_sms(a_u8.device.index or 0) if a_u8.is_cuda else _NUM_SMS_H200
        key = CompileKey.for_shape(m, n, k, act_scale_ue8m0=a_scale.dtype == torch.uint8, num_sms=sms)
    if key.fused_q:  # a table config may fuse the quantizer for linear_fp8; here the input is quantized
        key = dataclasses.replace(key, fused_q=False, q_recip=False, q_nan_propagate=False, q_amax_floor=0.0)
    if key.gluon and _interpreting():  # no Gluon interpreter: the Triton kernel's same tile (the same bits)
        key = triton_tile(key)
    if key.tma and not _tma_ok(a_u8, w_u8):
        # the same operands by masked loads (the Gluon kernel's tile on the Triton kernel: the same bits)
        key = dataclasses.replace(triton_tile(without_ws(key)), tma=False)
    compiled = _compile(key)(a_u8.view(torch.uint8), a_scale, w_u8.view(torch.uint8), w_block_dec_f32, out)
    if key not in _LAST_COMPILED and compiled is not None:
        _LAST_COMPILED[key] = compiled
    return out


def triton_tile(key: CompileKey) -> CompileKey:
    """A Gluon key's tile on the Triton kernel (no Gluon interpreter; operands TMA cannot take; the fused quantizer):
    the same token-major tile, 64 weight rows for the 192-wide one (the Triton kernel's tiles divide 128); the
    same operations per element in the same order (the same bits)."""
    if not key.gluon:
        return key
    return dataclasses.replace(key, gluon=False, persistent=False, acc3=False, producer=False, dual=False,
                               block_n=64 if key.block_n == WIDE_BN else key.block_n)


def fused_key(key: CompileKey, *, scale_rule: str, encode_rule: str = "divide", amax_nan: str = "propagate",
              amax_floor_f32: float = 1e-4) -> CompileKey:
    """`key`'s tile with the quantizer fused for the recipe (what launch_fused compiles)."""
    return dataclasses.replace(triton_tile(without_ws(key)), act_scale_ue8m0=scale_rule == "ue8m0_ceil", tma=False,
                               fused_q=True,
                               q_recip=encode_rule == "mul_reciprocal",
                               q_nan_propagate=amax_nan == "propagate", q_amax_floor=float(amax_floor_f32))


def launch_fused(x: Tensor, w_u8: Tensor, w_block_dec_f32: Tensor, *, scale_rule: str, encode_rule: str = "divide",
                 amax_nan: str = "propagate", amax_floor_f32: float = 1e-4,
                 key: CompileKey | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, K] (bf16 / fp16 / fp32) -> (y bf16 [M, N], act codes u8 [M, K], act scales [M, ceil(K/128)]): the
    activation quantized in the GEMM's prologue (the recipe fields as quantize_fp8_1x128.launch takes them),
    one launch (plus the chunk reduce when split with reduce="kernel"; with "ticket" one launch in all).
    Same bytes, scales and output bits as quantize_fp8_1x128 then launch. key: a CompileKey whose tile fields
    are used (fused_q and the recipe are set here); by default CompileKey.for_shape."""
    from kernels.sm90 import quantize_fp8_1x128 as q

    q._check_inputs(x, scale_rule, encode_rule, amax_nan, amax_floor_f32)
    if not isinstance(w_u8, Tensor) or w_u8.dim() != 2 or w_u8.shape[1] != x.shape[1]:
        raise ValueError(f"w_u8: expected [N, {x.shape[1]}] E4M3 bytes, got {tuple(getattr(w_u8, 'shape', ()))}")
    m, k = x.shape
    n = w_u8.shape[0]
    g = -(-k // GROUP)
    ue8m0 = scale_rule == "ue8m0_ceil"
    codes = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    scale = torch.empty((m, g), dtype=torch.uint8 if ue8m0 else torch.float32, device=x.device)
    _check_inputs(codes, scale, w_u8, w_block_dec_f32)
    out = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    if m == 0 or n == 0:  # no GEMM to fuse into: the quantizer alone
        codes, scale = q.launch(x, scale_rule=scale_rule, encode_rule=encode_rule, amax_nan=amax_nan,
                                amax_floor_f32=amax_floor_f32)
        return out, codes, scale
    if key is None:
        sms = _num_sms(x.device.index or 0) if x.is_cuda else _NUM_SMS_H200
        key = CompileKey.for_shape(m, n, k, act_scale_ue8m0=ue8m0, num_sms=sms)
    key = fused_key(key, scale_rule=scale_rule, encode_rule=encode_rule, amax_nan=amax_nan,
                    amax_floor_f32=amax_floor_f32)
    compiled = _compile(key)(codes, scale, w_u8.view(torch.uint8), w_block_dec_f32, out, x)
    if key not in _LAST_COMPILED and compiled is not None:
        _LAST_COMPILED[key] = compiled
    return out, codes, scale
