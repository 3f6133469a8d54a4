"""What the adapters of other people's kernels share: finding their optional package (installed, at the version
the adapter was written against, importable), gating by device, and the NVFP4 boundary conversions an adapter
makes between the protocol's representation (verify.backends.protocol) and what its kernels take.

Nothing here imports references/: an adapter converts at the boundary with its own code (DESIGN "Backend
protocol": the harness never prepares a kernel's operands with references/ code), so a layout bug here fails the
stage that uses it; verify/tests/test_adapters.py compares these functions with the references' layout code.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Package", "package_problem", "package_version", "cuda_device_problem", "e2m1_codes_to_f32",
           "swizzled_128x4_offsets", "sf_linear_to_swizzled_128x4_u8", "nvfp4_act_to_bf16",
           "grouped_nvfp4_act_to_bf16", "grouped_padded_row_of", "f32_pow2_to_ue8m0_u8", "ZeroSignBlindDiff",
           "zero_sign_blind_diff"]

_SF_BLOCK = 16        # NVFP4: one E4M3 scale per 16 consecutive K
_SWIZZLE_ROWS = 128   # the 128x4 layout's row tile (grouped: each expert's rows padded to it)
_SWIZZLE_COLS = 4


@dataclass(frozen=True)
class Package:
    """An adapter's optional dependency: dist (as pip spells it), module (its top-level import name), extra (the
    nvfp4-verify extra that installs it), pinned (the version the adapter was read and written against; None:
    any version)."""

    dist: str
    module: str
    extra: str
    pinned: str | None = None


def package_version(pkg: Package) -> str | None:
    """The installed version of pkg's distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(pkg.dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=16)
def package_problem(pkg: Package) -> str | None:
    """None when pkg is installed at its pinned version and imports here, else why not, in one sentence. Cached
    per Package (an engine's import takes seconds and is asked once per op); package_problem.cache_clear()
    forgets (a test that fakes the installation calls it)."""
    version = package_version(pkg)
    if version is None and importlib.util.find_spec(pkg.module) is None:
        return f"{pkg.dist} is not installed (nvfp4-verify's extra {pkg.extra!r} installs it)"
    if version is not None and pkg.pinned is not None and version != pkg.pinned:
        return (f"{pkg.dist} {version} is installed, but this adapter is written against {pkg.pinned} (a young API; "
                f"nvfp4-verify's extra {pkg.extra!r} pins it)")
    try:
        importlib.import_module(pkg.module)
    except Exception as e:  # noqa: BLE001 (any import failure is a reason to report, not a crash of the listing)
        return f"{pkg.dist} {version or '(no metadata)'} does not import here ({type(e).__name__}: " \
               f"{' '.join(str(e).split())[:240]})"
    return None


def cuda_device_problem(name: str, device: torch.device | str, *, majors: tuple[int, ...],
                        arch_words: str) -> str | None:
    """None when `device` is a CUDA device whose compute capability major is one of `majors`, else why not
    (naming the backend, the device and what it needs, e.g. arch_words "Hopper (sm90)")."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{name}: needs a CUDA device, {arch_words}; got {device.type}"
    if not torch.cuda.is_available():
        return f"{name}: needs a CUDA device, {arch_words}; none is available here"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in majors:
        return (f"{name}: {arch_words} only; {torch.cuda.get_device_name(device)} is compute capability "
                f"{major}.{minor}")
    return None


# ----------------------------------------------------------------------------- NVFP4 boundary conversions


def e2m1_codes_to_f32(codes_u8: Tensor) -> Tensor:
    """E2M1 codes (uint8 0..15) -> float32 values: codes 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign
    (0x8 is -0). Arithmetic on the code's bits (no table tensor: nothing is copied to the device)."""
    c = codes_u8.to(torch.int32)
    exponent = (c >> 1) & 0x3
    mantissa = (c & 0x1).to(torch.float32)
    normal = torch.exp2((exponent - 1).to(torch.float32)) * (1.0 + 0.5 * mantissa)
    magnitude = torch.where(exponent == 0, 0.5 * mantissa, normal)  # exponent 0: the subnormal 0.5 (or zero)
    return torch.where((c & 0x8) != 0, -magnitude, magnitude)


def swizzled_128x4_offsets(rows_i64: Tensor, cols: int) -> Tensor:
    """Byte offsets [R, cols] of scale (r, c) for each row index r in rows_i64 [R] (its row in the padded 128-row
    tiles) and each column c < cols, in the 128x4 layout (cuBLAS / CUTLASS SWIZZLE_32_4_4) of a buffer whose scale
    columns are padded to a multiple of 4: ((r//128)*(Cp/4) + c//4)*512 + (r%32)*16 + ((r//32)%4)*4 + c%4."""
    cols_padded = -(-cols // _SWIZZLE_COLS) * _SWIZZLE_COLS
    r = rows_i64.to(torch.int64).reshape(-1, 1)
    c = torch.arange(cols, dtype=torch.int64, device=rows_i64.device).reshape(1, -1)
    tile = (r // _SWIZZLE_ROWS) * (cols_padded // _SWIZZLE_COLS) + c // _SWIZZLE_COLS
    return tile * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % _SWIZZLE_COLS


def sf_linear_to_swizzled_128x4_u8(sf_u8: Tensor) -> Tensor:
    """Block scales [..., R, C] uint8 (linear) -> the 128x4 layout [..., Rp, Cp] (R padded to 128, C to 4; padding
    zero), each leading index (an expert of a stack) swizzled on its own."""
    *lead, rows, cols = sf_u8.shape
    rows_padded = -(-rows // _SWIZZLE_ROWS) * _SWIZZLE_ROWS
    cols_padded = -(-cols // _SWIZZLE_COLS) * _SWIZZLE_COLS
    flat = sf_u8.reshape(-1, rows * cols)
    out = torch.zeros(flat.shape[0], rows_padded * cols_padded, dtype=torch.uint8, device=sf_u8.device)
    offsets = swizzled_128x4_offsets(torch.arange(rows, device=sf_u8.device), cols).reshape(-1)
    out[:, offsets] = flat
    return out.reshape(*lead, rows_padded, cols_padded)


def _check_act(packed_u8: Tensor, sf_swizzled_u8: Tensor, name: str) -> tuple[int, int]:
    if packed_u8.dtype != torch.uint8 or packed_u8.dim() != 2:
        raise ValueError(f"{name}.packed_u8: expected uint8 [R, K/2], got {packed_u8.dtype} {tuple(packed_u8.shape)}")
    if sf_swizzled_u8.dtype not in (torch.uint8, torch.float8_e4m3fn):
        raise ValueError(f"{name}.sf_swizzled_u8: expected E4M3 bytes (uint8), got {sf_swizzled_u8.dtype}")
    rows, k = packed_u8.shape[0], 2 * packed_u8.shape[1]
    if k % _SF_BLOCK:
        raise ValueError(f"{name}.packed_u8: K = {k} is not a multiple of {_SF_BLOCK}")
    return rows, k


def _decode_rows(packed_u8: Tensor, sf_swizzled_u8: Tensor, scale_rows_i64: Tensor) -> Tensor:
    """Packed E2M1 rows [R, K/2] with each row's scales at scale_rows_i64 [R] of the swizzled buffer -> bf16
    [R, K], each element e2m1 x E4M3 block scale (exact in bf16: at most 6 significant bits, 2^-10 .. 2688)."""
    rows, k = packed_u8.shape[0], 2 * packed_u8.shape[1]
    codes = torch.stack((packed_u8 & 0xF, packed_u8 >> 4), dim=-1).reshape(rows, k)  # element 2i: low nibble
    offsets = swizzled_128x4_offsets(scale_rows_i64, k // _SF_BLOCK)
    sf_f32 = sf_swizzled_u8.reshape(-1).view(torch.uint8)[offsets].view(torch.float8_e4m3fn).to(torch.float32)
    values = e2m1_codes_to_f32(codes).reshape(rows, k // _SF_BLOCK, _SF_BLOCK) * sf_f32.unsqueeze(-1)
    return values.reshape(rows, k).to(torch.bfloat16)


def nvfp4_act_to_bf16(packed_u8: Tensor, sf_swizzled_u8: Tensor) -> Tensor:
    """Dense NVFP4 boundary activations (packed E2M1 [M, K/2], 128x4 swizzled E4M3 scales) -> their exact values
    without the global scale, bf16 [M, K] (the caller folds the global decode scale into its own fp32 scale).
    Reads only the scale bytes of real rows and columns: padding is never read. No host sync."""
    rows, k = _check_act(packed_u8, sf_swizzled_u8, "a")
    rows_padded = -(-rows // _SWIZZLE_ROWS) * _SWIZZLE_ROWS
    cols_padded = -(-(k // _SF_BLOCK) // _SWIZZLE_COLS) * _SWIZZLE_COLS
    if sf_swizzled_u8.numel() < rows_padded * cols_padded:
        raise ValueError(f"a.sf_swizzled_u8: {sf_swizzled_u8.numel()} bytes, expected at least "
                         f"{rows_padded} x {cols_padded} for {rows} rows of K = {k}")
    return _decode_rows(packed_u8, sf_swizzled_u8, torch.arange(rows, device=packed_u8.device))


def grouped_padded_row_of(offsets_i32: Tensor, rows: int) -> Tensor:
    """For each of the `rows` expert-sorted rows, its row in the grouped scale buffer where each expert's rows are
    padded to 128 on their own: row i of expert e -> i - offsets[e] + sum over e' < e of round_up(count e', 128).
    int64 [rows], device ops only."""
    off = offsets_i32.to(torch.int64)
    counts = off[1:] - off[:-1]
    padded = (counts + _SWIZZLE_ROWS - 1) // _SWIZZLE_ROWS * _SWIZZLE_ROWS
    padded_start = torch.cumsum(padded, 0) - padded
    i = torch.arange(rows, dtype=torch.int64, device=off.device)
    expert = torch.searchsorted(off[1:], i, right=True).clamp_(max=counts.numel() - 1)
    return i - off[expert] + padded_start[expert]


def grouped_nvfp4_act_to_bf16(packed_u8: Tensor, sf_swizzled_u8: Tensor, offsets_i32: Tensor) -> Tensor:
    """Grouped NVFP4 boundary activations (expert-sorted rows, offsets int32 [E+1], each expert's scale rows padded
    to 128 then swizzled) -> their exact values without the global scales, bf16 [R, K]. Padding is never read.
    No host sync (the row count is the packed tensor's shape)."""
    rows, _ = _check_act(packed_u8, sf_swizzled_u8, "a")
    if offsets_i32.dtype != torch.int32 or offsets_i32.dim() != 1 or offsets_i32.numel() < 2:
        raise ValueError(f"offsets_i32: expected int32 [E+1], got {offsets_i32.dtype} {tuple(offsets_i32.shape)}")
    return _decode_rows(packed_u8, sf_swizzled_u8, grouped_padded_row_of(offsets_i32, rows))


def f32_pow2_to_ue8m0_u8(scale_f32: Tensor) -> Tensor:
    """float32 scales that are powers of two -> UE8M0 bytes (2^(b - 127)), exactly: a normal 2^e -> e + 127,
    the subnormal 2^-127 -> 0. A scale that is not a power of two (or NaN, Inf, zero, negative) -> 0xFF, the NaN
    byte, so a bytes verdict shows it instead of a rounded byte hiding it."""
    bits = scale_f32.to(torch.float32).contiguous().view(torch.int32)
    exponent, mantissa = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    positive = bits > 0
    normal_pow2 = positive & (mantissa == 0) & (exponent > 0) & (exponent < 0xFF)
    byte = torch.where(normal_pow2, exponent, torch.full_like(exponent, 0xFF))
    byte = torch.where(positive & (exponent == 0) & (mantissa == (1 << 22)), torch.zeros_like(byte), byte)
    return byte.to(torch.uint8)


# ----------------------------------------------------------------------------- decode-back comparison


@dataclass(frozen=True)
class ZeroSignBlindDiff:
    """zero_sign_blind_diff's counts over `total` elements: `bits_differ` (any bit differs, or NaN on either side),
    `zero_sign_only` (both are zeros of opposite sign), `other` = bits_differ - zero_sign_only (the ones that
    count), `first_other` (flat index of the first of those, None when there is none)."""

    total: int
    bits_differ: int
    zero_sign_only: int
    other: int
    first_other: int | None


def zero_sign_blind_diff(got: Tensor, want: Tensor) -> ZeroSignBlindDiff:
    """Bit-exact comparison of a weight decoded back THROUGH A GEMM with the checkpoint's decoded values, blind
    to the sign of zero only.

    Why the sign of zero: a kernel's GEMM on the identity (the only way to read a prepared weight back through
    the kernel itself) returns sum_k 1[k == n] x w[n, k] from an accumulator that starts at +0, and
    (+0) + (-0) = +0 in IEEE arithmetic, so a -0 weight (E2M1 code 0x8, or any code under a zero block scale
    with its sign bit set) always comes out +0; no GEMM output can ever show that sign (a zero product adds
    nothing to any sum that has another term). Everything else must be bit-equal: the two are the same float32
    bits, or both are zeros (of either sign). A NaN is never equal, not even to a NaN with the same bits (a
    decoded weight has no business being NaN). Inputs of different shapes raise ValueError naming both."""
    if got.shape != want.shape:
        raise ValueError(f"got: shape {tuple(got.shape)} differs from want {tuple(want.shape)}")
    g = got.detach().to(torch.float32).reshape(-1).cpu()
    w = want.detach().to(torch.float32).reshape(-1).cpu()
    nan = torch.isnan(g) | torch.isnan(w)
    bits_differ = (g.view(torch.int32) != w.view(torch.int32)) | nan
    zero_sign_only = bits_differ & (g == 0) & (w == 0)
    other = bits_differ & ~zero_sign_only
    first = torch.nonzero(other)
    return ZeroSignBlindDiff(g.numel(), int(bits_differ.sum()), int(zero_sign_only.sum()), int(other.sum()),
                             int(first[0, 0]) if first.numel() else None)
