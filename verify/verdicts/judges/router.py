"""The router stage: logits, scores, top-k (or the hash table), renormalised weights.

Collected: the backend's routing of x_ffn and verify.verdicts.routing.router_verdict's comparison with
the reference's (near-ties within the fp32 score bound are reported, not failed; exact ties must go to
the lower id; hash layers compare ids exactly). Own checks: ids, weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from references.router import Routing
from references.stages import ROUTER, Check, Stage
from verify.backends.base import Backend
from verify.backends.protocol import RoutingOut
from verify.verdicts.checks import Judge, Outputs, Replay
from verify.verdicts.context import JudgeContext
from verify.verdicts.routing import RouterVerdict, router_verdict

__all__ = ["JUDGE", "rejudged"]


@dataclass
class RouterOutputs(Outputs):
    backend: Backend
    x_bf16: torch.Tensor
    prepared: object
    token_ids_i64: torch.Tensor | None   # hash layers only
    got: RoutingOut
    reference: Routing
    rv: RouterVerdict

    def stats(self) -> dict:
        rv = self.rv
        return {"tokens": rv.tokens, "identical": rv.identical, "near_ties": rv.near_ties,
                "topk_overlap": rv.topk_overlap, "max_weight_ratio": rv.max_weight_ratio}

    def replay(self) -> Replay:
        x = self.x_bf16
        x_buf = x.clone()
        return Replay(lambda: self.backend.router(x_buf, self.prepared, token_ids_i64=self.token_ids_i64), (
            ("new values", lambda: x_buf.copy_((x.roll(1, 0) * -0.75).to(torch.bfloat16))),
            ("every token alike", lambda: x_buf.copy_(x[:1].expand_as(x_buf)))))


def collect(ctx: JudgeContext, stage: Stage) -> RouterOutputs:
    case, b = ctx.case, ctx.backend
    lw, spec, e = case.layer, case.moe_spec, case.emulated
    hashed = lw.router.tid2eid_i64 is not None
    prep = b.prepare_router(lw.router, spec)
    tok = case.token_ids_i64 if hashed else None
    r = b.router(case.x_ffn, prep, token_ids_i64=tok)
    ref = Routing(e[ROUTER.tensor("logits")], e[ROUTER.tensor("scores")], e[ROUTER.tensor("ids")],
                  e[ROUTER.tensor("weights")], hashed=hashed)
    return RouterOutputs(b, case.x_ffn, prep, tok, r, ref, _judged(ctx, ref, r))


def _judged(ctx: JudgeContext, ref: Routing, r: RoutingOut) -> RouterVerdict:
    lw, spec = ctx.case.layer, ctx.case.moe_spec
    return router_verdict(ref, r.ids_i64, r.weights_f32, x=ctx.case.x_ffn, gate_weight=lw.router.gate_weight_bf16,
                          bias_f32=None if ref.hashed else lw.router.gate_bias_f32, scoring=spec.scoring,
                          routed_scaling_factor=spec.routed_scaling_factor,
                          renormalize=spec.renormalize if spec.renormalize is not None else spec.scoring != "softmax",
                          n_group=spec.n_group, topk_group=spec.topk_group)


def rejudged(ctx: JudgeContext, out: RouterOutputs, got: RoutingOut) -> RouterOutputs:
    """out with the backend's routing replaced by `got`, judged again (the negative controls)."""
    return dataclasses.replace(out, got=got, rv=_judged(ctx, out.reference, got))


def ids(ctx: JudgeContext, stage: Stage, out: RouterOutputs, metrics: dict) -> str:
    """Expert ids equal the reference's, but for near-ties (reported)."""
    __tracebackhide__ = True
    rv = out.rv
    metrics.update(out.stats())
    if rv.mismatched_tokens:
        t = rv.mismatched_tokens[0]
        raise AssertionError(f"{len(rv.mismatched_tokens)}{'+' if len(rv.mismatched_tokens) == 16 else ''} of "
                             f"{rv.tokens} tokens select other experts; first token {t}: got ids "
                             f"{out.got.ids_i64[t].tolist()}, expected {out.reference.ids_i64[t].tolist()}; "
                             f"{rv.summary()}")
    return f"{rv.identical}/{rv.tokens} tokens identical, {rv.near_ties} near-ties (reported)"


def weights(ctx: JudgeContext, stage: Stage, out: RouterOutputs, metrics: dict) -> str:
    """Routing weights within the fp32 bound of the reference's, on the tokens whose ids agree."""
    __tracebackhide__ = True
    rv = out.rv
    metrics.update(out.stats())
    if rv.weight_violations:
        raise AssertionError(f"{rv.weight_violations} routing weights outside the fp32 bound (max ratio "
                             f"{rv.max_weight_ratio:.3g}); {rv.summary()}")
    return f"routing weights within the fp32 bound (max ratio {rv.max_weight_ratio:.3g})"


JUDGE = Judge(collect, {Check.IDS: ids, Check.WEIGHTS: weights})
