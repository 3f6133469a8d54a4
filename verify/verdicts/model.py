"""What a judge produces (Verdict, STATUSES) and what it judges (LayerCase, applicable_stages).

A LayerCase is one unit: a decoder layer (unit "decoder", layer a verify.checkpoint.LayerWeights) or
DeepSeek-V4's MTP block (unit "mtp", layer a verify.checkpoint.MtpWeights). applicable_stages keeps the
table rows of the case's unit only (references.stages.Stage.unit): a decoder layer never gets an MTP row,
an MTP block only its own."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from references.layer import RunOptions
from references.stages import (DENSE_MLP_STAGES, INDEXER_WQ_B, MOE_BLOCK_STAGES, MTP_EXPERTS_L1, MTP_EXPERTS_L2,
                               SHARED_STAGES, STAGES, UNITS, Stage)

__all__ = ["Verdict", "STATUSES", "LayerCase", "applicable_stages"]

STATUSES = ("pass", "fail", "not served", "skipped")


@dataclass
class Verdict:
    """One (stage, check) verdict. status: pass / fail / not served (the backend lacks the op here)
    / skipped (the check does not apply: no CUDA device, a non-NVFP4 weight, ...)."""

    stage: str
    check: str
    status: str
    message: str = ""
    metrics: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def as_dict(self) -> dict:
        return {"stage": self.stage, "check": self.check, "status": self.status, "message": self.message,
                "metrics": self.metrics}


@dataclass
class LayerCase:
    """Everything a layer's verdicts need: the checkpoint layer (loader types), its inputs, the
    reference layer's emulated and high-precision stage tensors, the run options and the MoE spec.
    unit: "decoder" (layer: LayerWeights) or "mtp" (layer: MtpWeights; its inputs x_attn / x_ffn are the
    MTP block's enorm / hnorm outputs, also in emulated under references.stages.INPUT_MTP_E / _H)."""

    layer: object            # verify.checkpoint.LayerWeights
    schema: str
    x_attn: Tensor
    x_ffn: Tensor
    token_ids_i64: Tensor | None
    emulated: dict[str, Tensor]
    high: dict[str, Tensor]
    options: RunOptions
    moe_spec: object | None  # references.layer.MoeSpec
    unit: str = "decoder"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit={self.unit!r}: expected one of {UNITS}")

    @property
    def static(self) -> bool:
        return self.options.act_scale == "static"

    @property
    def device(self) -> torch.device:
        return self.x_ffn.device


def applicable_stages(case: LayerCase) -> list[Stage]:
    """The kernel stages of the table that this unit has (its unit kind, schema; a decoder layer: MoE or
    dense MLP, shared expert, indexer; an MTP block: the experts when stored), in table order."""
    lw = case.layer
    out = []
    for s in STAGES:
        if not s.kernel or case.schema not in s.schemas or s.unit != case.unit:
            continue
        if s in (MTP_EXPERTS_L1, MTP_EXPERTS_L2) and lw.experts is None:  # an MTP block stored without experts
            continue
        if s in MOE_BLOCK_STAGES and lw.experts is None:
            continue
        if s in SHARED_STAGES and lw.shared_experts is None:
            continue
        if s in DENSE_MLP_STAGES and lw.dense_mlp is None:
            continue
        if s is INDEXER_WQ_B and INDEXER_WQ_B.weights[0] not in lw.attention:  # stored only in some checkpoints
            continue
        out.append(s)
    return out
