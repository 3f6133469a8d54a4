"""The combine stage (moe.combine): the routing-weighted sum of the L2 rows per token.

Collected: the backend's combine of the reference's L2 rows, with the reference routing's weights (None
when they were applied before w2). Own check: bound (k adds in the accumulator, and the output rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from references.gemm import gamma, half_ulp
from references.stages import ROUTER, Check, Stage
from verify.assertions import assert_within_gemm_bound
from verify.backends.base import Backend
from verify.backends.protocol import Dispatched
from verify.verdicts.checks import Judge, Outputs, Replay
from verify.verdicts.context import JudgeContext, MoeOperands

__all__ = ["JUDGE"]


def _dispatched(moe: MoeOperands) -> Dispatched:
    """The reference dispatch in the boundary representation (top_k known on the host)."""
    d = moe.dispatch
    return Dispatched(d.token_of_row_i64, d.slot_of_row_i64, moe.offsets_i32, d.row_of_pair_i64.shape[1])


@dataclass
class CombineOutputs(Outputs):
    backend: Backend
    moe: MoeOperands
    y_rows: Tensor               # the reference's L2 rows (expert order)
    weights_f32: Tensor | None   # the reference routing's weights; None: applied before w2
    got: Tensor

    def replay(self) -> Replay:
        weights = self.weights_f32
        y_buf = self.y_rows.clone()
        w_buf = None if weights is None else weights.clone()
        disp = _dispatched(self.moe)

        mutations = [("new values", lambda: y_buf.mul_(-0.5))]
        if w_buf is not None:  # before_w2: the combine takes no weights, there is nothing to rewrite
            mutations.append(("new routing weights", lambda: w_buf.copy_(weights.flip(1))))
        return Replay(lambda: self.backend.combine(y_buf, disp, w_buf), tuple(mutations))


def collect(ctx: JudgeContext, stage: Stage) -> CombineOutputs:
    case = ctx.case
    before = case.options.weight_placement == "before_w2"
    weights = None if before else case.emulated[ROUTER.tensor("weights")]
    y_rows = case.emulated[stage.input]
    return CombineOutputs(ctx.backend, ctx.moe, y_rows, weights,
                          ctx.backend.combine(y_rows, _dispatched(ctx.moe), weights))


def bound(ctx: JudgeContext, stage: Stage, out: CombineOutputs, metrics: dict) -> str:
    """Each token's output within gamma(k + 1, u_acc) of its terms' magnitudes plus its rounding."""
    __tracebackhide__ = True
    pairs = out.moe.dispatch.row_of_pair_i64
    terms = out.y_rows.double()[pairs]  # [T, k, H]
    if out.weights_f32 is not None:
        terms = terms * out.weights_f32.double()[..., None]
    exact = terms.sum(1)
    acc = gamma(pairs.shape[1] + 1, ctx.backend.u_acc) * terms.abs().sum(1)
    bnd = acc + half_ulp(exact.abs() + acc, out.got.dtype)
    ratio = assert_within_gemm_bound(out.got, exact, bnd, label=f"{stage.name} output")
    return f"max |y - exact| / bound = {ratio:.3g} (k={pairs.shape[1]})"


JUDGE = Judge(collect, {Check.BOUND: bound})
