"""The sm90 FP8 block-scaled GEMM compiles for sm_90a on any machine with triton (no GPU needed).

Every key CompileKey.for_shape routes to on the DeepSeek-V4-Pro FP8 shapes (M = 1, 16, 64, 128,
4096), and the token-major layout (swap=False) at M = 4096, is compiled for sm_90 (Triton's bundled
ptxas) and its SASS checked: no register spills, and the group dot is the FP8 wgmma
(QGMMA ...E4M3.E4M3, the tokens or weight rows on the right side), not an fp16 upcast or mma.sync.
GPU numerics are in test_sm90_fp8_gemm.py. The warp-specialized tiles (CompileKey.ws; no longer sweep
candidates and refused at launch on a device: no result on an H200) must still really be specialized when
compiled: ttg.warp_specialize in the TTGIR, setmaxnreg in the PTX, 12 warps from num_warps=4 (at num_warps=8
Triton 3.6 leaves the loop as it is: tested, hence the key's rule).
"""

from __future__ import annotations

import dataclasses
import re

import pytest

triton = pytest.importorskip("triton", reason="triton: not installed (the sm90 kernels need it)")

from kernels.sm90._consts import SMEM_BLOCK_MAX  # noqa: E402
from kernels.sm90.gemm_fp8_block import CompileKey  # noqa: E402
from kernels.sm90.gemm_fp8_block_configs import _ws, candidates  # noqa: E402
from verify.tests._sass import _cuobjdump, registers_without_spills  # noqa: E402

V4_PRO = [(1536, 7168), (65536, 1536), (512, 7168), (16384, 4096), (7168, 16384), (3072, 7168), (7168, 3072)]
_SIG = {"w_ptr": "*u8", "a_ptr": "*u8", "ws_ptr": "*fp32", "as_ptr": "*u8", "out_ptr": "*bf16", "M": "i32",
        "N": "i32", "K": "i32", "G": "i32", "stride_wn": "i32", "stride_am": "i32", "stride_as": "i32",
        "stride_om": "i32", "stride_oc": "i32"}


def _keys() -> list[CompileKey]:
    from kernels.sm90.gemm_fp8_block import fused_key

    routed = {CompileKey.for_shape(m, n, k, act_scale_ue8m0=True) for m in (1, 16, 64, 128, 4096) for n, k in V4_PRO}
    # a committed fused_q config: launch() compiles its tile unfused, linear_fp8 the fused kernel
    # (a committed Gluon config, CompileKey.gluon, is compiled by test_sm90_fp8_gluon_compile.py)
    keys = {dataclasses.replace(key, fused_q=False) for key in routed if not key.gluon}
    keys |= {fused_key(key, scale_rule="ue8m0_ceil") for key in routed if key.fused_q}
    keys |= {dataclasses.replace(CompileKey.heuristic(4096, n, k, act_scale_ue8m0=True), block_n=128, block_t=128,
                                 num_warps=8, num_stages=4, swap=False) for n, k in V4_PRO}
    keys.add(fused_key(CompileKey.heuristic(1, 7168, 16384, act_scale_ue8m0=True), scale_rule="ue8m0_ceil"))
    # the warp-specialized tiles (no longer sweep candidates: refused at launch on a device, see
    # gemm_fp8_block._refuse_ws_on_a_device) at a chunked (wo_b) and a one-chunk (wq_b) shape: what Triton builds
    keys |= {CompileKey.from_config(n, k, _ws(bn, stages, split), act_scale_ue8m0=True)
             for bn, stages, split in ((128, 4, False), (128, 4, True), (64, 4, True))
             for n, k in ((7168, 16384), (65536, 1536))}
    # the single-launch split-K candidates (reduce="ticket") at wkv (28 chunks: the unrolled reduce) and w2
    # (3 chunks: its tail), and with the fused quantizer (M <= 16: quantize, GEMM and reduce in one launch)
    ticket = {CompileKey.from_config(n, k, c, act_scale_ue8m0=True) for m in (1, 16, 32, 64, 128, 4096)
              for c in candidates(m) if c["reduce"] == "ticket" for n, k in ((512, 7168), (7168, 3072))}
    keys |= ticket | {fused_key(key, scale_rule="ue8m0_ceil") for key in ticket if key.swap and key.block_t == 16}
    # keys differing only in the loop's trip count compile to the same code: one per layout is enough (the
    # chunk count matters to the ticket reduce: its trip count and unrolled tail)
    by_layout = {}
    for key in sorted(keys, key=str):
        by_layout.setdefault((key.block_n, key.block_t, key.split, key.chunked, key.swap, key.pipe, key.tma,
                              key.fused_q, key.num_warps, key.num_stages, key.ws, key.reduce,
                              key.n_chunks if key.reduce == "ticket" else 0), key)
    return list(by_layout.values())


_SMEM_MAX = SMEM_BLOCK_MAX  # the H100's / H200's opt-in shared memory per block (227 KB)


def _compile(key: CompileKey, num_warps: int | None = None):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.sm90._gemm_fp8_block_jit import gemm_fp8_block_kernel
    from kernels.sm90.gemm_fp8_block import constexprs

    sig = dict(_SIG, out_ptr="*fp32" if key.split else "*bf16")
    if key.tma:  # host tensor descriptors of the E4M3 operands
        sig.update(w_ptr=f"tensordesc<fp8e4nv[{key.block_n}, 128]>", a_ptr=f"tensordesc<fp8e4nv[{key.block_t}, 128]>")
    if key.fused_q:  # the bf16 activation in, its codes and scales out
        sig.update(a_ptr="*bf16")
    const = constexprs(key)
    if key.fused_q:
        sig.update(codes_ptr="*u8", qscale_ptr="*u8" if key.act_scale_ue8m0 else "*fp32")
    if key.split and key.reduce == "ticket":  # the bf16 output the tile's last program writes, its counters
        sig.update(y_ptr="*bf16", ctr_ptr="*i32")
    sig.update({name: "constexpr" for name in const})
    index = gemm_fp8_block_kernel.arg_names.index  # positions in the kernel's parameter list
    aligned = ["ws_ptr", "as_ptr", "out_ptr"] + ([] if key.tma else ["w_ptr", "a_ptr"])  # torch allocations
    aligned += [name for name in ("codes_ptr", "qscale_ptr", "y_ptr", "ctr_ptr") if name in sig]
    aligned += ["N", "K", "stride_wn", "stride_am", "stride_om"]  # V4 shapes: multiples of 16
    attrs = {(index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(gemm_fp8_block_kernel, sig, {(index(n),): v for n, v in const.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps or key.num_warps, "num_stages": key.num_stages})


@pytest.mark.parametrize("key", _keys(), ids=lambda key: f"{'swap' if key.swap else 'tok'}-bn{key.block_n}-bt"
                         f"{key.block_t}-{'split' if key.split else 'pass'}-{'chunked' if key.chunked else 'one'}"
                         f"-w{key.num_warps}s{key.num_stages}{'-pipe' if key.pipe else ''}{'-tma' if key.tma else ''}"
                         f"{'-fused' if key.fused_q else ''}{'-ws' if key.ws else ''}"
                         f"{f'-ticket{key.n_chunks}' if key.reduce == 'ticket' else ''}")
def test_sm90_fp8_gemm_compiles_to_fp8_wgmma_without_spills(key, tmp_path):
    ck = _compile(key)
    regs = registers_without_spills(ck.asm["cubin"], tmp_path, str(key))
    sass = _cuobjdump(ck.asm["cubin"], tmp_path, "-sass")
    wide = key.block_t if key.swap else key.block_n  # the wgmma's N: tokens (swap AB) or weight rows
    shapes = set(re.findall(r"QGMMA\.64x(\d+)x32\.F32\.E4M3\.E4M3", sass))
    assert shapes == {str(wide)}, f"{key}: QGMMA shapes {sorted(shapes)} (expected 64x{wide}x32 E4M3)"
    assert not re.search(r"\bHMMA\b", sass), f"{key}: an mma.sync (HMMA) in the SASS"
    assert ck.metadata.shared <= _SMEM_MAX, f"{key}: {ck.metadata.shared} bytes of shared memory"
    specialized = ("ttg.warp_specialize" in ck.asm["ttgir"], "setmaxnreg" in ck.asm["ptx"], ck.metadata.num_warps)
    assert specialized == ((True, True, 12) if key.ws else (False, False, key.num_warps)), (key, specialized)
    # reduce="ticket": partials stored, a CTA barrier, the ticket taken by an acq_rel gpu-scope atomic, the
    # partials read back at L2 and the counter reset; the reduce launch's path has none of it
    ptx = ck.asm["ptx"]
    ticket = key.split and key.reduce == "ticket"
    found = (bool(re.search(r"atom\.global\.gpu\.acq_rel\.add\.u32", ptx)),
             bool(re.search(r"atom\.global\.gpu\.relaxed\.exch\.b32", ptx)), "ld.global.cg" in ptx)
    assert found == (ticket,) * 3, (key, found)
    if ticket:  # the barrier right before the ticket (every thread's partial stored first)
        assert re.search(r"bar\.sync\s+0;\s*(?:\S[^\n]*\n\s*){0,8}?@%p\d+ atom\.global\.gpu\.acq_rel", ptx), key
        print(f"{key.config()} x {key.n_chunks} chunks: {regs} registers")


def test_warp_specialize_needs_num_warps_4_on_sm90():
    """Triton 3.6 specializes the group loop on sm_90 from num_warps=4 only (at 8 it compiles the plain loop,
    silently): so CompileKey refuses ws with 8 warps, and this test notices a Triton that changes it."""
    base = dict(block_n=128, block_t=128, num_warps=4, num_stages=4, split=False, swap=False, tma=True, ws=True)
    key = CompileKey.from_config(7168, 3072, base, act_scale_ue8m0=True)
    with pytest.raises(ValueError, match="ws needs"):
        CompileKey.from_config(7168, 3072, {**base, "num_warps": 8}, act_scale_ue8m0=True)
    ck = _compile(key, num_warps=8)
    assert "ttg.warp_specialize" not in ck.asm["ttgir"] and ck.metadata.num_warps == 8
