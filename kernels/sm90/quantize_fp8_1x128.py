"""bf16 / fp16 / float32 [M, K] -> FP8 E4M3 codes [M, K] + one decode scale per 1x128 group
(per token, groups of 128 along K; the last group may be shorter), on Hopper, in Triton.

Math per group (v = max |x| of the group, float32; the emulator's references.fp8_act gives the
same bytes for the recipes FP8_ACT_UE8M0, FP8_ACT_F32 and FP8_ACT_F32_RECIP):

  s    = max(v, amax_floor) / 448                  IEEE division (div.rn), NaN stays NaN
  s    = 2^ceil(log2 s)  (scale_rule "ue8m0_ceil") exponent + (mantissa != 0) on the f32 bits,
                                                    stored as the UE8M0 byte; Inf / NaN -> 0xFF
  y    = x / s  ("divide", div.rn)  or  x * f32(1/s)  ("mul_reciprocal")
         (under ue8m0_ceil 1/s is an exact power of two and x * (1/s) IS the rounded x / s)
  code = E4M3 RNE of clamp(y, -448, 448); sign from the sign bit (-0.0 -> 0x80); NaN -> 0x7F

Special inputs: an all-zero group gets s = floor/448 (byte 105 = 2^-22 for floor 1e-4) and codes
+-0; a NaN with amax_nan "propagate" makes the group's scale NaN (0xFF / NaN) and every code 0x7F,
with "ignore" only the NaN element codes 0x7F; an Inf gives an Inf (f32) or 0xFF (UE8M0) scale.

Outputs (torch.empty, every byte written): codes uint8 [M, K]; scales [M, ceil(K/128)] row-major,
uint8 UE8M0 bytes (value 2^(b-127)) or float32. No host sync, graph-capturable; M and K are runtime
arguments. With TRITON_INTERPRET=1 the kernel runs on CPU tensors (the CPU tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor
from kernels.sm90._env import triton_interpreting as _interpreting

__all__ = ["FP8_GROUP", "SCALE_RULES", "CompileKey", "launch"]

FP8_GROUP = 128
SCALE_RULES = ("ue8m0_ceil", "f32")
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)



@dataclass(frozen=True)
class CompileKey:
    """Everything codegen reads: the tile and the recipe's byte-changing choices (M, K, G and the
    row stride are runtime arguments, so not here)."""

    block_m: int
    groups: int
    num_warps: int
    scale_ue8m0: bool
    encode_recip: bool
    nan_propagate: bool
    amax_floor: float

    @staticmethod
    def for_shape(m: int, k: int, *, scale_rule: str, encode_rule: str, amax_nan: str,
                  amax_floor_f32: float) -> "CompileKey":
        # 8 rows x 4 groups (8 KB of bf16) per program for batches; one row (K of 7168 is 56 groups,
        # 14 programs) for single tokens. The bytes do not depend on the tile.
        block_m = 1 if m <= 1 else (4 if m <= 64 else 8)
        return CompileKey(block_m=block_m, groups=4, num_warps=4, scale_ue8m0=scale_rule == "ue8m0_ceil",
                          encode_recip=encode_rule == "mul_reciprocal", nan_propagate=amax_nan == "propagate",
                          amax_floor=float(amax_floor_f32))


@functools.lru_cache(maxsize=32)
def _compile(key: CompileKey):
    """The launcher for `key` (Triton compiles on the first launch: warm up before graph capture)."""
    import triton

    from kernels.sm90._quantize_fp8_1x128_jit import quantize_fp8_1x128_kernel

    def run(x: Tensor, codes_u8: Tensor, scale: Tensor) -> None:
        m, k = x.shape
        g = scale.shape[1]
        grid = (triton.cdiv(m, key.block_m), triton.cdiv(g, key.groups))
        quantize_fp8_1x128_kernel[grid](
            x, x.stride(0), codes_u8, scale, m, k, g,
            BLOCK_M=key.block_m, GROUPS=key.groups, SCALE_UE8M0=key.scale_ue8m0, ENCODE_RECIP=key.encode_recip,
            NAN_PROPAGATE=key.nan_propagate, AMAX_FLOOR=key.amax_floor, num_warps=key.num_warps,
        )

    return run


def _check_inputs(x: Tensor, scale_rule: str, encode_rule: str, amax_nan: str, amax_floor_f32: float) -> None:
    if not isinstance(x, Tensor) or x.dtype not in _X_DTYPES or x.dim() != 2:
        raise ValueError(f"x: expected a 2-d bfloat16, float16 or float32 tensor [M, K], got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if x.shape[1] == 0:
        raise ValueError("x: K = 0 (no groups to quantize)")
    if x.stride(1) != 1:
        raise ValueError(f"x: rows must be contiguous along K (stride(1) == 1), got strides {x.stride()}")
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"scale_rule={scale_rule!r}: expected one of {SCALE_RULES}")
    if encode_rule not in ("divide", "mul_reciprocal"):
        raise ValueError(f"encode_rule={encode_rule!r}: expected 'divide' or 'mul_reciprocal'")
    if amax_nan not in ("propagate", "ignore"):
        raise ValueError(f"amax_nan={amax_nan!r}: expected 'propagate' or 'ignore'")
    if not amax_floor_f32 > 0:
        raise ValueError(f"amax_floor_f32={amax_floor_f32!r}: must be > 0 (a zero group would code 0 / 0)")
    if not x.is_cuda and not _interpreting():
        raise ValueError(f"x: expected a CUDA tensor (or TRITON_INTERPRET=1), got device {x.device}")


def launch(x: Tensor, *, scale_rule: str, encode_rule: str = "divide", amax_nan: str = "propagate",
           amax_floor_f32: float = 1e-4, check: bool = True) -> tuple[Tensor, Tensor]:
    """Quantize x [M, K] per token in 1x128 groups (module docstring).

    Returns (codes_u8 [M, K] E4M3 bytes, scale [M, ceil(K/128)]: uint8 UE8M0 bytes for scale_rule
    "ue8m0_ceil", float32 decode scales for "f32"). M may be 0 (empty outputs).
    """
    if check:
        _check_inputs(x, scale_rule, encode_rule, amax_nan, amax_floor_f32)
    m, k = x.shape
    g = -(-k // FP8_GROUP)
    codes_u8 = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    scale = torch.empty((m, g), dtype=torch.uint8 if scale_rule == "ue8m0_ceil" else torch.float32, device=x.device)
    if m > 0:
        key = CompileKey.for_shape(m, k, scale_rule=scale_rule, encode_rule=encode_rule, amax_nan=amax_nan,
                                   amax_floor_f32=amax_floor_f32)
        _compile(key)(x, codes_u8, scale)
    return codes_u8, scale
