"""Emulator quantize / dequantize throughput (marker `bench`; not run by default).

Target (foundation issue): >= 5e9 elements/s for quantize of a [8192, 7168] bf16
tensor on an H200. Baseline measured in the same run: a device copy of the input
(x.clone()), so the table also says what fraction of copy bandwidth it reaches.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from references.nvfp4 import dequantize_nvfp4, quantize_nvfp4, te_global_enc_scale
from references.recipes import RECIPES, TE
from verify.bench import BenchRow, print_table, time_call, write_json

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
SHAPE = {"cpu": (1024, 7168), "cuda": (8192, 7168)}
QUANTIZE_TARGET_ELEMENTS_PER_S = {"cuda": 5e9}


@pytest.mark.bench
@pytest.mark.parametrize("device", DEVICES)
def test_bench_emulator_quantize_dequantize(device, run_cfg):
    dev = torch.device(device)
    m, k = SHAPE[device]
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, generator=g, device=dev).to(torch.bfloat16)
    n = x.numel()
    enc = te_global_enc_scale(x.abs().amax().float())
    iters = 5 if device == "cuda" else 2
    copy_s = time_call(lambda: x.clone(), dev, iters=iters)
    copy_bytes = 2 * x.numel() * x.element_size()
    rows = [BenchRow("copy (baseline)", device, f"{m}x{k}", copy_s, n / copy_s, copy_bytes / copy_s / 1e9)]
    quant_bytes = n * 2 + n // 2 + n // 16  # read bf16, write codes and scales
    for recipe in RECIPES.values():
        kw = {"global_enc_scale_f32": enc} if recipe.global_convention == "enc" else {"global_dec_scale_f32": 1 / enc}
        s = time_call(lambda: quantize_nvfp4(x, recipe=recipe, **kw), dev, iters=iters)
        rows.append(BenchRow(f"quantize {recipe.name}", device, f"{m}x{k}", s, n / s, quant_bytes / s / 1e9,
                             copy_s / s, "copy"))
    q = quantize_nvfp4(x, recipe=TE, global_enc_scale_f32=enc)
    s = time_call(lambda: dequantize_nvfp4(q, dtype=torch.bfloat16), dev, iters=iters)
    rows.append(BenchRow("dequantize te", device, f"{m}x{k}", s, n / s, quant_bytes / s / 1e9, copy_s / s, "copy"))
    print_table(f"emulator throughput on {torch.cuda.get_device_name(dev) if device == 'cuda' else 'CPU'}", rows)
    out_dir = run_cfg.report_dir or Path(os.environ.get("OUT", "reports"))
    write_json(Path(out_dir) / f"bench_emulator_{device}.json", rows, torch=torch.__version__)
    te_rate = next(r.elements_per_s for r in rows if r.name == "quantize te")
    target = QUANTIZE_TARGET_ELEMENTS_PER_S.get(device)
    if target is not None:
        assert te_rate >= target, f"emulator quantize te: {te_rate:.3e} elements/s < target {target:.1e}"
