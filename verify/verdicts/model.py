"""What a judge produces (Verdict, STATUSES) and what it judges (LayerCase, applicable_stages)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from references.layer import RunOptions
from references.stages import DENSE_MLP_STAGES, INDEXER_WQ_B, MOE_BLOCK_STAGES, SHARED_STAGES, STAGES, Stage

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
    reference layer's emulated and high-precision stage tensors, the run options and the MoE spec."""

    layer: object            # verify.checkpoint.LayerWeights
    schema: str
    x_attn: Tensor
    x_ffn: Tensor
    token_ids_i64: Tensor | None
    emulated: dict[str, Tensor]
    high: dict[str, Tensor]
    options: RunOptions
    moe_spec: object | None  # references.layer.MoeSpec

    @property
    def static(self) -> bool:
        return self.options.act_scale == "static"

    @property
    def device(self) -> torch.device:
        return self.x_ffn.device


def applicable_stages(case: LayerCase) -> list[Stage]:
    """The kernel stages of the table that this layer has (schema, MoE or dense MLP, shared expert), in
    table order."""
    lw = case.layer
    out = []
    for s in STAGES:
        if not s.kernel or case.schema not in s.schemas:
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
