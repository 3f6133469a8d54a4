"""Benchmark of the sm90 grouped NVFP4 GEMMs at DeepSeek-V4-Pro MoE sizes (marker `bench`: run with -m bench).

384 experts, top-6, hidden 7168, intermediate 3072; uniform random routing (each token's 6 distinct experts
drawn uniformly), T in {1, 16, 256, 4096, 32768} tokens, R = 6T expert rows. Measured in one process:
- ours: L1 (fused SwiGLU + te requant epilogue) + L2 (grouped_gemm on the L1's h); the unfused L1 (gate/up
  float32) + the unfused SwiGLU + requant kernel (kernels.sm90.swiglu_requant, when present) + L2; each GEMM
  alone;
- torch bf16 on the same routing: torch._grouped_mm for L1 (w1|w3, [E, 7168, 6144]) and L2 ([E, 3072, 7168]),
  silu(gate) * up between them;
- copy bandwidth (torch copy_ of 1 GiB, read + write) in the same run.
Timing: each op captured several times into one CUDA graph, replayed, CUDA events, median per call. GB/s
counts the weight bytes of the active experts (NVFP4: packed + E4M3 scales; bf16: 2 bytes per element);
TFLOP/s counts 2 * R * (7168 * 6144 + 3072 * 7168). Printed, and written to sm90_moe_bench.json under
NVFP4V_REPORT_DIR when set.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from verify.tests._cuda_timing import copy_bandwidth, time_graph

pytestmark = [pytest.mark.bench, pytest.mark.gpu, pytest.mark.sm90]

E, TOPK, H, I = 384, 6, 7168, 3072
TOKENS = tuple(int(t) for t in os.environ.get("NVFP4V_MOE_TOKENS", "1,16,256,4096,32768").split(","))


def _time(fn, calls: int = 3, reps: int = 7) -> float:
    """Seconds per call (fn captured `calls` times in one graph, median over replays)."""
    return time_graph([fn] * calls, reps)


def _copy_bw() -> float:
    return copy_bandwidth(warmup=20)[0]


def _dump(name: str, obj) -> None:
    """obj as JSON to NVFP4V_REPORT_DIR/name when that variable is set (the H200 runs collect these)."""
    out_dir = os.environ.get("NVFP4V_REPORT_DIR")
    if out_dir:
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=1)


def test_moe_grouped_gemm_bench():
    from kernels.sm90 import grouped_gemm_nvfp4 as gg

    try:
        from kernels.sm90 import swiglu_requant
    except ImportError:  # the unfused kernel lands separately
        swiglu_requant = None
    torch.manual_seed(0)
    dev = torch.device("cuda")
    bw = _copy_bw()
    report: dict = {"copy_GBps": bw / 1e9, "device": torch.cuda.get_device_name(), "rows": []}
    print(f"\ncopy bandwidth (read+write): {bw / 1e9:.0f} GB/s")

    # ---- weights: NVFP4 from checkpoint-format bytes (our host prep), bf16 for torch
    def nvfp4_stack(n, k):
        return (torch.randint(0, 256, (E, n, k // 2), dtype=torch.uint8, device=dev),
                torch.randint(0x28, 0x38, (E, n, k // 16), dtype=torch.uint8, device=dev),
                torch.full((E,), 1e-3, dtype=torch.float32, device=dev))

    w1, w3 = nvfp4_stack(I, H), nvfp4_stack(I, H)
    w13 = gg.prepare_gate_up(*w1, *w3)
    del w1, w3
    w2 = gg.prepare_experts(*nvfp4_stack(H, I))
    w13_bf16 = torch.randn(E, 2 * I, H, dtype=torch.bfloat16, device=dev) * 0.02  # [E, N, K]; passed as [E, K, N]
    w2_bf16 = torch.randn(E, H, I, dtype=torch.bfloat16, device=dev) * 0.02
    l1_bytes = 2 * I * (H // 2 + H // 16)
    l2_bytes = H * (I // 2 + I // 16)
    flop_per_row = 2 * (H * 2 * I + I * H)
    s2 = torch.full((E,), 0.05, dtype=torch.float32, device=dev)
    torch.cuda.synchronize()

    rows_out = []
    for t in TOKENS:
        ids = torch.rand(t, E, device=dev).topk(TOPK, dim=1).indices
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        off = torch.zeros(E + 1, dtype=torch.int32, device=dev)
        off[1:] = torch.cumsum(counts, 0).to(torch.int32)
        r = t * TOPK
        active = int((counts > 0).sum())
        a_packed = torch.randint(0, 256, (r, H // 2), dtype=torch.uint8, device=dev)
        a_sf = torch.randint(0x30, 0x3A, (gg.grouped_sf_rows(r, E), H // 16), dtype=torch.uint8, device=dev)
        a_dec = torch.full((E,), 0.02, dtype=torch.float32, device=dev)
        hp, hsf, hdec = gg.grouped_l1_swiglu_requant(a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0,
                                                     h_input_dec_scale_f32=s2)
        res: dict = {"T": t, "rows": r, "active_experts": active}
        res["l1_fused_s"] = _time(lambda: gg.grouped_l1_swiglu_requant(a_packed, a_sf, a_dec, off, w13,
                                                                      swiglu_limit=10.0, h_input_dec_scale_f32=s2))
        res["l1_gate_up_s"] = _time(lambda: gg.grouped_gemm_l1(a_packed, a_sf, a_dec, off, w13))
        res["l2_s"] = _time(lambda: gg.grouped_gemm(hp, hsf, hdec, off, w2))
        res["ours_fused_s"] = _time(lambda: gg.grouped_gemm(*gg.grouped_l1_swiglu_requant(
            a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0, h_input_dec_scale_f32=s2), off, w2))
        if swiglu_requant is not None:
            def unfused():
                gate, up = gg.grouped_gemm_l1(a_packed, a_sf, a_dec, off, w13)
                _, (p, sf, dec) = swiglu_requant.launch(gate, up, off, swiglu_limit=10.0, input_dec_scale_f32=s2)
                return gg.grouped_gemm(p, sf, dec, off, w2)
            try:
                res["ours_unfused_s"] = _time(unfused)
            except Exception as exc:  # the unfused kernel is another engineer's work in progress
                res["unfused_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        # torch bf16, same routing
        x = torch.randn(r, H, dtype=torch.bfloat16, device=dev)
        offs = off[1:]

        def torch_moe():
            y1 = torch._grouped_mm(x, w13_bf16.transpose(-2, -1), offs=offs)
            h = torch.nn.functional.silu(y1[:, :I]) * y1[:, I:]
            return torch._grouped_mm(h, w2_bf16.transpose(-2, -1), offs=offs)

        res["torch_l1_s"] = _time(lambda: torch._grouped_mm(x, w13_bf16.transpose(-2, -1), offs=offs))
        res["torch_moe_s"] = _time(torch_moe)
        ours = res["ours_fused_s"]
        res["ours_weight_GBps"] = active * (l1_bytes + l2_bytes) / ours / 1e9
        res["ours_pct_copy"] = 100 * active * (l1_bytes + l2_bytes) / ours / bw
        res["ours_TFLOPs"] = r * flop_per_row / ours / 1e12
        res["torch_weight_GBps"] = active * 2 * (2 * I * H + H * I) / res["torch_moe_s"] / 1e9
        res["torch_TFLOPs"] = r * flop_per_row / res["torch_moe_s"] / 1e12
        res["x_torch"] = res["torch_moe_s"] / ours
        res["key_l1"] = str(gg.CompileKey.for_shape(2, r, E, 2 * I, H))
        rows_out.append(res)
        print(f"T={t:6d} R={r:6d} active={active:3d} | fused L1 {res['l1_fused_s'] * 1e6:9.1f} us, L1 gate/up "
              f"{res['l1_gate_up_s'] * 1e6:9.1f}, L2 {res['l2_s'] * 1e6:9.1f} | ours L1f+L2 {ours * 1e6:9.1f} us "
              f"({res['ours_weight_GBps']:.0f} GB/s, {res['ours_pct_copy']:.0f}% copy, {res['ours_TFLOPs']:.0f} TFLOP/s)"
              + (f", unfused {res['ours_unfused_s'] * 1e6:9.1f}" if "ours_unfused_s" in res else "")
              + f" | torch bf16 {res['torch_moe_s'] * 1e6:9.1f} us (L1 {res['torch_l1_s'] * 1e6:.1f}; "
              f"{res['torch_TFLOPs']:.0f} TFLOP/s) | x torch {res['x_torch']:.2f}", flush=True)
        del x, a_packed, a_sf, hp, hsf
        torch.cuda.empty_cache()
    report["rows"] = rows_out
    _dump("sm90_moe_bench.json", report)
    assert all(r_["ours_fused_s"] > 0 for r_ in rows_out)


@pytest.mark.parametrize("t", [1, 16, 4096, 32768])
def test_moe_tile_sweep(t):
    """Token-tile / warps / stages sweep of the fused L1 and the L2 at one token count (for NOTES.md)."""
    from kernels.sm90 import grouped_gemm_nvfp4 as gg

    torch.manual_seed(1)
    dev = torch.device("cuda")
    e_small = E  # full expert count: the schedule and the weight traffic are what is measured
    w13 = gg.prepare_gate_up(*[torch.randint(0, 256, (e_small, I, H // 2), dtype=torch.uint8, device=dev),
                               torch.randint(0x28, 0x38, (e_small, I, H // 16), dtype=torch.uint8, device=dev),
                               torch.full((e_small,), 1e-3, device=dev)] * 2)
    ids = torch.rand(t, E, device=dev).topk(TOPK, dim=1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    off = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    off[1:] = torch.cumsum(counts, 0).to(torch.int32)
    r = t * TOPK
    a_packed = torch.randint(0, 256, (r, H // 2), dtype=torch.uint8, device=dev)
    a_sf = torch.randint(0x30, 0x3A, (gg.grouped_sf_rows(r, E), H // 16), dtype=torch.uint8, device=dev)
    a_dec = torch.full((E,), 0.02, dtype=torch.float32, device=dev)
    s2 = torch.full((E,), 0.05, dtype=torch.float32, device=dev)
    out = []
    # (BN, BT, warps, stages, act_f16)
    configs = {1: [(64, 16, 4, 4, False), (128, 16, 4, 4, False)],
               16: [(128, 16, 4, 4, False), (64, 16, 4, 4, False), (64, 16, 4, 3, False)],
               4096: [(128, 64, 8, 3, True), (64, 64, 4, 3, True), (128, 64, 8, 3, False), (128, 128, 8, 3, True)],
               32768: [(128, 128, 8, 3, True), (128, 128, 8, 3, False), (64, 64, 4, 3, True), (128, 64, 8, 3, True)]}[t]
    for bn, bt, warps, stages, act_f16 in configs:
        key = gg.CompileKey(epi=2, block_n=bn, block_t=bt, num_warps=warps, num_stages=stages, e_pad=512, clamp=True,
                            act_f16=act_f16)
        try:
            s = _time(lambda: gg.grouped_l1_swiglu_requant(a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0,
                                                           h_input_dec_scale_f32=s2, key=key), calls=2, reps=5)
        except Exception as exc:  # a config that does not compile (shared memory) is reported, not fatal
            print(f"T={t} BN={bn} BT={bt} warps={warps} stages={stages} act_f16={act_f16}: {type(exc).__name__}: "
                  f"{str(exc)[:120]}")
            continue
        out.append({"T": t, "BN": bn, "BT": bt, "warps": warps, "stages": stages, "act_f16": act_f16, "us": s * 1e6})
        print(f"sweep fused L1 T={t} BN={bn} BT={bt} warps={warps} stages={stages} act_f16={act_f16}: {s * 1e6:.1f} us",
              flush=True)
    _dump(f"sm90_moe_sweep_T{t}.json", out)
    assert out


def _v4pro_block(dev):
    """(experts, gate bf16 [E, H], bias [E], router) of one V4-Pro MoE layer: random NVFP4 stacks with
    input scales (static and dynamic both run), a random gate and bias (seed 2)."""
    from kernels.sm90 import moe_block

    torch.manual_seed(2)

    def stack(n, k):
        return (torch.randint(0, 256, (E, n, k // 2), dtype=torch.uint8, device=dev),
                torch.randint(0x28, 0x38, (E, n, k // 16), dtype=torch.uint8, device=dev),
                torch.full((E,), 1e-3, dtype=torch.float32, device=dev),
                torch.full((E,), 0.02, dtype=torch.float32, device=dev))

    experts = moe_block.prepare_moe_experts(stack(I, H), stack(I, H), stack(H, I))
    torch.cuda.empty_cache()
    gate = (torch.randn(E, H, device=dev) * 0.02).to(torch.bfloat16)
    bias = torch.randn(E, device=dev) * 0.01
    router = moe_block.prepare_router(gate, bias, None, top_k=TOPK, routed_scaling_factor=2.5,
                                      scoring="sqrtsoftplus", renormalize=True, n_group=None, topk_group=None)
    return experts, gate, bias, router


def test_moe_block_bench():
    """The whole block, one capturable call (kernels.sm90.moe_block.launch): router + dispatch + act_quant +
    L1 (+ SwiGLU + requant) + L2 + combine, static (fused L1 epilogue) and dynamic scales, against torch bf16
    on the same routing: the GEMMs alone (torch._grouped_mm L1, silu * up, L2: the issue's baseline) and a
    whole torch block (fp32 router logits, sqrt(softplus), biased top-k, stable sort by expert, row gather,
    the two grouped GEMMs, weighted combine). Routing: the V4 router on random x and a random gate (close to
    uniform; the active-expert count is printed)."""
    from kernels.sm90 import moe_block

    dev = torch.device("cuda")
    bw = _copy_bw()
    report: dict = {"copy_GBps": bw / 1e9, "device": torch.cuda.get_device_name(), "rows": []}
    print(f"\ncopy bandwidth (read+write): {bw / 1e9:.0f} GB/s")
    experts, gate, bias, router = _v4pro_block(dev)
    w13_bf16 = torch.randn(E, 2 * I, H, dtype=torch.bfloat16, device=dev) * 0.02
    w2_bf16 = torch.randn(E, H, I, dtype=torch.bfloat16, device=dev) * 0.02
    l1_bytes, l2_bytes = 2 * I * (H // 2 + H // 16), H * (I // 2 + I // 16)
    flop_per_row = 2 * (H * 2 * I + I * H)
    rows_out = []
    for t in TOKENS:
        x = torch.randn(t, H, device=dev).to(torch.bfloat16)
        ids, _ = moe_block.route(x, router, None)
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        active = int((counts > 0).sum())
        r = t * TOPK
        res: dict = {"T": t, "rows": r, "active_experts": active, "max_rows_per_expert": int(counts.max())}
        for act in ("static", "dynamic"):
            res[f"ours_{act}_s"] = _time(lambda: moe_block.launch(x, router, experts, swiglu_limit=10.0,
                                                                 weight_placement="after_w2", act_scale=act))

        # torch bf16, the GEMMs alone on this routing (the baseline)
        off = torch.zeros(E + 1, dtype=torch.int32, device=dev)
        off[1:] = torch.cumsum(counts, 0).to(torch.int32)
        offs = off[1:]
        xr = torch.randn(r, H, dtype=torch.bfloat16, device=dev)

        def torch_gemms():
            y1 = torch._grouped_mm(xr, w13_bf16.transpose(-2, -1), offs=offs)
            h = torch.nn.functional.silu(y1[:, :I]) * y1[:, I:]
            return torch._grouped_mm(h, w2_bf16.transpose(-2, -1), offs=offs)

        def torch_block():
            logits = x.float() @ gate.float().t()
            scores = torch.sqrt(torch.nn.functional.softplus(logits))
            sel = (scores + bias).topk(TOPK, dim=1).indices
            w = scores.gather(1, sel)
            w = w / w.sum(1, keepdim=True) * 2.5
            flat = sel.reshape(-1)
            order = torch.sort(flat, stable=True).indices
            cnt = torch.zeros(E, dtype=torch.int32, device=dev).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
            o = torch.cumsum(cnt, 0, dtype=torch.int32)
            xs = x[order // TOPK]
            y1 = torch._grouped_mm(xs, w13_bf16.transpose(-2, -1), offs=o)
            h = torch.nn.functional.silu(y1[:, :I]) * y1[:, I:]
            y2 = torch._grouped_mm(h, w2_bf16.transpose(-2, -1), offs=o)
            y = torch.empty_like(y2)
            y[order] = y2
            return (y.view(t, TOPK, H).float() * w.unsqueeze(-1)).sum(1).to(torch.bfloat16)

        res["torch_gemms_s"] = _time(torch_gemms)
        res["torch_block_s"] = _time(torch_block)
        wbytes = active * (l1_bytes + l2_bytes)
        for act in ("static", "dynamic"):
            s = res[f"ours_{act}_s"]
            res[f"ours_{act}_weight_GBps"] = wbytes / s / 1e9
            res[f"ours_{act}_pct_copy"] = 100 * wbytes / s / bw
            res[f"ours_{act}_TFLOPs"] = r * flop_per_row / s / 1e12
            res[f"x_torch_gemms_{act}"] = res["torch_gemms_s"] / s
            res[f"x_torch_block_{act}"] = res["torch_block_s"] / s
        res["torch_block_TFLOPs"] = r * flop_per_row / res["torch_block_s"] / 1e12
        rows_out.append(res)
        print(f"block T={t:6d} active={active:3d} max/expert={res['max_rows_per_expert']:5d} | ours static "
              f"{res['ours_static_s'] * 1e6:9.1f} us ({res['ours_static_weight_GBps']:.0f} GB/s, "
              f"{res['ours_static_pct_copy']:.0f}% copy, {res['ours_static_TFLOPs']:.0f} TFLOP/s), dynamic "
              f"{res['ours_dynamic_s'] * 1e6:9.1f} us | torch bf16 GEMMs {res['torch_gemms_s'] * 1e6:9.1f} us, block "
              f"{res['torch_block_s'] * 1e6:9.1f} us ({res['torch_block_TFLOPs']:.0f} TFLOP/s) | x torch GEMMs "
              f"{res['x_torch_gemms_static']:.2f} / {res['x_torch_gemms_dynamic']:.2f}, x torch block "
              f"{res['x_torch_block_static']:.2f} / {res['x_torch_block_dynamic']:.2f} (static / dynamic)", flush=True)
        del x, xr
        torch.cuda.empty_cache()
    report["rows"] = rows_out
    _dump("sm90_moe_block_bench.json", report)
    assert all(r_["ours_static_s"] > 0 and r_["ours_dynamic_s"] > 0 for r_ in rows_out)


def test_moe_block_breakdown():
    """Each step of the static-scale block timed alone at each T (same router, experts and routing as
    test_moe_block_bench): where the block's time goes beyond its two GEMMs."""
    from kernels.sm90 import grouped_gemm_nvfp4 as gg
    from kernels.sm90 import moe_block, moe_dispatch, quantize_grouped

    dev = torch.device("cuda")
    ex, _, _, router = _v4pro_block(dev)
    s1, s2 = ex.l1_input_dec_scale_f32, ex.l2_input_dec_scale_f32
    out = []
    for t in TOKENS:
        x = torch.randn(t, H, device=dev).to(torch.bfloat16)
        ids, w = moe_block.route(x, router, None)
        d = moe_dispatch.dispatch(ids, E)
        a = quantize_grouped.launch(x, d.offsets_i32, input_dec_scale_f32=s1, row_token=d.row_token_i64,
                                    rows_cap=t * TOPK)
        h = gg.grouped_l1_swiglu_requant(*a, d.offsets_i32, ex.w13, swiglu_limit=10.0, h_input_dec_scale_f32=s2)
        y = gg.grouped_gemm(*h, d.offsets_i32, ex.w2)
        steps = {
            "router": lambda: moe_block.route(x, router, None),
            "dispatch": lambda: moe_dispatch.dispatch(ids, E),
            "act_quant_static": lambda: quantize_grouped.launch(x, d.offsets_i32, input_dec_scale_f32=s1,
                                                                row_token=d.row_token_i64, rows_cap=t * TOPK),
            "act_quant_dynamic": lambda: quantize_grouped.launch(x, d.offsets_i32, row_token=d.row_token_i64,
                                                                 rows_cap=t * TOPK),
            "l1_fused": lambda: gg.grouped_l1_swiglu_requant(*a, d.offsets_i32, ex.w13, swiglu_limit=10.0,
                                                             h_input_dec_scale_f32=s2),
            "l2": lambda: gg.grouped_gemm(*h, d.offsets_i32, ex.w2),
            "combine": lambda: moe_dispatch.combine(y, d.row_of_pair_i32, w, num_tokens=t, top_k=TOPK),
            "block_static": lambda: moe_block.launch(x, router, ex, swiglu_limit=10.0, act_scale="static"),
        }
        row = {"T": t}
        for name, fn in steps.items():
            row[name + "_us"] = _time(fn) * 1e6
        out.append(row)
        print(f"breakdown T={t:6d} | " + " | ".join(f"{k[:-3]} {v:8.1f}" for k, v in row.items() if k != "T"),
              flush=True)
        del x, a, h, y
        torch.cuda.empty_cache()
    _dump("sm90_moe_block_breakdown.json", out)
    assert all(r["block_static_us"] > 0 for r in out)
