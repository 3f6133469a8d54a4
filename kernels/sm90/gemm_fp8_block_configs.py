"""Per-shape configs of the sm90 FP8 block-scaled GEMM (kernels.sm90.gemm_fp8_block), chosen by the config
sweep on the GPU (verify/tests/test_sm90_fp8_sweep.py, marker bench) and committed here.

TABLE maps (N, K) to M buckets: ((m_max, config), ...) in ascending m_max; an M takes the first bucket with
M <= m_max, and the last bucket serves every larger M. A config holds only tunable fields (tile, warps,
stages, split, layout, raster group, pipelining, TMA loads, ws: the warp-specialized group loop; reduce: who
adds a split's chunk partials, "kernel" (a second launch) or "ticket" (the tile's last program); fused_q:
linear_fp8 quantizes the activation in the GEMM's prologue with this tile, gemm_fp8_block.launch ignores it; a
field in DEFAULTS may be absent: entries committed before it existed mean its default): the summation order comes from
chunk_plan(N, K) alone, so
every config gives the same bits and a token's result does not depend on M or on the bucket (the sweep
refuses a candidate whose output differs by one bit from the reference config's). Chosen on the host from
the shape at launch (graph safe: nothing is read from the device). Shapes not in the table use
CompileKey.heuristic.

Committing the sweep's winners (the lead, after a GPU run):
    python -m kernels.sm90.gemm_fp8_block_configs --from-json OUT/sm90_fp8_sweep.json
rewrites TABLE below (entries merged with those already here; a later run's winner replaces an earlier one
at the same N, K, m_max) and prints what changed; then run the FP8 GEMM tests and commit this file.
"""

from __future__ import annotations

import argparse
import json
import pprint
import sys
from pathlib import Path

__all__ = ["TABLE", "FIELDS", "DEFAULTS", "candidates", "compact", "lookup", "merged_table"]

FIELDS = ("block_n", "block_t", "num_warps", "num_stages", "split", "swap", "group_t", "pipe", "tma", "fused_q", "ws",
          "reduce", "gluon", "persistent", "acc3", "producer", "dual")
# fields added after configs were committed: an entry (or a sweep's winner) without one means this default, so
# older tables and sweep files keep their meaning
DEFAULTS = {"ws": False, "reduce": "kernel", "gluon": False, "persistent": False, "acc3": False, "producer": False,
            "dual": False}

# ---- TABLE (written by --from-json; edit by hand only to remove an entry)
# device: NVIDIA H100 80GB HBM3; wq_b (65536 x 1536) at M <= 4096 the dual tile and wo_b at M <= 4096 with raster
# group 8: H100 (session 15, NVFP4V_FP8_SWEEP_ONLY=wide); the other block_n 192 entries (wo_a, shared l1, MTP e/h_proj
# at M <= 4096, wo_b at M <= 128): NVIDIA H200 (2026-12-07, session 8, NVFP4V_FP8_SWEEP_ONLY=wide)
TABLE: dict[tuple[int, int], tuple[tuple[int, dict], ...]] = {(512, 7168): ((1,
                {'block_n': 64,
                 'block_t': 16,
                 'num_warps': 4,
                 'num_stages': 4,
                 'split': True,
                 'swap': True,
                 'group_t': 8,
                 'pipe': False,
                 'tma': False,
                 'fused_q': False,
                 'reduce': 'ticket'}),
               (16,
                {'block_n': 64,
                 'block_t': 16,
                 'num_warps': 4,
                 'num_stages': 4,
                 'split': True,
                 'swap': True,
                 'group_t': 8,
                 'pipe': False,
                 'tma': False,
                 'fused_q': True,
                 'reduce': 'ticket'}),
               (64,
                {'block_n': 128,
                 'block_t': 64,
                 'num_warps': 4,
                 'num_stages': 4,
                 'split': True,
                 'swap': False,
                 'group_t': 8,
                 'pipe': False,
                 'tma': True,
                 'fused_q': False}),
               (128,
                {'block_n': 128,
                 'block_t': 64,
                 'num_warps': 4,
                 'num_stages': 4,
                 'split': True,
                 'swap': False,
                 'group_t': 8,
                 'pipe': False,
                 'tma': True,
                 'fused_q': False}),
               (4096,
                {'block_n': 128,
                 'block_t': 128,
                 'num_warps': 8,
                 'num_stages': 3,
                 'split': False,
                 'swap': False,
                 'group_t': 8,
                 'pipe': False,
                 'tma': True,
                 'fused_q': False})),
 (1536, 7168): ((1,
                 {'block_n': 64,
                  'block_t': 16,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': True,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'reduce': 'ticket'}),
                (16,
                 {'block_n': 64,
                  'block_t': 16,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': True,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'reduce': 'ticket'}),
                (64,
                 {'block_n': 128,
                  'block_t': 64,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': False,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (128,
                 {'block_n': 128,
                  'block_t': 64,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': False,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (4096,
                 {'block_n': 128,
                  'block_t': 128,
                  'num_warps': 8,
                  'num_stages': 4,
                  'split': False,
                  'swap': False,
                  'group_t': 16,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'gluon': True,
                  'producer': True})),
 (3072, 7168): ((1,
                 {'block_n': 64,
                  'block_t': 16,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': True,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'reduce': 'ticket'}),
                (16,
                 {'block_n': 64,
                  'block_t': 16,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': True,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'reduce': 'ticket'}),
                (64,
                 {'block_n': 128,
                  'block_t': 64,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': False,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (128,
                 {'block_n': 128,
                  'block_t': 64,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': False,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'gluon': True}),
                (4096,
                 {'block_n': 192,
                  'block_t': 128,
                  'num_warps': 8,
                  'num_stages': 3,
                  'split': False,
                  'swap': False,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'gluon': True,
                  'producer': True})),
 (7168, 3072): ((1,
                 {'block_n': 64,
                  'block_t': 16,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': True,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'reduce': 'ticket'}),
                (16,
                 {'block_n': 64,
                  'block_t': 16,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': True,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'reduce': 'ticket'}),
                (64,
                 {'block_n': 128,
                  'block_t': 64,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': False,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (128,
                 {'block_n': 128,
                  'block_t': 64,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': False,
                  'swap': False,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (4096,
                 {'block_n': 128,
                  'block_t': 128,
                  'num_warps': 8,
                  'num_stages': 4,
                  'split': False,
                  'swap': False,
                  'group_t': 16,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'gluon': True,
                  'producer': True})),
 (7168, 7168): ((1,
                 {'block_n': 64,
                  'block_t': 16,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': True,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (16,
                 {'block_n': 64,
                  'block_t': 16,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': True,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (64,
                 {'block_n': 128,
                  'block_t': 64,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': True,
                  'swap': False,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (128,
                 {'block_n': 128,
                  'block_t': 64,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': False,
                  'swap': False,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'gluon': True}),
                (4096,
                 {'block_n': 192,
                  'block_t': 128,
                  'num_warps': 8,
                  'num_stages': 3,
                  'split': False,
                  'swap': False,
                  'group_t': 16,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'gluon': True,
                  'producer': True})),
 (7168, 16384): ((1,
                  {'block_n': 64,
                   'block_t': 16,
                   'num_warps': 4,
                   'num_stages': 4,
                   'split': True,
                   'swap': True,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False,
                   'reduce': 'ticket'}),
                 (16,
                  {'block_n': 64,
                   'block_t': 16,
                   'num_warps': 4,
                   'num_stages': 4,
                   'split': True,
                   'swap': True,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False,
                   'reduce': 'ticket'}),
                 (64,
                  {'block_n': 128,
                   'block_t': 64,
                   'num_warps': 4,
                   'num_stages': 4,
                   'split': True,
                   'swap': False,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False}),
                 (128,
                  {'block_n': 192,
                   'block_t': 128,
                   'num_warps': 8,
                   'num_stages': 4,
                   'split': True,
                   'swap': False,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False,
                   'gluon': True,
                   'producer': True}),
                 (4096,
                  {'block_n': 192,
                   'block_t': 128,
                   'num_warps': 8,
                   'num_stages': 3,
                   'split': False,
                   'swap': False,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False,
                   'gluon': True,
                   'producer': True})),
 (8192, 1536): ((1,
                 {'block_n': 64,
                  'block_t': 16,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': False,
                  'swap': True,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (16,
                 {'block_n': 64,
                  'block_t': 16,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': False,
                  'swap': True,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (64,
                 {'block_n': 128,
                  'block_t': 64,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': False,
                  'swap': False,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (128,
                 {'block_n': 128,
                  'block_t': 64,
                  'num_warps': 4,
                  'num_stages': 4,
                  'split': False,
                  'swap': False,
                  'group_t': 8,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False}),
                (4096,
                 {'block_n': 128,
                  'block_t': 128,
                  'num_warps': 8,
                  'num_stages': 4,
                  'split': False,
                  'swap': False,
                  'group_t': 16,
                  'pipe': False,
                  'tma': True,
                  'fused_q': False,
                  'gluon': True,
                  'producer': True})),
 (16384, 4096): ((1,
                  {'block_n': 64,
                   'block_t': 16,
                   'num_warps': 4,
                   'num_stages': 4,
                   'split': False,
                   'swap': True,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False}),
                 (16,
                  {'block_n': 64,
                   'block_t': 16,
                   'num_warps': 4,
                   'num_stages': 4,
                   'split': False,
                   'swap': True,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False}),
                 (64,
                  {'block_n': 128,
                   'block_t': 64,
                   'num_warps': 4,
                   'num_stages': 4,
                   'split': False,
                   'swap': False,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False}),
                 (128,
                  {'block_n': 128,
                   'block_t': 64,
                   'num_warps': 4,
                   'num_stages': 4,
                   'split': False,
                   'swap': False,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False}),
                 (4096,
                  {'block_n': 192,
                   'block_t': 128,
                   'num_warps': 8,
                   'num_stages': 3,
                   'split': False,
                   'swap': False,
                   'group_t': 16,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False,
                   'gluon': True,
                   'producer': True})),
 (65536, 1536): ((1,
                  {'block_n': 64,
                   'block_t': 16,
                   'num_warps': 4,
                   'num_stages': 6,
                   'split': True,
                   'swap': True,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False}),
                 (16,
                  {'block_n': 64,
                   'block_t': 16,
                   'num_warps': 4,
                   'num_stages': 6,
                   'split': True,
                   'swap': True,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False}),
                 (64,
                  {'block_n': 128,
                   'block_t': 64,
                   'num_warps': 4,
                   'num_stages': 4,
                   'split': True,
                   'swap': False,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False}),
                 (128,
                  {'block_n': 128,
                   'block_t': 64,
                   'num_warps': 4,
                   'num_stages': 4,
                   'split': False,
                   'swap': False,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False}),
                 (4096,
                  {'block_n': 192,
                   'block_t': 128,
                   'num_warps': 8,
                   'num_stages': 3,
                   'split': False,
                   'swap': False,
                   'group_t': 8,
                   'pipe': False,
                   'tma': True,
                   'fused_q': False,
                   'gluon': True,
                   'producer': True,
                   'dual': True}))}
# ---- end TABLE


def lookup(m: int, n: int, k: int, table: dict | None = None) -> dict | None:
    """The config of (N, K) at M's bucket, or None when (N, K) has no entry."""
    entries = (TABLE if table is None else table).get((n, k))
    if not entries:
        return None
    for m_max, cfg in entries:
        if m <= m_max:
            return cfg
    return entries[-1][1]


def _cfg(bn: int, bt: int, warps: int, stages: int, split: bool, swap: bool = True, group_t: int = 8,
         pipe: bool = False, tma: bool = False, ws: bool = False, reduce: str = "kernel") -> dict:
    return {"block_n": bn, "block_t": bt, "num_warps": warps, "num_stages": stages, "split": split, "swap": swap,
            "group_t": group_t, "pipe": pipe, "tma": tma, "fused_q": False, "ws": ws, "reduce": reduce,
            "gluon": False, "persistent": False, "acc3": False, "producer": False, "dual": False}


def _tk(bn: int, bt: int, warps: int, stages: int, swap: bool = True, tma: bool = True) -> dict:
    """A split config whose chunk partials the last program of each output tile reduces (one launch)."""
    return _cfg(bn, bt, warps, stages, True, swap=swap, tma=tma, reduce="ticket")


def _ws(bn: int, stages: int, split: bool, group_t: int = 8) -> dict:
    """Token-major bn x 128 tokens, TMA loads, the group loop warp-specialized (num_warps 4 -> 12 warps on sm_90:
    a TMA producer warpgroup and two math warpgroups of 64 tokens; CompileKey.ws)."""
    return _cfg(bn, 128, 4, stages, split, swap=False, group_t=group_t, tma=True, ws=True)


def candidates(m: int) -> list[dict]:
    """The configs the sweep times at M (swap: weights on the wgmma's M side, tokens its N; tok: tokens the
    M side; tma: tensor-descriptor loads, which free the address registers: 158 instead of 209 at 128 x 128
    split on the sm_90a compile). Decode sizes: 64 weight rows x 16..64 tokens, split-K or not, pipeline
    depth, the software-pipelined loop; batches: the token-major 128 x 128 / 64 x 128 tiles (a token's scale
    along the wgmma's M, as DeepGEMM has it), split-K (one accumulator per program: see
    gemm_fp8_block.constexprs), raster groups, beside the heuristic's swapped 128 x 64. The first entry of
    each bucket is the heuristic's choice. Tiles that spill on the sm_90a compile (BN 256, pipe with two
    accumulators) are left out; the sweep refuses any spilling config anyway. No ws candidates: the
    warp-specialized group loop (_ws, CompileKey.ws) compiles for sm_90a but gave no result on an H200 (a bits
    test of 5 launches silent for 60 s, twice; the M = 128 / 4096 sweep with ws candidates silent for 230 s), so
    launches refuse it unless NVFP4V_FP8_WS_EXPERIMENT=1 (gemm_fp8_block.WS_EXPERIMENT_ENV).
    reduce="ticket" (_tk): the split configs of the launch-bound sizes (small N at M <= 64) in one launch, the
    chunk partials reduced by each output tile's last program; with pointer loads at M <= 16 too, the tile
    the fused quantizer (fused_q, pointer loads) takes, so quantize + GEMM + reduce can be one launch."""
    if m <= 16:
        return [_cfg(64, 16, 4, 4, True), _cfg(64, 16, 4, 4, False), _cfg(64, 16, 4, 3, True),
                _cfg(64, 16, 4, 4, True, tma=True), _cfg(64, 16, 4, 4, False, tma=True), _cfg(64, 16, 4, 6, True, tma=True),
                _cfg(64, 16, 4, 4, True, pipe=True, tma=True), _cfg(128, 16, 8, 4, True, tma=True),
                _tk(64, 16, 4, 4), _tk(64, 16, 4, 4, tma=False), _tk(64, 16, 4, 6)]
    if m <= 32:
        return [_cfg(64, 32, 4, 4, True), _cfg(64, 32, 4, 4, True, tma=True), _cfg(64, 32, 4, 4, False, tma=True),
                _cfg(64, 16, 4, 4, True, tma=True), _cfg(64, 32, 4, 4, True, pipe=True, tma=True), _tk(64, 32, 4, 4)]
    if m <= 64:
        return [_cfg(64, 64, 4, 4, True), _cfg(64, 64, 4, 4, False), _cfg(64, 64, 4, 4, True, tma=True),
                _cfg(64, 64, 4, 6, True, tma=True), _cfg(64, 32, 4, 4, True, tma=True), _cfg(128, 64, 8, 4, True, tma=True),
                _cfg(64, 64, 4, 4, True, pipe=True, tma=True), _cfg(128, 64, 4, 4, True, swap=False, tma=True),
                _cfg(128, 64, 4, 4, False, swap=False, tma=True), _tk(128, 64, 4, 4, swap=False), _tk(64, 64, 4, 4)]
    if m <= 256:
        return [_cfg(128, 64, 8, 4, True), _cfg(128, 64, 8, 4, False), _cfg(128, 64, 8, 4, True, tma=True),
                _cfg(128, 64, 8, 4, True, pipe=True, tma=True), _cfg(128, 128, 8, 4, True, swap=False),
                _cfg(128, 128, 8, 4, True, swap=False, tma=True), _cfg(128, 128, 8, 4, False, swap=False, tma=True),
                _cfg(128, 128, 8, 4, True, swap=False, pipe=True, tma=True),
                _cfg(128, 64, 4, 4, True, swap=False, tma=True), _cfg(128, 64, 4, 4, False, swap=False, tma=True),
                _tk(128, 64, 4, 4, swap=False), _tk(128, 128, 8, 4, swap=False)]
    return [_cfg(128, 64, 8, 4, False), _cfg(128, 128, 8, 4, False, swap=False),
            _cfg(128, 128, 8, 4, False, swap=False, tma=True), _cfg(128, 128, 8, 3, False, swap=False, tma=True),
            _cfg(128, 128, 8, 5, False, swap=False, tma=True), _cfg(128, 128, 8, 4, False, swap=False, group_t=16, tma=True),
            _cfg(128, 128, 8, 4, True, swap=False, tma=True), _cfg(128, 128, 8, 4, True, swap=False, pipe=True, tma=True),
            _cfg(128, 128, 8, 3, True, swap=False, pipe=True, tma=True),
            _cfg(128, 64, 4, 4, True, swap=False, tma=True),
            _tk(128, 128, 8, 4, swap=False)]


def _check_config(cfg: dict, where: str) -> dict:
    """cfg's FIELDS in order, a missing field of DEFAULTS filled with its default (an older sweep's winner)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: config must be a dict, got {type(cfg).__name__}")
    missing = [f for f in FIELDS if f not in cfg and f not in DEFAULTS]
    if missing:
        raise ValueError(f"{where}: config lacks {missing}")
    return {f: cfg.get(f, DEFAULTS.get(f)) for f in FIELDS}


def merged_table(table: dict, winners: list[dict]) -> dict:
    """table with the sweep's winners ({"N", "K", "M", "config"}, M the bucket's m_max) merged in."""
    out = {key: dict(entries) for key, entries in table.items()}
    for i, w in enumerate(winners):
        try:
            n, k, m = int(w["N"]), int(w["K"]), int(w["M"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"winners[{i}]: expected N, K, M and config, got {w}") from exc
        out.setdefault((n, k), {})[m] = _check_config(w["config"], f"winners[{i}] (N={n}, K={k}, M={m})")
    return {key: tuple(sorted(buckets.items())) for key, buckets in sorted(out.items())}


def compact(cfg: dict) -> dict:
    """cfg without the DEFAULTS-valued fields (what the table file holds: a field left out means its default, as
    _check_config and CompileKey.from_config read it)."""
    return {f: v for f, v in cfg.items() if f not in DEFAULTS or v != DEFAULTS[f]}


def _compact_table(table: dict) -> dict:
    return {key: tuple((m, compact(cfg)) for m, cfg in entries) for key, entries in table.items()}


def _write(path: Path, table: dict, device: str) -> None:
    table = _compact_table(table)
    text = path.read_text()
    start, end = "# ---- TABLE (written by --from-json; edit by hand only to remove an entry)\n", "# ---- end TABLE\n"
    i, j = text.index(start) + len(start), text.index(end)
    body = (f"# device: {device}\n"
            f"TABLE: dict[tuple[int, int], tuple[tuple[int, dict], ...]] = "
            f"{pprint.pformat(table, width=116, sort_dicts=False)}\n")
    path.write_text(text[:i] + body + text[j:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from-json", required=True, help="the sweep's sm90_fp8_sweep.json")
    ap.add_argument("--table-file", default=__file__, help="the module to rewrite (default: this one)")
    args = ap.parse_args(argv)
    try:
        data = json.loads(Path(args.from_json).read_text())
        winners = data["winners"]
        device = str(data.get("device", "unknown"))
        new = merged_table(TABLE, winners)
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
        print(f"--from-json {args.from_json}: {exc}", file=sys.stderr)
        return 2
    old = _compact_table(TABLE)
    for key, entries in _compact_table(new).items():
        if old.get(key) != entries:
            print(f"N={key[0]} K={key[1]}: " + "; ".join(f"M<={m} {cfg}" for m, cfg in entries))
    _write(Path(args.table_file), new, device)
    print(f"wrote {len(new)} shapes to {args.table_file} (device {device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
