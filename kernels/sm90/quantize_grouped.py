"""Expert-sorted bf16 rows -> NVFP4 in the grouped 128x4 layout (recipe `te`), on Hopper, in Triton.

Input: rows in expert order, delimited by offsets_i32 [E+1] on the device (expert e owns rows
offsets[e] .. offsets[e+1]-1; zero-row experts are legal), either given directly ([R, K] bf16) or
gathered from token rows x [T, K] through row_token [R] (the MoE block: no permuted copy of x).

Output (the backend protocol's grouped QuantizedAct):
  packed_u8      [R_cap, K/2]: row r's codes, element 2i in the low nibble; rows past offsets[E]
                 are zero;
  sf_swizzled_u8 [sf_capacity_rows(R_cap, E), Cp]: each expert's rows padded to a multiple of 128
                 (expert e's first scale row is sum_{j<e} ceil(cnt_j/128)*128), then 128x4 swizzled
                 (byte ((p//128)*(Cp//4) + c//4)*512 + (p%32)*16 + ((p//32)%4)*4 + c%4 of padded row
                 p, block c); every padding byte and the rows past the last expert's tiles are zero;
  global_dec_f32 [E]: the decode multiplier each expert's GEMM folds into alpha.

Global scales (one argument name, one direction, as everywhere in the suite):
  static:  input_dec_scale_f32 [E] (a checkpoint input_scale per expert, amax/2688): expert e's rows
           quantized with S_e = 1/D_e (IEEE division on the device); global_dec_f32 = D (a copy);
  dynamic: None: S = te_global_enc_scale(max |x| over the rows that reach an expert, NaN ignored)
           on the device (two launches, deterministic: max is exact, the last reduction runs in one
           program in a fixed order), global_dec_f32[e] = 1/S for every e.
The per-block math is kernels.sm90.quantize_nvfp4_1x16's (te: the scale byte is
e4m3_rne_satfinite(min(v * (S * f32(1/6)), FLT_MAX)), enc = min(1 / (f32(byte) * (1/S)), FLT_MAX)),
so the bytes equal references' te quantization of each expert's rows with its scale.

Capacity: every buffer is sized by R_cap (the caller's T * top_k), never by the routed counts, and
the grid covers the R_cap capacity rows (the scale buffer is zero-filled by a memset, so the
per-expert padding costs no kernel work); the counts are read on the device. Any routing and any
row count up to R_cap runs in the same launches: no host sync, no recompilation, graph-capturable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90._consts import BLOCK, FLT_MAX, FP4_X_FP8_MAX, ONE_SIXTH_F32

__all__ = ["CompileKey", "launch", "amax_enc_dec", "sf_capacity_rows", "next_pow2"]

_MAX_AMAX_PROGRAMS = 264  # two per H200 SM


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def sf_capacity_rows(rows_cap: int, num_experts: int) -> int:
    """Scale rows that hold any routing of rows_cap rows over num_experts experts: each non-empty
    expert pads at most 127 rows, and at most min(E, rows_cap) experts are non-empty."""
    return (rows_cap + 127 * min(num_experts, rows_cap) + 127) // 128 * 128


@dataclass(frozen=True)
class CompileKey:
    """Everything codegen reads. R_cap, K, E and strides are runtime arguments; E_PAD (the expert
    lookup vector) is E rounded up to a power of two."""

    block_m: int
    block_k: int
    e_pad: int
    gather: bool
    static: bool
    num_warps: int = 4

    @property
    def log2_e(self) -> int:
        return self.e_pad.bit_length() - 1

    @staticmethod
    def for_shape(k: int, num_experts: int, *, gather: bool, static: bool) -> "CompileKey":
        block_k = 512 if k >= 512 else max(64, next_pow2(k))
        return CompileKey(block_m=16, block_k=block_k, e_pad=max(16, next_pow2(num_experts)), gather=gather,
                          static=static)


@functools.lru_cache(maxsize=32)
def _compile(key: CompileKey):
    """The Triton launch for `key` (Triton compiles on the first launch, outside any capture)."""
    import triton

    from kernels.sm90._quantize_grouped_jit import grouped_quantize_te_kernel, padded_starts_kernel

    def run(x_bf16, row_map, offsets_i32, scale_f32, packed_u8, sf_u8) -> None:
        """sf_u8 must arrive zero-filled: the kernel writes only the routed rows' scale bytes."""
        k = x_bf16.shape[1]
        cp = sf_u8.shape[1]
        r_cap = packed_u8.shape[0]
        e = offsets_i32.numel() - 1
        pstart = torch.empty((e + 1,), dtype=torch.int32, device=x_bf16.device)
        padded_starts_kernel[(1,)](offsets_i32, pstart, e, E_PAD=key.e_pad, num_warps=4)
        grid = (triton.cdiv(r_cap, key.block_m), triton.cdiv(cp * BLOCK, key.block_k))
        grouped_quantize_te_kernel[grid](
            x_bf16, x_bf16.stride(0), row_map if row_map is not None else offsets_i32, offsets_i32, pstart,
            scale_f32, packed_u8, sf_u8.view(torch.int32), r_cap, k, cp // 4, e,
            BLOCK_M=key.block_m, BLOCK_K=key.block_k, LOG2_E=key.log2_e, GATHER=key.gather, STATIC=key.static,
            ONE_SIXTH=ONE_SIXTH_F32, FMAX=FLT_MAX, num_warps=key.num_warps)

    return run


@dataclass(frozen=True)
class _AmaxKey:
    """The amax kernels' codegen inputs: tile sizes and the trip counts of the capacity shape."""

    block_m: int
    block_k: int
    n_iters: int
    k_tiles: int
    n_progs: int
    has_n: bool
    e_pad: int

    @staticmethod
    def for_shape(m: int, k: int, num_experts: int, has_n: bool) -> "_AmaxKey":
        block_m = 8 if m <= 8 else 16
        block_k = min(1024, max(64, next_pow2(k)))
        n_tiles = max(1, (m + block_m - 1) // block_m)
        n_progs = min(_MAX_AMAX_PROGRAMS, n_tiles)
        return _AmaxKey(block_m, block_k, (n_tiles + n_progs - 1) // n_progs, (k + block_k - 1) // block_k, n_progs,
                        has_n, max(16, next_pow2(num_experts)))


@functools.lru_cache(maxsize=32)
def _compile_amax(key: _AmaxKey):
    from kernels.sm90._quantize_grouped_jit import amax_final_kernel, amax_partial_kernel

    def run(x_bf16: Tensor, n_i32: Tensor | None, enc_f32: Tensor, dec_f32: Tensor) -> None:
        m, k = x_bf16.shape
        part = torch.empty((key.n_progs,), dtype=torch.float32, device=x_bf16.device)
        amax_partial_kernel[(key.n_progs,)](x_bf16, x_bf16.stride(0), n_i32 if n_i32 is not None else part, part, m, k,
                                            key.n_progs, N_ITERS=key.n_iters, K_TILES=key.k_tiles, HAS_N=key.has_n,
                                            BLOCK_M=key.block_m, BLOCK_K=key.block_k, num_warps=4)
        amax_final_kernel[(1,)](part, key.n_progs, enc_f32, dec_f32, dec_f32.numel(), BLOCK=512, E_PAD=key.e_pad,
                                FMAX=FLT_MAX, NUM=FP4_X_FP8_MAX, num_warps=4)

    return run


def amax_enc_dec(x_bf16: Tensor, num_experts: int, *, num_valid_rows_i32: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(S [1], dec [E]) on x's device: S = te_global_enc_scale(max |x[:n]|), NaN ignored, n = the
    device count num_valid_rows_i32 (int32 [1], clamped to the row count) or all rows; dec = 1/S."""
    m, k = x_bf16.shape
    enc = torch.empty((1,), dtype=torch.float32, device=x_bf16.device)
    dec = torch.empty((num_experts,), dtype=torch.float32, device=x_bf16.device)
    _compile_amax(_AmaxKey.for_shape(m, k, num_experts, num_valid_rows_i32 is not None))(x_bf16, num_valid_rows_i32, enc, dec)
    return enc, dec


def _check(x_bf16: Tensor, offsets_i32: Tensor, row_token: Tensor | None, rows_cap: int,
           input_dec_scale_f32: Tensor | None) -> int:
    if not isinstance(x_bf16, Tensor) or x_bf16.dtype != torch.bfloat16 or x_bf16.dim() != 2:
        raise ValueError(f"x_bf16: expected a 2-d torch.bfloat16 tensor, got {getattr(x_bf16, 'dtype', type(x_bf16))} "
                         f"{tuple(getattr(x_bf16, 'shape', ()))}")
    k = x_bf16.shape[1]
    if k == 0 or k % BLOCK:
        raise ValueError(f"x_bf16: K={k} must be a positive multiple of {BLOCK}")
    if x_bf16.stride(1) != 1:
        raise ValueError(f"x_bf16: rows must be contiguous along K, got strides {x_bf16.stride()}")
    if (not isinstance(offsets_i32, Tensor) or offsets_i32.dtype != torch.int32 or offsets_i32.dim() != 1
            or offsets_i32.numel() < 2 or not offsets_i32.is_contiguous()):
        raise ValueError(f"offsets_i32: expected a contiguous int32 [E+1] tensor with E >= 1, got "
                         f"{getattr(offsets_i32, 'dtype', type(offsets_i32))} {tuple(getattr(offsets_i32, 'shape', ()))}")
    if offsets_i32.device != x_bf16.device:
        raise ValueError(f"offsets_i32: on {offsets_i32.device}, x_bf16 on {x_bf16.device}")
    e = offsets_i32.numel() - 1
    if row_token is not None:
        if row_token.dim() != 1 or row_token.dtype not in (torch.int32, torch.int64) or not row_token.is_contiguous() \
                or row_token.numel() < rows_cap or row_token.device != x_bf16.device:
            raise ValueError(f"row_token: expected a contiguous int32/int64 [>= {rows_cap}] tensor on {x_bf16.device}, "
                             f"got {row_token.dtype} {tuple(row_token.shape)} on {row_token.device}")
    elif rows_cap != x_bf16.shape[0]:
        raise ValueError(f"rows_cap={rows_cap}: without row_token the rows are x_bf16's {x_bf16.shape[0]}")
    if input_dec_scale_f32 is not None:
        s = input_dec_scale_f32
        if not isinstance(s, Tensor) or s.dtype != torch.float32 or s.numel() != e or s.device != x_bf16.device:
            raise ValueError(f"input_dec_scale_f32: expected float32 [{e}] (one decode scale per expert) on "
                             f"{x_bf16.device}, got {getattr(s, 'dtype', type(s))} {tuple(getattr(s, 'shape', ()))}")
    return e


def launch(x_bf16: Tensor, offsets_i32: Tensor, *, input_dec_scale_f32: Tensor | None = None,
           row_token: Tensor | None = None, rows_cap: int | None = None,
           num_valid_tokens_i32: Tensor | None = None,
           enc_dec_f32: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped te quantization (module docstring) -> (packed_u8 [R_cap, K/2], sf_swizzled_u8, global_dec_f32 [E]).

    x_bf16: the expert-sorted rows [R, K] (row_token None, R_cap = R), or the token rows [T, K] with
    row_token [>= R_cap] giving each expert-sorted row's token (rows_cap: R_cap, e.g. T * top_k).
    Dynamic amax runs over x's rows: all of them, or the first num_valid_tokens_i32 (device int32 [1]);
    enc_dec_f32: a dynamic (S [1], 1/S [E]) the caller already formed on the device (e.g. the SwiGLU
    kernel's amax of h), used instead of running the amax kernels.
    """
    rows_cap = x_bf16.shape[0] if rows_cap is None else int(rows_cap)
    e = _check(x_bf16, offsets_i32, row_token, rows_cap, input_dec_scale_f32)
    k = x_bf16.shape[1]
    dev = x_bf16.device
    cp = (k // BLOCK + 3) // 4 * 4
    packed = torch.empty((rows_cap, k // 2), dtype=torch.uint8, device=dev)
    sf = torch.zeros((sf_capacity_rows(rows_cap, e), cp), dtype=torch.uint8, device=dev)  # padding stays 0
    if input_dec_scale_f32 is None and enc_dec_f32 is not None:
        enc, dec = enc_dec_f32
        scale = enc
    elif input_dec_scale_f32 is None:
        if x_bf16.shape[0] == 0:
            enc = torch.ones((1,), dtype=torch.float32, device=dev)
            dec = torch.ones((e,), dtype=torch.float32, device=dev)
        else:
            enc, dec = amax_enc_dec(x_bf16, e, num_valid_rows_i32=num_valid_tokens_i32 if row_token is not None
                                    else offsets_i32[e:])
        scale = enc
    else:
        scale = input_dec_scale_f32.reshape(e).contiguous()
        dec = scale.clone()
    if rows_cap:
        _compile(CompileKey.for_shape(k, e, gather=row_token is not None, static=input_dec_scale_f32 is not None))(
            x_bf16, row_token, offsets_i32, scale, packed, sf)
    return packed, sf, dec
