"""A determinism check for kernel launches that two identical back-to-back launches cannot fake.

assert_deterministic(launch, make_inputs, other_work=..., label=...) launches once and keeps the
output's bytes, then launches again in conditions a nondeterministic kernel would show:
- fresh buffers over garbage: the caching allocator's free memory is filled with 0xFF bytes (NaN in
  bf16 and float32) first, so an output element or padding row the kernel does not write, or an
  input it reads past its end, comes back different;
- after other work: `other_work` (other shapes, other kernels) runs in between, so shared memory,
  L2, workspaces and any state a launch leaves behind differ from the first launch's;
- on another CUDA stream (cuda only), ordered after the inputs are written.
Every trial's output must equal the first one bit for bit. The first output must have non-zero
bytes and no NaN/Inf, so a kernel that writes nothing (or garbage) cannot pass by repeating it.
verify/tests/test_determinism_check.py runs this on the CPU with planted nondeterministic "kernels".
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from verify.assertions import assert_bits_equal

__all__ = ["assert_deterministic", "poison_free_memory"]

_POISON_SIZES = tuple(2**k for k in range(9, 27))  # 512 B .. 64 MiB: the small and the large pool's blocks


def poison_free_memory(device: torch.device | str) -> None:
    """Fill blocks of every size class with 0xFF bytes and free them: on CUDA the caching allocator hands
    those blocks out next, so new torch.empty buffers hold NaN bytes instead of zeros or old results."""
    blocks = [torch.full((n,), 0xFF, dtype=torch.uint8, device=device) for n in _POISON_SIZES for _ in range(2)]
    del blocks


def _outputs(out: Tensor | tuple | list) -> list[Tensor]:
    """The output tensor(s) of a launch, copied to the CPU (so a later launch cannot overwrite them)."""
    tensors = list(out) if isinstance(out, (tuple, list)) else [out]
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError(f"launch must return a tensor or a tuple of tensors, got {type(out).__name__}")
    return [t.detach().to("cpu", copy=True) for t in tensors]


def assert_deterministic(launch: Callable[..., Tensor | tuple], make_inputs: Callable[[], tuple], *,
                         other_work: Callable[[], object], label: str, device: torch.device | str) -> None:
    """launch(*make_inputs()) gives the same bits in every trial of the module docstring. make_inputs
    builds new input buffers on each call (from the same host data)."""
    __tracebackhide__ = True
    device = torch.device(device)
    first = _outputs(launch(*make_inputs()))
    for i, t in enumerate(first):
        if t.numel() == 0 or not bool(t.reshape(-1).view(torch.uint8).any()):
            raise AssertionError(f"{label}: output {i} {tuple(t.shape)} is empty or all zero bytes: a determinism "
                                 "check of nothing")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AssertionError(f"{label}: output {i} holds {int((~torch.isfinite(t)).sum())} NaN/Inf values: "
                                 "a repeated garbage output is no determinism")

    def over_garbage():
        poison_free_memory(device)
        return launch(*make_inputs())

    def after_other_work():
        other_work()
        return launch(*make_inputs())

    trials = {"fresh buffers over garbage": over_garbage, "after other work": after_other_work}
    if device.type == "cuda":
        def on_another_stream():
            inputs = make_inputs()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                out = launch(*inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            return out

        trials["on another stream"] = on_another_stream
    for name, trial in trials.items():
        again = _outputs(trial())
        if len(again) != len(first):
            raise AssertionError(f"{label}: {name}: {len(again)} outputs, the first launch gave {len(first)}")
        for i, (got, want) in enumerate(zip(again, first)):
            assert_bits_equal(got, want, label=f"{label}: output {i}, {name}, vs the first launch")
