"""Split-K ticket counters shared by the sm90 kernels whose split programs reduce in-kernel (the NVFP4 wgmma
path of gemm_nvfp4 and the FP8 block GEMM's reduce="ticket"): the last program of each output tile, found by
an acq_rel ticket on its counter, adds the partials in split order and resets the counter to zero.

Made by a kernel's first such launch on a device, outside CUDA-graph capture; on a GPU that launch waits once
for the zero fill (one host synchronisation, like the first launch's compile), so no stream can use a counter
before it is zero. Launches outside capture take 64-counter-aligned slices of `eager` round robin; a launch
being captured takes a slice of `captured` that no other launch ever gets (a graph keeps its slice for its
lifetime), and running out of those is an error, never reuse. So two launches share counters only if both run
eagerly with more than `eager` counters' worth of eager launches issued between them and still overlap in time.
Each kernel module keeps its own registry (device -> Tickets), so its tests can inspect and replace it."""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_made = threading.Lock()


class Tickets:
    """The counters of one device for one kernel module (int32, zero between launches). The sizes are
    arguments for the tests (a small eager buffer makes consecutive launches reuse the same counters)."""

    def __init__(self, device: torch.device, eager: int = 1 << 20, captured: int = 1 << 22, *,
                 owner: str = "sm90"):
        self.owner = owner
        self.eager = torch.zeros(eager, dtype=torch.int32, device=device)
        self.captured = torch.zeros(captured, dtype=torch.int32, device=device)
        if self.eager.is_cuda:
            torch.cuda.current_stream(device).synchronize()
        self.eager_next = 0
        self.captured_next = 0
        self.lock = threading.Lock()

    def take(self, tiles: int, capturing: bool) -> Tensor:
        span = -(-tiles // 64) * 64
        with self.lock:
            if capturing:
                if self.captured_next + span > self.captured.numel():
                    raise RuntimeError(
                        f"{self.owner}: captured split-K launches on {self.captured.device} need more than "
                        f"{self.captured.numel()} tickets (graph slices are never reused); capture fewer GEMMs or "
                        "make Tickets with a larger `captured`")
                start = self.captured_next
                self.captured_next += span
                return self.captured[start:start + tiles]
            if span > self.eager.numel():
                raise ValueError(f"{self.owner}: {tiles} output tiles exceed the {self.eager.numel()} split-K tickets")
            if self.eager_next + span > self.eager.numel():
                self.eager_next = 0
            start = self.eager_next
            self.eager_next += span
            return self.eager[start:start + tiles]

    def nonzero(self) -> int:
        """Counters not back at zero (tests; synchronises on a GPU)."""
        return int(self.eager.count_nonzero()) + int(self.captured.count_nonzero())


def tile_tickets(registry: dict, owner: str, device: torch.device, tiles: int) -> Tensor:
    """`tiles` zeroed counters for one launch of `owner` on `device` from its registry (made on first use)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    entry = registry.get(device)
    if entry is None:
        if capturing:
            raise RuntimeError(
                f"{owner}: the split-K ticket counters of {device} are made by the first split-K launch; make one "
                "launch outside CUDA-graph capture first (the kernels are compiled there too)")
        with _made:  # two threads' first launches make one buffer
            entry = registry.get(device) or registry.setdefault(device, Tickets(device, owner=owner))
    return entry.take(tiles, capturing)
