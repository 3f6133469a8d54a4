"""Emulator self-check: the main job until the layer harness exists (`python -m verify demo`).

Runs the bit-level codecs against the third-party oracles that are installed (ml_dtypes,
torch casts), every recipe on a deterministic heavy-tailed activation (round-trip
bound, quantization loss metrics), the swizzle round trip and the GEMM bound, and
prints one rich table. Every row is a real check that can fail; the exit status is
non-zero if any does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from references import layouts
from references.codecs import e2m1_codes_to_f32, e4m3_bytes_to_f32, f32_to_e2m1_codes, f32_to_e4m3_bytes
from references.gemm import U_FP32, bound_ratio, gemm_error_bound, nvfp4_gemm_f64
from references.nvfp4 import (
    decode_nvfp4_block_scaled,
    dequantize_nvfp4,
    unpack_e2m1x2_low_first,
    global_dec_scale_from_amax,
    quantize_nvfp4,
    te_global_enc_scale,
)
from references.recipes import RECIPES
from verify.metrics import stage_metrics
from verify.oracles import ORACLE_VERSIONS, installed_version, matches


@dataclass(frozen=True)
class CheckRow:
    check: str
    ok: bool
    detail: str
    metrics: dict | None = None


def make_heavy_tailed_activation(rows: int, k: int, seed: int) -> torch.Tensor:
    """Student-t-like data with a few outlier channels (bf16), deterministic."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) / torch.sqrt(torch.rand(rows, k, generator=g).clamp_min(1e-3))
    outliers = torch.randperm(k, generator=g)[: max(1, k // 64)]
    x[:, outliers] *= 30.0
    return x.to(torch.bfloat16)


def _codec_rows() -> list[CheckRow]:
    rows = []
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    finite = torch.isfinite(x)
    try:
        import ml_dtypes
        import numpy as np

        with np.errstate(invalid="ignore", over="ignore"):
            e4 = torch.from_numpy(x.numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8).copy())
            e2 = torch.from_numpy(x.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8).copy())
        n4 = int((f32_to_e4m3_bytes(x, saturate=False) != e4).sum())
        n2 = int((f32_to_e2m1_codes(x)[~torch.isnan(x)] != e2[~torch.isnan(x)]).sum())
        version = installed_version("ml_dtypes")
        note = "" if any(matches(version, d) for d in ORACLE_VERSIONS["ml_dtypes"]) else \
            f" (ml_dtypes {version} is not the documented {ORACLE_VERSIONS['ml_dtypes'][0]})"
        rows.append(CheckRow(f"e4m3 encode, all bf16 vs ml_dtypes {version}", n4 == 0, f"{n4} / 65536 differ{note}"))
        rows.append(CheckRow(f"e2m1 encode, all non-NaN bf16 vs ml_dtypes {version}", n2 == 0, f"{n2} differ{note}"))
    except ImportError:
        rows.append(CheckRow("ml_dtypes oracle", True, "not installed (pip install '.[test]'); skipped"))
    t = x[finite].to(torch.float8_e4m3fn).view(torch.uint8)
    torch_sat = int(torch.tensor([465.0]).to(torch.float8_e4m3fn).view(torch.uint8)) == 0x7E
    n = int((f32_to_e4m3_bytes(x[finite], saturate=torch_sat) != t).sum())
    rows.append(CheckRow(f"e4m3 encode, finite bf16 vs torch cast (saturating={torch_sat})", n == 0, f"{n} differ"))
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    dec, oracle = e4m3_bytes_to_f32(b), b.view(torch.float8_e4m3fn).float()
    same = bool(torch.equal(torch.isnan(dec), torch.isnan(oracle)) and torch.equal(dec.nan_to_num(), oracle.nan_to_num()))
    rows.append(CheckRow("e4m3 decode, 256 bytes vs torch", same, "bit-equal" if same else "differs"))
    e2 = e2m1_codes_to_f32(torch.arange(16, dtype=torch.uint8)).tolist()
    rows.append(CheckRow("e2m1 decode, 16 codes", e2[:8] == [0, 0.5, 1, 1.5, 2, 3, 4, 6], f"{e2[:8]}"))
    return rows


def _recipe_rows(x_bf16: torch.Tensor) -> list[CheckRow]:
    rows = []
    amax = x_bf16.float().abs().max()
    for recipe in RECIPES.values():
        kw = ({"global_enc_scale_f32": te_global_enc_scale(amax)} if recipe.global_convention == "enc"
              else {"global_dec_scale_f32": global_dec_scale_from_amax(amax)})
        q = quantize_nvfp4(x_bf16, recipe=recipe, **kw)
        deq = dequantize_nvfp4(q)
        # |x - deq| <= half the E2M1 gap around the code (0.25 below 2, 0.5 below 4, else 1)
        # times block scale times global decode; elements past 6 after scaling saturate and are counted.
        q_abs = e2m1_codes_to_f32(unpack_e2m1x2_low_first(q.packed_u8)).abs().double()
        half_gap = torch.where(q_abs < 2, 0.25, torch.where(q_abs < 4, 0.5, 1.0))
        blk = e4m3_bytes_to_f32(q.sf_u8).double().repeat_interleave(16, -1) * q.global_dec_scale().double()
        saturated = x_bf16.double().abs() > 6 * blk
        err = (deq.double() - x_bf16.double()).abs()
        # slack: one float32 rounding of the dequantized value (2^-24 relative)
        ratio = err / (half_gap * blk + deq.double().abs() * 2**-24)
        worst = float(ratio[~saturated].max())
        m = stage_metrics(deq, x_bf16.float())
        rows.append(CheckRow(f"quantize {recipe.name}: |x - dq(q(x))| / half-step bound", worst <= 1.0,
                             f"max ratio {worst:.3f} ({int(saturated.sum())} saturated); cos {m['cosine']:.6f}, SQNR {m['sqnr_db']:.2f} dB", m))
    return rows


def _layout_and_gemm_rows(x_bf16: torch.Tensor) -> list[CheckRow]:
    rows = []
    g = torch.Generator().manual_seed(1)
    sf = torch.randint(0, 127, (300, 28), dtype=torch.uint8, generator=g)
    buf = layouts.sf_linear_to_swizzled_128x4(sf)
    r, c = torch.meshgrid(torch.arange(300), torch.arange(28), indexing="ij")
    ok = torch.equal(buf.reshape(-1)[layouts.swizzled_128x4_offset(r, c, cols=28)], sf) and torch.equal(
        layouts.sf_swizzled_128x4_to_linear(buf, rows=300, cols=28), sf)
    pad_zero = int(buf.count_nonzero()) == int(sf.count_nonzero())
    rows.append(CheckRow("128x4 swizzle: offset formula, round trip, zero padding", ok and pad_zero, f"{tuple(buf.shape)}"))
    a = x_bf16[:32]
    w = make_heavy_tailed_activation(64, a.shape[1], seed=2)
    qa = quantize_nvfp4(a, recipe=RECIPES["te"], global_enc_scale_f32=te_global_enc_scale(a.float().abs().max()))
    qw = quantize_nvfp4(w, recipe=RECIPES["te"], global_enc_scale_f32=te_global_enc_scale(w.float().abs().max()))
    alpha = qa.global_dec_scale() * qw.global_dec_scale()
    y64, absdot = nvfp4_gemm_f64(qa.packed_u8, qa.sf_u8, qw.packed_u8, qw.sf_u8, alpha)
    y = ((decode_nvfp4_block_scaled(qa.packed_u8, qa.sf_u8) @ decode_nvfp4_block_scaled(qw.packed_u8, qw.sf_u8).T) * alpha).bfloat16()
    bound = gemm_error_bound(absdot, y64, alpha, k=a.shape[1], u_acc=U_FP32)
    ratio = float(bound_ratio(y, y64, bound))
    rows.append(CheckRow("fp32 GEMM of decoded operands within the float64 bound", ratio <= 1.0, f"bound ratio {ratio:.3f}"))
    bad_sf = qw.sf_u8.clone()
    bad_sf[:, [0, 1]] = bad_sf[:, [1, 0]]
    y_bad = ((decode_nvfp4_block_scaled(qa.packed_u8, qa.sf_u8) @ decode_nvfp4_block_scaled(qw.packed_u8, bad_sf).T) * alpha).bfloat16()
    bad_ratio = float(bound_ratio(y_bad, y64, bound))
    rows.append(CheckRow("a misplaced block scale exceeds the bound", bad_ratio > 1.0, f"bound ratio {bad_ratio:.3g}"))
    return rows


def run_selfcheck(*, rows: int = 256, k: int = 1024, seed: int = 0) -> list[CheckRow]:
    x = make_heavy_tailed_activation(rows, k, seed)
    return _codec_rows() + _recipe_rows(x) + _layout_and_gemm_rows(x)


def print_selfcheck(results: list[CheckRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="nvfp4-verify emulator self-check")
    table.add_column("check")
    table.add_column("verdict")
    table.add_column("detail")
    for r in results:
        table.add_row(r.check, "[green]PASS[/]" if r.ok else "[red]FAIL[/]", r.detail)
    Console(width=150).print(table)


def cli_demo(args) -> int:
    from rich.progress import Progress

    from verify.preflight import writable_file  # noqa: PLC0415

    if args.json:
        writable_file(args.json, "--json")

    with Progress(transient=True) as progress:
        progress.add_task("emulator self-check", total=None)
        results = run_selfcheck(rows=args.rows, k=args.k, seed=args.seed)
    print_selfcheck(results)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2, sort_keys=True, default=str))
    return 0 if all(r.ok for r in results) else 1


def multiple_of_16(text: str) -> int:
    """argparse type of --k: a multiple of the NVFP4 block (16 elements), at least two blocks (the
    misplaced-block-scale check swaps blocks 0 and 1)."""
    import argparse  # noqa: PLC0415

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 32 or value % 16:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (must be a multiple of 16, the NVFP4 block, "
                                         ">= 32: two blocks)")
    return value


def add_demo_arguments(parser) -> None:
    from verify.config import positive_int  # noqa: PLC0415

    parser.add_argument("--rows", type=positive_int, default=256, help="Activation rows. Default: %(default)r.")
    parser.add_argument("--k", type=multiple_of_16, default=1024,
                        help="Activation K (a multiple of 16, the NVFP4 block; at least 32). Default: %(default)r.")
    parser.add_argument("--seed", type=int, default=0, help="Data seed. Default: %(default)r.")
    parser.add_argument("--json", default=None, help="Write the results as JSON here. Default: %(default)r.")
