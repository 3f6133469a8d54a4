"""The Gluon FP8 block-scaled GEMM (CompileKey.gluon, kernels.sm90._gemm_fp8_block_gluon) on the CPU: every key
the sweep may commit compiles for sm_90a (Triton's bundled ptxas) without spills, to the E4M3 wgmma fed by the
tensor copy engine, with the odd group's wgmma in flight while the even one is promoted (in the SASS: DEPBAR 0x1;
no ptxas serialization warning), and with the promotion contracted exactly as the Triton kernel's (same bits:
mul.f32 for the scale product, fma.rn.f32 of dot, scale and sum, add.f32 at a chunk's end); the key's rules, its
config round trip and the routing (no Gluon under the interpreter, pointer loads where TMA cannot take the
operands, the fused quantizer on the Triton kernel).
GPU bits (Gluon = Triton for the same chunk plan) and graph replay: test_sm90_fp8_gemm.py, marker gpu.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton: not installed (the sm90 kernels need it)")

from kernels.sm90._consts import SMEM_BLOCK_MAX  # noqa: E402
from kernels.sm90.gemm_fp8_block import (  # noqa: E402
    WIDE_BN, CompileKey, fused_key, gluon_constexprs, gluon_operand_layouts, launch_warps)
from verify.tests._fp8_sweep import V4_PRO_FP8, _gl, _gl3, _glw, candidates, shape_candidates  # noqa: E402
from verify.tests._sass import (  # noqa: E402
    _cuobjdump, ptxas_log, registers_without_spills, wgmma_depbars, wgmma_serialization_warnings)

REPO = Path(__file__).resolve().parents[2]
_SMEM_MAX = SMEM_BLOCK_MAX  # the H100's / H200's opt-in shared memory per block (227 KB)
# wo_b (3 chunks of 43 groups), wq_b (one chunk), wkv (28 chunks of 2 groups), a partial K (576)
_SHAPES = [(7168, 16384), (65536, 1536), (512, 7168), (7168, 576)]
V4_PRO_FP8_SHAPES = [(n, k) for _, n, k in V4_PRO_FP8]


def _keys() -> list[CompileKey]:
    """Every Gluon sweep candidate at the shapes above and both activation-scale modes, and every Gluon key the
    committed table routes a V4-Pro FP8 linear to (M = 128, 200, 4096), one per code layout."""
    keys = {CompileKey.from_config(n, k, c, act_scale_ue8m0=ue8m0) for m in (128, 4096) for n, k in _SHAPES
            for c in shape_candidates(m, n, k) if c.get("gluon") for ue8m0 in (True, False)}
    keys |= {key for m in (128, 200, 4096) for n, k in V4_PRO_FP8_SHAPES for ue8m0 in (True, False)
             if (key := CompileKey.for_shape(m, n, k, act_scale_ue8m0=ue8m0)).gluon}
    by_layout = {}
    for key in sorted(keys, key=str):
        by_layout.setdefault((key.block_n, key.block_t, key.num_stages, key.split, key.chunked, key.even_k,
                              key.act_scale_ue8m0, key.persistent, key.acc3, key.producer, key.dual), key)
    return list(by_layout.values())


def _compile(key: CompileKey, every_int_aligned: bool = False):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernels.sm90 import _gemm_fp8_block_gluon as gluon_kernels

    wide = key.block_n == WIDE_BN
    kernel = (gluon_kernels.gemm_fp8_block_gluon_persistent_kernel if key.persistent
              else gluon_kernels.gemm_fp8_block_gluon_acc3_kernel if key.acc3
              else gluon_kernels.gemm_fp8_block_gluon_dual_kernel if key.dual
              else gluon_kernels.gemm_fp8_block_gluon_wide_kernel if wide
              else gluon_kernels.gemm_fp8_block_gluon_producer_kernel if key.producer
              else gluon_kernels.gemm_fp8_block_gluon_kernel)

    w_layout, a_layout = gluon_operand_layouts(key)
    # the 192-wide tile: two descriptors of the weights, its 128-row and 64-row pieces
    w_descs = {"w_desc": 128, "v_desc": 64} if wide else {"w_desc": key.block_n}
    sig = {**{name: f"tensordesc<fp8e4nv[{rows}, 128],{w_layout!r}>" for name, rows in w_descs.items()},
           "a_desc": f"tensordesc<fp8e4nv[{64 if key.dual else key.block_t}, 128],{a_layout!r}>", "ws_ptr": "*fp32",
           "as_ptr": "*u8" if key.act_scale_ue8m0 else "*fp32", "out_ptr": "*fp32" if key.split else "*bf16",
           "M": "i32", "N": "i32", "G": "i32", "stride_as": "i32", "stride_om": "i32"}
    if not key.persistent:
        sig["stride_oc"] = "i32"
    const = gluon_constexprs(key)
    sig.update({name: "constexpr" for name in const})
    index = kernel.arg_names.index
    aligned = ["ws_ptr", "as_ptr", "out_ptr", "N", "stride_om"]  # torch allocations, V4 shapes
    if every_int_aligned:  # as a launch at M = 4096 specializes it: M, G, the scales' row stride, the chunk stride too
        aligned += ["M", "G", "stride_as"] + ([] if key.persistent else ["stride_oc"])
    attrs = {(index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = GluonASTSource(kernel, sig, {(index(n),): v for n, v in const.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": launch_warps(key)})


def _promotion_ops(ptx: str) -> tuple[int, int, int]:
    """(fma.rn.f32, mul.f32, add.f32) instructions in a PTX listing."""
    return (len(re.findall(r"\bfma\.rn\.f32\b", ptx)), len(re.findall(r"\bmul\.(?:rn\.)?f32\b", ptx)),
            len(re.findall(r"\badd\.(?:rn\.)?f32\b", ptx)))


@pytest.mark.parametrize("key", _keys(), ids=lambda key: f"bm{key.block_t}-bn{key.block_n}-s{key.num_stages}-"
                         f"{'split' if key.split else 'pass'}-{'chunked' if key.chunked else 'one'}"
                         f"{'' if key.even_k else '-partialk'}-{'ue8m0' if key.act_scale_ue8m0 else 'f32'}"
                         f"{'-persistent' if key.persistent else ''}{'-acc3' if key.acc3 else ''}"
                         f"{'-producer' if key.producer else ''}{'-wide' if key.block_n == WIDE_BN else ''}"
                         f"{'-dual' if key.dual else ''}")
def test_gluon_compiles_to_fp8_wgmma_tma_ring_without_spills(key, tmp_path):
    ck = _compile(key)
    regs = registers_without_spills(ck.asm["cubin"], tmp_path, str(key))
    sass = _cuobjdump(ck.asm["cubin"], tmp_path, "-sass")
    wide = key.block_n == WIDE_BN  # a 128-row and a 64-row weight piece: a wgmma each, 4 QGMMA (K 128) a group each
    # the 192-wide tile's two-group loop: totals in shared memory and UE8M0 token scales (elsewhere it spills)
    pairs = wide and key.chunked and not key.split and key.act_scale_ue8m0 and not key.dual
    # dual: the wide consumer's code twice (a partition each, 64 tokens), the token tile as two TMA blocks
    copies = 2 if key.dual else 1
    shapes = set(re.findall(r"QGMMA\.64x(\d+)x32\.F32\.E4M3\.E4M3", sass))
    want = {"128", "64"} if wide else {str(key.block_n)}
    assert shapes == want, f"{key}: QGMMA shapes {sorted(shapes)} (expected 64 x {sorted(want)} x 32 E4M3)"
    assert not re.search(r"\bHMMA\b", sass), f"{key}: an mma.sync (HMMA) in the SASS"
    # operands by the copy engine: the ring's prologue (NS stages x 2 operands) and the refill in the loop (left
    # out by the compiler where a split program's chunk has no more groups than stages)
    utmaldg = len(re.findall(r"\bUTMALDG\b", sass))
    n_max = key.chunk_blocks if key.split else key.groups  # the most groups a program sums
    want = 3 if wide else 2 if key.producer else 2 * key.num_stages + 2 if n_max > key.num_stages else 2 * n_max
    assert utmaldg >= want, f"{key}: {utmaldg} UTMALDG (expected >= {want})"
    assert ck.metadata.shared <= _SMEM_MAX, f"{key}: {ck.metadata.shared} bytes of shared memory"
    ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
    if key.producer:
        # warp-specialized: the math warps and one producer warp (a warpgroup of 4 allocated), registers moved from the
        # producer to the math warps (setmaxnreg), the producer's loads alone in the SASS (2 UTMALDG: its one loop);
        # a stage released by one thread of the math warps (one mbarrier.arrive per retire site, predicated) after a
        # barrier of the math warps only (bar.sync 0, 32 x their warps)
        assert ck.metadata.num_warps == key.block_t // 16 + 4, (key, ck.metadata.num_warps)
        assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+\d+", ptx), key
        assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+\d+", ptx), key
        # wide: the token block (dual: two) and both weight pieces
        assert utmaldg == (3 + key.dual if wide else 2), (key, utmaldg)
        releases = re.findall(r"(@%p\d+)?\s*mbarrier\.arrive\.shared::cta\.b64", ptx)
        # wide: 3 with the two-group loop (chunked: two in the loop, an odd count's last group), else 1
        assert len(releases) == copies * (3 if pairs or not wide else 1) and all(releases), (key, releases)
        if wide:
            # a group's two wgmmas issued back to back (no CTA barrier between them: a second wait on the stage's
            # ready barrier put one there): the 128-row piece's 4 QGMMA then the 64-row piece's 4, in the one-group
            # body (the loop, or the two-group loop's odd tail) and the two-group loop's first group
            issue = re.findall(r"QGMMA\.64x(\d+)x32|(BAR\.SYNC)|(SYNCS\.PHASECHK)", sass)
            seq = "".join("W" if q == "128" else "V" if q == "64" else "|" for q, _, _ in issue)
            assert seq.count("WWWWVVVV") == copies * (2 if pairs else 1), (key, seq)
        if key.dual:
            # 168 at launch; in the partitions both consumers at 240 (the worker raised, the default lowered from the
            # 256 it leaves with), the producer warp 24: 128 x (240 + 240 + 24) = 64512 of the 65536 registers; each
            # consumer's barrier its own 128 threads (two named barriers, none across both warpgroups), each stage's
            # empty barrier waits for 2 releases
            moved = set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))
            assert re.search(r"\.maxnreg\s+168\b", ptx) and {("inc", "240"), ("dec", "240"), ("dec", "24")} <= moved, (
                key, moved)
            named = set(re.findall(r"bar\.sync\s+(\d+),\s*(\d+)\s*;", ptx))
            assert {c for _, c in named} == {"128"} and len({b for b, _ in named}) == 2, (key, named)
            assert re.search(r"mbarrier\.init\.shared::cta\.b64 \[%r\d+\], 2;", ptx), key
        elif wide:  # 168 at launch (12 warps), the math warps raised to 240 (96 + 96 tile registers), the producer 40
            assert re.search(r"\.maxnreg\s+168\b", ptx), key
            assert {("inc", "240"), ("inc", "40"), ("dec", "24")} <= set(
                re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)), key
        assert key.dual or re.search(rf"bar\.sync\s+0,\s*{32 * key.block_t // 16}\s*;", ptx), key
    else:
        assert ck.metadata.num_warps == key.block_t // 16 and "setmaxnreg" not in ptx, key  # not specialized
    # no promotion inside the wgmma chain (the Triton kernel's setting: 2^30 on sm_90), asynchronous wgmma with one
    # group left in flight while the previous one is promoted
    assert set(re.findall(r"maxNumImpreciseAcc = (\d+)", ttgir)) == {str(2**30)}, key
    # ... and the SASS keeps it so: ptxas neither serializes the wgmma nor injects waits (C7514 / C7517, which a
    # PTX wait_group 1 does not rule out), and the two-group loop waits for its even group with the odd group's
    # wgmma in flight (one DEPBAR 0x1), then for both (0x0), the odd count's last group (0x0)
    warnings = wgmma_serialization_warnings(ptxas_log(ptx, tmp_path))
    assert not warnings, f"{key}: ptxas serializes the wgmma: {warnings}"
    depbars = wgmma_depbars(sass)
    if key.acc3:
        # group 0 waited for before the loop (0x0); in the loop each of the three waits but the last leaves the next
        # group's wgmma in flight (0x1 0x1, then 0x0: that group's promotion runs under the next iteration's first
        # wgmma); the tail of two groups (0x1 0x0: folded away where a split chunk has 2 groups) and of one (0x0)
        want = [0, 1, 1, 0] + ([1, 0] if n_max >= 3 else []) + [0]
        assert depbars == want, f"{key}: DEPBAR counts {depbars} (expected {want})"
    elif wide:
        # chunked: the two-group loop (W(i) promoted under V(i), V(i) under W(i + 1), W(i + 1) under V(i + 1): 0x1 three
        # times, then 0x0), an odd count's last group (0x1 0x0); else one group an iteration (0x1 0x0)
        want = ([1, 1, 1, 0, 1, 0] if pairs else [1, 0]) * copies
        assert depbars == want, f"{key}: DEPBAR counts {depbars} (expected {want})"
    else:  # the two-accumulator loop (the producer kernel's too)
        assert depbars == [1, 0, 0], f"{key}: DEPBAR counts {depbars} (expected 0x1 0x0 in the loop, 0x0 after it)"
    # the promotion contracted as in the Triton kernel (mul for sa * sw, one fma per element, one add per element at
    # a chunk's end): three times, the loop's two groups and the odd count's last group (the persistent kernel: its
    # bf16 store three times too, one per promotion); acc3: seven times (the loop's three, the two-group tail's two,
    # the one-group tail's one, the last group; five where the two-group tail is folded away)
    per_thread = key.block_t * key.block_n // (32 * key.num_warps)
    rows = 2  # token rows per thread in the wgmma accumulator layout (lane / 4 and lane / 4 + 8 of its warp's 16)
    fma, mul, add = _promotion_ops(ptx)
    chunk_add = key.chunked and not key.split
    # wide: one site a piece (the loop's one group), sa * sw per row and piece (its own weight-scale block)
    sites = (7 if n_max >= 3 else 5) if key.acc3 else (3 if pairs else 1) if wide else 3
    sites *= copies
    want = (sites * per_thread, sites * rows * (2 if wide else 1), sites * per_thread if chunk_add else 0)
    assert (fma, mul, add) == want, (key, fma, mul, add)
    stores = len(re.findall(r"\bst\.global", ptx))
    # the output tile's stores: bf16 pairs (split: float32 partials one by one)
    want = (per_thread if key.split else per_thread // 2) * (3 if key.persistent else 1) * copies
    assert stores == want, (key, stores, want)
    qgmma = len(re.findall(r"\bQGMMA\b", sass))
    moved = re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)  # the producer kernel's
    moved = f", setmaxnreg {moved}" if moved else ""
    print(f"{key.config()} chunked={key.chunked} even_k={key.even_k} ue8m0={key.act_scale_ue8m0}: {regs} registers, "
          f"{ck.metadata.shared} B shared, {qgmma} QGMMA, {utmaldg} UTMALDG, DEPBAR {depbars}{moved}")


@pytest.mark.parametrize("ue8m0", [True, False], ids=["ue8m0", "f32"])
@pytest.mark.parametrize("n,k", V4_PRO_FP8_SHAPES, ids=lambda v: str(v))
def test_gluon_wide_tile_has_no_spills_at_every_v4_pro_shape(n, k, ue8m0, tmp_path):
    """The 128 x 192 producer tile sits at the register limit (96 accumulator + 96 sum registers a math thread under
    setmaxnreg 240; spills seen while writing it came and went with the chunk plan and the scale type: 4-8 bytes at
    wo_a / shared_l2 with float32 scales): its 3-stage configs, split (M's 128 bucket) and one pass (4096), compile
    without spills at every V4-Pro FP8 shape and both activation-scale modes (the test above covers one key per code
    layout)."""
    from verify.tests._fp8_sweep import _glw

    for cfg in (_glw(WIDE_BN, 128, 3, True), _glw(WIDE_BN, 128, 3, False)):
        key = CompileKey.from_config(n, k, cfg, act_scale_ue8m0=ue8m0)
        registers_without_spills(_compile(key).asm["cubin"], tmp_path, str(key))


@pytest.mark.parametrize("ue8m0", [True, False], ids=["ue8m0", "f32"])
@pytest.mark.parametrize("n,k", [(16384, 4096), (7168, 16384), (3072, 7168), (7168, 7168), (65536, 1536)],
                         ids=lambda v: str(v))
def test_gluon_dual_tile_has_no_spills_as_launched_at_m_4096(n, k, ue8m0, tmp_path):
    """The dual keys (the 192-wide tile's warpgroups as partitions, 3 stages, one pass: M's 4096 bucket) compiled as
    a launch at M = 4096 specializes them (every integer argument divisible by 16): no spills at the V4-Pro shapes the
    sweep times them on, both activation-scale modes. (With the two-group loop, or 224 registers for the default
    partition, ptxas kept one register across the K loop in 8 bytes of stack here, while the partly aligned compile of
    the test above showed none.)"""
    key = CompileKey.from_config(n, k, {**_glw(WIDE_BN, 128, 3, False), "dual": True}, act_scale_ue8m0=ue8m0)
    registers_without_spills(_compile(key, every_int_aligned=True).asm["cubin"], tmp_path, str(key))


@pytest.mark.parametrize("split", [False, True])
def test_triton_kernel_contracts_the_promotion_the_same_way(split):
    """The reference the Gluon kernel's bits are held to: the Triton kernel's token-major TMA tile contracts
    d * sigma + sum into one fma.rn.f32 per element (mul.f32 only for sa * sw, add.f32 only at a chunk's end), the
    operations the Gluon kernel spells out (test above); maxNumImpreciseAcc 2^30 on both."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_sm90_fp8_compile import _compile as triton_compile
    finally:
        sys.path.pop(0)
    key = CompileKey.from_config(7168, 16384, {**_gl(128, 128, 4, split), "gluon": False, "num_warps": 8},
                                 act_scale_ue8m0=True)
    ck = triton_compile(key)
    per_thread = 128 * 128 // 256
    fma, mul, add = _promotion_ops(ck.asm["ptx"])
    assert (fma, mul, add) == (per_thread, 2, 0 if split else per_thread), (fma, mul, add)
    assert set(re.findall(r"maxNumImpreciseAcc = (\d+)", ck.asm["ttgir"])) == {str(2**30)}


def test_gluon_key_rules_and_config_round_trip():
    base = _gl(128, 128, 4, False)
    for n, k in V4_PRO_FP8_SHAPES:
        for cfg in (c for m in (128, 4096) for c in shape_candidates(m, n, k) if c.get("gluon")):
            key = CompileKey.from_config(n, k, cfg, act_scale_ue8m0=True)
            assert key.gluon and not key.swap and key.tma and key.num_warps == key.block_t // 16
            assert CompileKey.from_config(n, k, key.config(), act_scale_ue8m0=True) == key
    for bad in ({"swap": True}, {"tma": False}, {"pipe": True}, {"num_warps": 4}, {"block_t": 32, "num_warps": 2},
                {"block_n": 256}, {"num_stages": 1}, {"split": True, "reduce": "ticket"}):
        with pytest.raises(ValueError, match="gluon needs"):
            CompileKey.from_config(7168, 16384, {**base, **bad}, act_scale_ue8m0=True)
    for bad in ({"split": True}, {"gluon": False, "num_warps": 8}):
        with pytest.raises(ValueError, match="persistent needs"):
            CompileKey.from_config(7168, 16384, {**base, "persistent": True, **bad}, act_scale_ue8m0=True)
    # acc3: the two-accumulator Gluon kernel's rules, plus not persistent and 64 weight rows (128 spills)
    for bad in ({"persistent": True}, {"acc3": True, "block_n": 64}, {"gluon": False, "num_warps": 8}):
        with pytest.raises(ValueError, match="producer needs"):
            CompileKey.from_config(7168, 16384, {**_glw(128, 128, 4, False), **bad}, act_scale_ue8m0=True)
    for m in (128, 4096):
        assert [c for c in candidates(m) if c.get("producer")], m
    # block_n 192: the producer-warp kernel's wide tile only, 128 tokens, its shared memory within 227 KB
    wide = _glw(WIDE_BN, 128, 3, False)
    assert CompileKey.from_config(7168, 16384, wide, act_scale_ue8m0=True).block_n == WIDE_BN
    assert CompileKey.from_config(65536, 1536, {**wide, "num_stages": 5}, act_scale_ue8m0=True).num_stages == 5
    assert CompileKey.from_config(7168, 16384, {**wide, "num_stages": 5, "split": True}, act_scale_ue8m0=True).split
    for bad in ({"producer": False}, {"gluon": False, "num_warps": 8}, {"acc3": True}, {"persistent": True},
                {"block_t": 64, "num_warps": 4}, {"swap": True}):
        with pytest.raises(ValueError, match="block_n=192 needs gluon and producer") as err:
            CompileKey.from_config(7168, 16384, {**wide, **bad}, act_scale_ue8m0=True)
    # dual: the 192-wide tile's warpgroups as partitions; other widths refused, the field round-trips
    dual = CompileKey.from_config(7168, 16384, {**wide, "dual": True}, act_scale_ue8m0=True)
    assert dual.dual and CompileKey.from_config(7168, 16384, dual.config(), act_scale_ue8m0=True) == dual
    assert not CompileKey.from_config(7168, 16384, wide, act_scale_ue8m0=True).dual  # absent: the default
    with pytest.raises(ValueError, match="dual needs block_n=192"):
        CompileKey.from_config(7168, 16384, {**_glw(128, 128, 4, False), "dual": True}, act_scale_ue8m0=True)
        assert "\n" not in str(err.value)
    for n, k, stages in ((7168, 16384, 4), (65536, 1536, 6)):  # chunked: totals 96 KB; one chunk: the ring alone
        with pytest.raises(ValueError, match="bytes of shared memory"):
            CompileKey.from_config(n, k, {**wide, "num_stages": stages}, act_scale_ue8m0=True)
    with pytest.raises(ValueError, match="must divide 128"):
        CompileKey.from_config(7168, 16384, {**base, "gluon": False, "num_warps": 8, "block_n": 96},
                               act_scale_ue8m0=True)
    for m in (128, 4096):
        wides = [c for c in candidates(m) if c["block_n"] == WIDE_BN]
        assert wides and all(c["producer"] and c["block_t"] == 128 for c in wides), m
        assert shape_candidates(m, 65536, 1536) == candidates(m)
    # a 4- or 5-stage one-pass wide config does not fit a chunked plan: left out there, kept where one chunk
    left_out = [c for c in candidates(4096) if c not in shape_candidates(4096, 7168, 16384)]
    assert left_out and all(c["block_n"] == WIDE_BN and c["num_stages"] > 3 for c in left_out), left_out
    acc3 = _gl3(128, 4, False)
    assert CompileKey.from_config(7168, 16384, acc3, act_scale_ue8m0=True).acc3
    for bad in ({"block_n": 128}, {"persistent": True}, {"gluon": False, "num_warps": 8}):
        with pytest.raises(ValueError, match="acc3 needs"):
            CompileKey.from_config(7168, 16384, {**acc3, **bad}, act_scale_ue8m0=True)
    for m in (128, 4096):
        acc3s = [c for c in candidates(m) if c.get("acc3")]
        assert acc3s and all(c["gluon"] and c["block_n"] == 64 and not c["persistent"] for c in acc3s), (m, acc3s)
    assert not [c for c in candidates(64) if c.get("acc3")]
    assert [c for c in candidates(4096) if c.get("persistent")] and not [c for c in candidates(128)
                                                                        if c.get("persistent")]
    # the fused quantizer runs on the Triton kernel (pointer loads of the unquantized activation)
    key = CompileKey.from_config(7168, 16384, base, act_scale_ue8m0=True)
    fk = fused_key(key, scale_rule="ue8m0_ceil")
    assert fk.fused_q and not fk.gluon and not fk.tma
    # the sweep offers Gluon tiles at M >= 128 only
    assert not [c for m in (1, 16, 32, 64) for c in candidates(m) if c.get("gluon")]
    assert all([c for c in candidates(m) if c.get("gluon")] for m in (128, 256, 4096))


_CPU_SCRIPT = r"""
import json, sys
import torch
from kernels.sm90 import gemm_fp8_block, quantize_fp8_1x128
from kernels.sm90.gemm_fp8_block import CompileKey
from verify.tests._fp8_sweep import _gl, _gl3, _glp, _glw
n, k = 192, 576  # (the 192-wide tile: one tile, 5 chunks)
g = torch.Generator().manual_seed(5)
x = (torch.randn(130, k, generator=g) * 3).to(torch.bfloat16)
w = torch.randn(n, k, generator=g).clamp_(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
w_dec = torch.ldexp(torch.ones(2, 5), torch.randint(-9, -5, (2, 5), generator=g)).contiguous()
out = {}
for rule in ("ue8m0_ceil", "f32"):
    a, sa = quantize_fp8_1x128.launch(x, scale_rule=rule)
    ue8m0 = rule == "ue8m0_ceil"
    ref = gemm_fp8_block.launch(a, sa, w, w_dec, key=CompileKey.heuristic(130, n, k, act_scale_ue8m0=ue8m0))
    for split, cfg in ((False, _gl(128, 128, 3, False)), (True, _gl(128, 128, 3, True)), ("p", _glp(128, 128, 3)),
                       ("a3", _gl3(128, 3, True)), ("w", _glw(128, 128, 3, False)), ("w192", _glw(192, 128, 3, False))):
        key = CompileKey.from_config(n, k, cfg, act_scale_ue8m0=ue8m0)
        y = gemm_fp8_block.launch(a, sa, w, w_dec, key=key)
        tri = gemm_fp8_block.launch(a, sa, w, w_dec, key=gemm_fp8_block.triton_tile(key))
        out[f"{rule}-{split}"] = [bool(torch.equal(y.view(torch.int16), ref.view(torch.int16))),
                                  bool(torch.equal(tri.view(torch.int16), ref.view(torch.int16))),
                                  bool((ref != 0).any()), key.gluon, key.chunked, key.split, key.persistent, key.acc3,
                                  key.producer]
json.dump(out, open(sys.argv[1], "w"))
"""


def test_gluon_key_under_the_interpreter_runs_the_triton_tile(tmp_path):
    """There is no Gluon interpreter: launch() runs a Gluon key's tile on the Triton kernel there (the same
    operations, so the same bits: the heuristic's output at M = 130, N 192, K 576, 5 chunks, split, not split,
    persistent, the three-accumulator loop split and the producer-warp kernel, 128 and 192 weight rows: the 192-wide
    tile runs as 64-row Triton tiles)."""
    out = tmp_path / "gluon_interp.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _CPU_SCRIPT, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads(out.read_text())
    tags = ("False", "True", "a3", "p", "w", "w192")
    assert sorted(rep) == [f"{r}-{s}" for r in ("f32", "ue8m0_ceil") for s in tags], rep
    for tag, (gluon_eq, triton_eq, nonzero, gluon, chunked, split, persistent, acc3, producer) in rep.items():
        assert gluon and chunked and split == tag.endswith(("True", "a3")), (tag, rep[tag])
        assert persistent == tag.endswith("p") and acc3 == tag.endswith("a3"), (tag, rep[tag])
        assert producer == tag.endswith(("w", "w192")), (tag, rep[tag])
        assert nonzero and gluon_eq and triton_eq, (tag, rep[tag])


def test_gluon_falls_back_to_pointer_loads_where_tma_cannot(monkeypatch):
    """An operand TMA cannot describe (base or row stride not 16-byte aligned) sends a Gluon key to the Triton
    kernel's same tile with pointer loads (the same operands, so the same bits)."""
    import torch

    from kernels.sm90 import gemm_fp8_block

    seen = []
    monkeypatch.setattr(gemm_fp8_block, "_compile", lambda key: seen.append(key) or (lambda *a, **kw: None))
    monkeypatch.setattr(gemm_fp8_block, "_interpreting", lambda: False)
    key = CompileKey.from_config(192, 584, _gl(128, 128, 4, False), act_scale_ue8m0=True)
    a = torch.zeros(130, 584, dtype=torch.uint8)
    sa = torch.zeros(130, 5, dtype=torch.uint8)
    w = torch.zeros(192, 584, dtype=torch.uint8)
    wd = torch.ones(2, 5)
    gemm_fp8_block.launch(a, sa, w, wd, key=key, check=False)  # K 584: rows 584 bytes apart, not a multiple of 16
    assert seen == [dataclasses.replace(key, gluon=False, tma=False)], seen
    # the 192-wide producer tile: the Triton kernel's 64-row tiles (its tiles divide 128), same tokens and stages
    wide = CompileKey.from_config(192, 584, _glw(WIDE_BN, 128, 3, False), act_scale_ue8m0=True)
    gemm_fp8_block.launch(a, sa, w, wd, key=wide, check=False)
    assert seen[1] == dataclasses.replace(wide, gluon=False, tma=False, producer=False, block_n=64), seen
    assert fused_key(wide, scale_rule="ue8m0_ceil").block_n == 64
