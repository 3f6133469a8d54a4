"""A measured accumulator: how many mantissa bits a backend's GEMM really keeps, per GEMM path.

The GEMM bound (DESIGN "Verdicts") uses the backend's declared unit roundoff u_acc. A backend could
declare a loose u_acc and pass anything; so the harness measures it on exact-arithmetic NVFP4 data
and refuses a backend whose declaration is looser than the measurement.

Probe data (global scales 1, alpha 1): output column j of row i is
    +2^(10 + b_j)  +  n small terms of 2^(s_j - 10)  -  2^(10 + b_j)
(the big terms in the first and last block, the small ones in every block between). Every product
and the exact sum n * 2^(s_j - 10) are exact in bf16 / fp32 / float64. An accumulator that keeps p
mantissa bits and adds the small terms to the big one loses them once the gap t_j = 20 + b_j - s_j
reaches p (round to nearest: a term of half an ulp ties to even and is lost; truncation loses it
too): the largest gap whose column comes out exact gives the effective bits p_eff = t + 1. A
second set of columns puts small terms of 0.75 ulp at the measured width: round-to-nearest keeps
each (rounded up to an ulp), truncation drops them. Each path is probed with its own token count
(M selects the kernel path on sm90: GEMV, swap-AB wgmma, fp16 GEMM), K = 1024.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from references.codecs import f32_to_e4m3_bytes
from references.gemm import U_FP32
from references.nvfp4 import pack_e2m1x2_low_first
from references.stages import Op
from verify.backends import Backend, QuantizedAct
from verify.backends.registry import BACKEND_HELP, backend_arg
from verify.checkpoint import Nvfp4Linear

__all__ = ["AccumulatorReading", "probe_accumulator", "check_declared_u_acc", "PROBE_PATHS", "AccumulatorRefused"]

K = 1024
BLOCKS = K // 16
GAPS = tuple(range(4, 39))  # t = 20 + b - s, b in [-8, 8], s in [-10, 8]: the big term's exponent over the small's
# path -> (M, N, K): the shape selects the kernel variant (sm90 routing, kernels/sm90/gemm_nvfp4.py for_shape:
# M <= 2 GEMV (one-warp CTAs when N > 2048; split-K when K is long), 3 <= M <= 32 Gluon wgmma with in-kernel
# split-K, M = 64 Triton swap-AB with split-K, 65 <= M < 256 Triton 128x128 with split-K, M >= 256 the fp16
# GEMM on predecoded weights). N counts columns (gap columns first, zero weights after); a plain int is M.
PROBE_PATHS = {
    "M=1 (GEMV)": (1, 0, K),
    "M=1, N=4096 (one-warp GEMV)": (1, 4096, K),
    "M=1, K=8192 (GEMV, split-K)": (1, 0, 8192),
    "M=16 (wgmma, split-K)": (16, 0, K),
    "M=64 (Triton swap-AB, split-K)": (64, 0, K),
    "M=128 (Triton 128x128, split-K)": (128, 0, K),
    "M=256 (fp16 GEMM)": (256, 0, K),
}
_CODE = {0.5: 1, 1.0: 2, 1.5: 3, 2.0: 4, 3.0: 5, 4.0: 6, 6.0: 7}


class AccumulatorRefused(RuntimeError):
    """The backend declares a looser u_acc than its measured accumulator (it could pass anything)."""


@dataclass(frozen=True)
class AccumulatorReading:
    path: str
    effective_bits: int        # p_eff: the accumulator keeps at least this many mantissa bits
    exact_up_to: bool          # True when every probed gap came out exact (the width is >= GAPS[-1] + 1)
    rounding: str              # "nearest", "truncation" or "n/a" (exact at every probed gap)
    u_measured: float          # the unit roundoff of a p_eff-bit mantissa: 2^-p_eff


def _pow2_split(e: int) -> tuple[float, float]:
    """2^e as code x E4M3 scale with the scale in [2^-9, 2^8]: (code value, scale)."""
    for code in (1.0, 2.0, 4.0, 0.5):
        sc = 2.0**e / code
        if 2.0**-9 <= sc <= 2.0**8:
            return code, sc
    raise ValueError(f"2^{e} is not a code x E4M3 power of two")


def _rows(values_per_block: list[tuple[float, list[float]]]) -> tuple[Tensor, Tensor]:
    """One row from per-block (scale, 16 element values that are code x scale): packed + linear scales."""
    codes, scales = [], []
    for scale, vals in values_per_block:
        for v in vals:
            mag = abs(v) / scale
            c = 0 if v == 0 else _CODE[mag]
            codes.append(c | (8 if v < 0 else 0))
        scales.append(scale)
    c = torch.tensor(codes, dtype=torch.uint8).view(1, -1)
    s = f32_to_e4m3_bytes(torch.tensor(scales, dtype=torch.float32), saturate=True).view(1, -1)
    return pack_e2m1x2_low_first(c), s


def _a_row(k: int = K) -> tuple[Tensor, Tensor]:
    big_c, big_s = _pow2_split(10)
    small_c, small_s = _pow2_split(-10)
    blocks = [(big_s, [big_c * big_s] + [0.0] * 15)]
    blocks += [(small_s, [small_c * small_s] * 16) for _ in range(k // 16 - 2)]
    blocks += [(big_s, [0.0] * 15 + [-big_c * big_s])]
    return _rows(blocks)


def _b_row(b: int, s: int, frac: float = 1.0, k: int = K) -> tuple[Tensor, Tensor]:
    """Big 2^b (first and last element), small frac x 2^s in between (frac 1.5 for the rounding columns:
    1.5 x 2^(s-10) x ... lands at 0.75 ulp of the big term when t = p_eff)."""
    big_c, big_s = _pow2_split(b)
    small_c, small_s = _pow2_split(s)
    blocks = [(big_s, [big_c * big_s] + [0.0] * 15)]
    blocks += [(small_s, [frac * small_c * small_s] * 16) for _ in range(k // 16 - 2)]
    blocks += [(big_s, [0.0] * 15 + [big_c * big_s])]
    return _rows(blocks)


def _gap_columns(gaps, frac: float = 1.0) -> list[tuple[int, int, float]]:
    out = []
    for t in gaps:  # t = 20 + b - s with b, s in [-8, 8] (2^b and 2^s as code x E4M3 scale)
        b = max(-8, min(8, t - 20 + 8))
        s = 20 + b - t
        out.append((b, s, frac))
    return out


def _weights(cols: list[tuple[int, int, float]], device, *, n: int = 0, k: int = K) -> Nvfp4Linear:
    """The gap columns, then zero columns up to n (codes 0, scale bytes 0) to reach the path's N."""
    rows = [_b_row(b, s, frac, k) for b, s, frac in cols]
    w = torch.cat([r[0] for r in rows])
    sf = torch.cat([r[1] for r in rows])
    if n > w.shape[0]:
        w = torch.cat([w, w.new_zeros(n - w.shape[0], w.shape[1])])
        sf = torch.cat([sf, sf.new_zeros(n - sf.shape[0], sf.shape[1])])
    w, sf = w.to(device), sf.to(device)
    one = torch.ones((), dtype=torch.float32, device=device)
    return Nvfp4Linear("accumulator-probe", w, sf.view(torch.float8_e4m3fn), one, one)


def _run(backend: Backend, m: int, lin: Nvfp4Linear, device) -> Tensor:
    from references.layouts import sf_linear_to_swizzled_128x4  # noqa: PLC0415 (the boundary layout)

    a_p, a_s = _a_row(lin.k)
    a = QuantizedAct(a_p.repeat(m, 1).to(device), sf_linear_to_swizzled_128x4(a_s.repeat(m, 1)).to(device),
                     torch.ones(1, dtype=torch.float32, device=device))
    return backend.dense_gemm(a, backend.prepare_linear(lin)).float().cpu()


def probe_accumulator(backend: Backend, device: torch.device | str,
                      paths: dict[str, int | tuple[int, int, int]] = PROBE_PATHS) -> list[AccumulatorReading]:
    """One reading per GEMM path ((M, N, K), or M with N = the gap columns and K = 1024) the backend serves on
    `device`. Under split-K the big terms sit in different splits and the small terms meet them as partial
    sums, so a split path may measure more bits than its accumulator has (allowed: see check_declared_u_acc)."""
    device = torch.device(device)
    if backend.unsupported_reason(Op.DENSE_GEMM, device) or backend.unsupported_reason(Op.PREPARE, device):
        return []
    cols = _gap_columns(GAPS)
    out = []
    for path, shape in paths.items():
        m, n, k = (shape, 0, K) if isinstance(shape, int) else shape
        n_small = 16 * (k // 16 - 2)
        y = _run(backend, m, _weights(cols, device, n=n, k=k), device)[:, :len(cols)]
        exact = [bool((y[:, j] == n_small * 2.0 ** (s - 10)).all()) for j, (b, s, _) in enumerate(cols)]
        ok = [t for t, e in zip(GAPS, exact) if e]
        # the first gap that fails ends the exact range (every smaller gap must be exact too)
        first_bad = next((t for t, e in zip(GAPS, exact) if not e), None)
        p_eff = (first_bad if first_bad is not None else GAPS[-1] + 1)
        if first_bad is not None and any(t > first_bad for t in ok):
            p_eff = first_bad  # non-monotone: report the conservative width
        rounding = "n/a"
        if first_bad is not None:
            try:  # small terms of 0.75 ulp of the big one: nearest rounds each up to an ulp, truncation drops it
                yr = _run(backend, m, _weights(_gap_columns([first_bad], frac=1.5), device, n=n, k=k), device)
                rounding = "nearest" if bool((yr[:, 0] != 0).all()) else "truncation"
            except KeyError:  # 1.5 x the small term is not an E2M1 code at this gap
                rounding = "unprobed"
        out.append(AccumulatorReading(path, p_eff, first_bad is None, rounding, 2.0 ** -p_eff))
    return out


def check_declared_u_acc(backend: Backend, readings: list[AccumulatorReading]) -> None:
    """Refuse (AccumulatorRefused) a backend whose declared u_acc is looser than a path's measured unit
    roundoff and than fp32's 2^-24: its bound would be wider than its arithmetic needs, and a loose bound
    passes bugs. Declaring fp32 is always allowed (a path that sums a tile's products exactly before
    adding them measures MORE bits than 24, and fp32's gamma(K) still bounds it rigorously)."""
    for r in readings:
        if backend.u_acc > max(r.u_measured, U_FP32) * (1 + 1e-12):
            raise AccumulatorRefused(
                f"{backend.name}: declares u_acc = 2^{_log2(backend.u_acc):.0f} but its {r.path} accumulator keeps "
                f"{r.effective_bits}{'+' if r.exact_up_to else ''} bits (u = 2^-{r.effective_bits}); a declaration "
                "looser than the measurement would let the bound pass bugs")


def _log2(x: float) -> float:
    import math  # noqa: PLC0415

    return math.log2(x)


# ============================================================================= CLI


def add_accumulator_arguments(p) -> None:
    p.add_argument("--backend", default="auto", type=backend_arg,
                   help=f"Backend whose GEMM paths to probe: {BACKEND_HELP}. Default: %(default)r.")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda. Default: %(default)r.")


def cli_accumulator(args) -> int:
    """`python -m verify accumulator`: effective accumulator bits and rounding per GEMM path; exit 1
    when the backend's declared u_acc is looser than measured. The first line names the backend and
    device (no checkpoint: the probe data are synthetic)."""
    from rich.console import Console
    from rich.table import Table

    from verify.backends import get_backend  # noqa: PLC0415
    from verify.config import check_env_backend, target_line  # noqa: PLC0415
    from verify.errors import DeviceUnavailableError, UsageError  # noqa: PLC0415

    check_env_backend(args.backend)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        backend = get_backend(args.backend, device)
    except ImportError as e:
        raise DeviceUnavailableError(f"--backend {args.backend}: backend unavailable ({e})", argument="--backend") \
            from None
    reason = backend.unsupported_reason(Op.DENSE_GEMM, device)
    if reason:
        raise DeviceUnavailableError(f"--backend {args.backend}: backend unavailable ({reason})", argument="--backend")
    console = Console()
    console.print(target_line("accumulator", checkpoint=None, backend=backend.name, device=device,
                              threads_note=getattr(args, "threads_note", None)).replace(
        "checkpoint (none)", "no checkpoint (synthetic probe data)"), highlight=False, soft_wrap=True)
    readings = probe_accumulator(backend, device)
    table = Table(title=f"{backend.name} on {device}: measured GEMM accumulator (declared u_acc = "
                        f"2^{_log2(backend.u_acc):.0f})")
    for col in ("path", "effective mantissa bits", "rounding", "u measured"):
        table.add_column(col)
    for r in readings:
        table.add_row(r.path, f"{r.effective_bits}{'+ (exact at every probed gap)' if r.exact_up_to else ''}",
                      r.rounding, f"2^-{r.effective_bits}")
    console.print(table)
    try:
        check_declared_u_acc(backend, readings)
    except AccumulatorRefused as e:
        console.print(f"[bold red]{e}[/]")
        return 1
    console.print("[green]the declared u_acc is not looser than any measured path[/]")
    return 0
