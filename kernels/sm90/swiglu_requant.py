"""Unfused clamped SwiGLU + NVFP4 requantization of h (recipe `te`), on Hopper, in Triton.

    g = min(gate, L);  u = clamp(up, -L, L)      (L = swiglu_limit; None or 0: no clamp)
    h = silu(g) * u [* row_weight]               float32, rounded once to bf16 (the kernel's h)
    h -> NVFP4, grouped by expert (kernels.sm90.quantize_grouped): static with w2's input_scale
         per expert (input_dec_scale_f32 [E]), or dynamic with S = te_global_enc_scale(max |h|)

gate / up: [R_cap, I] float32 or bf16 (an L1 GEMM's halves) in expert order; offsets_i32 [E+1] on
the device; rows r >= offsets[E] (capacity rows) give h = 0 and zero codes. row_weight_f32 [R_cap]
(optional): the routing weight of each row (the before-w2 placement).

Launches: the SwiGLU kernel (a fixed grid of at most 264 programs striding over the capacity rows;
each also writes max |h| of its rows), then, dynamic, one program that reduces those maxima in a
fixed order into S and 1/S, then the grouped quantizer. Deterministic (elementwise math, exact max),
no host sync, no recompilation across routings or row counts: graph-capturable.

float32 math: silu(g) u = g u / (1 + e^-g) with an IEEE division; for g < -64 (where e^-g can
overflow float32) g u e^(g+64) e^-64, which equals it to float32 precision (e^g < 2^-92 there).
The result is within one bf16 ulp of the exact clamped SwiGLU (the moe.swiglu verdict).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90 import quantize_grouped
from kernels.sm90._consts import BLOCK, FLT_MAX, FP4_X_FP8_MAX
from kernels.sm90.quantize_grouped import next_pow2

__all__ = ["CompileKey", "launch", "swiglu"]

_MAX_PROGRAMS = 264


@dataclass(frozen=True)
class CompileKey:
    """Codegen inputs: tiles, trip counts of the capacity shape (R_cap, I), clamp and row-weight
    variants. The limit value, the counts and the pointers are runtime arguments."""

    block_m: int
    block_n: int
    n_iters: int
    n_tiles: int
    n_progs: int
    has_limit: bool
    has_w: bool
    e_pad: int

    @staticmethod
    def for_shape(rows_cap: int, n: int, e: int, has_limit: bool, has_w: bool) -> "CompileKey":
        block_m, block_n = 8, min(512, max(64, next_pow2(n)))
        row_tiles = max(1, (rows_cap + block_m - 1) // block_m)
        n_progs = min(_MAX_PROGRAMS, row_tiles)
        return CompileKey(block_m, block_n, (row_tiles + n_progs - 1) // n_progs, (n + block_n - 1) // block_n,
                          n_progs, has_limit, has_w, max(16, next_pow2(e)))


@functools.lru_cache(maxsize=32)
def _compile(key: CompileKey):
    from kernels.sm90._quantize_grouped_jit import amax_final_kernel
    from kernels.sm90._swiglu_requant_jit import swiglu_amax_kernel

    def run(gate, up, w, offsets_i32, limit: float, h_bf16, enc_f32, dec_f32) -> None:
        rows_cap, n = h_bf16.shape
        e = offsets_i32.numel() - 1
        part = torch.empty((key.n_progs,), dtype=torch.float32, device=h_bf16.device)
        swiglu_amax_kernel[(key.n_progs,)](
            gate, up, gate.stride(0), up.stride(0), w if w is not None else part, offsets_i32, h_bf16, part, limit,
            rows_cap, n, e, key.n_progs, N_ITERS=key.n_iters, N_TILES=key.n_tiles, HAS_LIMIT=key.has_limit,
            HAS_W=key.has_w, BLOCK_M=key.block_m, BLOCK_N=key.block_n, num_warps=4)
        if enc_f32 is not None:
            amax_final_kernel[(1,)](part, key.n_progs, enc_f32, dec_f32, e, BLOCK=512, E_PAD=key.e_pad,
                                    FMAX=FLT_MAX, NUM=FP4_X_FP8_MAX, num_warps=4)

    return run


def _check(gate: Tensor, up: Tensor, offsets_i32: Tensor, row_weight_f32: Tensor | None) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.dtype not in (torch.float32, torch.bfloat16) \
                or t.stride(1) != 1:
            raise ValueError(f"{name}: expected a 2-d float32 or bf16 tensor [R, I] contiguous along I, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if gate.shape != up.shape or gate.device != up.device:
        raise ValueError(f"gate {tuple(gate.shape)} on {gate.device} and up {tuple(up.shape)} on {up.device}: "
                         "expected the same shape and device")
    if gate.shape[1] == 0 or gate.shape[1] % BLOCK:
        raise ValueError(f"gate: I={gate.shape[1]} must be a positive multiple of {BLOCK} (h is requantized)")
    if (not isinstance(offsets_i32, Tensor) or offsets_i32.dtype != torch.int32 or offsets_i32.dim() != 1
            or offsets_i32.numel() < 2 or offsets_i32.device != gate.device):
        raise ValueError(f"offsets_i32: expected int32 [E+1] (E >= 1) on {gate.device}, got "
                         f"{getattr(offsets_i32, 'dtype', type(offsets_i32))} {tuple(getattr(offsets_i32, 'shape', ()))}")
    if row_weight_f32 is not None and (row_weight_f32.dtype != torch.float32 or row_weight_f32.dim() != 1
                                       or row_weight_f32.numel() < gate.shape[0] or not row_weight_f32.is_contiguous()
                                       or row_weight_f32.device != gate.device):
        raise ValueError(f"row_weight_f32: expected contiguous float32 [>= {gate.shape[0]}] on {gate.device}, got "
                         f"{row_weight_f32.dtype} {tuple(row_weight_f32.shape)}")


def swiglu(gate: Tensor, up: Tensor, offsets_i32: Tensor, *, swiglu_limit: float | None,
           row_weight_f32: Tensor | None = None, dynamic: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """(h bf16 [R_cap, I], (S [1], 1/S [E]) of max |h| when dynamic, else None)."""
    _check(gate, up, offsets_i32, row_weight_f32)
    rows_cap, n = gate.shape
    e = offsets_i32.numel() - 1
    h = torch.empty((rows_cap, n), dtype=torch.bfloat16, device=gate.device)
    enc = dec = None
    if dynamic:
        enc = torch.empty((1,), dtype=torch.float32, device=gate.device)
        dec = torch.empty((e,), dtype=torch.float32, device=gate.device)
    if rows_cap == 0:
        if dynamic:
            enc.fill_(1.0)
            dec.fill_(1.0)
        return h, (enc, dec) if dynamic else None
    key = CompileKey.for_shape(rows_cap, n, e, bool(swiglu_limit), row_weight_f32 is not None)
    _compile(key)(gate, up, row_weight_f32, offsets_i32, float(swiglu_limit or 0.0), h, enc, dec)
    return h, (enc, dec) if dynamic else None


def launch(gate: Tensor, up: Tensor, offsets_i32: Tensor, *, swiglu_limit: float | None,
           row_weight_f32: Tensor | None = None,
           input_dec_scale_f32: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """SwiGLU then grouped requantization -> (h bf16 [R_cap, I], (packed_u8 [R_cap, I/2],
    sf_swizzled_u8 [sf_capacity_rows(R_cap, E), Cp], global_dec_f32 [E]))."""
    h, enc_dec = swiglu(gate, up, offsets_i32, swiglu_limit=swiglu_limit, row_weight_f32=row_weight_f32,
                        dynamic=input_dec_scale_f32 is None)
    q = quantize_grouped.launch(h, offsets_i32, input_dec_scale_f32=input_dec_scale_f32, enc_dec_f32=enc_dec)
    return h, q
