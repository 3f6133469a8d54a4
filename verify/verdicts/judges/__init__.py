"""One judge per stage kind, keyed by the stage table's op (references.stages.Op).

Each module holds its kind's collected outputs (an Outputs subclass: what the generic checks ask for)
and its own check functions; `JUDGE` ties them together (verify.verdicts.checks.Judge). A new stage of
an existing kind is a row of the stage table only; a new kind is a module here and one entry below.
"""

from __future__ import annotations

from references.stages import Op
from verify.verdicts.checks import Judge
from verify.verdicts.judges.act_quant import JUDGE as ACT_QUANT
from verify.verdicts.judges.block import JUDGE as BLOCK
from verify.verdicts.judges.combine import JUDGE as COMBINE
from verify.verdicts.judges.dense import JUDGE as DENSE
from verify.verdicts.judges.dispatch import JUDGE as DISPATCH
from verify.verdicts.judges.grouped_dense import JUDGE as GROUPED_DENSE
from verify.verdicts.judges.grouped_gemm import JUDGE as GROUPED_GEMM
from verify.verdicts.judges.l1_fused import JUDGE as L1_FUSED
from verify.verdicts.judges.mxfp4_experts import JUDGE as MXFP4_EXPERTS
from verify.verdicts.judges.router import JUDGE as ROUTER
from verify.verdicts.judges.swiglu_requant import JUDGE as SWIGLU_REQUANT

__all__ = ["JUDGES"]

JUDGES: dict[Op, Judge] = {
    Op.DENSE_LINEAR: DENSE,
    Op.GROUPED_DENSE_LINEAR: GROUPED_DENSE,
    Op.ROUTER: ROUTER,
    Op.DISPATCH: DISPATCH,
    Op.GROUPED_QUANTIZE: ACT_QUANT,
    Op.GROUPED_GEMM: GROUPED_GEMM,
    Op.SWIGLU_REQUANT: SWIGLU_REQUANT,
    Op.L1_FUSED: L1_FUSED,
    Op.COMBINE: COMBINE,
    Op.MOE_BLOCK: BLOCK,
    Op.GROUPED_LINEAR_MXFP4: MXFP4_EXPERTS,
}
