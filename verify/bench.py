"""Timing helpers for `bench` tests: CUDA events on GPU, perf_counter on CPU; rich tables, JSON."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class BenchRow:
    name: str
    device: str
    shape: str
    seconds: float
    elements_per_s: float
    gbytes_per_s: float
    ratio_to_baseline: float | None = None
    baseline: str | None = None


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call of fn() (CUDA events on GPU, so no host time is counted there)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def print_table(title: str, rows: list[BenchRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("name", "device", "shape", "time", "elem/s", "GB/s", "ratio", "baseline"):
        table.add_column(col, justify="right" if col not in ("name", "baseline", "shape") else "left")
    for r in rows:
        table.add_row(r.name, r.device, r.shape, f"{r.seconds * 1e3:.3f} ms", f"{r.elements_per_s:.3e}",
                      f"{r.gbytes_per_s:.1f}", "" if r.ratio_to_baseline is None else f"{r.ratio_to_baseline:.3f}",
                      r.baseline or "")
    Console(width=160).print(table)


def write_json(path: Path, rows: list[BenchRow], **env: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows]}, indent=2, sort_keys=True))
