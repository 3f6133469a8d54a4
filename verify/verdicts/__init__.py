"""Verdicts: every kernel stage of the stage table judged through the backend protocol."""

from verify.verdicts.judges import (
    STATUSES, LayerCase, Verdict, applicable_stages, check_quantized, expected_grouped_quant, grouped_f64,
    moe_block_bound, stage_verdicts,
)

__all__ = ["Verdict", "LayerCase", "STATUSES", "stage_verdicts", "applicable_stages", "check_quantized",
           "expected_grouped_quant", "grouped_f64", "moe_block_bound"]
