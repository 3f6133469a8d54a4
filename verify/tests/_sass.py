"""Shared helpers of the sm_90a compile tests: Triton's bundled cuobjdump (SASS, resource usage) and ptxas
(its -v log, where the wgmma serialization warnings C7510-C7520 appear)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest


def _tool(name: str) -> Path:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not tool.exists():
        pytest.skip(f"triton: no bundled {name} at {tool}")
    return tool


def _cuobjdump(cubin: bytes, tmp_path: Path, *flags: str) -> str:
    """cuobjdump's output for `cubin` with `flags` (-sass, -res-usage)."""
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    return subprocess.run([str(_tool("cuobjdump")), *flags, str(path)], check=True, capture_output=True,
                          text=True).stdout


def registers_without_spills(cubin: bytes, tmp_path: Path, what: str) -> int:
    """The kernel's registers a thread (cuobjdump -res-usage); fails the test, naming `what`, where it spills (stack
    or local memory)."""
    usage = _cuobjdump(cubin, tmp_path, "-res-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert found, usage
    regs, stack, local = map(int, found.groups())
    assert stack == 0 and local == 0, f"{what}: spills (STACK {stack}, LOCAL {local}, {regs} registers)"
    return regs


def ptxas_log(ptx: str, tmp_path: Path, arch: str = "sm_90a") -> str:
    """ptxas -v's log for `ptx` (the same assembler Triton ran): its warnings, registers, spills."""
    src, out = tmp_path / "kernel.ptx", tmp_path / "kernel_ptxas.cubin"
    src.write_text(ptx)
    proc = subprocess.run([str(_tool("ptxas")), "-v", f"--gpu-name={arch}", str(src), "-o", str(out)],
                          check=True, capture_output=True, text=True)
    return proc.stdout + proc.stderr


def wgmma_serialization_warnings(log: str) -> list[str]:
    """The ptxas warnings that say wgmma no longer overlaps (C7514 serialized, C7517 wait injected, C7513 / C7515
    / C7516 / C7518 / C7519 / C7520 their causes): the lines that name them."""
    return [line for line in log.splitlines() if re.search(r"\bC75(?:1\d|20)\b", line)]


def wgmma_depbars(sass: str) -> list[int]:
    """The in-flight counts N of every `WARPGROUP.DEPBAR.LE gsb0, N` in SASS order (0: a full wait)."""
    return [int(n, 16) for n in re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+)", sass)]
