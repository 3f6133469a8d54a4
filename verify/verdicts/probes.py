"""The two CUDA probes of a stage's op (the sync and graph checks call them through the JudgeContext,
which times them): each runs `forward()`, a closure over input buffers that the graph probe's mutations
rewrite in place, and raises AssertionError (its message, without the "<stage> <check>:" prefix that the
verdict adds) when the op fails the probe."""

from __future__ import annotations

import traceback
from typing import Callable

import torch
from torch import Tensor

__all__ = ["as_tensors", "bits", "sync_probe", "graph_probe", "Mutation"]

Mutation = tuple[str, Callable[[], object]]  # (what it changes, in words; the in-place write)


def as_tensors(out: object) -> tuple:
    """An op's output as a tuple of its outputs (an L1 GEMM returns (gate, up); most ops one tensor)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def bits(out: object) -> Tensor:
    """Every output tensor of an op (tensor, tuple, boundary dataclass) as one flat uint8 tensor."""
    if isinstance(out, Tensor):
        return out.contiguous().reshape(-1).view(torch.uint8)
    if isinstance(out, (tuple, list)):
        return torch.cat([bits(o) for o in out])
    if hasattr(out, "__dataclass_fields__"):  # its tensors; plain Python fields (top_k, ...) are not device output
        return torch.cat([bits(v) for v in (getattr(out, f) for f in out.__dataclass_fields__)
                          if not isinstance(v, (int, float, str, type(None)))])
    raise TypeError(f"cannot compare op output of type {type(out).__name__}")


def sync_probe(forward: Callable[[], object]) -> str:
    """forward() under torch.cuda.set_sync_debug_mode("error") (after one call outside, to compile)."""
    forward()  # compile and cache outside the probe
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        forward()
    except RuntimeError as exc:
        raise AssertionError(f"the forward path synchronizes with the host: {exc}") from None
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return "no host synchronization"


def graph_probe(forward: Callable[[], object], mutations: list[Mutation], metrics: dict) -> str:
    """Warm up, capture forward() once (at capacity), then for each mutation: write the new inputs in
    place, replay, and require the graph's outputs bit-equal to an eager call on the same inputs. A
    capture or replay error fails the probe (it is a verdict, not a crash)."""
    done: list[str] = []
    failure = None
    stream = torch.cuda.current_stream()
    try:
        forward()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        rng = torch.cuda.default_generators[torch.cuda.current_device()]
        rng_before = rng.clone_state()
        try:
            with torch.cuda.graph(graph):
                y_graph = forward()
        except BaseException:
            # a capture that never ended leaves the default CUDA generator registered as capturing: every
            # later torch.randn(device="cuda") outside capture raises ("Offset increment outside graph
            # capture encountered unexpectedly"); its state from before the capture is put back
            rng.graphsafe_set_state(rng_before)
            raise
        finally:
            # torch.cuda.graph's __exit__ leaves its capture stream current when capture_end raises (a
            # capture the forward invalidated): every later "eager" call would then run on the shared
            # capture stream, and a stream-escaping bug in a later probe would go unseen
            torch.cuda.set_stream(stream)
        for name, mutate in mutations:
            mutate()
            graph.replay()
            torch.cuda.synchronize()
            y_eager = forward()
            g_bits, e_bits = bits(y_graph), bits(y_eager)
            diff = int((g_bits != e_bits).sum()) if g_bits.shape == e_bits.shape else -1
            if diff:
                metrics.update(differing_bytes=diff, mutation=name)
                failure = (f"after {name}, replay differs from eager in {diff} of {e_bits.numel()} output bytes "
                           f"(replays before it matched: {done or 'none'})")
                eager_diff = 0
                for _ in range(3):  # the same inputs again: is the op itself run-to-run nondeterministic?
                    again = bits(forward())
                    eager_diff = int((again != e_bits).sum()) if again.shape == e_bits.shape else -1
                    if eager_diff:
                        break
                if eager_diff:
                    metrics.update(eager_twice_differing_bytes=eager_diff)
                    failure = (f"nondeterministic: eager twice differs in {eager_diff} of {e_bits.numel()} output "
                               f"bytes on the same inputs (after {name}), so no replay can be bit-equal to eager; "
                               f"the replay differed in {diff}")
                break
            done.append(name)
    except Exception as exc:  # noqa: BLE001 - a capture failure is a verdict, not a crash
        metrics["traceback"] = traceback.format_exc(limit=3)
        raise AssertionError(f"capture/replay failed after {done or 'capture'}: {type(exc).__name__}: {exc}") \
            from None
    if failure:
        raise AssertionError(failure)
    metrics["mutations"] = done
    return f"captured once; replays bit-equal to eager after {', '.join(done)}"
