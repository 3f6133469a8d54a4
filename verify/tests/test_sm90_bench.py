"""Benchmarks of the sm90 kernels on the GPU (marker `bench`: run with -m bench).

Timing: each measured op is captured K times into one CUDA graph (inputs rotating over
enough copies to defeat the 60 MB L2 where the op is memory-bound), the graph replayed
and timed with CUDA events; the median over replays, divided by K, is reported. Ratios
are against baselines measured in the same process: the device copy bandwidth
(torch copy_ of 1 GiB, bytes read + written) and torch.matmul in bf16.
Results are printed and, when NVFP4V_REPORT_DIR is set, written to sm90_bench.json there.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from verify.tests._cuda_timing import copy_bandwidth, time_graph

pytestmark = [pytest.mark.bench, pytest.mark.gpu, pytest.mark.sm90]

L2_BYTES = 60 * 2**20
_RESULTS: dict[str, list] = {"copy": [], "quantize": [], "gemm": []}


_time_graph = time_graph


@pytest.fixture(scope="module")
def copy_bw():
    bw, t = copy_bandwidth()
    _RESULTS["copy"].append({"bytes": 2 * 2**30, "seconds": t, "GBps": bw / 1e9,
                             "device": torch.cuda.get_device_name()})
    print(f"\n[{torch.cuda.get_device_name()}] copy bandwidth (read+write): {bw / 1e9:.0f} GB/s")
    return bw


def _dump():
    d = os.environ.get("NVFP4V_REPORT_DIR")
    if d:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "sm90_bench.json"), "w") as f:
            json.dump(_RESULTS, f, indent=1, sort_keys=True)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("m", [1, 64, 4096, 16384])
def test_sm90_bench_quantize(copy_bw, m, mode):
    from kernels.sm90.api import Sm90Kernels

    be = Sm90Kernels()
    k = 7168
    nbytes_in = m * k * 2
    copies = max(1, min(16, -(-3 * L2_BYTES // nbytes_in)))
    xs = [torch.randn(m, k, device="cuda").to(torch.bfloat16) for _ in range(copies)]
    s = be.amax_global_enc_scale(xs[0])
    calls = max(copies, 20 if m <= 64 else 4)
    if mode == "static":
        fns = [(lambda x=xs[i % copies]: be.quantize_nvfp4(x, s)) for i in range(calls)]
    else:
        fns = [(lambda x=xs[i % copies]: be.quantize_nvfp4_dynamic(x)) for i in range(calls)]
    t = _time_graph(fns)
    rp, cp = (m + 127) // 128 * 128, (k // 16 + 3) // 4 * 4
    moved = nbytes_in + m * k // 2 + rp * cp + (nbytes_in if mode == "dynamic" else 0)
    bw = moved / t
    row = {"mode": mode, "M": m, "K": k, "us": t * 1e6, "GBps": bw / 1e9, "ratio_to_copy": bw / copy_bw}
    _RESULTS["quantize"].append(row)
    _dump()
    print(f"\nquantize {mode:7s} M={m:6d} K={k}: {t * 1e6:8.2f} us  {bw / 1e9:7.0f} GB/s  "
          f"{100 * bw / copy_bw:5.1f}% of copy")


GEMM_NK = [(2048, 7168), (6144, 7168), (7168, 3072), (7168, 16384)]


def _nvfp4_weight(n, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, device="cuda", dtype=torch.uint8)
    sf = torch.randint(0x20, 0x48, ((n + 127) // 128 * 128, (k // 16 + 3) // 4 * 4), generator=g,
                       device="cuda", dtype=torch.uint8)
    return packed, sf


@pytest.mark.parametrize("m", [1, 16, 64, 4096])
@pytest.mark.parametrize("n,k", GEMM_NK, ids=lambda v: str(v))
def test_sm90_bench_gemm(copy_bw, n, k, m):
    from kernels.sm90 import gemm_nvfp4

    w_bytes = n * k // 2 + (n + 127) // 128 * 128 * ((k // 16 + 3) // 4 * 4)
    copies = max(1, min(24, -(-3 * L2_BYTES // w_bytes))) if m <= 64 else 1
    ws = [_nvfp4_weight(n, k, i) for i in range(copies)]
    a_p, a_sf = _nvfp4_weight(m, k, 99)
    alpha = torch.tensor(1e-3, device="cuda")
    calls = max(copies, 8 if m <= 64 else 3)
    key = gemm_nvfp4.CompileKey.for_shape(m, n, k)
    fns = [(lambda w=ws[i % copies]: gemm_nvfp4.launch(a_p, a_sf, w[0], w[1], alpha, key=key)) for i in range(calls)]
    t = _time_graph(fns)
    del ws
    # torch.matmul bf16 with the same shapes, rotating its (4x larger) weights too
    bcopies = max(1, min(8, -(-3 * L2_BYTES // (n * k * 2)))) if m <= 64 else 1
    wb = [torch.randn(n, k, device="cuda").to(torch.bfloat16) for _ in range(bcopies)]
    xb = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    t_bf16 = _time_graph([(lambda w=wb[i % bcopies]: torch.matmul(xb, w.T)) for i in range(max(bcopies, calls))])
    del wb
    flops = 2 * m * n * k
    roofline_t = w_bytes / copy_bw
    row = {"M": m, "N": n, "K": k, "us": t * 1e6, "TFLOPs": flops / t / 1e12, "weight_GBps": w_bytes / t / 1e9,
           "torch_bf16_us": t_bf16 * 1e6, "speedup_vs_torch_bf16": t_bf16 / t,
           "roofline_fraction": roofline_t / t, "key": str(key)}
    _RESULTS["gemm"].append(row)
    _dump()
    print(f"\ngemm M={m:5d} N={n:5d} K={k:5d}: {t * 1e6:8.2f} us {flops / t / 1e12:7.1f} TFLOP/s "
          f"{w_bytes / t / 1e9:6.0f} GB/s(w)  bf16 {t_bf16 * 1e6:8.2f} us  x{t_bf16 / t:5.2f}  "
          f"roofline {100 * roofline_t / t:5.1f}%  [{'predecode' if key.predecode else 'wgmma'} "
          f"{key.block_x}x{key.block_y} split {key.split} chunk {key.chunk}]")


@pytest.mark.parametrize("m", [3, 16, 32, 64])
@pytest.mark.parametrize("cfg", ["for_shape", "p1x1", "p2x1", "p4x1", "p6x1", "p4x0", "r2p4x1"])
@pytest.mark.parametrize("n,k", GEMM_NK, ids=lambda v: str(v))
def test_sm90_bench_gemm_wgmma_configs(copy_bw, n, k, m, cfg):
    """The Gluon wgmma path (split-K target p CTAs/SM, x1: activations decoded once per GEMM, x0: in
    every CTA, r2: two 64-row tiles per warpgroup) against the for_shape key (the chunk plan), same shapes and weight
    rotation as test_sm90_bench_gemm. Exploration only: an explicit split that depends on M is not batch invariant."""
    from kernels.sm90 import gemm_nvfp4

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if cfg == "for_shape":
        key = gemm_nvfp4.CompileKey.for_shape(m, n, k)
    else:
        reps = 2 if cfg.startswith("r2") else 1
        per_sm, act = cfg.removeprefix("r2").removeprefix("p").split("x")
        key = gemm_nvfp4.CompileKey._wgmma(m, n, k, sms, reps=reps, per_sm=int(per_sm), act_f16=act == "1")
    w_bytes = n * k // 2 + (n + 127) // 128 * 128 * ((k // 16 + 3) // 4 * 4)
    copies = max(1, min(24, -(-3 * L2_BYTES // w_bytes)))
    ws = [_nvfp4_weight(n, k, i) for i in range(copies)]
    a_p, a_sf = _nvfp4_weight(m, k, 99)
    alpha = torch.tensor(1e-3, device="cuda")
    t = _time_graph([(lambda w=ws[i % copies]: gemm_nvfp4.launch(a_p, a_sf, w[0], w[1], alpha, key=key))
                     for i in range(max(copies, 8))])
    _RESULTS["gemm"].append({"M": m, "N": n, "K": k, "cfg": cfg, "us": t * 1e6, "key": str(key)})
    _dump()
    print(f"\nwgmma cfg M={m} N={n} K={k} {cfg} split{key.split}: {t * 1e6:8.2f} us "
          f"roofline {100 * w_bytes / copy_bw / t:5.1f}%")


# the predecode path's fp16 GEMM variants (M 512 .. 4096): name -> CompileKey fields replaced in the
# routed key (chunked 128 x 128 tiles: 4 stages routed, 5, two decode launches); "one-chain" is session 10's routed
# key (128 x 256, one natural-order chain: other bits, the cost of batch invariance)
_F16_GEMM_VARIANTS = {"chunked-s5": dict(num_stages=5), "chunked-2dec": dict(decode_pair=False),
                      "one-chain": dict(block_y=256, chunk=0, mma_order=False)}


@pytest.mark.parametrize("n,k", GEMM_NK, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1024, 2048, 4096])
def test_sm90_bench_gemm_large_m_f16_gemm(copy_bw, m, n, k):
    """M 512 .. 4096, one run: torch.matmul bf16, for_shape's predecode key ("routed") and _F16_GEMM_VARIANTS, each
    the whole launch (decode included); the chunked variants' output bytes must equal the routed key's (checked
    after the table line; "one-chain" sums in another order and is timed only)."""
    import dataclasses

    from kernels.sm90 import gemm_nvfp4

    w_p, w_sf = _nvfp4_weight(n, k, 1)
    a_p, a_sf = _nvfp4_weight(m, k, 99)
    alpha = torch.tensor(1e-3, device="cuda")
    keys = {"routed": gemm_nvfp4.CompileKey.for_shape(m, n, k)}
    assert keys["routed"].predecode and keys["routed"].chunk, keys["routed"]
    keys.update({name: dataclasses.replace(keys["routed"], **kw) for name, kw in _F16_GEMM_VARIANTS.items()})
    xb = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    wb = torch.randn(n, k, device="cuda").to(torch.bfloat16)
    t_bf16 = _time_graph([lambda: torch.matmul(xb, wb.T)] * 3)
    del xb, wb
    flops = 2 * m * n * k
    times, gemm_times, decode_times, mismatches = {}, {}, {}, []
    ref = gemm_nvfp4.launch(a_p, a_sf, w_p, w_sf, alpha, key=keys["routed"])
    for name, key in keys.items():
        y = gemm_nvfp4.launch(a_p, a_sf, w_p, w_sf, alpha, key=key)
        if key.chunk and not torch.equal(y.view(torch.int16), ref.view(torch.int16)):
            mismatches.append(f"{name}: {int((y.view(torch.int16) != ref.view(torch.int16)).sum())} elements differ")
        times[name] = _time_graph([(lambda key=key: gemm_nvfp4.launch(a_p, a_sf, w_p, w_sf, alpha, key=key))] * 3)
        # the two steps apart: the fp16 GEMM alone on decoded operands, the decode alone (one launch or two)
        parts = gemm_nvfp4._compile(key)
        a16, b16 = parts.decode_operands(a_p, a_sf, w_p, w_sf)
        gemm_times[name] = _time_graph([lambda parts=parts: parts.f16_gemm(a16, b16, alpha, y)] * 3)
        decode_times["pair" if key.decode_pair else "two"] = _time_graph(
            [lambda parts=parts: parts.decode_operands(a_p, a_sf, w_p, w_sf)] * 3)
        del y, a16, b16
    row = {"M": m, "N": n, "K": k, "torch_bf16_us": t_bf16 * 1e6, "device": torch.cuda.get_device_name(),
           "us": {name: t * 1e6 for name, t in times.items()},
           "x_torch": {name: t_bf16 / t for name, t in times.items()}, "bits_equal": not mismatches,
           "f16_gemm_us": {name: t * 1e6 for name, t in gemm_times.items()},
           "decode_us": {name: t * 1e6 for name, t in decode_times.items()}}
    _RESULTS["gemm"].append(row)
    _dump()
    cells = "  ".join(f"{name} {t * 1e6:7.1f} us x{t_bf16 / t:4.2f}" for name, t in times.items())
    print(f"\nf16 GEMM M={m} N={n:5d} K={k:5d}: torch bf16 {t_bf16 * 1e6:7.1f} us "
          f"({flops / t_bf16 / 1e12:5.0f} TFLOP/s)  {cells}  bits {'equal' if not mismatches else 'DIFFER'}")
    print("    fp16 GEMM alone: " + "  ".join(f"{name} {t * 1e6:7.1f} us {flops / t / 1e12:4.0f} TFLOP/s"
                                            for name, t in gemm_times.items())
          + "  decode: " + "  ".join(f"{name} {t * 1e6:6.1f} us" for name, t in decode_times.items()))
    assert not mismatches, f"M={m} N={n} K={k}: output bytes differ from the routed key's: {mismatches}"
