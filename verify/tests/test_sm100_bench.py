"""Benchmarks of the sm100 kernels at DeepSeek-V4-Pro shapes (markers bench + gpu + sm100).

Not run by default (-m bench or --run-bench), and only on a B200. Each prints the time
per call (CUDA events, after warm-up) and the achieved TFLOP/s; no assertion on speed.
"""

import pytest
import torch

from kernels.sm100 import gemm_nvfp4_blockscaled as gemm
from kernels.sm100 import host_bridge as hb
from kernels.sm100 import moe_routing as mr
from kernels.sm100 import quantize_nvfp4_1x16 as quant

pytestmark = [pytest.mark.bench, pytest.mark.gpu, pytest.mark.sm100]

HIDDEN, INTER, EXPERTS, TOP_K = 7168, 3072, 384, 6  # DeepSeek-V4-Pro


def _time_ms(fn, iters=50):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _rand_u8(*shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")


def _rand_sf(*shape):
    return torch.randint(0x30, 0x40, shape, dtype=torch.uint8, device="cuda")  # finite, moderate scales


@pytest.mark.parametrize("m", [1, 128, 4096], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("n,k", [(7168, 3072), (6144, 7168)], ids=["wo-like", "w13-like"])
def test_bench_dense(m, n, k, record_property):
    w = hb.prepare_nvfp4_weight(_rand_u8(n, k // 2), _rand_sf(n, k // 16), torch.ones((), device="cuda"))
    a, a_sf = _rand_u8(m, k // 2), hb.sf_linear_to_swizzled_128x4(_rand_sf(m, k // 16))
    one = torch.ones(1, device="cuda")
    ms = _time_ms(lambda: gemm.launch_dense(a, a_sf, one, w))
    record_property("ms", ms)
    print(f"dense M={m} N={n} K={k}: {ms * 1e3:.1f} us, {2 * m * n * k / ms / 1e9:.1f} TFLOP/s")


@pytest.mark.parametrize("tokens", [64, 4096], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("stage", ["l1_swiglu", "l2"])
def test_bench_grouped(tokens, stage, record_property):
    e = EXPERTS
    ids = torch.stack([torch.randperm(e, device="cuda")[:TOP_K] for _ in range(tokens)])
    perm = mr.permute(ids, e)
    n, k = (2 * INTER, HIDDEN) if stage == "l1_swiglu" else (HIDDEN, INTER)
    ones_e = torch.ones(e, device="cuda")
    if stage == "l1_swiglu":
        half = (_rand_u8(e, INTER, k // 2), _rand_sf(e, INTER, k // 16), ones_e)
        w = hb.prepare_gate_up_weight(*half, *half)
    else:
        w = hb.prepare_nvfp4_weight(_rand_u8(e, n, k // 2), _rand_sf(e, n, k // 16), ones_e)
    a = torch.zeros(perm.capacity_rows, k // 2, dtype=torch.uint8, device="cuda")
    a_sf = torch.zeros(perm.capacity_rows, (k // 16 + 3) // 4 * 4, dtype=torch.uint8, device="cuda")
    one = torch.ones(1, device="cuda")
    limit = 10.0 if stage == "l1_swiglu" else None
    ms = _time_ms(lambda: gemm.launch_grouped(a, a_sf, one, w, perm.tile_expert_i32, swiglu_limit=limit))
    record_property("ms", ms)
    print(f"grouped {stage} T={tokens}: {ms * 1e3:.1f} us, {2 * tokens * TOP_K * n * k / ms / 1e9:.1f} useful TFLOP/s")


@pytest.mark.parametrize("m", [64, 4096 * TOP_K], ids=lambda m: f"M{m}")
def test_bench_quantize(m, record_property):
    x = torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16)
    ms = _time_ms(lambda: quant.launch(x))
    record_property("ms", ms)
    print(f"act quant (dynamic) M={m} K={HIDDEN}: {ms * 1e3:.1f} us, {m * HIDDEN * 2 / ms / 1e6:.1f} GB/s read")
