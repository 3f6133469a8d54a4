"""The valid check of the MoE block (issue 26, item 4): the device valid-token count is honoured.

A graph captured at capacity T replays any n <= T tokens (DESIGN "Backend protocol"); the rows t >= n
of its input buffer are stale: whatever the last, larger batch left there. The check replays the block
eagerly with a count n < T and garbage in rows t >= n (verify.adversarial.garbage_past_count "mixed": NaN /
+-Inf rows and copies of valid rows times 4, 2^20, 16, 2; hash layers also get stale, in-range token ids
there), and requires
  - rows t < n bit-equal to the block on the first n tokens alone (eager, no count): nothing the kernel
    derives from the padding rows (a dynamic global scale, an amax, a routing, a dispatch) reaches them;
  - rows t >= n zero;
  - on CUDA (graph-safe backends): a graph of the block captured at capacity (n = T, clean rows) and replayed
    after the garbage and the count n were written into its buffers gives the eager call's bits (so, with the
    two items above, the valid rows of the replay are the block on those tokens alone).
The valid rows are the layer's x_ffn[:n] times VALID_ROWS_GAIN (2^-6, exact): SwiGLU bounds |h| by
L * silu(L) (~100 at L = 10), which a garbage row reaches and which heavy-tailed real activations reach too
(mini-v4's gate reaches 200; at 2^-2 its h still hits 100); at 2^-6 no valid h of mini-v4 exceeds 4, so a
dispatch that routes the padding tokens (the sm90 bug class: the dynamic L2 scale moves with their h) fails in dynamic
runs even where the layer's own data already saturates the clamp (whether a padding token's h outgrows the
valid rows' depends on the weights: test_valid_count measures it on every layer and placement of mini-v4).
A dynamic L1 amax over every row fails it in any dynamic run.
Backends whose moe_block takes no count (supports_valid_tokens False) are "not served", with that reason.
"""

from __future__ import annotations

import torch

from references.stages import Check, Stage
from verify.adversarial import garbage_past_count, stale_token_ids
from verify.assertions import assert_all_zero, assert_bits_equal
from verify.verdicts.checks import Outputs, Skipped
from verify.verdicts.context import JudgeContext
from verify.verdicts.probes import graph_probe

__all__ = ["valid_count", "valid_tokens_below", "VALID_ROWS_GAIN"]

VALID_ROWS_GAIN = 2.0**-6  # exact in bf16 (module docstring)


def valid_tokens_below(capacity: int) -> int:
    """The count the check replays: about two thirds of the capacity, at least 1 and below it."""
    return max(1, min(capacity - 1, (2 * capacity) // 3))


def valid_count(ctx: JudgeContext, stage: Stage, out: Outputs, metrics: dict) -> str:
    """valid: the block with a valid-token count n < T and garbage past it (module docstring). `out` is the
    block judge's outputs: out.run(x, token_ids, num_valid_tokens_i32=...) runs the backend's block."""
    __tracebackhide__ = True
    b, case = ctx.backend, ctx.case
    if not getattr(b, "supports_valid_tokens", False):
        raise NotImplementedError(f"not served: the {b.name} backend's moe_block takes no valid-token count "
                                  "(supports_valid_tokens is False), so a graph is never replayed with fewer tokens")
    ids, t = case.token_ids_i64, case.x_ffn.shape[0]
    if t < 2:
        raise Skipped(f"{Check.VALID.value}: needs at least 2 tokens to leave rows past the count (got {t})")
    n = valid_tokens_below(t)
    metrics.update(capacity=t, valid_tokens=n)
    x = (case.x_ffn.float() * VALID_ROWS_GAIN).to(case.x_ffn.dtype)
    alone = out.run(x[:n].contiguous(), None if ids is None else ids[:n].contiguous())
    n_i32 = torch.full((1,), n, dtype=torch.int32, device=x.device)
    vocab = None if case.layer.router.tid2eid_i64 is None else case.layer.router.tid2eid_i64.shape[0]
    stale_ids = None if ids is None or vocab is None else stale_token_ids(ids, n, vocab)
    garbage, stale = garbage_past_count(x, n, "mixed"), ids if stale_ids is None else stale_ids
    y = out.run(garbage, stale, num_valid_tokens_i32=n_i32)
    where = f"{stage.name} with {n} of {t} tokens valid and NaN / Inf / huge rows past them"
    assert_bits_equal(y[:n].cpu(), alone.cpu(), label=f"{where}: valid rows vs the block on the {n} tokens alone")
    assert_all_zero(y[n:].cpu(), label=f"{where}: rows past the valid count")
    replay = ""
    if x.device.type == "cuda" and getattr(b, "graph_safe", True):
        x_buf, ids_buf = x.clone(), None if ids is None else ids.clone()
        n_buf = torch.full((1,), t, dtype=torch.int32, device=x.device)

        def stale_tail() -> None:
            x_buf.copy_(garbage)
            n_buf.fill_(n)
            if ids_buf is not None:
                ids_buf.copy_(stale)

        with ctx.probe("graph probe", stage.name):
            graph_probe(lambda: out.run(x_buf, ids_buf, num_valid_tokens_i32=n_buf),
                        [(f"the garbage rows and a count of {n} written in place", stale_tail)], metrics)
        replay = "; a graph captured at capacity replays it bit-equal"
    return (f"{n} of {t} tokens valid (x_ffn x {VALID_ROWS_GAIN}), NaN / Inf / huge rows past the count: valid rows "
            f"bit-equal to the block on them alone, the other {t - n} rows zero{replay}")
