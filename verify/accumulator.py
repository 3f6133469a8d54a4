"""A measured accumulator: how many mantissa bits a backend's GEMM really keeps, per GEMM path.

The GEMM bound (DESIGN "Verdicts") uses the backend's declared unit roundoff u_acc. A backend could
declare a loose u_acc and pass anything; so the harness measures it on exact-arithmetic NVFP4 data
and refuses a backend whose declaration is looser than the measurement (it could pass anything) or
tighter (it claims more bits than a path keeps: the bound is lied to).

Probe data (global scales 1, alpha 1): output column j of row i is
    +2^(10 + b_j)  +  n small terms of 2^(s_j - 10)  -  2^(10 + b_j)
(the big terms in the first and last block, the small ones in every block between). Every product
and the exact sum n * 2^(s_j - 10) are exact in bf16 / fp32 / float64. An accumulator that keeps p
mantissa bits and adds the small terms to the big one loses them once the gap t_j = 20 + b_j - s_j
reaches p (round to nearest: a term of half an ulp ties to even and is lost; truncation loses it
too): the largest gap whose column comes out exact gives the effective bits p_eff = t + 1. A
second set of columns puts small terms of 0.75 ulp at the measured width: round-to-nearest keeps
each (rounded up to an ulp), truncation drops them. Each path is probed with its own token count
(M selects the kernel on sm90: the register-fed wgmma kernel or the fp16 GEMM), K = 1024 or 8192.

FP8 block-scaled paths (section "FP8 block-scaled paths" below: probe_fp8_accumulator,
check_declared_fp8_accumulator): through the backend's own FP8 dense_linear, the narrow accumulator's
bits and rounding inside one 128-K block and whether (and how often) it promotes to float32; a
backend whose declared fp8_u_acc or fp8_promotion_interval is not what a path measures is refused.
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
from verify.backends.base import declared_fp8_accumulator
from verify.checkpoint import Fp8BlockLinear, GatedMlp, Nvfp4Linear
from verify.errors import BackendRefusedError

__all__ = ["AccumulatorReading", "probe_accumulator", "check_declared_u_acc", "PROBE_PATHS", "AccumulatorRefused",
           "Fp8AccumulatorReading", "probe_fp8_accumulator", "probe_grouped_accumulator", "GROUPED_PROBE_PATHS",
           "check_declared_fp8_accumulator", "FP8_PROBE_PATHS", "FP8_PROBE_PATHS_GPU", "fp8_probe_paths",
           "FP8_GAPS", "FP8_PROMOTION_GAP", "accumulator_claims_more_than_kept"]

K = 1024
BLOCKS = K // 16
GAPS = tuple(range(4, 39))  # t = 20 + b - s, b in [-8, 8], s in [-10, 8]: the big term's exponent over the small's
# path -> (M, N, K): the shape selects the kernel variant (sm90 routing, kernels/sm90/gemm_nvfp4.py for_shape:
# every M sums an output in chunk_plan(N, K)'s chunks, M < 1024 by the register-fed wgmma kernel (a chunk a CTA, the
# chunk sums added by the tile's last CTA, or every chunk in one CTA where the routing says so; activations
# decoded in-kernel at M <= 2, once per GEMM above 16), M >= 1024
# by the Gluon fp16 GEMM on predecoded operands with a chunk and a total accumulator). The same summation at every M,
# so the readings should agree; each kernel is probed all the same. N counts columns (gap columns first, zero weights
# after); a plain int is M.
PROBE_PATHS = {
    "M=1 (wgmma, a chunk a CTA)": (1, 0, K),
    "M=1, N=4096 (wgmma, 6 CTAs an SM)": (1, 4096, K),
    "M=1, K=8192 (wgmma, 32 chunks)": (1, 0, 8192),
    "M=16 (wgmma)": (16, 0, K),
    "M=64 (wgmma, activations decoded once)": (64, 0, K),
    "M=128 (wgmma, two token tiles)": (128, 0, K),
    "M=256 (wgmma, every chunk in one CTA)": (256, 0, K),
    "M=1024 (Gluon fp16 GEMM, chunked: 8 chunks of 128 at this N and K)": (1024, 0, K),
}
# grouped (MoE) paths: path -> (experts E, rows per expert) of a grouped L2 GEMM on the same probe rows (N = the gap
# columns padded to 128, K = 1024); the sm90 routing (kernels/sm90/grouped_gemm_nvfp4.py) takes the register-fed
# wgmma kernel at <= 16 rows per expert, the large-token path (activations decoded once) at >= 64, the per-tile
# Triton kernel between.
GROUPED_PROBE_PATHS = {
    "grouped L2, 1 row per expert (sm90: register-fed wgmma)": (8, 1),
    "grouped L2, 32 rows per expert (sm90: per-tile Triton)": (8, 32),
    "grouped L2, 64 rows per expert (sm90: large-token)": (8, 64),
}
_CODE = {0.5: 1, 1.0: 2, 1.5: 3, 2.0: 4, 3.0: 5, 4.0: 6, 6.0: 7}


class AccumulatorRefused(RuntimeError):
    """The backend declares a looser u_acc than its measured accumulator (it could pass anything), or an
    FP8 accumulator (fp8_u_acc, promotion interval) that is not what its FP8 paths measure."""


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


def _run_grouped(backend: Backend, experts: int, rows: int, lin: Nvfp4Linear, device) -> Tensor:
    """The probe rows through the backend's grouped L2 GEMM: `experts` experts holding lin's weights, `rows` rows
    each (every row the probe's activation row); w1 / w3 zero (L2 does not read them)."""
    from references.layouts import sf_grouped_linear_to_swizzled_128x4  # noqa: PLC0415 (the boundary layout)

    a_p, a_s = _a_row(lin.k)
    r = experts * rows
    off = torch.arange(experts + 1, dtype=torch.int64) * rows
    sw, _ = sf_grouped_linear_to_swizzled_128x4(a_s.repeat(r, 1), off)
    a = QuantizedAct(a_p.repeat(r, 1).to(device), sw.contiguous().to(device),
                     torch.ones(1, dtype=torch.float32, device=device))

    def stack(t: Tensor) -> Tensor:
        return t.unsqueeze(0).expand(experts, *t.shape).contiguous()

    n, k = lin.n, lin.k
    ones = torch.ones(experts, dtype=torch.float32, device=device)
    zero = Nvfp4Linear("accumulator-probe.w13", torch.zeros(experts, k, n // 2, dtype=torch.uint8, device=device),
                       torch.zeros(experts, k, n // 16, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn),
                       ones, ones)
    w2 = Nvfp4Linear("accumulator-probe.w2", stack(lin.weight_u8), stack(lin.weight_scale_e4m3), ones, ones)
    y = backend.grouped_gemm(a, off.to(torch.int32).to(device), backend.prepare_experts(GatedMlp(zero, zero, w2)),
                             layer="l2")
    return y.float().cpu()


def _read_path(path: str, k: int, run) -> AccumulatorReading:
    """The reading of one path: run(cols) -> its outputs [rows, len(cols)] (float32) on the gap columns `cols`."""
    cols = _gap_columns(GAPS)
    n_small = 16 * (k // 16 - 2)
    y = run(cols)
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
            yr = run(_gap_columns([first_bad], frac=1.5))
            rounding = "nearest" if bool((yr[:, 0] != 0).all()) else "truncation"
        except KeyError:  # 1.5 x the small term is not an E2M1 code at this gap
            rounding = "unprobed"
    return AccumulatorReading(path, p_eff, first_bad is None, rounding, 2.0 ** -p_eff)


def _refused(backend: Backend, op: str, path: str, shape: str, e: Exception) -> BackendRefusedError:
    return BackendRefusedError(f"--backend {backend.name}: refused (its {op} crashed on the accumulator probe's path "
                               f"{path!r}, {shape}: {type(e).__name__}: {' '.join(str(e).split())[:400]})",
                               argument="--backend")


def probe_accumulator(backend: Backend, device: torch.device | str,
                      paths: dict[str, int | tuple[int, int, int]] = PROBE_PATHS) -> list[AccumulatorReading]:
    """One reading per GEMM path ((M, N, K), or M with N = the gap columns and K = 1024) the backend serves on
    `device`. Under split-K the big terms sit in different splits and the small terms meet them as partial
    sums, so a split path may measure more bits than its accumulator has (allowed: see check_declared_u_acc)."""
    device = torch.device(device)
    if backend.unsupported_reason(Op.DENSE_GEMM, device) or backend.unsupported_reason(Op.PREPARE, device):
        return []
    out = []
    for path, shape in paths.items():
        m, n, k = (shape, 0, K) if isinstance(shape, int) else shape
        try:
            out.append(_read_path(path, k, lambda cols, m=m, n=n, k=k: _run(
                backend, m, _weights(cols, device, n=n, k=k), device)[:, :len(cols)]))
        except NotImplementedError:  # the backend does not serve this path's shape (its own reason): not probed
            continue
        except Exception as e:  # noqa: BLE001 - a crash inside the backend: one line (exit 2), not a traceback
            raise _refused(backend, "dense_gemm", path, f"M={m} K={k}", e) from e
    return out


def probe_grouped_accumulator(backend: Backend, device: torch.device | str,
                              paths: dict[str, tuple[int, int]] = GROUPED_PROBE_PATHS) -> list[AccumulatorReading]:
    """One reading per grouped (MoE) GEMM path (experts, rows per expert) the backend serves on `device`: the same
    probe rows and gap columns as the dense paths, through prepare_experts and the grouped L2 GEMM; none where the
    backend serves no grouped GEMM."""
    device = torch.device(device)
    if (backend.unsupported_reason(Op.GROUPED_GEMM, device)
            or backend.unsupported_reason(Op.PREPARE, device)):
        return []
    out = []
    for path, (experts, rows) in paths.items():
        try:
            out.append(_read_path(path, K, lambda cols, e=experts, r=rows: _run_grouped(
                backend, e, r, _weights(cols, device, n=128, k=K), device)[:, :len(cols)]))
        except NotImplementedError:
            continue
        except Exception as e:  # noqa: BLE001 - a crash inside the backend: one line (exit 2), not a traceback
            raise _refused(backend, "grouped_gemm", path, f"E={experts} x {rows} rows, K={K}", e) from e
    return out


def check_declared_u_acc(backend: Backend, readings: list[AccumulatorReading], *, refuse_tighter: bool = True) -> None:
    """Refuse (AccumulatorRefused) a backend whose declared u_acc is not what its accumulator keeps:
    - looser than a path's measured unit roundoff and than fp32's 2^-24: its bound would be wider than its
      arithmetic needs, and a loose bound passes bugs. Declaring fp32 is always allowed (a path that sums a
      tile's products exactly before adding them measures MORE bits than 24, and fp32's gamma(K) still bounds
      it rigorously);
    - tighter than a path's measured unit roundoff (accumulator_claims_more_than_kept): it claims more bits
      than that path keeps, so its bound is lied to. A path exact at every probed gap refutes nothing.
      refuse_tighter=False leaves that to the caller (`verify layer` fails the run and still judges)."""
    for r in readings:
        if backend.u_acc > max(r.u_measured, U_FP32) * (1 + 1e-12):
            raise AccumulatorRefused(
                f"{backend.name}: declares u_acc = 2^{_log2(backend.u_acc):.0f} but its {r.path} accumulator keeps "
                f"{r.effective_bits}{'+' if r.exact_up_to else ''} bits (u = 2^-{r.effective_bits}); a declaration "
                "looser than the measurement would let the bound pass bugs")
    claims = accumulator_claims_more_than_kept(backend, readings) if refuse_tighter else []
    if claims:
        raise AccumulatorRefused(claims[0])


def accumulator_claims_more_than_kept(backend: Backend, readings: list[AccumulatorReading]) -> list[str]:
    """One line per path whose measured accumulator keeps fewer bits than the declared u_acc claims (the
    bound is then tighter than the arithmetic: that path's verdicts can only fail, never pass wrongly, but the
    declaration is false). `verify layer` reports each as a failure of the run and still runs the verdicts;
    `verify accumulator` exits 1."""
    return [f"{backend.name}: declares u_acc = 2^{_log2(backend.u_acc):.0f} but its {r.path} accumulator keeps "
            f"{r.effective_bits} bits ({r.rounding}, u = 2^-{r.effective_bits}); a declaration tighter than the "
            "measurement lies to the bound"
            for r in readings if not r.exact_up_to and backend.u_acc < r.u_measured * (1 - 1e-12)]


def _log2(x: float) -> float:
    import math  # noqa: PLC0415

    return math.log2(x)


# ============================================================================= FP8 block-scaled paths
#
# The FP8 block-scaled GEMM (NVFP4_FACTS 5b) sums each 128-K scale group's products in the tensor
# cores' narrow accumulator (about 14 bits on Hopper) and, in a good kernel, promotes the partial sum
# to float32 every 128 of K (DeepGEMM). The bound reads both from the backend (fp8_u_acc,
# fp8_promotion_interval); this probe measures both through the backend's own dense_linear.
#
# Probe data: every activation group holds the anchor 448 at position 1 (its weights are 0 in every
# column), so the group amax is 448 and both FP8 activation scale rules give the decode scale 1
# (UE8M0: 2^ceil(log2 1) = 1; float32: 448 / 448): the backend's own quantizer reproduces the bf16
# activations, which are E4M3 values, byte for byte. Weight block scales are E8M0 1. The activation
# row is
#     group 0:         +2^8 (position 0), 448, 2^-6 at positions 2..126, -2^8 (position 127)
#     groups 1..G-2:    0,                448, 2^-6 at positions 2..126,  0
#     group G-1:        0,                448, 2^-6 at positions 2..126, -2^8 (position 127)
# and each column picks its terms with its weights (every product and partial sum is exact in float64):
# - in-block columns (gap t): group 0 only, weights 2^wb at 0 and 127 and 2^ws at 2..126, so the
#   sum is +2^(8+wb), 125 products 2^(8+wb-t), -2^(8+wb), all inside one 128-K block. A p-bit
#   accumulator (nearest or truncation) keeps the small products while t <= p - 1 and loses them from
#   t = p on (at t = p a product is half an ulp: ties to even lose it too), so the smallest gap lost is
#   the effective width p_eff. A second column per gap takes 1.5 x 2^ws: at t = p_eff each product is
#   0.75 ulp; nearest rounds every one up to an ulp (125 ulp in all), truncation drops each (0).
# - promotion columns (group j = 1..G-2): 2^wb at position 0 of group 0 and at position 127 of the
#   last group, 2^ws on group j's small positions, gap 22 (FP8_PROMOTION_GAP): +big, 125 products
#   2^-22 below it in group j, -big at the very end. A narrow accumulator (p_eff <= 22) that the
#   small products meet together with a big term in the same chunk (summed from zero, then promoted)
#   loses them (or, truncating, rounds -big + their sum to -(big - ulp): 256 products, not 125); in a
#   chunk of their own they are summed exactly, promoted, and kept by float32 (the
#   sum needs 23 bits). So the groups whose products survive show where the promotions are: every
#   j with promotion every 128 of K, none without promotion (or with an interval >= K / 2).
# A backend serves the probe when it serves FP8 block-128 dense_linear (prepare_linear of an
# Fp8BlockLinear and dense_linear of its operand); the others get no FP8 readings.

FP8_GROUP = 128
FP8_GAPS = tuple(range(4, 32))  # t = 14 + wb - ws, wb in [-9, 8], ws in [-9, 8] (E4M3 powers of two)
FP8_PROMOTION_GAP = 22          # the sum of 125 products 2^-22 below the big term fits float32 (23 bits)
_A_BIG_LOG2, _A_SMALL_LOG2, _A_ANCHOR = 8, -6, 448.0
_SMALL_POS = tuple(range(2, FP8_GROUP - 1))  # 125 positions per group
_N_SMALL = len(_SMALL_POS)
# path -> (M, N, K): the shape selects the sm90 FP8 kernel variant (kernels/sm90/gemm_fp8_block.py
# CompileKey.for_shape and chunk_plan(N, K): M <= 16 / 32 / 64 swap-AB tiles of 64 weight rows x 16 / 32 /
# 64 tokens on one warpgroup, M > 64 128 x 64 tiles on two warpgroups; the groups cut into chunks from N
# and K, one program per chunk plus a chunk reduce when the grid is small ("split"), the chunks walked in
# one program otherwise).
FP8_PROBE_PATHS = {
    "M=1 (swap-AB 64x16, split: a program per group)": (1, 256, 1024),
    "M=1, N=4096, K=7168 (split: chunks of 12 groups)": (1, 4096, 7168),
    "M=32 (swap-AB 64x32, split)": (32, 256, 1024),
    "M=64 (swap-AB 64x64, split)": (64, 256, 1024),
    "M=128, N=16896 (128x64, one chunk)": (128, 16896, 1024),
    "M=4096, N=2048 (128x64, chunks in one program)": (4096, 2048, 1024),
}
# On a GPU also the shapes whose committed sm90 config (kernels/sm90/gemm_fp8_block_configs.TABLE) is a Gluon
# kernel: a 128 x 128 tile split (shared l1 at M <= 128), the producer-warp kernel (wq_a at M <= 4096), its
# 128 x 192 tile (wo_a at M <= 4096) and that tile with its warpgroups as two partitions (CompileKey.dual: wq_b at
# M <= 4096). Not on the CPU: the emulator would spend minutes on them in float64 and no
# Gluon kernel runs there.
FP8_PROBE_PATHS_GPU = {
    "M=128, N=3072, K=7168 (Gluon 128x128, split: shared l1)": (128, 3072, 7168),
    "M=256, N=1536, K=7168 (Gluon producer warp: wq_a)": (256, 1536, 7168),
    "M=256, N=16384, K=4096 (Gluon producer warp, 128x192 tile: wo_a)": (256, 16384, 4096),
    "M=256, N=65536, K=1536 (Gluon 128x192 tile, warpgroups as two partitions: wq_b)": (256, 65536, 1536),
}


def fp8_probe_paths(device: torch.device | str) -> dict[str, tuple[int, int, int]]:
    """The FP8 paths `verify accumulator` probes on `device`: FP8_PROBE_PATHS, and on CUDA FP8_PROBE_PATHS_GPU."""
    return FP8_PROBE_PATHS | (FP8_PROBE_PATHS_GPU if torch.device(device).type == "cuda" else {})


@dataclass(frozen=True)
class Fp8AccumulatorReading:
    """One FP8 GEMM path: the narrow accumulator inside a 128-K block and its float32 promotion.

    promotion_kept: per group j = 1..G-2, the column's value in units of one small product (125: all
    kept; 0: lost; another value: rounded together with a big term, e.g. 256 when a truncating chunk
    sums the products first and the -big after them); promotion_observable: False
    when the block accumulator keeps more than FP8_PROMOTION_GAP bits (then promoting to float32
    changes nothing the probe can see)."""

    path: str
    shape: tuple[int, int, int]   # (M, N, K)
    effective_bits: int           # p_eff: the smallest gap (in bits) at which a product is lost
    exact_up_to: bool             # exact at every probed gap: the width is >= FP8_GAPS[-1] + 1
    rounding: str                 # "nearest", "truncation", "mixed" (neither pattern), "unprobed" or "n/a"
    u_measured: float             # 2^-p_eff for nearest (and exact paths), 2^(1-p_eff) otherwise
    promotion_kept: tuple[float, ...]
    promotion_observable: bool

    @property
    def k(self) -> int:
        return self.shape[2]

    @property
    def promotion_interval(self) -> int | None:
        """The measured interval in K (a multiple of 128), None when no product survived (no promotion
        within K, or an interval >= K / 2); ValueError-free: -1 when no interval explains the reading."""
        if not any(self.groups_kept):
            return None
        groups = -(-self.k // FP8_GROUP)
        for d in range(1, groups + 1):
            if _predicted_kept(self.k, FP8_GROUP * d) == self.groups_kept:
                return FP8_GROUP * d
        return -1

    @property
    def groups_kept(self) -> tuple[bool, ...]:
        """Per group j = 1..G-2: all 125 small products came out exactly."""
        return tuple(v == _N_SMALL for v in self.promotion_kept)

    def promotion_matches(self, interval: int | None) -> bool:
        """Whether a kernel that promotes every `interval` of K (None: never) gives this reading."""
        return not self.promotion_observable or _predicted_kept(self.k, interval) == self.groups_kept

    def promotion_text(self) -> str:
        if not self.promotion_observable:
            return f"n/a ({self.effective_bits}{'+' if self.exact_up_to else ''} bits in a block: not observable)"
        d = self.promotion_interval
        if d is None:
            return f"none within K={self.k} (or every >= K/2)"
        if d == -1:
            return f"irregular (kept per group: {[int(v) if v == int(v) else v for v in self.promotion_kept]})"
        return f"float32 every {d} of K"


def _predicted_kept(k: int, interval: int | None) -> tuple[bool, ...]:
    """Per group j = 1..G-2, whether a kernel promoting every `interval` of K keeps all its small
    products: each in a chunk that holds neither the big term (k = 0) nor its negation (k = K - 1).
    (A chunk that does hold one loses them or rounds them with it: never exactly 125 products.)"""
    def chunk(pos: int) -> int:
        return 0 if interval is None else pos // interval

    groups = -(-k // FP8_GROUP)
    big = {chunk(0), chunk(k - 1)}
    return tuple(all(chunk(j * FP8_GROUP + p) not in big for p in _SMALL_POS) for j in range(1, groups - 1))


def _fp8_gap_split(t: int, *, frac: bool) -> tuple[int, int]:
    """(wb, ws) with 14 + wb - ws = t and 2^wb, 2^ws (and 1.5 x 2^ws when frac) E4M3 values."""
    ws_min = -8 if frac else -9  # 1.5 x 2^-9 is not an E4M3 value (subnormal step 2^-9)
    ws = max(ws_min, min(8, 14 + 8 - t))
    wb = t - 14 + ws
    if not -9 <= wb <= 8:
        raise ValueError(f"gap {t}: not a ratio of E4M3 powers of two x {_A_BIG_LOG2 - _A_SMALL_LOG2}")
    return wb, ws


def _fp8_act_row(k: int) -> Tensor:
    """The activation row (section comment), float32 values on the E4M3 grid, [K]."""
    groups = k // FP8_GROUP
    x = torch.zeros(k, dtype=torch.float32)
    for g in range(groups):
        base = g * FP8_GROUP
        x[base + 1] = _A_ANCHOR
        x[base + 2:base + FP8_GROUP - 1] = 2.0**_A_SMALL_LOG2
    x[0] = 2.0**_A_BIG_LOG2
    x[FP8_GROUP - 1] = -(2.0**_A_BIG_LOG2)
    x[k - 1] = -(2.0**_A_BIG_LOG2)
    return x


def _fp8_weights(k: int, n: int) -> tuple[Tensor, list[tuple[int, int, float]], list[int]]:
    """float32 [columns, K] weights (_fp8_linear pads zero columns up to n): the in-block columns
    (gap, frac) in FP8_GAPS order (frac 1.0, then 1.5 where it is an E4M3 value), then one promotion
    column per group 1..G-2. Returns (weights, [(column, gap, frac)], [promotion columns])."""
    groups = k // FP8_GROUP
    rows, inblock, promo = [], [], []
    for frac in (1.0, 1.5):
        for t in FP8_GAPS:
            try:
                wb, ws = _fp8_gap_split(t, frac=frac != 1.0)
            except ValueError:
                continue
            r = torch.zeros(k, dtype=torch.float32)
            r[0] = r[FP8_GROUP - 1] = 2.0**wb
            r[2:FP8_GROUP - 1] = frac * 2.0**ws
            inblock.append((len(rows), t, frac))
            rows.append(r)
    wb, ws = _fp8_gap_split(FP8_PROMOTION_GAP, frac=False)
    for j in range(1, groups - 1):
        r = torch.zeros(k, dtype=torch.float32)
        r[0] = r[k - 1] = 2.0**wb
        r[j * FP8_GROUP + 2:(j + 1) * FP8_GROUP - 1] = 2.0**ws
        promo.append(len(rows))
        rows.append(r)
    if len(rows) > n:
        raise ValueError(f"N={n}: the FP8 probe needs at least {len(rows)} columns at K={k}")
    return torch.stack(rows), inblock, promo


def _fp8_linear(w_f32: Tensor, n: int, device) -> Fp8BlockLinear:
    """E4M3 bytes of w (exact: every value is on the grid), zero rows up to n, E8M0 block scales 1 (byte 127)."""
    k = w_f32.shape[1]
    w_u8 = f32_to_e4m3_bytes(w_f32, saturate=True)
    if not torch.equal(w_u8.view(torch.float8_e4m3fn).float(), w_f32):
        raise AssertionError("FP8 probe weights: not on the E4M3 grid")  # a probe bug, not a backend's
    w_e4m3 = torch.cat([w_u8, w_u8.new_zeros(n - w_u8.shape[0], k)]).view(torch.float8_e4m3fn)
    scale = torch.full((-(-n // FP8_GROUP), -(-k // FP8_GROUP)), 127, dtype=torch.uint8)
    return Fp8BlockLinear("accumulator-probe-fp8", w_e4m3.to(device), scale.view(torch.float8_e8m0fnu).to(device),
                          None)


def _serves_fp8_dense_linear(backend: Backend, device: torch.device) -> bool:
    return not (backend.unsupported_reason(Op.DENSE_LINEAR, device) or backend.unsupported_reason(Op.PREPARE, device))


def probe_fp8_accumulator(backend: Backend, device: torch.device | str,
                          paths: dict[str, tuple[int, int, int]] = FP8_PROBE_PATHS, *,
                          not_served: dict[str, str] | None = None) -> list[Fp8AccumulatorReading]:
    """One reading per FP8 block-scaled path ((M, N, K), K a multiple of 128 with at least 3 groups) that
    the backend serves through dense_linear on `device`; [] when it serves no FP8 block-128 dense_linear.
    A path whose prepare_linear or dense_linear raises NotImplementedError (a shape the backend leaves out,
    e.g. M = 1) gets no reading; `not_served` (when given) receives path -> the backend's sentence."""
    device = torch.device(device)
    if not _serves_fp8_dense_linear(backend, device):
        return []
    out = []
    for path, (m, n, k) in paths.items():
        if k % FP8_GROUP or k < 3 * FP8_GROUP:
            raise ValueError(f"FP8 probe path {path!r}: K={k} must be a multiple of {FP8_GROUP}, at least 3 groups")
        w, inblock, promo = _fp8_weights(k, n)
        x = _fp8_act_row(k).to(torch.bfloat16).repeat(m, 1).to(device)
        try:
            y = backend.dense_linear(x, backend.prepare_linear(_fp8_linear(w, n, device))).double().cpu()
        except NotImplementedError as e:
            if not_served is not None:
                not_served[path] = str(e)
            continue
        out.append(_fp8_reading(path, (m, n, k), y, inblock, promo))
    return out


def _fp8_reading(path: str, shape: tuple[int, int, int], y: Tensor, inblock, promo) -> Fp8AccumulatorReading:
    def column_exact(col: int, want: float) -> bool:
        return bool((y[:, col] == want).all())

    small = {t: 2.0 ** (_A_SMALL_LOG2 + _fp8_gap_split(t, frac=False)[1]) for t in FP8_GAPS}
    exact = [column_exact(c, _N_SMALL * small[t]) for c, t, frac in inblock if frac == 1.0]
    first_bad = next((t for t, e in zip(FP8_GAPS, exact) if not e), None)
    p_eff = first_bad if first_bad is not None else FP8_GAPS[-1] + 1
    rounding = "n/a"
    if first_bad is not None:
        col = next((c for c, t, frac in inblock if frac != 1.0 and t == first_bad), None)
        if col is None:
            rounding = "unprobed"
        else:  # 125 products of 0.75 ulp: nearest keeps an ulp each (ulp = 2 x the plain product), truncation none
            ws = _fp8_gap_split(first_bad, frac=True)[1]
            ulp = 2.0 * 2.0 ** (_A_SMALL_LOG2 + ws)
            rounding = ("truncation" if column_exact(col, 0.0) else "nearest" if column_exact(col, _N_SMALL * ulp)
                        else "mixed")
    u = 2.0**-p_eff if rounding in ("nearest", "n/a") else 2.0 ** (1 - p_eff)
    small_p = 2.0 ** (_A_SMALL_LOG2 + _fp8_gap_split(FP8_PROMOTION_GAP, frac=False)[1])
    kept = []
    for c in promo:  # the least-kept row: a path must keep the products of every row to count as keeping them
        v = y[:, c] / small_p
        kept.append(float(v.min()) if bool((v == v[0]).all()) else -1.0)
    observable = first_bad is not None and p_eff <= FP8_PROMOTION_GAP
    return Fp8AccumulatorReading(path, shape, p_eff, first_bad is None, rounding, u, tuple(kept), observable)


def check_declared_fp8_accumulator(backend: Backend, readings: list[Fp8AccumulatorReading]) -> None:
    """Refuse (AccumulatorRefused) a backend whose declared FP8 accumulator (declared_fp8_accumulator:
    fp8_u_acc, fp8_promotion_interval) is not what a path measures:
    - fp8_u_acc tighter than the measured unit roundoff (it claims more bits than it keeps: a bound
      with that u is lied to; paths exact at every probed gap cannot be refuted this way);
    - fp8_u_acc looser than the measurement and than fp32's 2^-24 (a loose bound passes bugs);
    - a promotion interval whose prediction differs from the products the path kept."""
    u_dec, interval = declared_fp8_accumulator(backend)
    for r in readings:
        kept = f"{r.effective_bits}{'+' if r.exact_up_to else ''} bits ({r.rounding}, u = 2^{_log2(r.u_measured):.0f})"
        if not r.exact_up_to and u_dec < r.u_measured * (1 - 1e-12):
            raise AccumulatorRefused(
                f"{backend.name}: declares fp8_u_acc = 2^{_log2(u_dec):.0f} but its FP8 {r.path} accumulator keeps "
                f"{kept} inside a 128-K block; a declaration tighter than the measurement lies to the bound")
        if u_dec > max(r.u_measured, U_FP32) * (1 + 1e-12):
            raise AccumulatorRefused(
                f"{backend.name}: declares fp8_u_acc = 2^{_log2(u_dec):.0f} but its FP8 {r.path} accumulator keeps "
                f"{kept}; a declaration looser than the measurement would let the bound pass bugs")
        if not r.promotion_matches(interval):
            said = "no float32 promotion" if interval is None else f"float32 promotion every {interval} of K"
            raise AccumulatorRefused(
                f"{backend.name}: declares {said} but its FP8 {r.path} path measures {r.promotion_text()} "
                f"(small products kept per K group 1..{len(r.promotion_kept)}: "
                f"{[int(v) if v == int(v) else v for v in r.promotion_kept]})")



# ============================================================================= CLI


def add_accumulator_arguments(p) -> None:
    p.add_argument("--backend", default="auto", type=backend_arg,
                   help=f"Backend whose GEMM paths to probe: {BACKEND_HELP}. Default: %(default)r.")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda. Default: %(default)r.")


def cli_accumulator(args) -> int:
    """`python -m verify accumulator`: effective accumulator bits and rounding per GEMM path; exit 1
    when the backend's declared u_acc is looser than measured. Then the FP8 block-scaled paths (when
    the backend serves FP8 dense_linear): bits and rounding inside a 128-K block and the float32
    promotion interval; exit 1 when the declared fp8_u_acc / promotion interval is not what they
    measure. The first line names the backend and device (no checkpoint: the probe data are synthetic)."""
    from rich.console import Console
    from rich.table import Table

    from verify.backends import get_backend  # noqa: PLC0415
    from verify.config import check_env_backend, target_line  # noqa: PLC0415
    from verify.errors import DeviceUnavailableError  # noqa: PLC0415

    check_env_backend(args.backend)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        backend = get_backend(args.backend, device)
    except ImportError as e:
        raise DeviceUnavailableError(f"--backend {args.backend}: backend unavailable ({e})", argument="--backend") \
            from None
    reason = backend.unsupported_reason(Op.DENSE_GEMM, device)
    if reason and not _serves_fp8_dense_linear(backend, device):  # neither an NVFP4 nor an FP8 GEMM to probe
        raise DeviceUnavailableError(f"--backend {args.backend}: backend unavailable ({reason})", argument="--backend")
    console = Console()
    console.print(target_line("accumulator", checkpoint=None, backend=backend.name, device=device,
                              threads_note=getattr(args, "threads_note", None)).replace(
        "checkpoint (none)", "no checkpoint (synthetic probe data)"), highlight=False, soft_wrap=True)
    if reason:  # FP8 only (e.g. torch on a Hopper: its NVFP4 GEMM needs a Blackwell)
        console.print(f"{backend.name} serves no NVFP4 dense_gemm on {device} ({reason}): no NVFP4 paths probed",
                      soft_wrap=True)
        return _print_fp8_accumulator(console, backend, device)
    readings = probe_accumulator(backend, device) + probe_grouped_accumulator(backend, device)
    table = Table(title=f"{backend.name} on {device}: measured GEMM accumulator, dense and grouped (declared u_acc = "
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
    console.print("[green]the declared u_acc is what every measured path keeps (neither looser nor tighter)[/]")
    return _print_fp8_accumulator(console, backend, device)


def _print_fp8_accumulator(console, backend: Backend, device: torch.device) -> int:
    """The FP8 block-scaled table (when the backend serves FP8 dense_linear) and its check: 0, or 1
    with one red line when the declared FP8 accumulator is not what a path measures."""
    from rich.table import Table

    not_served: dict[str, str] = {}
    readings = probe_fp8_accumulator(backend, device, paths=fp8_probe_paths(device), not_served=not_served)
    if not readings:
        console.print(f"{backend.name} serves no FP8 block-128 dense_linear on {device}: no FP8 paths probed"
                      + "".join(f"; {p}: {why}" for p, why in not_served.items()), soft_wrap=True)
        return 0
    u_dec, interval = declared_fp8_accumulator(backend)
    said = "none" if interval is None else f"every {interval} of K"
    table = Table(title=f"{backend.name} on {device}: measured FP8 block-scaled GEMM accumulator (declared "
                        f"fp8_u_acc = 2^{_log2(u_dec):.0f}, float32 promotion {said})")
    for col in ("path", "M x N x K", "bits in a 128-K block", "rounding", "u measured", "float32 promotion"):
        table.add_column(col)
    for r in readings:
        table.add_row(r.path, " x ".join(map(str, r.shape)),
                      f"{r.effective_bits}{'+ (exact at every gap)' if r.exact_up_to else ''}",
                      r.rounding, f"2^{_log2(r.u_measured):.0f}", r.promotion_text())
    for path, why in not_served.items():  # a shape the backend leaves out: shown, never dropped
        shape = FP8_PROBE_PATHS.get(path)
        table.add_row(path, " x ".join(map(str, shape)) if shape else "", "not served", "", "", why)
    console.print(table)
    try:
        check_declared_fp8_accumulator(backend, readings)
    except AccumulatorRefused as e:
        console.print(f"[bold red]{e}[/]", soft_wrap=True)
        return 1
    console.print("[green]the declared FP8 accumulator (fp8_u_acc, promotion interval) is what every path measures[/]")
    return 0
