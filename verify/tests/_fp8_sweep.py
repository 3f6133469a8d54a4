"""Config sweep of the sm90 FP8 block-scaled GEMM (issue 23 item 8) on the GPU: for every DeepSeek-V4-Pro FP8
linear and M bucket, time each candidate config (candidates below: the committed ones of
kernels.sm90.gemm_fp8_block_configs.candidates, plus the Gluon kernel's tiles at M >= 128) against
torch bf16 (x @ W^T) and torch._scaled_mm blockwise (cuBLASLt, 1x128 x 128x128 scales) in the same run, keep
only candidates whose output is bit-equal to the reference (CompileKey.heuristic at M = 4096, rows 0..M-1:
the config check and the batch-invariance check in one), and pick the fastest per (N, K, M).

Prints one table, and writes NVFP4V_REPORT_DIR/sm90_fp8_sweep.json ({"device", "copy_GBps", "rows": every
candidate, "best": one row per (shape, M), "winners": [{"N", "K", "M", "config", "us"}]}) after every shape,
so a run stopped by its time limit keeps what it measured. The lead commits the winners with
`python -m kernels.sm90.gemm_fp8_block_configs --from-json OUT/sm90_fp8_sweep.json`.

Compiles run first in a pool of worker processes (Triton's on-disk cache is shared, so the timing process
only loads them); a candidate that fails to compile or launch is reported, not fatal. Environment:
NVFP4V_FP8_SWEEP_SHAPES (names, comma-separated; default the V4-Pro ones; "flash": the V4-Flash ones),
NVFP4V_FP8_SWEEP_M (default 1,16,64,128,4096; e.g. 128,4096 times the M > 64 buckets alone, the warp-specialized
candidates among them; 1,16,64 the launch-bound sizes, where the single-launch split-K (reduce="ticket") and the
fused quantizer compete),
NVFP4V_FP8_SWEEP_BUDGET_S (default 200: no new shape starts after it), NVFP4V_FP8_SWEEP_WORKERS (default 12),
NVFP4V_FP8_SWEEP_GLUON (default 1; 0 leaves the Gluon kernel's candidates out), NVFP4V_FP8_SWEEP_PRODUCER (default 1;
0 leaves the producer-warp candidates out: run their GPU bit test under a timeout first, a deadlock would stall the sweep),
NVFP4V_FP8_SWEEP_ONLY (default unset; "wide": only the 128 x 192 producer-warp candidates (_glw with block_n 192),
each shape's committed pick (the table's config at M's bucket, else the heuristic) timed beside them as always, with
torch bf16 and cuBLASLt: one short run for the new tile). A candidate is timed only at shapes whose key takes it
(shape_candidates: the 192-wide tile's ring and running totals must fit the shared memory).
Run: `python -m verify.tests._fp8_sweep` or the bench test verify/tests/test_sm90_fp8_sweep.py.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

# (name, N, K) of every FP8 linear of a DeepSeek-V4-Pro layer (verify/checkpoint/writer.py _V4_PRO; the
# indexer's wq_b [64 heads x 128, q_lora 1536]; the MTP block's e_proj / h_proj [H, H]; wo_a as the dense GEMM
# of its shape)
V4_PRO_FP8 = [("wq_a", 1536, 7168), ("wkv", 512, 7168), ("wq_b", 65536, 1536), ("wo_a", 16384, 4096),
              ("wo_b", 7168, 16384), ("idx_wq_b", 8192, 1536), ("shared_l1", 3072, 7168),
              ("shared_l2", 7168, 3072), ("mtp_e_h_proj", 7168, 7168)]
# V4-Flash (H 4096, q_lora 1024, 64 heads x 512, 8 x 1024, I 2048): by name only (NVFP4V_FP8_SWEEP_SHAPES=flash
# selects all of them)
V4_FLASH_FP8 = [("flash_wq_a", 1024, 4096), ("flash_wkv", 512, 4096), ("flash_wq_b", 32768, 1024),
                ("flash_wo_a", 8192, 4096), ("flash_wo_b", 4096, 8192), ("flash_shared_l1", 2048, 4096),
                ("flash_shared_l2", 4096, 2048), ("flash_mtp_e_h_proj", 4096, 4096)]
L2_BYTES = 60 * 2**20
M_MAX = 4096
FUSED_MAX_M = 16  # the fused quantize + GEMM prologue is timed for the winners at M <= 16


def _one_line(exc: BaseException, width: int) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:width] if text else ''}"


def _env_list(name: str, default: str) -> list[str]:
    return [v for v in os.environ.get(name, default).split(",") if v]


def _operands(m_max: int, n: int, k: int, seed: int, dev: str):
    """(act codes u8 [m_max, K], UE8M0 scales u8, x bf16, weight codes u8 [N, K], weight block scales f32):
    activations quantized by our kernel (FP8_ACT_UE8M0's rule), weight codes from N(0, 1) with power-of-two
    block scales (2^-12 .. 2^-6)."""
    from kernels.sm90 import quantize_fp8_1x128

    g = torch.Generator(device=dev).manual_seed(seed)
    x = (torch.randn(m_max, k, generator=g, device=dev) * 2).to(torch.bfloat16)
    codes, scale = quantize_fp8_1x128.launch(x, scale_rule="ue8m0_ceil")
    w = torch.randn(n, k, generator=g, device=dev).clamp_(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    e = torch.randint(115, 121, (-(-n // 128), -(-k // 128)), generator=g, device=dev, dtype=torch.int32)
    w_dec = (e << 23).view(torch.float32).contiguous()
    return codes, scale, x, w.contiguous(), w_dec


def _ue8m0_to_f32(b_u8: torch.Tensor) -> torch.Tensor:
    return (b_u8.to(torch.int32) << 23).view(torch.float32)


def _gl(bn: int, bt: int, stages: int, split: bool, group_t: int = 8) -> dict:
    """A Gluon kernel config (CompileKey.gluon): token-major bt x bn on bt // 16 warps, a TMA ring of `stages`."""
    from kernels.sm90.gemm_fp8_block_configs import _cfg

    return {**_cfg(bn, bt, bt // 16, stages, split, swap=False, group_t=group_t, tma=True), "gluon": True}


def _glp(bn: int, bt: int, stages: int, group_t: int = 8) -> dict:
    """The persistent Gluon kernel (CompileKey.persistent: one program per SM walking the output tiles, unsplit)."""
    return {**_gl(bn, bt, stages, False, group_t), "persistent": True}


def _gl3(bt: int, stages: int, split: bool, group_t: int = 8) -> dict:
    """The three-accumulator Gluon loop (CompileKey.acc3: every promotion under a later group's wgmma), bt tokens x
    64 weight rows (the only width that fits: three accumulators and the sums in registers)."""
    return {**_gl(64, bt, stages, split, group_t), "acc3": True}


def _glw(bn: int, bt: int, stages: int, split: bool, group_t: int = 8) -> dict:
    """The Gluon kernel with a producer warp (CompileKey.producer: gl.warp_specialize, one warp issues the TMA loads,
    the bt // 16 math warps only wgmma and promote)."""
    return {**_gl(bn, bt, stages, split, group_t), "producer": True}


def _gld(stages: int, split: bool, group_t: int = 8) -> dict:
    """The 128 x 192 producer tile with its two math warpgroups as two partitions (CompileKey.dual: each releases a
    stage by itself, so one promotes while the other's wgmmas run)."""
    return {**_glw(192, 128, stages, split, group_t), "dual": True}


def shape_candidates(m: int, n: int, k: int) -> list[dict]:
    """candidates(m) whose key (N, K) takes, by the key's own rules (CompileKey.from_config): e.g. a 128 x 192
    producer-warp config whose ring and running totals (a chunked plan walked in one program) exceed the shared
    memory is left out at that shape."""
    from kernels.sm90.gemm_fp8_block import CompileKey

    def takes(c: dict) -> bool:
        try:
            CompileKey.from_config(n, k, c, act_scale_ue8m0=True)
        except ValueError:
            return False
        return True

    return [c for c in candidates(m) if takes(c)]


def candidates(m: int) -> list[dict]:
    """The configs timed at M: the committed candidates (kernels.sm90.gemm_fp8_block_configs.candidates, the first
    the heuristic's choice) and, for M >= 128, the Gluon kernel's tiles (TMA ring, asynchronous wgmma with the next
    group's dot in flight during the promotion): 128 x 128 / 128 x 64 / 64 x 128, split-K or not, ring depth 3-6,
    raster group 8 / 16, at M = 4096 the persistent kernel (_glp), the three-accumulator loop at 128 tokens x
    64 weight rows (_gl3) and the producer-warp kernel (_glw). The same bits as every other candidate (the sweep
    refuses one that differs)."""
    from kernels.sm90.gemm_fp8_block import WIDE_BN
    from kernels.sm90.gemm_fp8_block_configs import candidates as table_candidates

    only = os.environ.get("NVFP4V_FP8_SWEEP_ONLY", "")
    if only not in ("", "wide"):
        raise ValueError(f"NVFP4V_FP8_SWEEP_ONLY: expected unset or 'wide', got {only!r}")
    if only == "wide":  # the 128 x 192 tile alone (sweep_shape adds the committed pick)
        return [c for c in _gluon_candidates(m) if c["block_n"] == WIDE_BN] if m >= 128 else []
    out = table_candidates(m)
    if m < 128 or os.environ.get("NVFP4V_FP8_SWEEP_GLUON", "1") == "0":
        return out
    gluon = _gluon_candidates(m)
    if os.environ.get("NVFP4V_FP8_SWEEP_PRODUCER", "1") == "0":
        gluon = [c for c in gluon if not c.get("producer")]
    return out + gluon


def _gluon_candidates(m: int) -> list[dict]:
    if m <= 256:
        return [_gl(128, 128, 4, True), _gl(128, 128, 4, False), _gl(128, 128, 3, True), _gl(64, 128, 4, True),
                      _gl(64, 128, 4, False), _gl(128, 64, 4, True), _gl(128, 64, 4, False), _gl3(128, 4, True),
                      _gl3(128, 4, False), _glw(128, 128, 4, True), _glw(128, 128, 4, False), _glw(64, 128, 4, True),
                      _glw(192, 128, 3, True), _glw(192, 128, 4, True), _glw(192, 128, 3, False), _gld(3, True),
                      _gld(3, False)]
    return [_gl(128, 128, 4, False), _gl(128, 128, 3, False), _gl(128, 128, 5, False),
                  _gl(128, 128, 4, False, group_t=16), _gl(128, 128, 4, True), _gl(64, 128, 4, False),
                  _gl(64, 128, 6, False), _gl(128, 64, 6, False), _glp(128, 128, 4), _glp(128, 128, 3),
                  _glp(128, 128, 4, group_t=16), _glp(64, 128, 4), _glp(128, 64, 4), _gl3(128, 4, False),
                  _gl3(128, 6, False), _gl3(128, 6, False, group_t=16), _glw(128, 128, 4, False),
                  _glw(128, 128, 5, False), _glw(128, 128, 4, False, group_t=16), _glw(64, 128, 6, False),
                  _glw(192, 128, 3, False), _glw(192, 128, 4, False), _glw(192, 128, 5, False),
                  _glw(192, 128, 3, False, group_t=16), _gld(3, False), _gld(4, False), _gld(5, False),
                  _gld(3, False, group_t=16)]


def _jobs(shapes, ms):
    from kernels.sm90.gemm_fp8_block import CompileKey

    for name, n, k in shapes:
        for m in ms:
            seen = set()
            cands = shape_candidates(m, n, k)
            if os.environ.get("NVFP4V_FP8_SWEEP_ONLY"):  # the committed pick and the reference too (sweep_shape's)
                picks = [CompileKey.for_shape(m, n, k, act_scale_ue8m0=True).config(),
                         CompileKey.heuristic(M_MAX, n, k, act_scale_ue8m0=True).config()]
                cands = [c for i, c in enumerate(picks) if c not in picks[:i] + cands] + cands
            for cfg in cands:
                yield name, n, k, m, cfg
                # the fused quantizer on the same tile (pointer loads), timed for the winner at M <= 16:
                # compiled (and run once) here too, so a failing fused kernel never reaches the timing process
                fused = {**cfg, "tma": False, "fused_q": True}
                tag = json.dumps(fused, sort_keys=True)
                if m <= FUSED_MAX_M and tag not in seen:
                    seen.add(tag)
                    yield name, n, k, m, fused


def _compile_worker(jobs: list) -> list:
    """Runs each (name, n, k, m, cfg) once (Triton compiles it into the shared cache); errors returned."""
    from kernels.sm90 import gemm_fp8_block

    errors = []
    ops = {}
    for name, n, k, m, cfg in jobs:
        try:
            if (n, k) not in ops:
                ops.clear()
                if _DEVICE == "cuda":
                    torch.cuda.empty_cache()
                ops[(n, k)] = _operands(M_MAX, n, k, 7, _DEVICE)
            codes, scale, x, w, w_dec = ops[(n, k)]
            key = gemm_fp8_block.CompileKey.from_config(n, k, cfg, act_scale_ue8m0=True)
            if cfg.get("fused_q"):
                gemm_fp8_block.launch_fused(x[:m].contiguous(), w, w_dec, scale_rule="ue8m0_ceil", key=key)
            else:
                gemm_fp8_block.launch(codes[:m], scale[:m], w, w_dec, key=key)
            _sync()
        except Exception as exc:  # noqa: BLE001 - reported by the timing process
            errors.append((name, n, k, m, cfg, _one_line(exc, 160)))
    return errors


def precompile(shapes, ms, workers: int) -> dict:
    """Compile every candidate in `workers` processes; {(n, k, m, config json): error} of the failures."""
    import multiprocessing as mp

    jobs = list(_jobs(shapes, ms))
    buckets: list[list] = [[] for _ in range(max(1, workers))]
    for i, j in enumerate(sorted(jobs, key=lambda j: (j[1], j[2], j[3], json.dumps(j[4], sort_keys=True)))):
        buckets[i % len(buckets)].append(j)
    # keep one shape's jobs together inside a bucket (fewer operand rebuilds)
    buckets = [sorted(b, key=lambda j: (j[1], j[2])) for b in buckets if b]
    t0 = time.time()
    with mp.get_context("spawn").Pool(len(buckets)) as pool:
        results = pool.map(_compile_worker, buckets)
    errors = {(e[1], e[2], e[3], json.dumps(e[4], sort_keys=True)): e[5] for r in results for e in r}
    print(f"precompiled {len(jobs)} candidate launches in {time.time() - t0:.0f} s on {len(buckets)} workers "
          f"({len(errors)} failed)", flush=True)
    return errors


_DEVICE = "cuda"  # the CPU test of the sweep's logic sets "cpu" (Triton interpreter, wall-clock timing)


def _time_graph(fns, reps: int = 5) -> float:
    if _DEVICE != "cuda":
        t0 = time.perf_counter()
        fns[0]()
        return time.perf_counter() - t0
    from verify.tests._cuda_timing import time_graph

    return time_graph(fns, reps)


def _sync() -> None:
    if _DEVICE == "cuda":
        torch.cuda.synchronize()


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))


def sweep_shape(name: str, n: int, k: int, ms: list[int], compile_errors: dict, rows: list, best: list,
                winners: list, m_max: int = M_MAX) -> None:
    from kernels.sm90 import gemm_fp8_block, quantize_fp8_1x128

    dev = _DEVICE
    codes, scale, x, w, w_dec = _operands(m_max, n, k, 7, dev)
    ref_key = gemm_fp8_block.CompileKey.heuristic(m_max, n, k, act_scale_ue8m0=True)
    y_ref = gemm_fp8_block.launch(codes, scale, w, w_dec, key=ref_key)
    copies = max(1, min(8, -(-2 * L2_BYTES // (n * k))))
    ws = [w] + [w.clone() for _ in range(copies - 1)]
    bcopies = max(1, min(4, -(-2 * L2_BYTES // (2 * n * k))))
    wbs = [torch.randn(n, k, device=dev).to(torch.bfloat16) for _ in range(bcopies)]
    w_fp8 = w.view(torch.float8_e4m3fn)
    for m in ms:
        a, sa, xm = codes[:m], scale[:m], x[:m].contiguous()
        calls = max(copies, 10 if m <= 128 else 3)
        bf16 = _time_graph([(lambda wb=wbs[i % bcopies]: xm @ wb.t()) for i in range(max(calls, bcopies))])
        blk, blk_err = None, None
        try:
            sa_f32 = _ue8m0_to_f32(sa).t().contiguous().t()
            def fn():
                return torch._scaled_mm(a.view(torch.float8_e4m3fn), w_fp8.t(), scale_a=sa_f32, scale_b=w_dec.t(),
                                        out_dtype=torch.bfloat16)
            fn()
            _sync()
            blk = _time_graph([fn] * calls)
        except Exception as exc:  # noqa: BLE001 - cuBLASLt has no M = 1 path: reported
            blk_err = _one_line(exc, 60)
            _sync()
        default_key = gemm_fp8_block.CompileKey.for_shape(m, n, k, act_scale_ue8m0=True)
        cands = shape_candidates(m, n, k)
        if default_key.config() not in cands:
            cands = [default_key.config()] + cands
        results = []
        for cfg in cands:
            tag = json.dumps(cfg, sort_keys=True)
            row = {"name": name, "N": n, "K": k, "M": m, "config": cfg, "bf16_us": bf16 * 1e6,
                   "blockwise_us": None if blk is None else blk * 1e6, "blockwise_error": blk_err,
                   "is_default": cfg == default_key.config()}
            if (n, k, m, tag) in compile_errors:
                row["error"] = compile_errors[(n, k, m, tag)]
                rows.append(row)
                continue
            try:
                key = gemm_fp8_block.CompileKey.from_config(n, k, cfg, act_scale_ue8m0=True)
                y = gemm_fp8_block.launch(a, sa, w, w_dec, key=key)
                row["bits_equal"] = _bits_equal(y, y_ref[:m])
                res = gemm_fp8_block.compiled_resources(key)
                row["regs"], row["spills"] = res if res is not None else (None, None)
                t = _time_graph([(lambda wi=ws[i % copies]: gemm_fp8_block.launch(a, sa, wi, w_dec, key=key,
                                                                                   check=False))
                                 for i in range(calls)])
                row["us"] = t * 1e6
                row["x_bf16"] = bf16 / t
                row["x_blockwise"] = None if blk is None else blk / t
            except Exception as exc:  # noqa: BLE001 - a config that does not run is reported
                row["error"] = _one_line(exc, 160)
                _sync()
            rows.append(row)
            results.append(row)
        # winners: bit-equal to the reference and no register spills (the sm_90a compile test refuses a
        # routed key that spills); spilling configs are timed and reported only
        ok = [r for r in results if r.get("bits_equal") and "us" in r and not r.get("spills")]
        differ = [r for r in results if r.get("bits_equal") is False]
        win = min(ok, key=lambda r: r["us"]) if ok else None
        dflt = next((r for r in results if r["is_default"] and "us" in r), None)
        summary = {"name": name, "N": n, "K": k, "M": m, "bf16_us": bf16 * 1e6,
                   "blockwise_us": None if blk is None else blk * 1e6, "blockwise_error": blk_err,
                   "default_us": None if dflt is None else dflt["us"],
                   "best_us": None if win is None else win["us"], "best_config": None if win is None else win["config"],
                   "candidates": len(results), "bits_differ": [r["config"] for r in differ],
                   "spilling": [r["config"] for r in results if r.get("spills")],
                   "errors": [(r["config"], r["error"]) for r in results if "error" in r]}
        if any(r["config"].get("ws") for r in results):  # the warp-specialized loop against the rest, same run
            for tag, pick in (("ws", True), ("no_ws", False)):
                mine = [r for r in ok if bool(r["config"].get("ws")) is pick]
                summary[f"best_{tag}_us"] = min(r["us"] for r in mine) if mine else None
        if any(r["config"].get("gluon") for r in results):  # the Gluon kernel against the Triton one, same run
            for tag, pick in (("gluon", True), ("triton", False)):
                mine = [r for r in ok if bool(r["config"].get("gluon")) is pick]
                summary[f"best_{tag}_us"] = min(r["us"] for r in mine) if mine else None
        if any(r["config"].get("acc3") for r in results):  # the three-accumulator loop against the two-accumulator one
            for tag, pick in (("acc3", True), ("acc2", False)):
                mine = [r for r in ok if r["config"].get("gluon") and bool(r["config"].get("acc3")) is pick]
                summary[f"best_gluon_{tag}_us"] = min(r["us"] for r in mine) if mine else None
        if any(r["config"].get("producer") for r in results):  # the producer warp against the math warps' own loads
            for tag, pick in (("producer", True), ("no_producer", False)):
                mine = [r for r in ok if r["config"].get("gluon") and bool(r["config"].get("producer")) is pick]
                summary[f"best_gluon_{tag}_us"] = min(r["us"] for r in mine) if mine else None
        if any(r["config"]["block_n"] == gemm_fp8_block.WIDE_BN for r in results):  # 128 x 192 against the rest
            for tag, pick in (("wide", True), ("narrow", False)):
                mine = [r for r in ok if (r["config"]["block_n"] == gemm_fp8_block.WIDE_BN) is pick]
                summary[f"best_{tag}_us"] = min(r["us"] for r in mine) if mine else None
        if any(r["config"].get("dual") for r in results):  # the 192-wide tile's warpgroups apart against together
            for tag, pick in (("dual", True), ("wide_one_partition", False)):
                mine = [r for r in ok if r["config"]["block_n"] == gemm_fp8_block.WIDE_BN
                        and bool(r["config"].get("dual")) is pick]
                summary[f"best_{tag}_us"] = min(r["us"] for r in mine) if mine else None
        if any(r["config"].get("reduce") == "ticket" for r in results):  # one launch against split + reduce launch
            for tag, pick in (("ticket", True), ("reduce_kernel", False)):
                mine = [r for r in ok if r["config"]["split"] and (r["config"].get("reduce") == "ticket") is pick]
                summary[f"best_split_{tag}_us"] = min(r["us"] for r in mine) if mine else None
        if win is not None:
            # the serving cost: activation quantization + the winner's GEMM, one graph
            key = gemm_fp8_block.CompileKey.from_config(n, k, win["config"], act_scale_ue8m0=True)
            xq = x[:m].contiguous()
            try:
                summary["best_with_quant_us"] = 1e6 * _time_graph(
                    [(lambda wi=ws[i % copies]: gemm_fp8_block.launch(
                        *quantize_fp8_1x128.launch(xq, scale_rule="ue8m0_ceil"), wi, w_dec, key=key, check=False))
                     for i in range(calls)])
            except Exception as exc:  # noqa: BLE001
                summary["best_with_quant_error"] = _one_line(exc, 100)
            win_cfg = dict(win["config"])
            if m <= FUSED_MAX_M and "best_with_quant_us" in summary:
                # the quantizer fused into a tile's prologue (pointer loads: tma off), tried on the winner's tile and
                # on the fastest single-launch split-K tile (reduce="ticket": then quantize + GEMM + reduce is one
                # launch); bit-equal bytes, scales and output required; the fastest is committed (fused_q) when it
                # beats quantize + the winner's GEMM (the serving cost; launch() then runs that tile unfused)
                tickets = [r for r in ok if r["config"].get("reduce") == "ticket" and r["config"]["split"]]
                tiles = [("winner", win_cfg)]
                if tickets:
                    tk = min(tickets, key=lambda r: r["us"])["config"]
                    if {**tk, "tma": False} != {**win_cfg, "tma": False}:
                        tiles.append(("ticket", dict(tk)))
                fused = []
                for src, tile in tiles:
                    res = _time_fused(tile, n, k, m, xq, w, ws, w_dec, y_ref, codes, scale, copies, calls,
                                      compile_errors)
                    summary["fused_ticket" if src == "ticket" else "fused"] = res
                    if res.get("bits_equal") and not res.get("spills") and "us" in res:
                        fused.append((res["us"], src, tile))
                first = summary["fused"]  # the winner's tile: the fields the report always had
                summary.update({f"fused_{f}": first[f] for f in ("us", "regs", "spills", "error") if f in first})
                equal = [summary[t]["bits_equal"] for t in ("fused", "fused_ticket")
                         if "bits_equal" in summary.get(t, {})]
                if equal:  # every fused tile tried (the bench test refuses a False)
                    summary["fused_bits_equal"] = all(equal)
                if fused and min(f[0] for f in fused) < summary["best_with_quant_us"]:
                    us, src, tile = min(fused, key=lambda f: f[0])
                    summary["fused_committed_from"] = src
                    summary["fused_committed_us"] = us
                    win_cfg = {**tile, "tma": False, "fused_q": True}
                    if win_cfg != {**win["config"], "fused_q": True}:
                        summary["fused_note"] = (f"the fused tile ({src}) differs from the GEMM-only winner"
                                                 + (" (tma off)" if src == "winner" else ""))
            summary["committed_config"] = win_cfg
            winners.append({"N": n, "K": k, "M": m, "config": win_cfg, "us": win["us"], "name": name})
        best.append(summary)
        _print_summary(summary)
    del ws, wbs, codes, scale, x, w, w_dec, y_ref
    torch.cuda.empty_cache()


def _time_fused(tile: dict, n, k, m, xq, w, ws, w_dec, y_ref, codes, scale, copies, calls, compile_errors) -> dict:
    """launch_fused on `tile` (tma off): {"bits_equal", "us", "regs", "spills"} or {"error"}."""
    from kernels.sm90 import gemm_fp8_block

    out: dict = {}
    fkey = gemm_fp8_block.CompileKey.from_config(n, k, {**tile, "tma": False}, act_scale_ue8m0=True)
    ftag = json.dumps({**tile, "tma": False, "fused_q": True}, sort_keys=True)
    try:
        if (n, k, m, ftag) in compile_errors:
            raise RuntimeError(f"precompile: {compile_errors[(n, k, m, ftag)]}")
        yf, cf, sf = gemm_fp8_block.launch_fused(xq, w, w_dec, scale_rule="ue8m0_ceil", key=fkey)
        out["bits_equal"] = _bits_equal(yf, y_ref[:m]) and torch.equal(cf, codes[:m]) and torch.equal(sf, scale[:m])
        out["us"] = 1e6 * _time_graph(
            [(lambda wi=ws[i % copies]: gemm_fp8_block.launch_fused(xq, wi, w_dec, scale_rule="ue8m0_ceil", key=fkey))
             for i in range(calls)])
        res = gemm_fp8_block.compiled_resources(gemm_fp8_block.fused_key(fkey, scale_rule="ue8m0_ceil"))
        out["regs"], out["spills"] = res if res is not None else (None, None)
    except Exception as exc:  # noqa: BLE001 - reported in the summary
        out["error"] = _one_line(exc, 120)
        _sync()
    return out


def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def _print_summary(s: dict) -> None:
    best, bf16, blk = s["best_us"], s["bf16_us"], s["blockwise_us"]
    cfg = s["best_config"]
    c = ("-" if cfg is None else f"{'swap' if cfg['swap'] else 'tok'} BN{cfg['block_n']} BT{cfg['block_t']} "
         f"w{cfg['num_warps']} s{cfg['num_stages']} {'split' if cfg['split'] else 'pass'} g{cfg['group_t']}"
         f"{' pipe' if cfg['pipe'] else ''}{' tma' if cfg['tma'] else ''}{' ws' if cfg.get('ws') else ''}"
         f"{' ticket' if cfg.get('reduce') == 'ticket' else ''}{' gluon' if cfg.get('gluon') else ''}"
         f"{' persistent' if cfg.get('persistent') else ''}{' acc3' if cfg.get('acc3') else ''}"
         f"{' producer' if cfg.get('producer') else ''}{' dual' if cfg.get('dual') else ''}")
    print(f"{s['name']:13} {s['M']:5} {s['N']:6} {s['K']:6} | best {_fmt(best, '9.2f')} us "
          f"(default {_fmt(s['default_us'], '9.2f')}) | bf16 {bf16:9.2f} x{_fmt(None if best is None else bf16 / best)}"
          f" | cuBLASLt blockwise {_fmt(blk, '9.2f', 'n/a')} x{_fmt(None if best is None or blk is None else blk / best)}"
          f" | +quant {_fmt(s.get('best_with_quant_us'), '9.2f')}"
          + (f" fused {_fmt(s.get('fused_us'), '9.2f')}{'' if s.get('fused_bits_equal', True) else ' BITS DIFFER'}"
             if "fused_us" in s else "")
          + (f" fused ticket tile {_fmt(s['fused_ticket'].get('us'), '.2f')}"
             f"{'' if s['fused_ticket'].get('bits_equal', True) else ' BITS DIFFER'}" if "fused_ticket" in s else "")
          + f" | {c}{' +fused_q' if (s.get('committed_config') or {}).get('fused_q') else ''}"
          + (f" | ws best {_fmt(s['best_ws_us'], '.2f')} us vs {_fmt(s['best_no_ws_us'], '.2f')} without"
             if "best_ws_us" in s else "")
          + (f" | gluon best {_fmt(s['best_gluon_us'], '.2f')} us vs triton {_fmt(s['best_triton_us'], '.2f')}"
             if "best_gluon_us" in s else "")
          + (f" | gluon acc3 {_fmt(s['best_gluon_acc3_us'], '.2f')} us vs acc2 {_fmt(s['best_gluon_acc2_us'], '.2f')}"
             if "best_gluon_acc3_us" in s else "")
          + (f" | gluon producer {_fmt(s['best_gluon_producer_us'], '.2f')} us vs "
             f"{_fmt(s['best_gluon_no_producer_us'], '.2f')} without" if "best_gluon_producer_us" in s else "")
          + (f" | wide 192 {_fmt(s['best_wide_us'], '.2f')} us vs {_fmt(s['best_narrow_us'], '.2f')} narrower"
             if "best_wide_us" in s else "")
          + (f" | dual {_fmt(s['best_dual_us'], '.2f')} us vs {_fmt(s['best_wide_one_partition_us'], '.2f')} one"
             f" partition" if "best_dual_us" in s else "")
          + (f" | split best: ticket {_fmt(s['best_split_ticket_us'], '.2f')} us, reduce launch "
             f"{_fmt(s['best_split_reduce_kernel_us'], '.2f')} us" if "best_split_ticket_us" in s else "")
          + (f" | BITS DIFFER: {len(s['bits_differ'])} configs {s['bits_differ']}" if s["bits_differ"] else "")
          + (f" | {len(s['spilling'])} spilling" if s["spilling"] else "")
          + (f" | {len(s['errors'])} failed" if s["errors"] else ""), flush=True)


def run_sweep(out_dir: str | None) -> dict:
    from verify.tests._cuda_timing import copy_bandwidth

    names = _env_list("NVFP4V_FP8_SWEEP_SHAPES", ",".join(s for s, _, _ in V4_PRO_FP8))
    if names == ["flash"]:
        names = [s for s, _, _ in V4_FLASH_FP8]
    everything = V4_PRO_FP8 + V4_FLASH_FP8
    unknown = sorted(set(names) - {s for s, _, _ in everything})
    if unknown:
        raise ValueError(f"NVFP4V_FP8_SWEEP_SHAPES: unknown {unknown}")
    shapes = [s for s in everything if s[0] in names]
    ms = [int(v) for v in _env_list("NVFP4V_FP8_SWEEP_M", "1,16,64,128,4096")]
    if any(not 1 <= m <= M_MAX for m in ms):
        raise ValueError(f"NVFP4V_FP8_SWEEP_M: every M must be in 1..{M_MAX}, got {ms}")
    budget = float(os.environ.get("NVFP4V_FP8_SWEEP_BUDGET_S", "200"))
    workers = int(os.environ.get("NVFP4V_FP8_SWEEP_WORKERS", "12"))
    t0 = time.time()
    bw = copy_bandwidth(warmup=20)[0]
    dev_name = torch.cuda.get_device_name()
    report = {"device": dev_name, "copy_GBps": bw / 1e9, "torch": torch.__version__, "M": ms, "rows": [], "best": [],
              "winners": [], "skipped_shapes": []}
    print(f"\n[{dev_name}] copy bandwidth (read+write) {bw / 1e9:.0f} GB/s; FP8 GEMM config sweep, M = {ms}", flush=True)
    errors: dict = {}
    if workers > 0:
        try:
            errors = precompile(shapes, ms, workers)
        except Exception as exc:  # noqa: BLE001 - the timing loop then compiles each config itself
            print(f"precompile failed ({_one_line(exc, 200)}): compiling in this process", flush=True)
    print(f"{'linear':13} {'M':>5} {'N':>6} {'K':>6} | ours best (default = committed table / heuristic) | "
          f"torch bf16 | cuBLASLt blockwise FP8 | quantize + GEMM | winning config", flush=True)
    for name, n, k in shapes:
        if time.time() - t0 > budget:
            report["skipped_shapes"].append(name)
            print(f"{name}: skipped (budget {budget:.0f} s spent)", flush=True)
            continue
        sweep_shape(name, n, k, ms, errors, report["rows"], report["best"], report["winners"])
        report["seconds"] = time.time() - t0
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            fname = "sm90_fp8_sweep_flash.json" if all(s[0].startswith("flash_") for s in shapes) else "sm90_fp8_sweep.json"
            with open(os.path.join(out_dir, fname), "w") as f:
                json.dump(report, f, indent=1)
    _print_targets(report)
    return report


def _print_targets(report: dict) -> None:
    """The issue's targets on the winners: >= 1.8x bf16 at M <= 64, >= 1.0x cuBLASLt blockwise at M >= 128."""
    lines = []
    for s in report["best"]:
        if s["best_us"] is None:
            lines.append(f"{s['name']} M={s['M']}: no bit-equal candidate ran")
            continue
        if s["M"] <= 64:
            r = s["bf16_us"] / s["best_us"]
            lines.append(f"{s['name']} M={s['M']}: x bf16 {r:.2f} {'MET' if r >= 1.8 else 'missed'} (>= 1.8)")
        else:
            if s["blockwise_us"] is None:
                lines.append(f"{s['name']} M={s['M']}: cuBLASLt blockwise n/a ({s['blockwise_error']})")
                continue
            r = s["blockwise_us"] / s["best_us"]
            lines.append(f"{s['name']} M={s['M']}: x cuBLASLt blockwise {r:.2f} {'MET' if r >= 1.0 else 'missed'} "
                         f"(>= 1.0)")
    print("targets (issue 23 item 8) with the winners:\n  " + "\n  ".join(lines), flush=True)


if __name__ == "__main__":
    rep = run_sweep(os.environ.get("NVFP4V_REPORT_DIR") or (sys.argv[1] if len(sys.argv) > 1 else None))
    sys.exit(0 if rep["winners"] else 1)
