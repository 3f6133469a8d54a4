"""The whole MoE block as one call (moe.block): router -> dispatch -> experts -> combine.

Collected: the backend's moe_block on x_ffn (its own router and the experts it prepared once per layer),
and, for the bound, its router's expert ids on the same input. Its intermediates are not visible: the
bound is the block interval (moe_block_bound). Own check: bound; batch (static runs only: with a dynamic
global scale a token's bits depend on the batch's amax by design) also reports the output's drift from
the reference combine. valid (judges/valid_count.py): a valid-token count below capacity, garbage past it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from references.gemm import gamma, half_ulp
from references.linear import nvfp4_global_scale_for
from references.nvfp4 import decode_nvfp4_block_scaled
from references.stages import MOE_BLOCK, MOE_COMBINE, ROUTER, Check, Stage
from verify.assertions import assert_within_gemm_bound
from verify.backends.base import Backend
from verify.metrics import stage_metrics
from verify.verdicts.checks import Batch, Judge, Outputs, Replay, Skipped, Subset
from verify.verdicts.context import JudgeContext, MoeOperands
from verify.verdicts.intervals import deq_interval, f32_down, f32_up, nonempty_experts, swiglu_interval, \
    widen_by_bf16_rounding
from verify.verdicts.judges.valid_count import valid_count
from verify.verdicts.model import LayerCase
from verify.verdicts.quantized import expected_grouped_quant, grouped_f64

__all__ = ["JUDGE", "moe_block_bound"]


@dataclass
class BlockOutputs(Outputs):
    backend: Backend
    case: LayerCase
    router: object                 # the backend's prepared router
    experts: object                # the backend's prepared experts
    y: Tensor                      # moe_block(x_ffn)
    backend_ids: Tensor | None     # after_w2 runs: the backend's router ids on x_ffn (the bound leaves out the
    #                                tokens it routes otherwise)

    def run(self, x: Tensor, ids: Tensor | None, **kw) -> Tensor:
        return _moe_block(self.backend, self.case, self.router, self.experts, x, ids, **kw)

    def batch(self, metrics: dict) -> Batch:
        case = self.case  # the output's drift from the reference combine is reported with the batch verdict
        metrics["drift_vs_reference_combine"] = stage_metrics(self.y.double(),
                                                              case.emulated[MOE_COMBINE.name].double())
        if not case.static:
            raise Skipped("batch: with a dynamic per-tensor global scale a token's bits depend on the batch's amax "
                          "by design; verified in the static runs")
        x, ids, t = case.x_ffn, case.token_ids_i64, case.x_ffn.shape[0]
        return Batch(lambda: self.run(x, ids), (Subset(
            f"{MOE_BLOCK.name} token 0 alone vs in a batch of {t}",
            lambda: self.run(x[:1].contiguous(), None if ids is None else ids[:1]), lambda full: full[:1]),),
            f"token 0 alone is bit-equal to token 0 in the batch of {t}")

    def replay(self) -> Replay:
        x = self.case.x_ffn
        x_buf = x.clone()
        t = x_buf.shape[0]
        valid = getattr(self.backend, "supports_valid_tokens", False)
        n_buf = torch.full((1,), t, dtype=torch.int32, device=x_buf.device) if valid else None

        def one_token() -> None:
            x_buf.copy_(x)
            n_buf.fill_(1)

        muts = [("new values (a new routing; in dynamic runs new global scales)",
                 lambda: x_buf.copy_((x.roll(1, 0) * -0.75).to(torch.bfloat16))),
                ("every token alike (one hot expert set, zero-token experts)",  # top-k experts take all rows
                 lambda: x_buf.copy_(x[:1].expand_as(x_buf)))]
        if valid:
            muts.append((f"a token count of 1 (captured at {t})", one_token))
        note = "" if valid else "; token-count replay not probed: the backend's MoE block takes no valid-token count"
        return Replay(lambda: self.run(x_buf, self.case.token_ids_i64, num_valid_tokens_i32=n_buf), tuple(muts), note)


def _moe_block(backend: Backend, case: LayerCase, router, experts, x: Tensor, ids: Tensor | None, **kw) -> Tensor:
    """The backend's MoE block on x with the run's options (token ids only for a hash-routed layer)."""
    o = case.options
    hashed = case.layer.router.tid2eid_i64 is not None
    return backend.moe_block(x, router, experts, token_ids_i64=ids if hashed else None,
                             swiglu_limit=case.moe_spec.swiglu_limit, weight_placement=o.weight_placement,
                             act_scale=o.act_scale, **kw)


def collect(ctx: JudgeContext, stage: Stage) -> BlockOutputs:
    case, b = ctx.case, ctx.backend
    router = b.prepare_router(case.layer.router, case.moe_spec)
    y = _moe_block(b, case, router, ctx.experts, case.x_ffn, case.token_ids_i64)
    ids = None
    if case.options.weight_placement == "after_w2":
        hashed = case.layer.router.tid2eid_i64 is not None
        ids = b.router(case.x_ffn, router, token_ids_i64=case.token_ids_i64 if hashed else None).ids_i64
    return BlockOutputs(b, case, router, ctx.experts, y, ids)


def bound(ctx: JudgeContext, stage: Stage, out: BlockOutputs, metrics: dict) -> str:
    if ctx.case.options.weight_placement != "after_w2":
        raise Skipped("bound: the block interval is written for the after_w2 placement (routing weights in the combine)")
    return moe_block_bound(ctx.backend, ctx.case, out.y, out.backend_ids)


def moe_block_bound(backend: Backend, case: LayerCase, y_block: Tensor, backend_ids: Tensor | None = None) -> str:
    """The whole MoE block against the emulator's operands (teacher forced on the reference routing): its
    hidden intermediates (L1 output, h, the requantized h) are not visible, so each output element must lie
    in the interval the format and the bounds allow: L1 within its accumulation bound, h the clamped SwiGLU
    of that (and one bf16 rounding), the requantization of h any choice an interval of h and of its global
    scale allows (the interval rule), L2 within its bound on that interval, the combine within its bound
    with the fp32 router weights' error. A wrong alpha, a wrong global scale or the wrong input_scale
    anywhere in the block moves outputs far outside. Tokens whose experts the backend's own router (the
    router op on the same input, `backend_ids`) chose differently from the reference are not expected to
    match and are left out, counted in the message; the router verdict judges them (near-ties allowed).
    Every token left out is a failure: the bound would then judge nothing."""
    __tracebackhide__ = True
    spec, e = case.moe_spec, case.emulated
    if backend.recipe.global_convention != "enc":
        raise NotImplementedError(f"moe.block bound: recipe {backend.recipe.name} takes a decode global scale; "
                                  "the block interval is written for encode-scale recipes (te, vllm)")
    m = MoeOperands.of(case)
    d, off64, ex = m.dispatch, m.offsets_i64, case.layer.experts
    s2 = m.l2_input_dec_f32  # per expert, as the emulator's moe_block (None: dynamic)
    a1 = expected_grouped_quant(backend, m.rows_bf16, off64, m.l1_input_dec_f32)
    g64, bg = grouped_f64(backend, a1, off64, ex.w1, torch.float32)
    u64, bu = grouped_f64(backend, a1, off64, ex.w3, torch.float32)
    h_lo, h_hi = widen_by_bf16_rounding(*swiglu_interval(g64 - bg, g64 + bg, u64 - bu, u64 + bu, spec.swiglu_limit))
    if s2 is not None:  # static: expert e's h quantized with S = 1/s2[e]
        q_lo, q_hi = torch.empty_like(h_lo), torch.empty_like(h_hi)
        for x, lo, hi in nonempty_experts(off64):
            g = next(iter(nvfp4_global_scale_for(h_lo[:1].float(), recipe=backend.recipe,
                                                 input_scale_f32=s2[x]).values())).reshape(())
            q_lo[lo:hi], q_hi[lo:hi] = deq_interval(h_lo[lo:hi], h_hi[lo:hi], backend.recipe, g, g)
    else:  # dynamic: S = 2688/amax(h) over all rows, amax somewhere inside the interval's amax bounds
        amax_lo = torch.where((h_lo <= 0) & (h_hi >= 0), 0.0, torch.minimum(h_lo.abs(), h_hi.abs())).max()
        amax_hi = torch.maximum(h_lo.abs(), h_hi.abs()).max()
        g_at = [next(iter(nvfp4_global_scale_for(f32_up(a.reshape(1)) if i else f32_down(a.reshape(1)),
                                                 recipe=backend.recipe, input_scale_f32=None).values()))
                for i, a in enumerate((amax_lo, amax_hi))]
        g_lo, g_hi = torch.minimum(*g_at), torch.maximum(*g_at)  # S falls as amax grows
        q_lo, q_hi = deq_interval(h_lo, h_hi, backend.recipe, g_lo.reshape(()), g_hi.reshape(()))
    # L2 on the interval (per expert), its accumulation bound and alpha's float32 rounding
    w2 = ex.w2
    mid, rad, mag = (q_lo + q_hi) / 2, (q_hi - q_lo) / 2, torch.maximum(q_lo.abs(), q_hi.abs())
    k2 = mid.shape[1]
    y_mid = torch.zeros(mid.shape[0], w2.weight_u8.shape[-2], dtype=torch.float64, device=mid.device)
    y_rad = torch.zeros_like(y_mid)
    for x, lo, hi in nonempty_experts(off64):
        wd = decode_nvfp4_block_scaled(w2.weight_u8[x], w2.weight_scale_e4m3[x].view(torch.uint8),
                                       dtype=torch.float64) * w2.weight_scale_2_f32[x].double()
        y_mid[lo:hi] = mid[lo:hi] @ wd.T
        # accumulation, plus alpha's float32 rounding and the epilogue's float32 product (2 x 2^-24)
        y_rad[lo:hi] = rad[lo:hi] @ wd.abs().T + (gamma(k2, backend.u_acc) + 2.0**-23) * (mag[lo:hi] @ wd.abs().T)
    y_rad = y_rad + half_ulp(y_mid.abs() + y_rad, torch.bfloat16)  # the L2 output in bf16
    # combine (after w2) with the reference routing weights; the kernel's fp32 weights are within
    # gamma(k + 4, 2^-24) of them (s / sum(s) * scale: k adds, a divide, a multiply)
    w = e[ROUTER.tensor("weights")].double()
    k = w.shape[1]
    pair_mid, pair_rad = y_mid[d.row_of_pair_i64], y_rad[d.row_of_pair_i64]  # [T, k, H]
    w_err = gamma(k + 4, 2.0**-24) * w.abs()
    out_mid = (pair_mid * w[..., None]).sum(1)
    mag_terms = (pair_mid.abs() + pair_rad) * (w.abs() + w_err)[..., None]
    out_rad = (pair_rad * w.abs()[..., None]).sum(1) + (pair_mid.abs() * w_err[..., None]).sum(1) \
        + gamma(k + 1, backend.u_acc) * mag_terms.sum(1)
    out_rad = out_rad + half_ulp(out_mid.abs() + out_rad, y_block.dtype)
    ref_ids = e[ROUTER.tensor("ids")].to(y_block.device)
    keep = torch.ones(y_block.shape[0], dtype=torch.bool, device=y_block.device)
    if backend_ids is not None:
        keep = (backend_ids.to(ref_ids).sort(dim=1).values == ref_ids.sort(dim=1).values).all(dim=1)
    left_out = int((~keep).sum())
    if left_out == y_block.shape[0]:
        raise AssertionError(f"{MOE_BLOCK.name} bound: the backend's router chose other experts than the reference "
                             f"for all {left_out} tokens; nothing left to judge (see the router verdict)")
    ratio = assert_within_gemm_bound(y_block[keep], out_mid[keep], out_rad[keep],
                                     label=f"{MOE_BLOCK.name} output vs the interval of the emulator's operands")
    skipped = f"; {left_out} token(s) the backend's router routed otherwise left out" if left_out else ""
    return (f"every output within the block interval (max |y - mid| / radius = {ratio:.3g}; "
            f"{'static' if case.static else 'dynamic'} scales, K1={a1.k}, K2={k2}{skipped})")


JUDGE = Judge(collect, {Check.BOUND: bound, Check.VALID: valid_count})
