"""One judge per stage kind, keyed by the stage table's op (references.stages.Op).

Each module holds its kind's collected outputs (an Outputs subclass: what the generic checks ask for)
and its own check functions; `JUDGE` ties them together (verify.verdicts.checks.Judge). A new stage of
an existing kind is a row of the stage table only; a new kind is a module here and one entry below.
"""

from __future__ import annotations

from references.stages import Op
from verify.verdicts.checks import Judge
from verify.verdicts.judges import act_quant, block, combine, dense, dispatch, grouped_gemm, l1_fused, router, \
    swiglu_requant

__all__ = ["JUDGES"]

JUDGES: dict[Op, Judge] = {
    Op.DENSE_LINEAR: dense.JUDGE,
    Op.ROUTER: router.JUDGE,
    Op.DISPATCH: dispatch.JUDGE,
    Op.GROUPED_QUANTIZE: act_quant.JUDGE,
    Op.GROUPED_GEMM: grouped_gemm.JUDGE,
    Op.SWIGLU_REQUANT: swiglu_requant.JUDGE,
    Op.L1_FUSED: l1_fused.JUDGE,
    Op.COMBINE: combine.JUDGE,
    Op.MOE_BLOCK: block.JUDGE,
}
