"""The sm90 Gluon wgmma GEMM compiles for sm_90a on any machine with triton (no GPU needed).

For every key CompileKey.for_shape routes to that kernel on the DeepSeek-V4-Pro projection
shapes, the kernel is compiled for sm_90 (Triton's bundled ptxas) and its SASS is checked:
no register spills (local memory), the wgmma of the right shape, and the register-renaming
converts of the A operand (asserted trivial inside the kernel, so a layout change that would
need shared memory fails the compile itself). GPU numerics are in test_sm90_gemm.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton: not installed (the sm90 kernels need it)")

from kernels.sm90.gemm_nvfp4 import CompileKey  # noqa: E402

PROJ = [(2048, 7168), (6144, 7168), (7168, 3072), (7168, 16384), (1536, 7168)]
_SIG = {"w_ptr": "*i32", "wsf_ptr": "*u8", "xp_ptr": "*fp16", "xsf_ptr": "*u8", "alpha_ptr": "*fp32",
        "out_ptr": "*bf16", "ws_ptr": "*fp32", "ctr_ptr": "*i32", "N": "i32", "M": "i32", "KW": "i32",
        "CP4": "i32", "k_iters": "i32", "iters_per_split": "i32"}


def _routed_keys() -> list[CompileKey]:
    keys = {CompileKey.for_shape(m, n, k) for m in (3, 8, 16, 32, 64) for n, k in PROJ}
    return sorted((key for key in keys if key.wgmma), key=str)


def _compile(key: CompileKey):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernels.sm90._gemm_nvfp4_wgmma import gemm_nvfp4_wgmma_kernel, wgmma_layouts

    sig = dict(_SIG, xp_ptr="*fp16" if key.act_f16 else "*i32")
    const = dict(wgmma_layouts(key.num_warps, key.wgmma, key.block_y), BN=key.block_x, BT=key.block_y,
                 NS=key.num_stages, SPLIT=key.split, X_F16=key.act_f16)
    names = list(sig) + list(const)
    sig.update({name: "constexpr" for name in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(8)}  # pointers: torch allocations are aligned
    attrs[(names.index("KW"),)] = [["tt.divisibility", 16]]  # K % 128 == 0
    src = GluonASTSource(gemm_nvfp4_wgmma_kernel, sig, {(names.index(n),): v for n, v in const.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": key.num_warps})


def _cuobjdump(cubin: bytes, tmp_path: Path, *flags: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip(f"triton: no bundled cuobjdump at {tool}")
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    return subprocess.run([str(tool), *flags, str(path)], check=True, capture_output=True, text=True).stdout


def test_sm90_wgmma_routes_exist():
    """for_shape sends the decode-sized projection GEMMs to the wgmma kernel (else the test below
    checks nothing)."""
    keys = _routed_keys()
    assert len(keys) >= 6, keys
    assert {key.block_y for key in keys} >= {8, 16, 32, 64}, keys


@pytest.mark.parametrize("key", _routed_keys(), ids=lambda key: f"bn{key.block_x}-bt{key.block_y}-s{key.split}")
def test_sm90_wgmma_kernel_compiles_without_spills(key, tmp_path):
    ck = _compile(key)
    usage = _cuobjdump(ck.asm["cubin"], tmp_path, "-res-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert found, usage
    regs, stack, local = map(int, found.groups())
    assert stack == 0 and local == 0, f"{key}: spills (STACK {stack}, LOCAL {local}, {regs} registers)"
    sass = _cuobjdump(ck.asm["cubin"], tmp_path, "-sass")
    hgmma = re.findall(r"HGMMA\.64x(\d+)x16\.F32", sass)
    assert hgmma and set(hgmma) == {str(key.block_y)}, f"{key}: HGMMA shapes {sorted(set(hgmma))}"
    assert "wgmma.mma_async.sync.aligned.m64n%dk16.f32.f16.f16" % key.block_y in ck.asm["ptx"]
