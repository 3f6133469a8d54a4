"""Compile and launch plumbing shared by the sm100 CuTe DSL kernels (cutlass imported lazily).

Every kernel module (gemm_nvfp4_blockscaled, quantize_nvfp4_1x16) keeps its own
body, CompileKey and argument checks; what was the same in each lives here:

- device_ptr(t, dtype_name, align): a torch tensor's address as a typed cute gmem pointer.
- fake_ptr(dtype_name, align): a placeholder pointer for compiling without a GPU.
- compile_for_arch(kernel, args, arch=..., dump_dir=None): cute.compile after checking
  that CUTE_DSL_ARCH (read once, when cutlass is imported) matches the key's arch.
- compile_keeping_ptx(kernel, args, arch=..., dump_dir=...): the same, returning the PTX text.
- launch_on_current_stream(compiled, *args): calls the compiled kernel with the CUDA
  stream read at call time. Never cached: a stream cached at compile time (or at the
  first call) breaks CUDA-graph capture, which records on its own side stream.
- device_i32_constant(value, device_str): a [1] int32 device buffer allocated once per
  (value, device), at warm-up, for "no limit" / "unused" pointer arguments.
- recording_launches(): provenance: a context manager yielding a list that gets (kernel class name, arch)
  for every launch inside it; arch is the SASS arch of the cubin compile_for_arch built (cubin_sm_arch on
  the ELF header of the kept cubin), else its compile target (CUTE_DSL_ARCH, checked equal to the
  CompileKey's arch; the key's arch where the variable is unset).
  One list append per launch while recording, nothing otherwise (host side: graph-safe).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile

INT32_MAX = 2**31 - 1
_BUILDS: dict[int, tuple[str, str]] = {}  # id(compiled) -> (kernel class name, the arch it was compiled for)
_RECORDERS: list[list] = []


def device_ptr(t, dtype_name: str, align: int = 16):
    """cute gmem pointer of dtype `cutlass.<dtype_name>` at t.data_ptr(), assuming `align` bytes."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    return make_ptr(getattr(cutlass, dtype_name), t.data_ptr(), cute.AddressSpace.gmem, assumed_align=align)


def fake_ptr(dtype_name: str, align: int):
    """A non-null, `align`-aligned placeholder pointer: compile never dereferences it."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    return make_ptr(getattr(cutlass, dtype_name), 1 << 20, cute.AddressSpace.gmem, assumed_align=align)


def fake_stream():
    import cuda.bindings.driver as cuda

    return cuda.CUstream(0)


def current_stream():
    """torch's current CUDA stream as a CUstream, read now (under capture: the capture stream)."""
    import cuda.bindings.driver as cuda
    import torch

    return cuda.CUstream(torch.cuda.current_stream().cuda_stream)


def launch_on_current_stream(compiled, *args) -> None:
    """Launch a compiled kernel whose last parameter is the stream, on the current stream."""
    for launched in _RECORDERS:
        launched.append(_BUILDS.get(id(compiled), (type(compiled).__name__, None)))
    compiled(*args, current_stream())


@contextlib.contextmanager
def recording_launches():
    """Yields a list that gets (kernel name, compile arch) for every launch_on_current_stream inside the block."""
    launched: list[tuple[str, str | None]] = []
    _RECORDERS.append(launched)
    try:
        yield launched
    finally:
        _RECORDERS.remove(launched)


def _check_arch(arch: str) -> None:
    arch_env = os.environ.get("CUTE_DSL_ARCH")
    if arch_env is not None and arch_env != arch:
        raise ValueError(
            f"CUTE_DSL_ARCH={arch_env!r} but CompileKey.arch={arch!r}: set CUTE_DSL_ARCH before importing cutlass"
        )


def compile_for_arch(kernel, args, *, arch: str, dump_dir: str | None = None):
    """cute.compile(kernel, *args) for `arch` (no GPU needed); with dump_dir the PTX is kept there."""
    _check_arch(arch)
    import cutlass.cute as cute

    if dump_dir is not None:
        compiled = cute.compile(kernel, *args, options=f"--keep-ptx --dump-dir={dump_dir}")
        built = None
    else:  # the cubin is kept so provenance reads its SASS arch from the ELF header; the DSL also writes it
        # to a file (the working directory without --dump-dir), so into a directory removed right after
        with tempfile.TemporaryDirectory(prefix="nvfp4v-cute-") as tmp:
            compiled = cute.compile(kernel, *args, options=f"--keep-cubin --dump-dir={tmp}")
            built = _cubin_arch_of(compiled)
    _BUILDS[id(compiled)] = (type(kernel).__name__, built or os.environ.get("CUTE_DSL_ARCH") or arch)
    return compiled


def _cubin_arch_of(compiled) -> str | None:
    """cubin_sm_arch of a compiled kernel's kept cubin (bytes, or the path of the dumped file), else None."""
    cubin = getattr(getattr(compiled, "artifacts", None), "CUBIN", None)
    if isinstance(cubin, str) and os.path.isfile(cubin):
        with open(cubin, "rb") as f:
            cubin = f.read()
    return cubin_sm_arch(cubin) if isinstance(cubin, (bytes, bytearray)) else None


_ELF_MAGIC = b"\x7fELF"
_ELF64_E_FLAGS = 0x30
_CUDA_ABI_V2 = 8  # EI_ABIVERSION from which the SM sits in bits 8..15 of e_flags (CUDA 12.8+ cubins)


def cubin_sm_arch(cubin: bytes) -> str | None:
    """The SASS architecture of a CUDA cubin from its ELF header, e.g. "sm_100a", or None when it is not one.
    e_flags of EI_ABIVERSION 7 cubins: SM in bits 0..7, 0x800 marks arch-specific ("a") code (an sm_90a
    cubin reads 0x5a0d5a); of version 8: SM in bits 8..15, 0x8 marks "a" (sm_100a: 0x600640a; sm_100f,
    family code, 0x6006402 reads as "sm_100"). Read from cubins this DSL version wrote for sm_90a, sm_100a
    and sm_100f (kernels.sm100 tests), not from a specification."""
    if len(cubin) < _ELF64_E_FLAGS + 4 or cubin[:4] != _ELF_MAGIC or cubin[4] != 2:
        return None
    flags = int.from_bytes(cubin[_ELF64_E_FLAGS:_ELF64_E_FLAGS + 4], "little")
    if cubin[8] >= _CUDA_ABI_V2:
        sm, accel = (flags >> 8) & 0xFF, flags & 0x8
    else:
        sm, accel = flags & 0xFF, flags & 0x800
    return f"sm_{sm}{'a' if accel else ''}" if sm else None


def compile_keeping_ptx(kernel, args, *, arch: str, dump_dir: str):
    """Compile uncached, keeping the PTX in dump_dir; returns (compiled, ptx_text). For CI inspection."""
    os.makedirs(dump_dir, exist_ok=True)
    compiled = compile_for_arch(kernel, args, arch=arch, dump_dir=dump_dir)
    ptx = compiled.__ptx__
    # With --keep-ptx this DSL version returns the path of the dumped file.
    if ptx is not None and "\n" not in ptx and os.path.isfile(ptx):
        with open(ptx) as f:
            ptx = f.read()
    return compiled, ptx


@functools.lru_cache(maxsize=32)
def device_i32_constant(value: int, device_str: str):
    """A [1] int32 tensor holding `value` on `device_str`, allocated once (call it at warm-up,
    outside any graph capture): the kernels read it where no device-side count is given."""
    import torch

    return torch.full((1,), value, dtype=torch.int32, device=device_str)
