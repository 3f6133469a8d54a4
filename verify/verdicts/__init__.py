"""Kernel verdicts for every stage of the stage table, through the backend protocol.

Teacher forcing (DESIGN "Stages"): each stage's op gets the reference layer's own input to that
stage (its emulated output of the stage before, the reference routing), so a failed verdict
blames exactly one stage. The backend prepares its weights from the checkpoint's bytes with its
own host code (`prepare_*`; the routed experts once per layer, shared by every MoE stage); the
expected results come from references/ on the same bytes.

How a verdict is produced (judge_layer, verify/verdicts/layer.py): for each row of the stage table
that the layer has (applicable_stages, table order), the judge of the row's op (judges/: one per
stage kind)
  1. answers "not served" for each check whose ops (Judge.ops(ctx, stage, check)) the backend lacks (the
     backend's reason: a backend with only a quantizer still gets its bytes judged); when no check is
     left, or collecting raises NotImplementedError (its sentence), every check of the row;
  2. collects the backend's outputs for the stage, once, with the ops it serves (judges/<kind>.collect);
  3. judges each Check the row lists, in the row's order, by the check function of that name: the
     kind's own (bound, ids, weights, exact, interval, rounding) or a generic one written once
     (checks.py: bytes, batch, padding, sync, graph). A check passes (its message), fails
     (AssertionError: "<stage> <check>: <what differs, where>"), is not served or is skipped (the
     reason it does not apply in this run).
A new check is one function and one word in the table (references.stages.Check and the rows that
list it); a new stage is one table row (plus a judge only for a new kind of op).

Checks (references.stages.Check; DESIGN "Verdicts"):
  bytes     quantized activations: codes equal as values (+0 == -0), swizzled scale bytes equal
            (padding included: it must be zero), global decode scale bit-equal;
  bound     GEMMs / combine: every element within the rigorous accumulation bound of the float64
            result on the same quantized operands (ratio <= 1, the backend's declared u_acc);
            dense linears: also the one-call dense_linear against the references' quantization;
            moe.block: within the block interval (moe_block_bound);
  prepare   GEMM stages: the backend's prepared weights decoded back by its dequantize_prepared equal the
            checkpoint's dequantized ones (judges/prepare.py; "not served" without that method); when they
            differ, the stage's bound and mode judge the GEMM on the backend's own weights (blame on prepare);
  mode      GEMM stages: the output matches its declared numerics mode (w4a4, w4a16, w4a8, fp8_block, bf16;
            references.modes) within that mode's bound, naming the mode it does match otherwise
            (judges/mode.py); no match at all is the bound's failure (mode skipped with every ratio);
  rounding  SwiGLU h: within one ulp of its dtype of the exact value (a faithful rounding);
  ids       router: expert ids equal; where the reference's k-th and (k+1)-th selection values are
            closer than their fp32 error bound the difference is a near-tie, reported, not failed
            (an exact tie is not a near-tie: the lower expert id wins, as in the reference);
  weights   router: weights within the fp32 error bound of the reference's, on tokens whose ids agree;
  exact     dispatch: rows, slots and offsets identical;
  interval  moe.l1_fused (static runs): each scale byte and code one that some h inside the L1
            bound gives (the interval rule);
  batch     a token's output bits do not depend on the other tokens or on M (dense linears: the end rows
            alone and the first 2, 3, 4, 8 .. 256 rows as batches of their own vs in the batch, checks.row_batch;
            grouped GEMMs: one expert's rows alone);
  padding   0xFF, then 0x7F in the activations' scale padding change no output bit;
  valid     moe.block with a valid-token count n below capacity and garbage (NaN, Inf, huge) past it: rows
            < n bit-equal to the block on the n tokens alone, rows >= n zero (judges/valid_count.py);
  sync      (CUDA) the stage under torch.cuda.set_sync_debug_mode("error");
  graph     (CUDA) captured once, replayed after new values and scales were written in place:
            bit-equal to eager on the new inputs; a capture error is a failed verdict.
The sync and graph probes are timed through the JudgeContext (context.py) into the caller's timing
sink ("graph_probe"); each verdict's metrics hold "seconds", its stage's time shared among its verdicts.

Modules: model (Verdict, LayerCase, applicable_stages), context (JudgeContext, MoeOperands), layer
(judge_layer), checks (the check machinery and the generic checks), probes (sync / graph probes),
quantized (bytes comparison, expected grouped quantization, grouped float64 GEMM), intervals (the
interval rule's arithmetic), routing (router_verdict), judges/ (one module per stage kind), controls (the
negative control of each passing verdict: the same check on the stage's real output with one planted
known-bad change; judge_layer(..., controls=list) and run_layer(..., controls=True) run them).
"""

from verify.verdicts.judges.block import moe_block_bound
from verify.verdicts.layer import judge_layer
from verify.verdicts.model import STATUSES, LayerCase, Verdict, applicable_stages
from verify.verdicts.quantized import check_quantized, expected_grouped_quant, grouped_f64

__all__ = ["Verdict", "LayerCase", "STATUSES", "judge_layer", "applicable_stages", "check_quantized",
           "expected_grouped_quant", "grouped_f64", "moe_block_bound"]
