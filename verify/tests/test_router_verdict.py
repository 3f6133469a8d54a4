"""The router verdict (verify.verdicts) on the sm100 backend's routing ops, which are plain torch
ops and run on the CPU: identical ids except reported near-ties, weights within the fp32 bound,
on the mini-v4 layers and on random wide routers. A wrong router must fail it."""

from __future__ import annotations

import pytest
import torch

from kernels.sm100 import moe_routing as sm100_routing
from references.router import route
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.layer_report import layer_inputs
from verify.verdicts.routing import router_verdict


def _sm100(x, gate_weight, *, top_k, rsf, bias=None, tid2eid=None, token_ids=None, weights_from="scores"):
    logits = sm100_routing.router_logits_f32(x, gate_weight)
    r = sm100_routing.route(logits, top_k=top_k, routed_scaling_factor=rsf, bias_f32=bias, tid2eid_i64=tid2eid,
                            token_ids_i64=token_ids)
    return r.ids_i64, r.weights_f32


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(GOLDEN_DIR / "mini-v4")


@pytest.mark.parametrize("i", [pytest.param(i, id=f"layer{i}", marks=getattr(pytest.mark, f"layer{i}")) for i in range(4)])
def test_sm100_router_passes_the_verdict_on_mini_v4(ckpt, i):
    layer = ckpt.load_layer(i)
    inputs = layer_inputs(ckpt, layer, tokens=256, seed=5, device="cpu")
    r = layer.router
    cfg = ckpt.config
    ids = inputs.token_ids_i64 if r.tid2eid_i64 is not None else None
    ref = route(inputs.x_ffn_bf16, r.gate_weight_bf16, scoring=cfg.scoring_func, top_k=cfg.top_k,
                routed_scaling_factor=cfg.routed_scaling_factor, bias_f32=r.gate_bias_f32, tid2eid=r.tid2eid_i64,
                token_ids_i64=ids)
    got_ids, got_w = _sm100(inputs.x_ffn_bf16, r.gate_weight_bf16, top_k=cfg.top_k, rsf=cfg.routed_scaling_factor,
                            bias=r.gate_bias_f32, tid2eid=r.tid2eid_i64, token_ids=ids)
    v = router_verdict(ref, got_ids, got_w, x=inputs.x_ffn_bf16, gate_weight=r.gate_weight_bf16, bias_f32=r.gate_bias_f32,
                       scoring=cfg.scoring_func, routed_scaling_factor=cfg.routed_scaling_factor)
    assert v.passed, f"layer{i} " + v.summary()


def _wide_router(seed, t=512, e=384, h=1024):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    w = (torch.randn(e, h, generator=g) * 0.02).to(torch.bfloat16)
    bias = torch.randn(e, generator=g) * 0.05
    return x, w, bias


@pytest.mark.parametrize("seed", [0, 1])
def test_sm100_router_passes_the_verdict_at_v4_pro_width(seed):
    x, w, bias = _wide_router(seed)
    ref = route(x, w, scoring="sqrtsoftplus", top_k=6, routed_scaling_factor=2.5, bias_f32=bias)
    got_ids, got_w = _sm100(x, w, top_k=6, rsf=2.5, bias=bias)
    v = router_verdict(ref, got_ids, got_w, x=x, gate_weight=w, bias_f32=bias, scoring="sqrtsoftplus", routed_scaling_factor=2.5)
    assert v.passed, v.summary()


def test_weights_from_biased_scores_fail_the_verdict():
    """A known-wrong router (weights gathered from s + bias) must be caught."""
    x, w, bias = _wide_router(3, t=64)
    ref = route(x, w, scoring="sqrtsoftplus", top_k=6, routed_scaling_factor=2.5, bias_f32=bias)
    logits = sm100_routing.router_logits_f32(x, w)
    s = torch.sqrt(torch.nn.functional.softplus(logits)) + bias
    ids = torch.topk(s, 6, dim=-1).indices
    wrong = s.gather(1, ids)
    wrong = wrong / wrong.sum(-1, keepdim=True) * 2.5
    v = router_verdict(ref, ids, wrong, x=x, gate_weight=w, bias_f32=bias, scoring="sqrtsoftplus", routed_scaling_factor=2.5)
    assert not v.passed and v.weight_violations > 0, v.summary()


def test_selection_without_bias_fails_the_verdict():
    x, w, bias = _wide_router(4, t=64)
    bias = bias * 20  # large enough to change most selections
    ref = route(x, w, scoring="sqrtsoftplus", top_k=6, routed_scaling_factor=2.5, bias_f32=bias)
    got_ids, got_w = _sm100(x, w, top_k=6, rsf=2.5, bias=None)
    v = router_verdict(ref, got_ids, got_w, x=x, gate_weight=w, bias_f32=bias, scoring="sqrtsoftplus", routed_scaling_factor=2.5)
    assert not v.passed and len(v.mismatched_tokens) > 0, v.summary()


def test_a_wrong_pick_on_a_tied_token_is_a_mismatch_not_a_tie():
    """Two identical gate rows make exact ties at place k on some tokens; a router that swaps its last
    pick for the lowest-scoring expert on those tokens must be reported as mismatched."""
    x, w, bias = _wide_router(5, t=64, e=32, h=256)
    w[1] = w[0]
    bias = torch.zeros(32)
    ref = route(x, w, scoring="sqrtsoftplus", top_k=6, routed_scaling_factor=2.5, bias_f32=bias)
    got_ids, got_w = _sm100(x, w, top_k=6, rsf=2.5, bias=bias)
    ok = router_verdict(ref, got_ids, got_w, x=x, gate_weight=w, bias_f32=bias, scoring="sqrtsoftplus",
                        routed_scaling_factor=2.5)
    assert ok.passed, ok.summary()
    worst = ref.scores_f32.argmin(1)
    bad_ids = got_ids.clone()
    tied = torch.tensor([bool(set(r.tolist()) & {0, 1}) for r in ref.ids_i64])
    bad_ids[tied, -1] = worst[tied]
    v = router_verdict(ref, bad_ids, got_w, x=x, gate_weight=w, bias_f32=bias, scoring="sqrtsoftplus",
                       routed_scaling_factor=2.5)
    assert tied.any() and not v.passed and len(v.mismatched_tokens) > 0, v.summary()


def test_group_limited_top_k_is_refused_with_a_clear_error():
    x, w, bias = _wide_router(6, t=4, e=32, h=64)
    ref = route(x, w, scoring="sigmoid", top_k=4, routed_scaling_factor=1.0, bias_f32=bias, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="n_group"):
        router_verdict(ref, ref.ids_i64, ref.weights_f32, x=x, gate_weight=w, bias_f32=bias, scoring="sigmoid",
                       routed_scaling_factor=1.0, n_group=4)
