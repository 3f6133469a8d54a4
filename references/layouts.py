"""Scale-factor layouts and weight views (NVFP4_FACTS.md section 3).

Checkpoints store block scales linear [rows, K/16]; block-scaled MMAs want them
swizzled. All functions are pure reshapes/permutes/scatters on uint8 bytes,
batched over leading dimensions where noted; padding is always zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "round_up",
    "swizzled_128x4_offset",
    "sf_linear_to_swizzled_128x4",
    "sf_swizzled_128x4_to_linear",
    "layout_8x4_offset",
    "sf_linear_to_8x4",
    "sf_8x4_to_linear",
    "grouped_padded_offsets",
    "sf_grouped_linear_to_swizzled_128x4",
    "sf_grouped_swizzled_128x4_to_linear",
    "k_major_view",
    "is_k_major",
    "interleave_gate_up",
    "deinterleave_gate_up",
]


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _as_bytes(sf: Tensor, name: str) -> Tensor:
    if sf.dtype == torch.float8_e4m3fn or str(sf.dtype) == "torch.float8_e8m0fnu":
        return sf.view(torch.uint8)
    if sf.dtype != torch.uint8:
        raise TypeError(f"{name}: expected uint8 scale bytes (or an 8-bit float view), got {sf.dtype}")
    if sf.dim() < 2:
        raise ValueError(f"{name}: expected [..., rows, cols], got shape {tuple(sf.shape)}")
    return sf


def _pad_rows_cols(sf_u8: Tensor, rows_to: int, cols_to: int) -> Tensor:
    *lead, r, c = sf_u8.shape
    out = torch.zeros(*lead, rows_to, cols_to, dtype=torch.uint8, device=sf_u8.device)
    out[..., :r, :c] = sf_u8
    return out


# ----------------------------------------------------------------------------- 128x4


def swizzled_128x4_offset(r: Tensor, c: Tensor, *, cols: int) -> Tensor:
    """Byte offset of sf[r][c] in the 128x4 swizzled buffer of a [*, cols] scale matrix.

    ((r//128)*(Cp//4) + c//4)*512 + (r%32)*16 + ((r//32)%4)*4 + c%4, Cp = cols padded to 4
    (cuBLAS / CUTLASS SWIZZLE_32_4_4, torch `to_blocked`).
    """
    cp = round_up(cols, 4)
    return ((r // 128) * (cp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4


def sf_linear_to_swizzled_128x4(sf_u8: Tensor) -> Tensor:
    """[..., R, C] linear scale bytes -> [..., Rp, Cp] whose flat memory is the 128x4 layout.

    Rp = R rounded up to 128, Cp = C rounded up to 4, padding bytes zero. Leading
    dimensions (e.g. experts) are swizzled independently.
    """
    sf_u8 = _as_bytes(sf_u8, "sf_u8")
    *lead, r, c = sf_u8.shape
    rp, cp = round_up(r, 128), round_up(c, 4)
    padded = _pad_rows_cols(sf_u8, rp, cp)
    # row r = rb*128 + r4*32 + r32, col c = cb*4 + c4 -> memory order (rb, cb, r32, r4, c4)
    t = padded.reshape(*lead, rp // 128, 4, 32, cp // 4, 4)
    n = len(lead)
    t = t.permute(*range(n), n + 0, n + 3, n + 2, n + 1, n + 4)
    return t.reshape(*lead, rp, cp)


def sf_swizzled_128x4_to_linear(buf_u8: Tensor, *, rows: int, cols: int) -> Tensor:
    """Inverse of sf_linear_to_swizzled_128x4: [..., Rp, Cp] (or [..., Rp*Cp]) -> [..., rows, cols]."""
    rp, cp = round_up(rows, 128), round_up(cols, 4)
    buf_u8 = buf_u8.view(torch.uint8) if buf_u8.dtype != torch.uint8 else buf_u8
    lead = buf_u8.shape[:-1] if buf_u8.shape[-1] == rp * cp else buf_u8.shape[:-2]
    if buf_u8.numel() != (torch.Size(lead).numel() * rp * cp):
        raise ValueError(f"buf_u8: shape {tuple(buf_u8.shape)} does not hold a {rp}x{cp} swizzled buffer "
                         f"for rows={rows}, cols={cols}")
    n = len(lead)
    t = buf_u8.reshape(*lead, rp // 128, cp // 4, 32, 4, 4)
    t = t.permute(*range(n), n + 0, n + 3, n + 2, n + 1, n + 4)
    return t.reshape(*lead, rp, cp)[..., :rows, :cols]


# ----------------------------------------------------------------------------- 8x4


def layout_8x4_offset(r: Tensor, c: Tensor, *, cols: int) -> Tensor:
    """Byte offset of sf[r][c] in the 8x4 layout (trtllm, small m):
    (r//8)*(Cp//4)*32 + (c//4)*32 + (r%8)*4 + c%4."""
    cp = round_up(cols, 4)
    return (r // 8) * (cp // 4) * 32 + (c // 4) * 32 + (r % 8) * 4 + c % 4


def sf_linear_to_8x4(sf_u8: Tensor) -> Tensor:
    """[..., R, C] -> [..., Rp, Cp] (Rp = R padded to 8, Cp to 4; zero padding) in 8x4 order."""
    sf_u8 = _as_bytes(sf_u8, "sf_u8")
    *lead, r, c = sf_u8.shape
    rp, cp = round_up(r, 8), round_up(c, 4)
    t = _pad_rows_cols(sf_u8, rp, cp).reshape(*lead, rp // 8, 8, cp // 4, 4)
    n = len(lead)
    return t.permute(*range(n), n + 0, n + 2, n + 1, n + 3).reshape(*lead, rp, cp)


def sf_8x4_to_linear(buf_u8: Tensor, *, rows: int, cols: int) -> Tensor:
    """Inverse of sf_linear_to_8x4."""
    rp, cp = round_up(rows, 8), round_up(cols, 4)
    lead = buf_u8.shape[:-2]
    n = len(lead)
    t = buf_u8.reshape(*lead, rp // 8, cp // 4, 8, 4)
    return t.permute(*range(n), n + 0, n + 2, n + 1, n + 3).reshape(*lead, rp, cp)[..., :rows, :cols]


# ----------------------------------------------------------------------------- grouped


def grouped_padded_offsets(offsets_i64: Tensor, *, align: int = 128) -> Tensor:
    """Expert row offsets [E+1] -> offsets after padding each expert to `align` rows.

    A zero-token expert keeps zero rows. Raises ValueError for a non-monotonic input.
    """
    if offsets_i64.dim() != 1 or offsets_i64.numel() < 1:
        raise ValueError(f"offsets_i64: expected a 1-D [E+1] tensor, got shape {tuple(offsets_i64.shape)}")
    counts = offsets_i64[1:] - offsets_i64[:-1]
    if bool((counts < 0).any()) or int(offsets_i64[0]) != 0:
        raise ValueError(f"offsets_i64: must start at 0 and be non-decreasing, got {offsets_i64.tolist()}")
    padded = (counts + align - 1) // align * align
    return torch.cat([offsets_i64.new_zeros(1), torch.cumsum(padded, 0)])


def _grouped_row_map(offsets_i64: Tensor, padded_i64: Tensor) -> Tensor:
    """Destination row (in the padded concatenation) of every source row."""
    counts = offsets_i64[1:] - offsets_i64[:-1]
    shift = torch.repeat_interleave(padded_i64[:-1] - offsets_i64[:-1], counts)
    return torch.arange(int(offsets_i64[-1]), device=offsets_i64.device) + shift


def sf_grouped_linear_to_swizzled_128x4(sf_u8: Tensor, offsets_i64: Tensor) -> tuple[Tensor, Tensor]:
    """MoE activation scales [T, C] grouped by expert offsets [E+1] -> (buffer, padded offsets).

    Each expert's rows are padded to a multiple of 128 independently (zero bytes),
    concatenated, and swizzled: buffer [sum_e Rp_e, Cp]. Because every segment is a
    whole number of 128-row tiles, this equals swizzling each expert and concatenating.
    """
    sf_u8 = _as_bytes(sf_u8, "sf_u8")
    offsets_i64 = offsets_i64.to(device=sf_u8.device, dtype=torch.int64)
    if int(offsets_i64[-1]) != sf_u8.shape[0]:
        raise ValueError(f"offsets_i64[-1]={int(offsets_i64[-1])} != sf_u8 rows {sf_u8.shape[0]}")
    padded = grouped_padded_offsets(offsets_i64)
    out = torch.zeros(int(padded[-1]), sf_u8.shape[1], dtype=torch.uint8, device=sf_u8.device)
    out[_grouped_row_map(offsets_i64, padded)] = sf_u8
    if out.shape[0] == 0:
        return out.new_zeros(0, round_up(sf_u8.shape[1], 4)), padded
    return sf_linear_to_swizzled_128x4(out), padded


def sf_grouped_swizzled_128x4_to_linear(buf_u8: Tensor, offsets_i64: Tensor, *, cols: int) -> Tensor:
    """Inverse of sf_grouped_linear_to_swizzled_128x4: back to [T, cols]."""
    offsets_i64 = offsets_i64.to(device=buf_u8.device, dtype=torch.int64)
    padded = grouped_padded_offsets(offsets_i64)
    rows = int(padded[-1])
    if rows == 0:
        return buf_u8.new_zeros(0, cols)
    lin = sf_swizzled_128x4_to_linear(buf_u8, rows=rows, cols=cols)
    return lin[_grouped_row_map(offsets_i64, padded)]


# ----------------------------------------------------------------------------- weights


def is_k_major(w: Tensor) -> bool:
    """True when the last dimension (K, packed) is contiguous: stride(-1) == 1."""
    return w.dim() >= 2 and w.stride(-1) == 1


def k_major_view(w: Tensor) -> Tensor:
    """Same shape [..., N, K/2], K-contiguous strides (a copy when w is not K-major).

    A weight stacked or transposed into N-major strides (stride(-2) == 1) must be
    copied K-contiguous: for a tensor *shaped* [E, K, N] that is
    permute(0,2,1).contiguous().permute(0,2,1) (NVFP4_FACTS section 3); for one
    already shaped [..., N, K/2] it is .contiguous(). Transposing the view, making
    that contiguous and transposing back returns the N-major layout unchanged.
    """
    if is_k_major(w) and w.is_contiguous():
        return w
    return w.contiguous()


def interleave_gate_up(gate: Tensor, up: Tensor, *, granularity: int) -> Tensor:
    """Fuse gate [N, ...] and up [N, ...] along N in groups of `granularity` rows:
    [g0..g(G-1), u0..u(G-1), gG.., uG.., ...] -> [2N, ...].

    The interleave acts on N (output features); one row is one output element
    whatever the packing along K, so no factor 2 enters `granularity`.
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    n = gate.shape[0]
    if granularity <= 0 or n % granularity:
        raise ValueError(f"granularity={granularity} must be positive and divide N={n}")
    rest = gate.shape[1:]
    g = gate.reshape(n // granularity, granularity, *rest)
    u = up.reshape(n // granularity, granularity, *rest)
    return torch.cat([g, u], dim=1).reshape(2 * n, *rest)


def deinterleave_gate_up(fused: Tensor, *, granularity: int) -> tuple[Tensor, Tensor]:
    """Inverse of interleave_gate_up: [2N, ...] -> (gate [N, ...], up [N, ...])."""
    n2 = fused.shape[0]
    if granularity <= 0 or n2 % (2 * granularity):
        raise ValueError(f"granularity={granularity}: 2*granularity must divide the fused rows {n2}")
    rest = fused.shape[1:]
    t = fused.reshape(n2 // (2 * granularity), 2, granularity, *rest)
    return t[:, 0].reshape(n2 // 2, *rest), t[:, 1].reshape(n2 // 2, *rest)
