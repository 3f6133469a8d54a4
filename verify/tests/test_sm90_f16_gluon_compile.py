"""The predecode path's Gluon fp16 GEMM (kernels.sm90._gemm_f16_gluon) on the CPU:
every bench variant compiles for sm_90a (Triton's bundled ptxas) without spills, warp-specialized (8 math warps, one
producer warp whose two TMA loads are the only ones), to fp16 wgmma of the tile's width (k16: 4 a 64-wide K stage,
and a 64-row warpgroup tile repeated for BM 256), one wgmma group left in flight while the previous stage is released
(DEPBAR 0x1 in the loop, 0x0 at a chunk's and the tile's end), no ptxas serialization warning (C7510-C7520), the
chunked keys' one fp32 add per element (a chunk's sum into the total), and the register-fed wgmma kernel's epilogue:
two fp32 multiplies per element (2^14, then alpha) and a round-to-nearest bf16 conversion.
GPU bits (the fp16 GEMM = the wgmma kernel, every M) and graph replay: test_sm90_gemm.py, marker gpu; timing:
test_sm90_bench.py.
"""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton", reason="triton: not installed (the sm90 kernels need it)")

from kernels.sm90._consts import SMEM_BLOCK_MAX  # noqa: E402
from kernels.sm90.gemm_nvfp4 import CompileKey  # noqa: E402
from verify.tests._sass import (  # noqa: E402
    _cuobjdump, ptxas_log, registers_without_spills, wgmma_depbars, wgmma_serialization_warnings)

_SMEM_MAX = SMEM_BLOCK_MAX  # the H100's / H200's opt-in shared memory per block (227 KB)
# the bench's variants (verify/tests/test_sm90_bench.py _F16_GEMM_VARIANTS), a 128 x 128 tile, and the chunked
# 128 x 128 keys for_shape routes (chunk and total accumulators)
_KEYS = [CompileKey.predecode_gluon(block_m=bm, block_n=bn, stages=ns)
         for bm, bn, ns in ((128, 256, 4), (128, 256, 3), (256, 128, 4), (128, 128, 5))] + [
    CompileKey.predecode_gluon(block_n=128, stages=ns, mma_order=True, chunk=4) for ns in (4, 5)]


def _compile(key: CompileKey):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernels.sm90._gemm_f16_gluon import gemm_f16_alpha_gluon_kernel, gluon_operand_layouts

    la, lb = gluon_operand_layouts(key.block_x, key.block_y)
    sig = {"a_desc": f"tensordesc<fp16[{key.block_x}, 64],{la!r}>",
           "b_desc": f"tensordesc<fp16[{key.block_y}, 64],{lb!r}>",
           "alpha_ptr": "*fp32", "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "chunk_iters": "i32"}
    const = dict(BM=key.block_x, BN=key.block_y, NS=key.num_stages, GROUP_M=8, CHUNKED=key.chunk > 0)
    sig.update({name: "constexpr" for name in const})
    index = gemm_f16_alpha_gluon_kernel.arg_names.index
    # torch allocations and the V4 shapes (N, K multiples of 16): what the launch specializes to
    attrs = {(index(name),): [["tt.divisibility", 16]] for name in ("alpha_ptr", "out_ptr", "N", "K")}
    src = GluonASTSource(gemm_f16_alpha_gluon_kernel, sig, {(index(n),): v for n, v in const.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": key.num_warps})


@pytest.mark.parametrize("key", _KEYS, ids=lambda key: f"{key.block_x}x{key.block_y}-s{key.num_stages}"
                         + ("-chunked" if key.chunk else ""))
def test_gluon_f16_gemm_compiles_to_a_specialized_wgmma_ring_without_spills(key, tmp_path):
    ck = _compile(key)
    regs = registers_without_spills(ck.asm["cubin"], tmp_path, str(key))
    sass = _cuobjdump(ck.asm["cubin"], tmp_path, "-sass")
    ptx = ck.asm["ptx"]
    shapes = set(re.findall(r"HGMMA\.(64x\d+x16)\.F32\b", sass))
    assert shapes == {f"64x{key.block_y}x16"}, f"{key}: HGMMA shapes {sorted(shapes)}"
    assert not re.search(r"\bHMMA\b", sass), f"{key}: an mma.sync (HMMA) in the SASS"
    hgmma = len(re.findall(r"\bHGMMA\b", sass))
    assert hgmma == 4 * key.block_x // 64 // 2, f"{key}: {hgmma} HGMMA (4 k16 steps x row tiles a warpgroup)"
    # warp-specialized: 8 math warps + a producer warpgroup (one warp of it), registers moved to the math warps, the
    # producer's two TMA loads the only ones
    assert ck.metadata.num_warps == 12, (key, ck.metadata.num_warps)
    moved = set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))
    utmaldg = len(re.findall(r"\bUTMALDG\b", sass))
    assert ("inc", "240") in moved and ("inc", "40") in moved, (key, moved)
    assert utmaldg == 2, (key, utmaldg)
    smem = ck.metadata.shared
    assert key.num_stages * (key.block_x + key.block_y) * 64 * 2 <= smem <= _SMEM_MAX, (key, smem)
    assert "STL" not in sass and "LDL" not in sass, key  # no local memory in any partition
    warnings = wgmma_serialization_warnings(ptxas_log(ptx, tmp_path))
    assert not warnings, f"{key}: ptxas serializes the wgmma: {warnings}"
    assert wgmma_depbars(sass) == [1, 0], (key, wgmma_depbars(sass))
    # the epilogue: (acc * 2^14) * alpha, two fp32 multiplies per element, no fma; rounded once to bf16 (pairs)
    per_thread = key.block_x * key.block_y // 256
    muls = len(re.findall(r"\bmul\.(?:rn\.)?f32\b", ptx))
    fmas = len(re.findall(r"\bfma\.rn\.f32\b", ptx))
    cvts = len(re.findall(r"\bcvt\.rn\.bf16x2\.f32\b", ptx))
    assert (muls, fmas, cvts) == (2 * per_thread, 0, per_thread // 2), (key, muls, fmas, cvts)
    # chunked: each chunk's finished sum added to the total, one fp32 add per element (round to nearest); else none
    adds = len(re.findall(r"\badd\.(?:rn\.)?f32\b", ptx))
    assert adds == (per_thread if key.chunk else 0), (key, adds)
    print(f"{key.block_x}x{key.block_y} s{key.num_stages}: {regs} registers, {smem} B shared, {hgmma} HGMMA, "
          f"{utmaldg} UTMALDG")
