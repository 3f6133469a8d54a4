"""The determinism check of the kernel tests (verify/tests/_determinism.py) on the CPU: it passes a
deterministic "kernel" and fails planted nondeterministic ones that two identical back-to-back
launches (the check it replaces) pass."""

from __future__ import annotations

import pytest
import torch

from verify.assertions import assert_bits_equal
from verify.tests._determinism import assert_deterministic

A = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
W = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def _inputs():
    return A.clone(), W.clone()


class StaleWorkspace:
    """Keeps a workspace between launches; it zeroes it for a launch of the same shape, but one of a new
    shape starts from the old workspace's values (the bug): the result depends on what ran before."""

    def __init__(self):
        self.workspace = None

    def __call__(self, a, w):
        y = a.float() @ w.float()
        if self.workspace is not None and self.workspace.shape == y.shape:
            self.workspace.zero_()
        else:
            stale = self.workspace
            self.workspace = torch.zeros_like(y)
            if stale is not None:
                n = min(stale.numel(), y.numel())
                self.workspace.view(-1)[:n] = stale.reshape(-1)[:n]
        self.workspace += y
        return self.workspace.to(torch.bfloat16)


class AccumulatesIntoItsOutput:
    """Returns one persistent output buffer and adds into it instead of overwriting it (a missing zero
    fill): every launch returns the same tensor object, so comparing two launches compares it with itself."""

    def __init__(self):
        self.out = None

    def __call__(self, a, w):
        y = (a.float() @ w.float()).to(torch.bfloat16)
        if self.out is None:
            self.out = torch.zeros_like(y)
        self.out += y
        return self.out


def _other_work(kernel):
    return lambda: kernel(torch.ones(3, 32, dtype=torch.bfloat16), torch.ones(32, 5, dtype=torch.bfloat16))


def test_a_deterministic_kernel_passes():
    def matmul(a, w):
        return (a.float() @ w.float()).to(torch.bfloat16), a.sum(0)

    assert_deterministic(matmul, _inputs, other_work=_other_work(matmul), label="matmul", device="cpu")


@pytest.mark.parametrize("kernel,trial", [(StaleWorkspace, "after other work"),
                                          (AccumulatesIntoItsOutput, "fresh buffers over garbage")],
                         ids=["stale-workspace", "accumulates-into-its-output"])
def test_a_planted_nondeterministic_kernel_fails(kernel, trial):
    k = kernel()
    with pytest.raises(AssertionError, match=f"planted: output 0, {trial}, vs the first launch"):
        assert_deterministic(k, _inputs, other_work=_other_work(k), label="planted", device="cpu")


@pytest.mark.parametrize("kernel", [StaleWorkspace, AccumulatesIntoItsOutput],
                         ids=["stale-workspace", "accumulates-into-its-output"])
def test_the_replaced_check_passed_both_planted_kernels(kernel):
    """Why the check was replaced: two identical back-to-back launches pass both planted kernels."""
    k = kernel()
    assert_bits_equal(k(*_inputs()), k(*_inputs()), label="two launches of the same kernel")


@pytest.mark.parametrize("value,problem", [(0.0, "all zero bytes"), (float("nan"), "NaN/Inf")])
def test_a_constant_garbage_output_is_no_determinism(value, problem):
    def garbage(a, w):
        return torch.full((a.shape[0], w.shape[1]), value, dtype=torch.bfloat16)

    with pytest.raises(AssertionError, match=problem):
        assert_deterministic(garbage, _inputs, other_work=lambda: None, label="garbage", device="cpu")
