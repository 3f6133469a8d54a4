"""The benches' GPU memory plans fit an 80 GB H100 (issue 25 item 4), checked on the CPU from the shapes.

verify/tests/_bench_memory.py plans each phase of the MoE benches (ours, then the torch bf16 baseline
after ours is freed) and of the dense / FP8 GEMM benches as an upper bound; the GPU benches compare
their measured peaks against these plans. Here: every phase at DeepSeek-V4-Pro sizes (E 384, top-6,
H 7168, I 3072, T up to 32768) stays under 70 GiB, the plan's restated sf-row count equals the
kernel's, and holding both weight sets at once (what the benches did before) would not fit.
"""

from __future__ import annotations

import pytest

from verify.tests._bench_memory import FIT_BYTES_H100, GiB, dense_plan, fp8_plan, moe_plans, nvfp4_stack_bytes

V4_PRO = dict(e=384, top_k=6, h=7168, i=3072, tokens=(1, 16, 256, 4096, 32768))


@pytest.mark.parametrize("phase", list(moe_plans(**V4_PRO)))
def test_moe_bench_phase_fits_h100(phase):
    plan = moe_plans(**V4_PRO)[phase]
    assert 0 < plan.peak <= FIT_BYTES_H100, plan.describe()


def test_moe_plan_counts_the_bf16_weights_and_would_not_fit_holding_both():
    plans = moe_plans(**V4_PRO)
    bf16 = 384 * 3 * 3072 * 7168 * 2
    assert plans["grouped_torch"].items["weights w13 + w2 bf16"] == bf16
    assert abs(bf16 / GiB - 47.25) < 0.01
    nvfp4 = nvfp4_stack_bytes(384, 6144, 7168) + nvfp4_stack_bytes(384, 7168, 3072)
    both = bf16 + nvfp4 + plans["grouped_ours"].items["unfused gate/up float32 + requant"] \
        + plans["grouped_torch"].items["y1, silu, h, y2"]
    assert both > FIT_BYTES_H100, f"{both / GiB:.1f} GiB: the single-phase bench would have fit"


def test_plan_sf_rows_equal_the_kernel_s():
    from kernels.sm90.grouped_gemm_nvfp4 import grouped_sf_rows

    from verify.tests._bench_memory import _sf_rows

    for rows in (1, 6, 96, 1536, 24576, 196608):
        for e in (8, 384):
            assert _sf_rows(rows, e) == grouped_sf_rows(rows, e)


def test_plan_grows_with_tokens():
    small = moe_plans(**{**V4_PRO, "tokens": (16,)})
    big = moe_plans(**V4_PRO)
    for k in small:
        if k != "copy":
            assert small[k].peak < big[k].peak, k


@pytest.mark.parametrize("m", [1, 16, 64, 4096])
@pytest.mark.parametrize("n,k", [(2048, 7168), (6144, 7168), (7168, 3072), (7168, 16384)])
def test_dense_bench_fits_h100(m, n, k):
    assert dense_plan(m, n, k, copies=24, bf16_copies=8).peak <= FIT_BYTES_H100


@pytest.mark.parametrize("m", [1, 16, 64, 128, 4096])
@pytest.mark.parametrize("n,k", [(1536, 7168), (65536, 1536), (512, 7168), (16384, 4096), (7168, 16384),
                                 (3072, 7168), (7168, 3072), (24576, 1536), (7168, 14336)])
def test_fp8_bench_fits_h100(m, n, k):
    assert fp8_plan(m, n, k, copies=8, bf16_copies=4).peak <= FIT_BYTES_H100
