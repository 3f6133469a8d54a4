"""The sm90 FP8 block-scaled GEMM config sweep (issue 23 item 8; marker bench, H100 / H200): every candidate
config of kernels.sm90.gemm_fp8_block_configs at the DeepSeek-V4-Pro FP8 shapes and M = 1, 16, 64, 128, 4096,
timed beside torch bf16 and torch._scaled_mm blockwise (cuBLASLt) in the same run; only configs bit-equal
to the reference (and so batch-invariant) and free of register spills can win. The table is printed and
written to NVFP4V_REPORT_DIR/sm90_fp8_sweep.json; commit the winners with
`python -m kernels.sm90.gemm_fp8_block_configs --from-json <that file>` (verify/tests/_fp8_sweep.py).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.bench, pytest.mark.gpu, pytest.mark.sm90]


def test_fp8_gemm_config_sweep():
    from verify.tests._fp8_sweep import run_sweep

    report = run_sweep(os.environ.get("NVFP4V_REPORT_DIR"))
    assert report["best"], "no (shape, M) was measured"
    differ = [(s["name"], s["M"], s["bits_differ"]) for s in report["best"] if s["bits_differ"]]
    # a config whose bits differ breaks the batch-invariance claim of gemm_fp8_block: never a silent pass
    assert not differ, f"configs whose output differs from the reference's bits: {differ}"
    assert all(s["best_us"] is not None for s in report["best"]), "a (shape, M) without a bit-equal candidate"
    assert torch.cuda.is_available()
