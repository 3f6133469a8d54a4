"""bf16 [M, K] -> te global encode scale S = 2688 / amax on the GPU (dynamic activation scale).

amax = max |x| over the tensor with NaN elements ignored (fmaxf semantics, the same
policy as the `te` block max). S follows references' te_global_enc_scale:
min(2688 / amax, FLT_MAX) with IEEE division, and 1.0 when amax == 0 or the
quotient is 0 (amax = +Inf).

Two launches, no host sync, no atomics, deterministic (max is exact, and the
final reduction runs in one program in a fixed order):
  1. G programs, each a grid-stride loop over [BLOCK_M, BLOCK_K] tiles, write a partial max;
  2. one program reduces the G partials and writes S.
When one program suffices (small inputs, e.g. decode), step 1 writes S itself.
The result is a 0-d float32 tensor that the quantizer reads on the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90._consts import FLT_MAX, FP4_X_FP8_MAX

__all__ = ["CompileKey", "launch"]

_MAX_PROGRAMS = 264  # two per H200 SM; the final reduction loads them in one vector
_SINGLE_PROGRAM_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class CompileKey:
    """Codegen inputs. M, K, the stride and the program count are runtime arguments."""

    block_m: int
    block_k: int
    num_warps: int
    single_program: bool

    @staticmethod
    def for_shape(m: int, k: int) -> "CompileKey":
        single = m * k <= _SINGLE_PROGRAM_ELEMENTS
        return CompileKey(block_m=8 if m <= 8 else 16, block_k=1024 if k >= 1024 else 256,
                          num_warps=8 if not single else 4, single_program=single)


@functools.lru_cache(maxsize=16)
def _compile(key: CompileKey):
    import triton

    from kernels.sm90._amax_global_enc_scale_jit import amax_final_kernel, amax_partial_kernel

    def run(x_bf16: Tensor, out_f32: Tensor) -> None:
        m, k = x_bf16.shape
        n_tiles_k = triton.cdiv(k, key.block_k)
        n_tiles = triton.cdiv(m, key.block_m) * n_tiles_k
        if key.single_program:
            amax_partial_kernel[(1,)](x_bf16, x_bf16.stride(0), out_f32, m, k, n_tiles_k, n_tiles, 1, n_tiles,
                                      BLOCK_M=key.block_m, BLOCK_K=key.block_k, SINGLE=True,
                                      FMAX=FLT_MAX, NUM=FP4_X_FP8_MAX, num_warps=key.num_warps)
            return
        n_progs = min(n_tiles, _MAX_PROGRAMS)
        part = torch.empty((n_progs,), dtype=torch.float32, device=x_bf16.device)
        amax_partial_kernel[(n_progs,)](x_bf16, x_bf16.stride(0), part, m, k, n_tiles_k, n_tiles, n_progs,
                                        triton.cdiv(n_tiles, n_progs),
                                        BLOCK_M=key.block_m, BLOCK_K=key.block_k, SINGLE=False,
                                        FMAX=FLT_MAX, NUM=FP4_X_FP8_MAX, num_warps=key.num_warps)
        amax_final_kernel[(1,)](part, out_f32, n_progs, BLOCK=512, FMAX=FLT_MAX, NUM=FP4_X_FP8_MAX,
                                num_warps=4)

    return run


def launch(x_bf16: Tensor, *, check: bool = True) -> Tensor:
    """S = te_global_enc_scale(max |x|) as a 0-d float32 tensor on x's device."""
    if check:
        if not isinstance(x_bf16, Tensor) or x_bf16.dtype != torch.bfloat16 or x_bf16.dim() != 2:
            raise ValueError(f"x_bf16: expected a 2-d torch.bfloat16 tensor, got "
                             f"{getattr(x_bf16, 'dtype', type(x_bf16))} {tuple(getattr(x_bf16, 'shape', ()))}")
        if x_bf16.stride(1) != 1:
            raise ValueError(f"x_bf16: rows must be contiguous (stride(1) == 1), got {x_bf16.stride()}")
        if not x_bf16.is_cuda:
            raise ValueError(f"x_bf16: expected a CUDA tensor, got device {x_bf16.device}")
    out_f32 = torch.empty((), dtype=torch.float32, device=x_bf16.device)
    m, k = x_bf16.shape
    if m * k == 0:
        out_f32.fill_(1.0)  # amax of nothing is 0 -> S = 1.0 (a device fill, no sync)
        return out_f32
    _compile(CompileKey.for_shape(m, k))(x_bf16, out_f32)
    return out_f32
