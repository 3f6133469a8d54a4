"""Benchmark timing shared by the sm90 bench modules: CUDA-graph replay timing and the device copy
bandwidth that the weight-bandwidth ratios are measured against (in the same run)."""

from __future__ import annotations

import statistics

import torch


def time_graph(fn_list, reps: int = 10) -> float:
    """Seconds per call of the callables in fn_list, captured into one CUDA graph (median over `reps`
    replays). The first two are called once outside capture, so compilation is not timed."""
    for f in fn_list[:2]:
        f()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the warm-up's cached blocks back to the device before the graph's pool takes its own
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_list:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / len(fn_list))
    return statistics.median(times)


def copy_bandwidth(warmup: int = 50) -> tuple[float, float]:
    """(bytes per second read + written, seconds per copy) of a 1 GiB uint8 device copy_."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(warmup):  # clocks up before the measurement
        dst.copy_(src)
    t = time_graph([lambda: dst.copy_(src)] * 5)
    bw = 2 * src.numel() / t
    return bw, t
