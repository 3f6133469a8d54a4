"""What a Hopper user picks between for an NVFP4 MoE (marker `bench`: run with -m bench): Humming's W4A16 grouped
GEMMs, our sm90 W4A4 grouped GEMMs and torch bf16 (torch._grouped_mm), in one process on one device.

DeepSeek-V4-Pro MoE sizes: 384 experts, top-6, hidden 7168, intermediate 3072; uniform random routing, T tokens
(NVFP4V_MOE_TOKENS, default 1,16,256,4096), R = 6T expert rows. Each contender starts from the same token rows
x [T, H] bf16 and the same routing (row_token, offsets), and ends with the L2 rows bf16 [R, H] (router and combine
are the same for all and left out):
- humming W4A16: the gather x[row_token], humming's grouped L1 (w1|w3, bf16 out), the clamped SwiGLU in float32,
  humming's grouped L2 (verify.backends.adapters.humming.experts_w4a16);
- ours sm90 W4A4: the grouped te quantization with the gather fused (static input scales), the fused L1 + SwiGLU +
  requant, the grouped L2 (kernels.sm90);
- torch bf16: the gather, torch._grouped_mm L1 ([E, 7168, 6144]), silu(gate) * up, torch._grouped_mm L2.
The NVFP4 weights of humming and ours are prepared from the same checkpoint-format bytes. An 80 GB H100 cannot hold
the bf16 weights (51 GB) beside both NVFP4 copies (2 x 12.7 GB), so the NVFP4 contenders run first on every T,
their weights are freed, then torch bf16 runs on the same T and routings; ratios are between columns of this run.
Timing: each callable captured 3 times into one CUDA graph, median of 7 replays (verify/tests/_cuda_timing).
Printed, and written to humming_moe_bench.json under NVFP4V_REPORT_DIR when set.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from verify.tests._cuda_timing import copy_bandwidth, time_graph

pytestmark = [pytest.mark.bench, pytest.mark.gpu, pytest.mark.sm90]

E, TOPK, H, I = 384, 6, 7168, 3072
TOKENS = tuple(int(t) for t in os.environ.get("NVFP4V_MOE_TOKENS", "1,16,256,4096").split(","))
SWIGLU_LIMIT = 10.0


def _time(fn) -> float:
    return time_graph([fn] * 3, 7)


def _routing(t: int, dev) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(row_token int64 [R], offsets int32 [E+1], active experts) of a uniform random top-6 routing of t tokens."""
    ids = torch.rand(t, E, device=dev).topk(TOPK, dim=1).indices
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    off = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    off[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return order // TOPK, off, int((counts > 0).sum())


def _stack(n: int, k: int, dev, module: str):
    from verify.checkpoint import Nvfp4Linear

    return Nvfp4Linear(module, torch.randint(0, 256, (E, n, k // 2), dtype=torch.uint8, device=dev),
                       torch.randint(0x28, 0x38, (E, n, k // 16), dtype=torch.uint8, device=dev).view(torch.float8_e4m3fn),
                       torch.full((E,), 1e-3, dtype=torch.float32, device=dev),
                       torch.full((E,), 0.02, dtype=torch.float32, device=dev))


def test_moe_humming_w4a16_vs_ours_w4a4_vs_torch_bf16():
    from kernels.sm90 import grouped_gemm_nvfp4 as gg
    from kernels.sm90 import quantize_grouped
    from references.stages import Op
    from verify.backends.adapters.humming import experts_w4a16
    from verify.backends.registry import get_backend
    from verify.checkpoint import GatedMlp

    dev = torch.device("cuda")
    hm = get_backend("humming")
    why = hm.unsupported_reason(Op.GROUPED_GEMM, dev)
    if why:
        pytest.skip(why)
    bw = copy_bandwidth(warmup=20)[0]
    report: dict = {"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "humming": hm.version, "rows": []}
    torch.manual_seed(0)

    # ---- NVFP4 weights from the same checkpoint-format bytes: humming's prepare, ours
    w1, w3, w2 = _stack(I, H, dev, "w1"), _stack(I, H, dev, "w3"), _stack(H, I, dev, "w2")
    t0 = time.perf_counter()
    hm_experts = hm.prepare_experts(GatedMlp(w1, w3, w2))
    torch.cuda.synchronize()
    report["humming_prepare_s"] = time.perf_counter() - t0
    ours_w13 = gg.prepare_gate_up(w1.weight_u8, w1.weight_scale_e4m3.view(torch.uint8), w1.weight_scale_2_f32,
                                  w3.weight_u8, w3.weight_scale_e4m3.view(torch.uint8), w3.weight_scale_2_f32)
    ours_w2 = gg.prepare_experts(w2.weight_u8, w2.weight_scale_e4m3.view(torch.uint8), w2.weight_scale_2_f32)
    s1, s2 = w1.input_scale_f32, w2.input_scale_f32
    del w1, w3, w2
    torch.cuda.empty_cache()
    l1_bytes, l2_bytes = 2 * I * (H // 2 + H // 16), H * (I // 2 + I // 16)
    flop_per_row = 2 * (H * 2 * I + I * H)

    rows = []
    for t in TOKENS:
        torch.manual_seed(t)
        row_token, off, active = _routing(t, dev)
        x = torch.randn(t, H, device=dev).to(torch.bfloat16)
        r = t * TOPK

        def humming_moe():
            return experts_w4a16(hm, x[row_token], off, hm_experts, swiglu_limit=SWIGLU_LIMIT)

        def ours_moe():
            a = quantize_grouped.launch(x, off, input_dec_scale_f32=s1, row_token=row_token, rows_cap=r)
            h = gg.grouped_l1_swiglu_requant(*a, off, ours_w13, swiglu_limit=SWIGLU_LIMIT, h_input_dec_scale_f32=s2)
            return gg.grouped_gemm(*h, off, ours_w2)

        t0 = time.perf_counter()
        humming_moe()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        res = {"T": t, "rows": r, "active_experts": active, "humming_first_call_s": first,
               "humming_s": _time(humming_moe), "ours_s": _time(ours_moe)}
        res["humming_weight_GBps"] = active * (l1_bytes + l2_bytes) / res["humming_s"] / 1e9
        res["ours_weight_GBps"] = active * (l1_bytes + l2_bytes) / res["ours_s"] / 1e9
        res["humming_TFLOPs"] = r * flop_per_row / res["humming_s"] / 1e12
        res["ours_TFLOPs"] = r * flop_per_row / res["ours_s"] / 1e12
        res["humming_over_ours"] = res["humming_s"] / res["ours_s"]
        rows.append((res, row_token, off))
        print(f"T={t:5d} R={r:6d} active={active:3d} | humming W4A16 {res['humming_s'] * 1e6:9.1f} us "
              f"({res['humming_weight_GBps']:.0f} GB/s; first call {first:.2f} s) | ours W4A4 {res['ours_s'] * 1e6:9.1f} us "
              f"({res['ours_weight_GBps']:.0f} GB/s) | humming / ours {res['humming_over_ours']:.2f}", flush=True)
        del x
    del hm_experts, ours_w13, ours_w2
    torch.cuda.empty_cache()

    # ---- torch bf16 on the same token counts and routings
    w13_bf16 = torch.randn(E, 2 * I, H, dtype=torch.bfloat16, device=dev) * 0.02
    w2_bf16 = torch.randn(E, H, I, dtype=torch.bfloat16, device=dev) * 0.02
    for res, row_token, off in rows:
        torch.manual_seed(res["T"])
        x = torch.randn(res["T"], H, device=dev).to(torch.bfloat16)
        offs = off[1:]

        def torch_moe():
            y1 = torch._grouped_mm(x[row_token], w13_bf16.transpose(-2, -1), offs=offs)
            h = torch.nn.functional.silu(y1[:, :I].clamp(max=SWIGLU_LIMIT)) * y1[:, I:].clamp(-SWIGLU_LIMIT,
                                                                                               SWIGLU_LIMIT)
            return torch._grouped_mm(h, w2_bf16.transpose(-2, -1), offs=offs)

        res["torch_bf16_s"] = _time(torch_moe)
        res["torch_bf16_TFLOPs"] = res["rows"] * flop_per_row / res["torch_bf16_s"] / 1e12
        res["torch_over_humming"] = res["torch_bf16_s"] / res["humming_s"]
        res["torch_over_ours"] = res["torch_bf16_s"] / res["ours_s"]
        report["rows"].append(res)
        print(f"T={res['T']:5d} | torch bf16 {res['torch_bf16_s'] * 1e6:9.1f} us ({res['torch_bf16_TFLOPs']:.0f} TFLOP/s) "
              f"| torch / humming {res['torch_over_humming']:.2f} | torch / ours {res['torch_over_ours']:.2f}", flush=True)
        del x
    print(f"\n{report['device']}, humming-kernels {report['humming']} (prepare of 384 experts "
          f"{report['humming_prepare_s']:.1f} s)\n{'T':>6} {'humming W4A16 us':>17} {'ours W4A4 us':>13} "
          f"{'torch bf16 us':>14} {'humming/ours':>13} {'torch/humming':>14}")
    for res in report["rows"]:
        print(f"{res['T']:6d} {res['humming_s'] * 1e6:17.1f} {res['ours_s'] * 1e6:13.1f} {res['torch_bf16_s'] * 1e6:14.1f} "
              f"{res['humming_over_ours']:13.2f} {res['torch_over_humming']:14.2f}")
    out_dir = os.environ.get("NVFP4V_REPORT_DIR")
    if out_dir:
        with open(os.path.join(out_dir, "humming_moe_bench.json"), "w") as f:
            json.dump(report, f, indent=1)
    assert all(r_["humming_s"] > 0 and r_["ours_s"] > 0 and r_["torch_bf16_s"] > 0 for r_ in report["rows"])
