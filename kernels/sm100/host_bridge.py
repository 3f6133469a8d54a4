"""Host bridge for the sm100 kernels: checkpoint bytes -> kernel operands.

Written independently of references/ (never imports it). Every function is torch
only, device-agnostic, and the forward-path ones (marked "graph-safe") allocate
fixed-size outputs from Python ints and never read a device value on the host.

Layouts (NVFP4_FACTS.md section 3):
- packed E2M1: uint8 [..., K/2], element 2i in the low nibble, K contiguous.
- block scales: E4M3 bytes. Checkpoints store them linear [..., R, K/16]; the
  kernels read the cuBLAS/CUTLASS 128x4 swizzle: rows padded to 128, columns to
  4, byte offset of sf[r][c] = ((r//128)*(Cp//4) + c//4)*512 + (r%32)*16
  + ((r//32)%4)*4 + c%4. Padding bytes are zero.
- grouped (MoE) activations: each expert's rows padded to a multiple of 128 and
  concatenated ("padded-per-expert" rows), so a 128-row M tile belongs to one
  expert; the tile -> expert table tells the kernel which.
- gate/up fused weights: w1 and w3 rows interleaved along N in groups of
  `granularity` rows [g0..g(G-1), u0..u(G-1), gG, ...]; the SwiGLU GEMM needs
  granularity = tile_n / 2 = 128 (GATE_UP_GRANULARITY).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SF_BLOCK = 16  # elements per E4M3 block scale
SF_ROW_ALIGN = 128
SF_COL_ALIGN = 4
K_ALIGN = 64  # K must be a multiple of this (block 16 x scale atom 4)
GATE_UP_GRANULARITY = 128  # rows of w1 then w3 per group, = tile_n / 2 of the SwiGLU kernel
E4M3_NAN_BYTES = (0x7F, 0xFF)


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _scale_bytes(sf: Tensor, name: str) -> Tensor:
    """uint8 view of E4M3 scale bytes (reinterpreted, never cast)."""
    if not isinstance(sf, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(sf).__name__}")
    if sf.dtype == torch.float8_e4m3fn:
        return sf.view(torch.uint8)
    if sf.dtype != torch.uint8:
        raise TypeError(f"{name}: expected uint8 or float8_e4m3fn scale bytes, got {sf.dtype}")
    return sf


# ----------------------------------------------------------------------------- scale layouts


def sf_linear_to_swizzled_128x4(sf_u8: Tensor) -> Tensor:
    """Linear block scales [..., R, C] -> 128x4 swizzled bytes [..., Rp, Cp] (graph-safe).

    Rp = R rounded up to 128, Cp = C rounded up to 4, zero padding; batched over
    leading dims (one swizzled matrix per batch, back to back in memory).
    Accepts uint8 or float8_e4m3fn (bytes reinterpreted); returns uint8.
    """
    sf_u8 = _scale_bytes(sf_u8, "sf_u8")
    if sf_u8.dim() < 2:
        raise ValueError(f"sf_u8: expected [..., R, C], got shape {tuple(sf_u8.shape)}")
    *lead, r, c = sf_u8.shape
    rp, cp = round_up(r, SF_ROW_ALIGN), round_up(c, SF_COL_ALIGN)
    padded = sf_u8.new_zeros(*lead, rp, cp)
    padded[..., :r, :c] = sf_u8
    nb = len(lead)
    # r = r0*128 + r1*32 + r2 ; c = c0*4 + c1  ->  order (r0, c0, r2, r1, c1)
    v = padded.reshape(*lead, rp // 128, 4, 32, cp // 4, 4)
    v = v.permute(*range(nb), nb + 0, nb + 3, nb + 2, nb + 1, nb + 4)
    return v.reshape(*lead, rp, cp).contiguous()


def grouped_capacity_rows(num_rows: int, num_experts: int) -> int:
    """Upper bound of sum_e round_up(rows_e, 128) for any split of num_rows over num_experts."""
    if num_rows < 0 or num_experts <= 0:
        raise ValueError(f"grouped_capacity_rows: num_rows={num_rows}, num_experts={num_experts}")
    return round_up(num_rows + (SF_ROW_ALIGN - 1) * min(num_experts, max(num_rows, 0)), SF_ROW_ALIGN)


def grouped_padded_offsets(offsets_i64: Tensor) -> Tensor:
    """Expert row offsets [E+1] -> offsets after padding each expert to 128 rows (graph-safe).

    A zero-token expert keeps zero rows.
    """
    _check_offsets(offsets_i64)
    counts = offsets_i64[1:] - offsets_i64[:-1]
    padded = (counts + SF_ROW_ALIGN - 1) // SF_ROW_ALIGN * SF_ROW_ALIGN
    return torch.cat([offsets_i64.new_zeros(1), torch.cumsum(padded, 0)])


def grouped_row_map(offsets_i64: Tensor, num_rows: int) -> Tensor:
    """Destination row in the padded-per-expert layout of each of the num_rows source rows (graph-safe)."""
    _check_offsets(offsets_i64)
    padded = grouped_padded_offsets(offsets_i64)
    rows = torch.arange(num_rows, device=offsets_i64.device, dtype=torch.int64)
    expert = torch.searchsorted(offsets_i64[1:].contiguous(), rows, right=True)
    expert = expert.clamp_(max=offsets_i64.numel() - 2)
    return rows - offsets_i64[expert] + padded[expert]


def sf_grouped_linear_to_swizzled_128x4(
    sf_u8: Tensor, offsets_i64: Tensor, *, capacity_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """MoE activation scales [T, C] grouped by offsets [E+1] -> (swizzled bytes, padded offsets).

    Each expert's rows are padded to 128 independently (zero bytes) and concatenated,
    then swizzled. With capacity_rows (>= the padded total, e.g. grouped_capacity_rows)
    the buffer has exactly that many rows, the tail is zero, and nothing syncs
    (graph-safe). Without it the buffer is trimmed to the padded total, which reads
    offsets on the host: for tests and load time only.
    """
    sf_u8 = _scale_bytes(sf_u8, "sf_u8")
    if sf_u8.dim() != 2:
        raise ValueError(f"sf_u8: expected [T, C], got shape {tuple(sf_u8.shape)}")
    offsets_i64 = offsets_i64.to(device=sf_u8.device, dtype=torch.int64)
    padded = grouped_padded_offsets(offsets_i64)
    rows = int(padded[-1]) if capacity_rows is None else capacity_rows
    if capacity_rows is not None and capacity_rows % SF_ROW_ALIGN:
        raise ValueError(f"capacity_rows={capacity_rows} must be a multiple of {SF_ROW_ALIGN}")
    lin = sf_u8.new_zeros(rows, sf_u8.shape[1])
    lin.index_copy_(0, grouped_row_map(offsets_i64, sf_u8.shape[0]), sf_u8)
    if rows == 0:
        return sf_u8.new_zeros(0, round_up(sf_u8.shape[1], SF_COL_ALIGN)), padded
    return sf_linear_to_swizzled_128x4(lin), padded


def tile_expert_table(padded_offsets_i64: Tensor, num_tiles: int) -> Tensor:
    """int32 [num_tiles]: the expert of each 128-row tile of the padded layout, -1 past the end (graph-safe)."""
    _check_offsets(padded_offsets_i64)
    starts = torch.arange(num_tiles, device=padded_offsets_i64.device, dtype=torch.int64) * SF_ROW_ALIGN
    expert = torch.searchsorted(padded_offsets_i64[1:].contiguous(), starts, right=True)
    return torch.where(starts < padded_offsets_i64[-1], expert, torch.full_like(expert, -1)).to(torch.int32)


def _check_offsets(offsets_i64: Tensor) -> None:
    if not isinstance(offsets_i64, Tensor):
        raise TypeError(f"offsets_i64: expected a torch.Tensor, got {type(offsets_i64).__name__}")
    if offsets_i64.dtype != torch.int64 or offsets_i64.dim() != 1 or offsets_i64.numel() < 2:
        raise ValueError(
            f"offsets_i64: expected int64 [E+1] with E >= 1, got {offsets_i64.dtype} {tuple(offsets_i64.shape)}"
        )


# ----------------------------------------------------------------------------- weights


def interleave_gate_up_rows(gate: Tensor, up: Tensor, *, granularity: int = GATE_UP_GRANULARITY) -> Tensor:
    """Fuse gate [..., N, X] and up [..., N, X] along N (dim -2) in groups of `granularity` rows.

    -> [..., 2N, X] with rows [g0..g(G-1), u0..u(G-1), gG, ...]. N counts output
    features (one row each) whatever the packing along K, so no factor 2 enters
    `granularity`. Works for packed weights and for linear scales alike.
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dim() < 2:
        raise ValueError(f"gate: expected [..., N, X], got shape {tuple(gate.shape)}")
    *lead, n, x = gate.shape
    if granularity <= 0 or n % granularity:
        raise ValueError(f"granularity={granularity} must be positive and divide N={n}")
    g = gate.reshape(*lead, n // granularity, granularity, x)
    u = up.reshape(*lead, n // granularity, granularity, x)
    return torch.cat([g, u], dim=-2).reshape(*lead, 2 * n, x)


def check_packed_e2m1(t: Tensor, name: str, *, k: int | None = None) -> int:
    """Validate a packed E2M1 operand [..., R, K/2]; returns K."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"{name}: expected uint8 packed E2M1 bytes, got {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name}: expected [..., rows, K/2], got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(
            f"{name}: must be K-major (stride(-1) == 1), got strides {t.stride()}; "
            "use t.transpose(-1, -2).contiguous().transpose(-1, -2)"
        )
    kk = 2 * t.shape[-1]
    if kk % K_ALIGN:
        raise ValueError(f"{name}: K={kk} must be a multiple of {K_ALIGN}")
    if k is not None and kk != k:
        raise ValueError(f"{name}: K={kk} does not match K={k} of the other operand")
    return kk


def _check_linear_scales(sf_u8: Tensor, name: str, rows_shape: tuple, k: int) -> Tensor:
    sf_u8 = _scale_bytes(sf_u8, name)
    want = (*rows_shape, k // SF_BLOCK)
    if tuple(sf_u8.shape) != want:
        raise ValueError(f"{name}: expected linear scales of shape {want}, got {tuple(sf_u8.shape)}")
    nan = (sf_u8 == E4M3_NAN_BYTES[0]) | (sf_u8 == E4M3_NAN_BYTES[1])
    if bool(nan.any()):  # load time, not the forward path
        first = tuple(int(i) for i in nan.nonzero()[0])
        raise ValueError(f"{name}: {int(nan.sum())} NaN scale bytes (0x7F/0xFF), first at {first}")
    return sf_u8


def _check_dec_scale(s: Tensor, name: str, numel: int) -> Tensor:
    if not isinstance(s, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(s).__name__}")
    if s.dtype != torch.float32:
        raise TypeError(f"{name}: expected float32, got {s.dtype}")
    if s.numel() != numel:
        raise ValueError(f"{name}: expected {numel} element(s), got shape {tuple(s.shape)}")
    return s.reshape(numel).contiguous()


@dataclass(frozen=True)
class Sm100Nvfp4Weight:
    """Kernel operands of one NVFP4 linear (L = 1) or of E experts (L = E).

    packed_u8: [L, N, K/2] K-major; sf_swizzled_u8: [L, Np, Cp] 128x4 swizzled;
    dec_scale_f32: [L] (weight_scale_2 = amax_w / 2688); up_dec_scale_f32: [L] for a
    gate/up fused weight (w3's weight_scale_2, dec_scale_f32 then being w1's), else None.
    """

    packed_u8: Tensor
    sf_swizzled_u8: Tensor
    dec_scale_f32: Tensor
    up_dec_scale_f32: Tensor | None = None
    interleave_granularity: int | None = None

    @property
    def n(self) -> int:
        return self.packed_u8.shape[-2]

    @property
    def k(self) -> int:
        return 2 * self.packed_u8.shape[-1]

    @property
    def num_batches(self) -> int:
        return self.packed_u8.shape[0]


def prepare_nvfp4_weight(weight_u8: Tensor, weight_scale_e4m3: Tensor, weight_scale_2_f32: Tensor) -> Sm100Nvfp4Weight:
    """Checkpoint tensors of one linear or of stacked experts -> kernel operands.

    weight_u8 [N, K/2] or [E, N, K/2] (bytes as stored, not re-quantized);
    weight_scale_e4m3 [.., N, K/16] linear; weight_scale_2_f32 0-d or [E].
    """
    k = check_packed_e2m1(weight_u8, "weight_u8")
    batched = weight_u8.dim() == 3
    w = weight_u8 if batched else weight_u8.unsqueeze(0)
    if w.dim() != 3:
        raise ValueError(f"weight_u8: expected [N, K/2] or [E, N, K/2], got shape {tuple(weight_u8.shape)}")
    sf = _check_linear_scales(weight_scale_e4m3, "weight_scale_e4m3", tuple(weight_u8.shape[:-1]), k)
    sf = sf if batched else sf.unsqueeze(0)
    dec = _check_dec_scale(weight_scale_2_f32, "weight_scale_2_f32", w.shape[0])
    return Sm100Nvfp4Weight(w.contiguous(), sf_linear_to_swizzled_128x4(sf), dec)


def prepare_gate_up_weight(
    w1_u8: Tensor, w1_scale_e4m3: Tensor, w1_scale_2_f32: Tensor,
    w3_u8: Tensor, w3_scale_e4m3: Tensor, w3_scale_2_f32: Tensor,
    *, granularity: int = GATE_UP_GRANULARITY,
) -> Sm100Nvfp4Weight:
    """w1 (gate) and w3 (up) [E, N, K/2] -> one interleaved operand for the SwiGLU GEMM.

    Rows and linear scales are interleaved along N with `granularity` (the kernel
    needs GATE_UP_GRANULARITY), then the scales are swizzled. w1 and w3 keep their
    own global decode scales (weight_scale_2); the epilogue applies each to its half.
    """
    if granularity != GATE_UP_GRANULARITY:
        raise ValueError(f"granularity={granularity}: the SwiGLU kernel needs {GATE_UP_GRANULARITY}")
    g = prepare_nvfp4_weight(w1_u8, w1_scale_e4m3, w1_scale_2_f32)
    u = prepare_nvfp4_weight(w3_u8, w3_scale_e4m3, w3_scale_2_f32)
    if g.packed_u8.shape != u.packed_u8.shape:
        raise ValueError(f"w1_u8 {tuple(w1_u8.shape)} and w3_u8 {tuple(w3_u8.shape)} must have the same shape")
    k = g.k
    w1 = w1_u8 if w1_u8.dim() == 3 else w1_u8.unsqueeze(0)
    w3 = w3_u8 if w3_u8.dim() == 3 else w3_u8.unsqueeze(0)
    s1 = _scale_bytes(w1_scale_e4m3, "w1_scale_e4m3").reshape(w1.shape[0], w1.shape[1], k // SF_BLOCK)
    s3 = _scale_bytes(w3_scale_e4m3, "w3_scale_e4m3").reshape(w3.shape[0], w3.shape[1], k // SF_BLOCK)
    packed = interleave_gate_up_rows(w1, w3, granularity=granularity).contiguous()
    sf = sf_linear_to_swizzled_128x4(interleave_gate_up_rows(s1, s3, granularity=granularity))
    return Sm100Nvfp4Weight(packed, sf, g.dec_scale_f32, u.dec_scale_f32, granularity)
