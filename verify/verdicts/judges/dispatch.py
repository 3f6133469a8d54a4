"""The dispatch stage: token-expert pairs -> expert-sorted rows + offsets.

Collected: the backend's dispatch of the reference routing's ids. Own check: exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from references.stages import ROUTER, Check, Stage
from verify.assertions import assert_bytes_equal, first_mismatch
from verify.backends.base import Backend
from verify.backends.protocol import Dispatched
from verify.verdicts.checks import Judge, Outputs, Replay
from verify.verdicts.context import JudgeContext

__all__ = ["JUDGE"]


@dataclass
class DispatchOutputs(Outputs):
    backend: Backend
    ids_i64: torch.Tensor     # the reference routing's expert ids [T, k]
    num_experts: int
    got: Dispatched

    def replay(self) -> Replay:
        ids = self.ids_i64
        ids_buf = ids.clone()
        return Replay(lambda: self.backend.dispatch(ids_buf, self.num_experts), (
            ("a new routing", lambda: ids_buf.copy_(ids.roll(1, 0))),
            ("every token to the same experts (zero-token experts)", lambda: ids_buf.copy_(ids[:1].expand_as(ids)))))


def collect(ctx: JudgeContext, stage: Stage) -> DispatchOutputs:
    ids = ctx.case.emulated[ROUTER.tensor("ids")]
    n = ctx.moe.dispatch.num_experts
    return DispatchOutputs(ctx.backend, ids, n, ctx.backend.dispatch(ids, n))


def exact(ctx: JudgeContext, stage: Stage, out: DispatchOutputs, metrics: dict) -> str:
    """Rows (token and slot of each expert-sorted row) and offsets identical to the reference dispatch."""
    __tracebackhide__ = True
    d, got = ctx.moe.dispatch, out.got
    assert_bytes_equal(got.offsets_i32.to(torch.int32).view(torch.uint8).cpu(),
                       ctx.moe.offsets_i32.view(torch.uint8).cpu(), label=f"{stage.name} offsets (int32 bytes)")
    for name, g, x in (("token", got.row_token_i64, d.token_of_row_i64), ("slot", got.row_slot_i64, d.slot_of_row_i64)):
        if tuple(g.shape) != tuple(x.shape):  # compared element by element, never broadcast
            raise AssertionError(f"row_{name}: shape {tuple(g.shape)}, expected {tuple(x.shape)} (one per "
                                 "token-expert pair)")
        bad = first_mismatch(g.to(torch.int64).cpu() != x.cpu())
        if bad:
            raise AssertionError(f"row {bad[0]}: {name} {int(g.reshape(-1)[bad[0]])}, expected {int(x[bad[0]])}")
    k = d.row_of_pair_i64.shape[1]
    if got.top_k is not None and got.top_k != k:
        raise AssertionError(f"top_k {got.top_k}, expected {k} (the routing's k: the combine sizes its output by it)")
    return f"{d.token_of_row_i64.numel()} rows and {d.num_experts + 1} offsets identical"


JUDGE = Judge(collect, {Check.EXACT: exact})
