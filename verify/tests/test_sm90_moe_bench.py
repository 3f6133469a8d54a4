"""Benchmark of the sm90 grouped NVFP4 GEMMs at DeepSeek-V4-Pro MoE sizes (marker `bench`: run with -m bench).

384 experts, top-6, hidden 7168, intermediate 3072; uniform random routing (each token's 6 distinct experts
drawn uniformly), T in {1, 16, 256, 4096, 32768} tokens, R = 6T expert rows. Measured in one process:
- ours: L1 (fused SwiGLU + te requant epilogue) + L2 (grouped_gemm on the L1's h), as routed; where
  grouped_gemm_nvfp4.wgmma_serves (T <= 256) also the Triton kernel and the register-fed wgmma kernel by explicit
  keys (L1 fused + L2, bits compared: the test fails if they differ); the unfused L1 (gate/up
  float32) + the unfused SwiGLU + requant kernel (kernels.sm90.swiglu_requant, when present) + L2; each GEMM
  alone;
- torch bf16 on the same routing: torch._grouped_mm for L1 (w1|w3, [E, 7168, 6144]) and L2 ([E, 3072, 7168]),
  silu(gate) * up between them;
- copy bandwidth (torch copy_ of 1 GiB, read + write) and the device name in the same run.

Fits an 80 GB H100 with the default allocator (issue 25 item 4): each test runs in phases, ours first, then
everything of ours freed, then the torch bf16 baseline (47 GiB of bf16 weights, filled in place); the routing
of each T is drawn once and shared by both phases. Each phase's peak is planned on the CPU
(verify/tests/_bench_memory.py, checked under 70 GiB by test_bench_memory_plan.py), printed beside the
measured torch.cuda.max_memory_allocated(), and a measured peak above its plan fails the test after the
table is written.

Timing: each op captured several times into one CUDA graph (once for T >= 4096, whose calls take
milliseconds: one call's buffers in the graph pool), replayed, CUDA events, median per call. GB/s counts
the weight bytes of the active experts (NVFP4: packed + E4M3 scales; bf16: 2 bytes per element); TFLOP/s
counts 2 * R * (7168 * 6144 + 3072 * 7168). Printed, and written to sm90_moe_bench.json (and the other
tests' JSON) under NVFP4V_REPORT_DIR when set.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from verify.tests._bench_memory import GiB, moe_plans
from verify.tests._cuda_timing import copy_bandwidth, time_graph

pytestmark = [pytest.mark.bench, pytest.mark.gpu, pytest.mark.sm90]

E, TOPK, H, I = 384, 6, 7168, 3072
H_INPUT_SCALE = 1e-7  # the w2 input scale of the benches' random data (see test_moe_grouped_gemm_bench)
TOKENS = tuple(int(t) for t in os.environ.get("NVFP4V_MOE_TOKENS", "1,16,256,4096,32768").split(","))
PLANS = moe_plans(E, TOPK, H, I, TOKENS)
# the large-token path's variants timed at the T it serves (same bits): the Triton kernel's two MMAs a K tile, its one
# K = 128 MMA, the register-fed Gluon kernel (routed key), and that kernel with two 64-row blocks a warpgroup
# (BigWgmmaKey.rows_per_wg 2, BT 64, 8 / 4 warps; and BT 128, 8 warps: BN 256, half the token bytes a weight row of the
# routed BT 128 key)
_LT_VARIANTS = ("big2", "k128", "wgmma", "wgmma_r2_w8", "wgmma_r2_w4", "wgmma_r2_bt128")


def _time(fn, calls: int = 3, reps: int = 7, t: int = 0) -> float:
    """Seconds per call (fn captured `calls` times in one graph, once for t >= 4096; median over replays)."""
    return time_graph([fn] * (1 if t >= 4096 else calls), reps)


def _copy_bw() -> float:
    return copy_bandwidth(warmup=20)[0]


def _dump(name: str, obj) -> None:
    """obj as JSON to NVFP4V_REPORT_DIR/name when that variable is set (the H100 / H200 runs collect these)."""
    out_dir = os.environ.get("NVFP4V_REPORT_DIR")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=1)


def _free() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


class _Phase:
    """Context: frees the cache and resets the peak counter on entry; on exit frees again and records the
    measured peak beside the plan (`peaks[name] = (measured, planned)`)."""

    def __init__(self, name: str, peaks: dict):
        self.name, self.peaks = name, peaks

    def __enter__(self):
        _free()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        self.peaks[self.name] = (measured, PLANS[self.name].peak)
        print(f"memory phase {self.name}: measured peak {measured / GiB:.1f} GiB, plan {PLANS[self.name].peak / GiB:.1f}"
              f" GiB ({PLANS[self.name].describe()})", flush=True)
        _free()
        return False


def _assert_peaks_within_plan(peaks: dict) -> None:
    over = {k: (m / GiB, p / GiB) for k, (m, p) in peaks.items() if m > p}
    assert not over, f"measured peak above its plan (GiB measured, planned): {over}; fix verify/tests/_bench_memory.py"


def _bench_header(report: dict) -> float:
    """Device, total memory, copy bandwidth (the same run) into report; checks the plans fit this device."""
    free_b, total_b = torch.cuda.mem_get_info()
    bw = _copy_bw()
    report.update({"device": torch.cuda.get_device_name(), "device_total_GiB": total_b / GiB, "copy_GBps": bw / 1e9,
                   "plans_GiB": {k: p.peak / GiB for k, p in PLANS.items()}})
    print(f"\n[{report['device']}, {total_b / GiB:.1f} GiB, {free_b / GiB:.1f} free] copy bandwidth (read+write): "
          f"{bw / 1e9:.0f} GB/s", flush=True)
    worst = max(p.peak for p in PLANS.values())
    assert worst <= free_b, f"the bench plan needs {worst / GiB:.1f} GiB, {free_b / GiB:.1f} GiB free on this device"
    return bw


def _routing(t: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts int64 [E], offsets int32 [E + 1]) of T tokens with 6 distinct uniform experts each (seed T)."""
    g = torch.Generator(device=dev).manual_seed(1000 + t)
    ids = torch.rand(t, E, device=dev, generator=g).topk(TOPK, dim=1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    off = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    off[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return counts, off


def _bf16_experts(dev) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H] and w2 [E, H, I] bf16, N(0, 0.02), filled in place (no full-size temporaries)."""
    torch.manual_seed(3)
    w13 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=dev).normal_(0.0, 0.02)
    w2 = torch.empty(E, H, I, dtype=torch.bfloat16, device=dev).normal_(0.0, 0.02)
    return w13, w2


def _torch_grouped_moe(x, w13_bf16, w2_bf16, offs):
    y1 = torch._grouped_mm(x, w13_bf16.transpose(-2, -1), offs=offs)
    h = torch.nn.functional.silu(y1[:, :I]) * y1[:, I:]
    return torch._grouped_mm(h, w2_bf16.transpose(-2, -1), offs=offs)


def test_moe_grouped_gemm_bench():
    from kernels.sm90 import grouped_gemm_nvfp4 as gg
    from kernels.sm90 import moe_block

    try:
        from kernels.sm90 import swiglu_requant
    except ImportError:  # the unfused kernel lands separately
        swiglu_requant = None
    torch.manual_seed(0)
    dev = torch.device("cuda")
    report: dict = {"rows": []}
    bw = _bench_header(report)
    peaks: dict = {}
    routing = {t: _routing(t, dev) for t in TOKENS}
    l1_bytes = 2 * I * (H // 2 + H // 16)
    l2_bytes = H * (I // 2 + I // 16)
    flop_per_row = 2 * (H * 2 * I + I * H)
    res_by_t: dict = {}

    # ---- phase 1, ours: NVFP4 weights from checkpoint-format bytes (our host prep)
    with _Phase("grouped_ours", peaks):
        def nvfp4_stack(n, k):
            return (torch.randint(0, 256, (E, n, k // 2), dtype=torch.uint8, device=dev),
                    torch.randint(0x28, 0x38, (E, n, k // 16), dtype=torch.uint8, device=dev),
                    torch.full((E,), 1e-3, dtype=torch.float32, device=dev))

        w13 = gg.prepare_gate_up(*nvfp4_stack(I, H), *nvfp4_stack(I, H))
        w2 = gg.prepare_experts(*nvfp4_stack(H, I))
        # the w2 input scale (amax / 2688) of this data: h = silu(gate) * up is about 2e-4 at most (random codes, weight
        # scale 1e-3, activation decode 0.02), so 0.05 (before session 14) quantized every h block to a zero scale:
        # L2 read zeros at T 1 / 16 and the bits compared were zeros. 1e-7 keeps h's blocks in E4M3 range.
        s2 = torch.full((E,), H_INPUT_SCALE, dtype=torch.float32, device=dev)
        for t in TOKENS:
            counts, off = routing[t]
            r = t * TOPK
            a_packed = torch.randint(0, 256, (r, H // 2), dtype=torch.uint8, device=dev)
            a_sf = torch.randint(0x30, 0x3A, (gg.grouped_sf_rows(r, E), H // 16), dtype=torch.uint8, device=dev)
            a_dec = torch.full((E,), 0.02, dtype=torch.float32, device=dev)
            hp, hsf, hdec = gg.grouped_l1_swiglu_requant(a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0,
                                                         h_input_dec_scale_f32=s2)
            # the bit checks below compare L2 outputs of this h: they mean something only if h is not all zero
            res: dict = {"T": t, "rows": r, "active_experts": int((counts > 0).sum()),
                         "h_nonzero_scale_bytes": int((hsf != 0).sum())}
            res["l1_fused_s"] = _time(lambda: gg.grouped_l1_swiglu_requant(
                a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0, h_input_dec_scale_f32=s2), t=t)
            res["l1_gate_up_s"] = _time(lambda: gg.grouped_gemm_l1(a_packed, a_sf, a_dec, off, w13), t=t)
            res["l2_s"] = _time(lambda: gg.grouped_gemm(hp, hsf, hdec, off, w2), t=t)
            # L2 as the MoE block launches it (kernels.sm90.moe_block: a programmatic dependent of L1 where the
            # register-fed kernel serves T), and launched normally beside it: the same bits, asserted
            res["ours_fused_s"] = _time(lambda: gg.grouped_gemm(*gg.grouped_l1_swiglu_requant(
                a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0, h_input_dec_scale_f32=s2), off, w2,
                pdl=moe_block.L2_PDL), t=t)
            res["ours_fused_no_pdl_s"] = _time(lambda: gg.grouped_gemm(*gg.grouped_l1_swiglu_requant(
                a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0, h_input_dec_scale_f32=s2), off, w2), t=t)
            y_pdl = gg.grouped_gemm(hp, hsf, hdec, off, w2, pdl=True)
            res["pdl_bits_equal"] = torch.equal(y_pdl, gg.grouped_gemm(hp, hsf, hdec, off, w2))
            del y_pdl
            print(f"T={t:6d} L1f+L2: L2 pdl={moe_block.L2_PDL} {res['ours_fused_s'] * 1e6:9.1f} us, L2 launched "
                  f"normally {res['ours_fused_no_pdl_s'] * 1e6:9.1f} us; bits equal {res['pdl_bits_equal']}",
                  flush=True)
            if swiglu_requant is not None:
                def unfused():
                    gate, up = gg.grouped_gemm_l1(a_packed, a_sf, a_dec, off, w13)
                    _, (p, sf, dec) = swiglu_requant.launch(gate, up, off, swiglu_limit=10.0, input_dec_scale_f32=s2)
                    return gg.grouped_gemm(p, sf, dec, off, w2)
                try:
                    res["ours_unfused_s"] = _time(unfused, t=t)
                except Exception as exc:  # reported in the row, not fatal to the bench
                    res["unfused_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            res["key_l1"] = str(gg.CompileKey.for_shape(2, r, E, 2 * I, H, clamp=True))
            if gg.CompileKey.for_shape(2, r, E, 2 * I, H, clamp=True).big:
                # the large-token path serves this T: the present path's keys timed beside it (same bits)
                k_l1 = gg.CompileKey.for_shape(2, r, E, 2 * I, H, clamp=True, large_token=False)
                k_l2 = gg.CompileKey.for_shape(0, r, E, H, I, large_token=False)
                res["key_l1_present"] = str(k_l1)
                res["present_l1_fused_s"] = _time(lambda: gg.grouped_l1_swiglu_requant(
                    a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0, h_input_dec_scale_f32=s2, key=k_l1), t=t)
                res["present_l2_s"] = _time(lambda: gg.grouped_gemm(hp, hsf, hdec, off, w2, key=k_l2), t=t)
                res["present_fused_s"] = _time(lambda: gg.grouped_gemm(*gg.grouped_l1_swiglu_requant(
                    a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0, h_input_dec_scale_f32=s2, key=k_l1), off, w2,
                    key=k_l2), t=t)
                print(f"present path T={t:6d}: fused L1 {res['present_l1_fused_s'] * 1e6:9.1f} us, L2 "
                      f"{res['present_l2_s'] * 1e6:9.1f}, L1f+L2 {res['present_fused_s'] * 1e6:9.1f} (large-token "
                      f"path {res['ours_fused_s'] * 1e6:9.1f}: x{res['present_fused_s'] / res['ours_fused_s']:.2f})",
                      flush=True)
                # the large-token path's variants (explicit keys, same bits): two MMAs per K tile, one K = 128 MMA,
                # the register-fed Gluon kernel (gg.LARGE_TOKEN_VARIANT routes one of them)
                for name in _LT_VARIANTS:
                    if name == "wgmma":  # BT 128, 8 warps, one row block a warpgroup (BN 128)
                        kv1, kv2 = (dataclasses.replace(gg.BigWgmmaKey.for_shape(epi, r, E, clamp=epi == 2),
                                                        block_t=128, num_warps=8, rows_per_wg=1) for epi in (2, 0))
                    elif name == "wgmma_r2_bt128":  # rows_per_wg 2, BT 128, 8 warps (BN 256)
                        kv1, kv2 = (dataclasses.replace(gg.BigWgmmaKey.for_shape(epi, r, E, clamp=epi == 2),
                                                        block_t=128, num_warps=8, rows_per_wg=2) for epi in (2, 0))
                    elif name.startswith("wgmma_r2"):  # rows_per_wg 2, BT 64, 8 / 4 warps (BN 256 / 128)
                        kv1, kv2 = (dataclasses.replace(gg.BigWgmmaKey.for_shape(epi, r, E, clamp=epi == 2), block_t=64,
                                                        num_warps=int(name[-1]), rows_per_wg=2) for epi in (2, 0))
                    else:
                        kv1 = dataclasses.replace(gg.CompileKey.for_shape(2, r, E, 2 * I, H, clamp=True),
                                                  k128=name == "k128")
                        kv2 = dataclasses.replace(gg.CompileKey.for_shape(0, r, E, H, I), k128=name == "k128")
                    res[f"key_l1_{name}"] = str(kv1)
                    h_ref = gg.grouped_l1_swiglu_requant(a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0,
                                                         h_input_dec_scale_f32=s2, key=k_l1)
                    h_got = gg.grouped_l1_swiglu_requant(a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0,
                                                         h_input_dec_scale_f32=s2, key=kv1)
                    same = all(torch.equal(x, y) for x, y in zip(h_got, h_ref))
                    del h_got
                    y_ref = gg.grouped_gemm(*h_ref, off, w2, key=k_l2)
                    res[f"lt_{name}_bits_equal"] = same and torch.equal(gg.grouped_gemm(*h_ref, off, w2, key=kv2),
                                                                        y_ref)
                    del h_ref, y_ref
                    res[f"lt_{name}_l1_fused_s"] = _time(lambda: gg.grouped_l1_swiglu_requant(
                        a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0, h_input_dec_scale_f32=s2, key=kv1), t=t)
                    res[f"lt_{name}_l2_s"] = _time(lambda: gg.grouped_gemm(hp, hsf, hdec, off, w2, key=kv2), t=t)
                    res[f"lt_{name}_fused_s"] = _time(lambda: gg.grouped_gemm(*gg.grouped_l1_swiglu_requant(
                        a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0, h_input_dec_scale_f32=s2, key=kv1), off,
                        w2, key=kv2), t=t)
                    print(f"large-token {name} T={t:6d}: fused L1 {res[f'lt_{name}_l1_fused_s'] * 1e6:9.1f} us, L2 "
                          f"{res[f'lt_{name}_l2_s'] * 1e6:9.1f}, L1f+L2 {res[f'lt_{name}_fused_s'] * 1e6:9.1f}; bits "
                          f"equal to the present path: {res[f'lt_{name}_bits_equal']}", flush=True)
            if gg.wgmma_serves(r, E):  # the register-fed kernel (issue 25 item 1) against the Triton one, explicit keys
                kw1, kw2 = gg.WgmmaKey.for_shape(2, r, E, clamp=True), gg.WgmmaKey.for_shape(0, r, E)
                kt1 = gg.CompileKey.for_shape(2, r, E, 2 * I, H, clamp=True)
                kt2 = gg.CompileKey.for_shape(0, r, E, H, I)

                def l1_l2(k1, k2):
                    h = gg.grouped_l1_swiglu_requant(a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0,
                                                     h_input_dec_scale_f32=s2, key=k1)
                    return h + (gg.grouped_gemm(*h, off, w2, key=k2),)

                res["wgmma_bits_equal"] = all(torch.equal(x, y) for x, y in zip(l1_l2(kw1, kw2), l1_l2(kt1, kt2)))
                res["triton_fused_s"] = _time(lambda: l1_l2(kt1, kt2), t=t)
                res["wgmma_fused_s"] = _time(lambda: l1_l2(kw1, kw2), t=t)
                res["wgmma_l1_fused_s"] = _time(lambda: gg.grouped_l1_swiglu_requant(
                    a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0, h_input_dec_scale_f32=s2, key=kw1), t=t)
                res["wgmma_l2_s"] = _time(lambda: gg.grouped_gemm(hp, hsf, hdec, off, w2, key=kw2), t=t)
                res["key_wgmma"] = str(kw1)
                # BT 8 / 4-warp keys at register caps none / 80 / 96 (WgmmaKey.max_registers: 4 / 6 / 5 CTAs an SM),
                # timed beside the routed key in the same run, each compared with the Triton kernel's bits
                caps = {}
                for cap in (0, 80, 96):
                    c1, c2 = (dataclasses.replace(k_, block_t=8, num_warps=4, max_registers=cap) for k_ in (kw1, kw2))
                    caps[cap] = {"l1_fused_us": 1e6 * _time(lambda: gg.grouped_l1_swiglu_requant(
                        a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0, h_input_dec_scale_f32=s2, key=c1),
                        t=t), "l2_us": 1e6 * _time(lambda: gg.grouped_gemm(hp, hsf, hdec, off, w2, key=c2), t=t),
                        "bits_equal": all(torch.equal(x, y) for x, y in zip(l1_l2(c1, c2), l1_l2(kt1, kt2)))}
                res["wgmma_register_caps"] = caps
                print(f"wgmma BT 8 register cap T={t:6d} (routed {kw1}): " + "; ".join(
                    f"cap {c or 'none'}: fused L1 {v['l1_fused_us']:.1f} us, L2 {v['l2_us']:.1f}, bits equal "
                    f"{v['bits_equal']}" for c, v in caps.items()), flush=True)
                print(f"wgmma T={t:6d}: fused L1 {res['wgmma_l1_fused_s'] * 1e6:9.1f} us, L2 "
                      f"{res['wgmma_l2_s'] * 1e6:9.1f}, L1f+L2 {res['wgmma_fused_s'] * 1e6:9.1f} (Triton "
                      f"{res['triton_fused_s'] * 1e6:9.1f}); bits equal to the Triton kernel: "
                      f"{res['wgmma_bits_equal']}",
                      flush=True)
            res_by_t[t] = res
            print(f"ours T={t:6d}: fused L1 {res['l1_fused_s'] * 1e6:9.1f} us, L1 gate/up "
                  f"{res['l1_gate_up_s'] * 1e6:9.1f}, L2 {res['l2_s'] * 1e6:9.1f}, L1f+L2 "
                  f"{res['ours_fused_s'] * 1e6:9.1f}", flush=True)
            del a_packed, a_sf, hp, hsf, hdec
            _free()
        del w13, w2

    # ---- phase 2, torch bf16 on the same routing (ours freed)
    with _Phase("grouped_torch", peaks):
        w13_bf16, w2_bf16 = _bf16_experts(dev)
        for t in TOKENS:
            _, off = routing[t]
            res = res_by_t[t]
            x = torch.randn(res["rows"], H, dtype=torch.bfloat16, device=dev)
            offs = off[1:]
            res["torch_l1_s"] = _time(lambda: torch._grouped_mm(x, w13_bf16.transpose(-2, -1), offs=offs), t=t)
            res["torch_moe_s"] = _time(lambda: _torch_grouped_moe(x, w13_bf16, w2_bf16, offs), t=t)
            del x
            _free()
        del w13_bf16, w2_bf16

    rows_out = []
    for t in TOKENS:
        res = res_by_t[t]
        r, active, ours = res["rows"], res["active_experts"], res["ours_fused_s"]
        res["ours_weight_GBps"] = active * (l1_bytes + l2_bytes) / ours / 1e9
        res["ours_pct_copy"] = 100 * active * (l1_bytes + l2_bytes) / ours / bw
        res["ours_TFLOPs"] = r * flop_per_row / ours / 1e12
        res["torch_weight_GBps"] = active * 2 * (2 * I * H + H * I) / res["torch_moe_s"] / 1e9
        res["torch_TFLOPs"] = r * flop_per_row / res["torch_moe_s"] / 1e12
        res["x_torch"] = res["torch_moe_s"] / ours
        if "present_fused_s" in res:
            res["present_x_torch"] = res["torch_moe_s"] / res["present_fused_s"]
            print(f"T={t:6d} large-token path: L1f+L2 {ours * 1e6:9.1f} us (x torch {res['x_torch']:.2f}) | present "
                  f"path {res['present_fused_s'] * 1e6:9.1f} us (x torch {res['present_x_torch']:.2f}) | torch bf16 "
                  f"{res['torch_moe_s'] * 1e6:9.1f} us", flush=True)
            for name in _LT_VARIANTS:
                res[f"lt_{name}_x_torch"] = res["torch_moe_s"] / res[f"lt_{name}_fused_s"]
            print(f"T={t:6d} L1f+L2 large-token variants (us, x torch, x big2, bits equal to present): "
                  + " | ".join(f"{name} {res[f'lt_{name}_fused_s'] * 1e6:9.1f} x{res[f'lt_{name}_x_torch']:.2f} "
                               f"x{res['lt_big2_fused_s'] / res[f'lt_{name}_fused_s']:.2f} "
                               f"{res[f'lt_{name}_bits_equal']}"
                               for name in _LT_VARIANTS)
                  + f" | present {res['present_fused_s'] * 1e6:9.1f} | torch bf16 {res['torch_moe_s'] * 1e6:9.1f}",
                  flush=True)
        rows_out.append(res)
        print(f"T={t:6d} R={r:6d} active={active:3d} | fused L1 {res['l1_fused_s'] * 1e6:9.1f} us, L1 gate/up "
              f"{res['l1_gate_up_s'] * 1e6:9.1f}, L2 {res['l2_s'] * 1e6:9.1f} | ours L1f+L2 {ours * 1e6:9.1f} us "
              f"({res['ours_weight_GBps']:.0f} GB/s, {res['ours_pct_copy']:.0f}% copy, {res['ours_TFLOPs']:.0f} TFLOP/s)"
              + (f", unfused {res['ours_unfused_s'] * 1e6:9.1f}" if "ours_unfused_s" in res else "")
              + f" | torch bf16 {res['torch_moe_s'] * 1e6:9.1f} us (L1 {res['torch_l1_s'] * 1e6:.1f}; "
              f"{res['torch_TFLOPs']:.0f} TFLOP/s) | x torch {res['x_torch']:.2f}", flush=True)
        if "wgmma_fused_s" in res:  # present (Triton, explicit key) vs register-fed vs torch, the same run
            for name in ("triton", "wgmma"):
                sec = res[f"{name}_fused_s"]
                res[f"{name}_x_torch"] = res["torch_moe_s"] / sec
                res[f"{name}_pct_copy"] = 100 * active * (l1_bytes + l2_bytes) / sec / bw
            print(f"T={t:6d} L1f+L2: Triton {res['triton_fused_s'] * 1e6:9.1f} us ({res['triton_pct_copy']:.0f}% copy, "
                  f"x torch {res['triton_x_torch']:.2f}) | wgmma {res['wgmma_fused_s'] * 1e6:9.1f} us "
                  f"({res['wgmma_pct_copy']:.0f}% copy, x torch {res['wgmma_x_torch']:.2f}) | bits equal "
                  f"{res['wgmma_bits_equal']}", flush=True)
    report["rows"] = rows_out
    report["peaks_GiB"] = {k: {"measured": m / GiB, "plan": p / GiB} for k, (m, p) in peaks.items()}
    _dump("sm90_moe_bench.json", report)
    assert all(r_["ours_fused_s"] > 0 and r_["torch_moe_s"] > 0 for r_ in rows_out)
    zero = [r_["T"] for r_ in rows_out if r_["h_nonzero_scale_bytes"] == 0]
    assert not zero, f"the requantized h is all zero at T = {zero}: the bit checks compared zeros (H_INPUT_SCALE)"
    unequal = [r_["T"] for r_ in rows_out if r_.get("wgmma_bits_equal") is False
               or any(not v["bits_equal"] for v in r_.get("wgmma_register_caps", {}).values())]
    assert not unequal, f"register-fed grouped kernel: bits differ from the Triton kernel at T = {unequal}"
    unequal = [(r_["T"], name) for r_ in rows_out for name in _LT_VARIANTS
               if r_.get(f"lt_{name}_bits_equal") is False]
    assert not unequal, f"large-token variants: bits differ from the present path at (T, variant) {unequal}"
    _assert_peaks_within_plan(peaks)


@pytest.mark.parametrize("t", [1, 16, 256, 4096, 32768])
def test_moe_tile_sweep(t):
    """Token-tile / warps / stages sweep of the fused L1 and the L2 at one token count (for NOTES.md); at T <= 256
    also the register-fed kernel's (BT, warps); at the large-token sizes the Triton large-token kernel (big=True,
    k128 False / True) and its register-fed Gluon variant (big wgmma: BT, warps)."""
    from kernels.sm90 import grouped_gemm_nvfp4 as gg

    torch.manual_seed(1)
    dev = torch.device("cuda")
    _free()
    torch.cuda.reset_peak_memory_stats()
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
    s2 = torch.full((E,), H_INPUT_SCALE, dtype=torch.float32, device=dev)
    out = []
    # (BN, BT, warps, stages, act_f16, big: the large-token path[, k128: its one-MMA-per-tile variant])
    big = [(128, 128, 8, 4, False, True), (128, 128, 8, 3, False, True), (128, 256, 8, 2, False, True),
           (128, 64, 8, 3, False, True), (128, 64, 4, 4, False, True), (64, 128, 4, 4, False, True)]
    big += [c + (True,) for c in big]
    configs = {1: [(64, 16, 4, 4, False, False), (128, 16, 4, 4, False, False)],
               16: [(128, 16, 4, 4, False, False), (64, 16, 4, 4, False, False), (64, 16, 4, 3, False, False)],
               256: [(128, 16, 4, 4, False, False), (64, 16, 4, 4, False, False)],
               4096: [(128, 64, 8, 3, True, False), (64, 64, 4, 3, True, False), (128, 64, 8, 3, False, False),
                      (128, 128, 8, 3, True, False)] + big,
               32768: [(128, 128, 8, 3, True, False), (128, 128, 8, 3, False, False), (64, 64, 4, 3, True, False),
                       (128, 64, 8, 3, True, False)] + big}[t]
    for bn, bt, warps, stages, act_f16, big_path, *k128 in configs:
        k128 = bool(k128 and k128[0])
        key = gg.CompileKey(epi=2, block_n=bn, block_t=bt, num_warps=warps, num_stages=stages, e_pad=512, clamp=True,
                            act_f16=act_f16, big=big_path, k128=k128)
        try:
            s = _time(lambda: gg.grouped_l1_swiglu_requant(a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0,
                                                           h_input_dec_scale_f32=s2, key=key), calls=2, reps=5, t=t)
        except Exception as exc:  # a config that does not compile (shared memory) is reported, not fatal
            print(f"T={t} BN={bn} BT={bt} warps={warps} stages={stages} act_f16={act_f16} big={big_path} k128={k128}: "
                  f"{type(exc).__name__}: "
                  f"{str(exc)[:120]}")
            continue
        out.append({"T": t, "BN": bn, "BT": bt, "warps": warps, "stages": stages, "act_f16": act_f16, "big": big_path,
                    "k128": k128, "us": s * 1e6})
        print(f"sweep fused L1 T={t} BN={bn} BT={bt} warps={warps} stages={stages} act_f16={act_f16} big={big_path} "
              f"k128={k128}: {s * 1e6:.1f} us",
              flush=True)
    if gg.CompileKey.for_shape(2, r, E, 2 * I, H, clamp=True).big:  # the large-token register-fed variant's keys
        # rows_per_wg 2: two 64-row blocks a warpgroup on each token tile (BN 256 with 8 warps, 128 with 4)
        for bt, warps, rows in ((128, 8, 1), (64, 8, 1), (128, 4, 1), (64, 4, 1), (64, 8, 2), (64, 4, 2), (128, 8, 2),
                                (128, 4, 2)):
            key = gg.BigWgmmaKey(epi=2, block_t=bt, e_pad=512, num_warps=warps, clamp=True, rows_per_wg=rows)
            s = _time(lambda: gg.grouped_l1_swiglu_requant(a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0,
                                                           h_input_dec_scale_f32=s2, key=key), calls=2, reps=5, t=t)
            out.append({"T": t, "big_wgmma": True, "BT": bt, "warps": warps, "rows_per_wg": rows, "us": s * 1e6})
            print(f"sweep fused L1 T={t} big wgmma BT={bt} warps={warps} rows_per_wg={rows} (BN {key.block_n}): "
                  f"{s * 1e6:.1f} us", flush=True)
    if gg.wgmma_serves(r, E):  # the register-fed kernel's keys (BT, warps), same inputs
        for bt, warps, cap in ((8, 4, 0), (8, 4, 96), (8, 8, 0), (16, 4, 0), (16, 8, 0)):  # cap: max_registers
            key = gg.WgmmaKey(epi=2, block_t=bt, e_pad=512, num_warps=warps, clamp=True, max_registers=cap)
            s = _time(lambda: gg.grouped_l1_swiglu_requant(a_packed, a_sf, a_dec, off, w13, swiglu_limit=10.0,
                                                           h_input_dec_scale_f32=s2, key=key), calls=2, reps=5, t=t)
            out.append({"T": t, "wgmma": True, "BT": bt, "warps": warps, "max_registers": cap, "us": s * 1e6})
            print(f"sweep fused L1 T={t} wgmma BT={bt} warps={warps} max_registers={cap}: {s * 1e6:.1f} us",
                  flush=True)
    _dump(f"sm90_moe_sweep_T{t}.json", out)
    assert out
    del w13, a_packed, a_sf
    peaks = {"tile_sweep": (torch.cuda.max_memory_allocated(), moe_plans(E, TOPK, H, I, (t,))["tile_sweep"].peak)}
    _free()
    _assert_peaks_within_plan(peaks)


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
    the two grouped GEMMs, scatter back, the weighted combine as one bf16 batched matmul [T, 1, 6] x
    [T, 6, H]). Routing: the V4 router on random x and a random gate (close to uniform; the active-expert
    count is printed). Phases: ours (NVFP4 experts), freed, then torch (bf16 experts)."""
    from kernels.sm90 import moe_block

    dev = torch.device("cuda")
    report: dict = {"rows": []}
    bw = _bench_header(report)
    peaks: dict = {}
    l1_bytes, l2_bytes = 2 * I * (H // 2 + H // 16), H * (I // 2 + I // 16)
    flop_per_row = 2 * (H * 2 * I + I * H)
    res_by_t: dict = {}
    counts_by_t: dict = {}

    def x_of(t):
        g = torch.Generator(device=dev).manual_seed(2000 + t)
        return torch.randn(t, H, device=dev, generator=g).to(torch.bfloat16)

    # ---- phase 1, ours
    with _Phase("block_ours", peaks):
        experts, gate, bias, router = _v4pro_block(dev)
        for t in TOKENS:
            x = x_of(t)
            ids, _ = moe_block.route(x, router, None)
            counts = torch.bincount(ids.reshape(-1), minlength=E)
            counts_by_t[t] = counts
            res: dict = {"T": t, "rows": t * TOPK, "active_experts": int((counts > 0).sum()),
                         "max_rows_per_expert": int(counts.max())}
            for act in ("static", "dynamic"):
                res[f"ours_{act}_s"] = _time(lambda: moe_block.launch(x, router, experts, swiglu_limit=10.0,
                                                                     weight_placement="after_w2", act_scale=act), t=t)
            res_by_t[t] = res
            print(f"ours block T={t:6d}: static {res['ours_static_s'] * 1e6:9.1f} us, dynamic "
                  f"{res['ours_dynamic_s'] * 1e6:9.1f} us", flush=True)
            del x, ids
            _free()
        del experts, router

    # ---- phase 2, torch bf16 (ours freed): the GEMMs alone, then the whole block
    with _Phase("block_torch", peaks):
        w13_bf16, w2_bf16 = _bf16_experts(dev)
        for t in TOKENS:
            res, r = res_by_t[t], t * TOPK
            off = torch.zeros(E + 1, dtype=torch.int32, device=dev)
            off[1:] = torch.cumsum(counts_by_t[t], 0).to(torch.int32)
            offs = off[1:]
            xr = torch.randn(r, H, dtype=torch.bfloat16, device=dev)
            res["torch_gemms_s"] = _time(lambda: _torch_grouped_moe(xr, w13_bf16, w2_bf16, offs), t=t)
            del xr
            _free()
            x = x_of(t)

            def torch_block():
                logits = x.float() @ gate.float().t()
                scores = torch.sqrt(torch.nn.functional.softplus(logits))
                sel = (scores + bias).topk(TOPK, dim=1).indices
                w = scores.gather(1, sel)
                w = w / w.sum(1, keepdim=True) * 2.5
                flat = sel.reshape(-1)
                order = torch.sort(flat, stable=True).indices
                cnt = torch.zeros(E, dtype=torch.int32, device=dev).index_add_(
                    0, flat, torch.ones_like(flat, dtype=torch.int32))
                o = torch.cumsum(cnt, 0, dtype=torch.int32)
                y2 = _torch_grouped_moe(x[order // TOPK], w13_bf16, w2_bf16, o)
                y = torch.empty_like(y2)
                y[order] = y2
                return torch.bmm(w.to(torch.bfloat16).unsqueeze(1), y.view(t, TOPK, H)).squeeze(1)

            res["torch_block_s"] = _time(torch_block, t=t)
            del x
            _free()
        del w13_bf16, w2_bf16

    rows_out = []
    for t in TOKENS:
        res = res_by_t[t]
        r, active = res["rows"], res["active_experts"]
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
    report["rows"] = rows_out
    report["peaks_GiB"] = {k: {"measured": m / GiB, "plan": p / GiB} for k, (m, p) in peaks.items()}
    _dump("sm90_moe_block_bench.json", report)
    assert all(r_["ours_static_s"] > 0 and r_["ours_dynamic_s"] > 0 and r_["torch_block_s"] > 0 for r_ in rows_out)
    _assert_peaks_within_plan(peaks)


def test_moe_block_breakdown():
    """Each step of the static-scale block timed alone at each T (same router and experts as
    test_moe_block_bench), the sum of the steps and the whole block in one graph: where the block's time
    goes beyond its two GEMMs. Device and copy bandwidth in the same run; ours only (no bf16 weights)."""
    from kernels.sm90 import grouped_gemm_nvfp4 as gg
    from kernels.sm90 import moe_block, moe_dispatch, quantize_grouped

    dev = torch.device("cuda")
    report: dict = {"rows": []}
    bw = _bench_header(report)
    peaks: dict = {}
    out = []
    with _Phase("breakdown", peaks):
        ex, _, _, router = _v4pro_block(dev)
        s1, s2 = ex.l1_input_dec_scale_f32, ex.l2_input_dec_scale_f32
        l1_bytes, l2_bytes = 2 * I * (H // 2 + H // 16), H * (I // 2 + I // 16)
        for t in TOKENS:
            g = torch.Generator(device=dev).manual_seed(2000 + t)
            x = torch.randn(t, H, device=dev, generator=g).to(torch.bfloat16)
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
                "l1_fused": lambda: gg.grouped_l1_swiglu_requant(*a, d.offsets_i32, ex.w13, swiglu_limit=10.0,
                                                                 h_input_dec_scale_f32=s2),
                "l2": lambda: gg.grouped_gemm(*h, d.offsets_i32, ex.w2),
                "combine": lambda: moe_dispatch.combine(y, d.row_of_pair_i32, w, num_tokens=t, top_k=TOPK),
                "block_static": lambda: moe_block.launch(x, router, ex, swiglu_limit=10.0, act_scale="static"),
                "act_quant_dynamic": lambda: quantize_grouped.launch(x, d.offsets_i32, row_token=d.row_token_i64,
                                                                     rows_cap=t * TOPK),
            }
            row: dict = {"T": t}
            for name, fn in steps.items():
                row[name + "_us"] = _time(fn, t=t) * 1e6
            parts = ("router", "dispatch", "act_quant_static", "l1_fused", "l2", "combine")
            row["sum_of_steps_us"] = sum(row[p + "_us"] for p in parts)
            active = int((torch.bincount(ids.reshape(-1), minlength=E) > 0).sum())
            row["active_experts"] = active
            row["block_pct_copy"] = 100 * active * (l1_bytes + l2_bytes) / (row["block_static_us"] * 1e-6) / bw
            for p in parts:
                row[p + "_pct_of_block"] = 100 * row[p + "_us"] / row["block_static_us"]
            out.append(row)
            print(f"breakdown T={t:6d} | " + " | ".join(f"{k[:-3]} {v:8.1f}" for k, v in row.items() if k.endswith("_us"))
                  + f" | GEMMs {row['l1_fused_pct_of_block'] + row['l2_pct_of_block']:.0f}% of the block, block at "
                  f"{row['block_pct_copy']:.0f}% of copy", flush=True)
            del x, ids, w, d, a, h, y
            _free()
        del ex, router
    report["rows"] = out
    report["peaks_GiB"] = {k: {"measured": m / GiB, "plan": p / GiB} for k, (m, p) in peaks.items()}
    _dump("sm90_moe_block_breakdown.json", report)
    assert all(r["block_static_us"] > 0 for r in out)
    _assert_peaks_within_plan(peaks)
