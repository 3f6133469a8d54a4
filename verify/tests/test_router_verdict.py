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


@pytest.mark.parametrize("special", [float("nan"), float("inf")], ids=["nan-weight", "inf-weight"])
def test_a_non_finite_routing_weight_fails_the_verdict(special):
    """Garbage never passes: a NaN / Inf weight compares false with any bound, so it must be counted as a
    violation (not read as 'max ratio nan' and passed)."""
    x, w, bias = _wide_router(4, t=32)
    ref = route(x, w, scoring="sqrtsoftplus", top_k=6, routed_scaling_factor=2.5, bias_f32=bias)
    weights = ref.weights_f32.clone()
    weights[5, 2] = special
    v = router_verdict(ref, ref.ids_i64, weights, x=x, gate_weight=w, bias_f32=bias, scoring="sqrtsoftplus",
                       routed_scaling_factor=2.5)
    assert not v.passed and v.weight_violations == 1 and v.max_weight_ratio == float("inf"), v.summary()


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


def test_group_limited_top_k_needs_topk_group():
    x, w, bias = _wide_router(6, t=4, e=32, h=64)
    ref = route(x, w, scoring="sigmoid", top_k=4, routed_scaling_factor=1.0, bias_f32=bias, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="topk_group=None"):
        router_verdict(ref, ref.ids_i64, ref.weights_f32, x=x, gate_weight=w, bias_f32=bias, scoring="sigmoid",
                       routed_scaling_factor=1.0, n_group=4)


# ----------------------------------------------------------------------------- V3 group-limited top-k
# Crafted tokens: 16 experts in 4 groups of 4, the 2 best groups compete, top-4. x = 0, so every
# score is sigmoid(0) = 0.5 and the biased score is 0.5 + bias, set exactly (multiples of 2^-24).
# The fp32 slack is then about 6e-7 per expert score and 1.4e-6 per group score: one ulp (2^-24,
# 6e-8) is a near-tie, 1/64 is a clear winner.

ULP = 2.0**-24
V3 = dict(scoring="sigmoid", top_k=4, routed_scaling_factor=2.5, n_group=4, topk_group=2)


def _v3_token(biased: list[float]):
    """(ref, judge) for one token whose biased scores are `biased` (16 values in [0.5, 1))."""
    e = len(biased)
    x, w = torch.zeros(1, 8, dtype=torch.bfloat16), torch.ones(e, 8, dtype=torch.bfloat16)
    bias = torch.tensor(biased, dtype=torch.float64).sub(0.5).float()
    assert torch.equal(bias + 0.5, torch.tensor(biased, dtype=torch.float32)), "crafted scores must be exact"
    ref = route(x, w, bias_f32=bias, **V3)

    def judge(ids: list[int]):
        got = torch.tensor([ids])
        weights = ref.scores_f32.gather(1, got.clamp(0, e - 1)).double()  # weights are not the point here
        weights = (weights / weights.sum(1, keepdim=True) * V3["routed_scaling_factor"]).float()
        return router_verdict(ref, got, weights, x=x, gate_weight=w, bias_f32=bias, scoring="sigmoid",
                              routed_scaling_factor=2.5, n_group=4, topk_group=2)
    return ref, judge


def _scores(g0, g1, g2, g3):
    return [*g0, *g1, *g2, *g3]


LOW = (0.5, 0.5, 0.5, 0.5)


def test_v3_reference_ids_pass_and_an_exact_group_tie_goes_to_the_lower_group():
    """Groups 1 and 2 have exactly equal group scores (0.75 + 0.625 = 0.6875 + 0.6875): the reference
    keeps group 1; a router that keeps group 2 broke the tie rule, a mismatch, not a near-tie."""
    ref, judge = _v3_token(_scores((0.9375, 0.875, 0.5, 0.5), (0.75, 0.625, 0.5, 0.5), (0.6875, 0.6875, 0.5, 0.5), LOW))
    assert sorted(ref.ids_i64[0].tolist()) == [0, 1, 4, 5]
    ok = judge([0, 1, 4, 5])
    assert ok.passed and ok.identical == 1, ok.summary()
    tie_lost = judge([0, 1, 8, 9])
    assert not tie_lost.passed and tie_lost.mismatched_tokens == [0] and tie_lost.near_ties == 0, tie_lost.summary()


def test_v3_group_near_tie_is_reported_not_failed():
    """Group 2 beats group 1 by one ulp of its group score: a backend keeping group 1 is a near-tie."""
    ref, judge = _v3_token(_scores((0.9375, 0.875, 0.5, 0.5), (0.75, 0.625, 0.5, 0.5),
                                   (0.6875, 0.6875 + ULP, 0.5, 0.5), LOW))
    assert sorted(ref.ids_i64[0].tolist()) == [0, 1, 8, 9]
    v = judge([0, 1, 4, 5])
    assert v.passed and v.near_ties == 1 and v.identical == 0, v.summary()


def test_v3_expert_near_tie_inside_the_kept_groups_is_reported_not_failed():
    """Experts 6 and 1 differ by one ulp at the k-th place, both inside the kept groups 0 and 1."""
    ref, judge = _v3_token(_scores((0.9375, 0.75, 0.5, 0.5), (0.875, 0.8125, 0.75 + ULP, 0.5), LOW, LOW))
    assert sorted(ref.ids_i64[0].tolist()) == [0, 4, 5, 6]
    v = judge([0, 4, 5, 1])
    assert v.passed and v.near_ties == 1, v.summary()
    clear_loser = judge([0, 4, 5, 2])  # expert 2 scores 0.5: 1/4 below expert 6
    assert not clear_loser.passed and clear_loser.mismatched_tokens == [0], clear_loser.summary()


@pytest.mark.parametrize("ids", [
    pytest.param([12, 0, 4, 5], id="ungrouped-top-k"),
    pytest.param([4, 5, 8, 0], id="expert-from-a-dropped-group"),
    pytest.param([4, 5, 8, 10], id="clear-loser-in-a-kept-group"),
    pytest.param([4, 5, 8, 8], id="same-expert-twice"),
    pytest.param([4, 5, 8, 16], id="expert-out-of-range"),
])
def test_v3_real_mismatches_fail(ids):
    """Groups 1 (0.875 + 0.875) and 2 (0.8125 + 0.8125) are kept, clearly; the global top-k would take
    experts 12 (0.96875) and 0 (0.9375) from the dropped groups 3 and 0."""
    ref, judge = _v3_token(_scores((0.9375, 0.5, 0.5, 0.5), (0.875, 0.875, 0.5, 0.5), (0.8125, 0.8125, 0.5, 0.5),
                                   (0.96875, 0.5, 0.5, 0.5)))
    assert sorted(ref.ids_i64[0].tolist()) == [4, 5, 8, 9]
    v = judge(ids)
    assert not v.passed and v.mismatched_tokens == [0] and v.near_ties == 0, v.summary()


def _fp32_v3_router(x, w, bias, *, top_k, n_group, topk_group, rsf):
    """DeepSeek-V3's router as a kernel computes it: fp32 logits, fp32 sigmoid, fp32 group sums,
    torch.topk (ties unspecified): an honest implementation whose only differences are roundings."""
    s = torch.sigmoid(x.float() @ w.float().T)
    biased = s + bias
    t, e = biased.shape
    gs = biased.view(t, n_group, -1).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(topk_group, dim=-1).indices, True)
    ids = biased.masked_fill(~keep.repeat_interleave(e // n_group, 1), -float("inf")).topk(top_k, dim=-1).indices
    wt = s.gather(1, ids)
    return ids, wt / wt.sum(-1, keepdim=True) * rsf


@pytest.mark.parametrize("seed", [0, 1])
def test_an_fp32_v3_router_passes_the_verdict_at_v3_width(seed):
    """256 experts in 8 groups, 4 kept, top-8 (DeepSeek-V3), bias scaled so groups compete closely."""
    x, w, bias = _wide_router(seed, t=512, e=256, h=1024)
    bias = bias * 0.1
    ref = route(x, w, scoring="sigmoid", top_k=8, routed_scaling_factor=2.5, bias_f32=bias, n_group=8, topk_group=4)
    ids, wt = _fp32_v3_router(x, w, bias, top_k=8, n_group=8, topk_group=4, rsf=2.5)
    v = router_verdict(ref, ids, wt, x=x, gate_weight=w, bias_f32=bias, scoring="sigmoid", routed_scaling_factor=2.5,
                       n_group=8, topk_group=4)
    assert v.passed, v.summary()
    wrong, _ = _fp32_v3_router(x, w, bias, top_k=8, n_group=8, topk_group=8, rsf=2.5)  # groups ignored
    assert not torch.equal(wrong, ids)
    bad = router_verdict(ref, wrong, wt, x=x, gate_weight=w, bias_f32=bias, scoring="sigmoid",
                         routed_scaling_factor=2.5, n_group=8, topk_group=4)
    assert not bad.passed, bad.summary()


@pytest.fixture(scope="module")
def ckpt_v3(tmp_path_factory):
    from verify.checkpoint.writer import make_checkpoint

    return Checkpoint.open(make_checkpoint(tmp_path_factory.mktemp("fixtures") / "mini-v3", "mini-v3")["out"])


@pytest.mark.parametrize("i", [1, 2, 3], ids=lambda i: f"layer{i}")
def test_an_fp32_v3_router_passes_the_verdict_on_mini_v3(ckpt_v3, i):
    layer = ckpt_v3.load_layer(i)
    cfg = ckpt_v3.config
    x = layer_inputs(ckpt_v3, layer, tokens=256, seed=5, device="cpu").x_ffn_bf16
    r = layer.router
    grp = dict(n_group=cfg.n_group, topk_group=cfg.topk_group)
    ref = route(x, r.gate_weight_bf16, scoring=cfg.scoring_func, top_k=cfg.top_k, bias_f32=r.gate_bias_f32,
                routed_scaling_factor=cfg.routed_scaling_factor, **grp)
    ids, wt = _fp32_v3_router(x, r.gate_weight_bf16, r.gate_bias_f32, top_k=cfg.top_k,
                              rsf=cfg.routed_scaling_factor, **grp)
    v = router_verdict(ref, ids, wt, x=x, gate_weight=r.gate_weight_bf16, bias_f32=r.gate_bias_f32,
                       scoring=cfg.scoring_func, routed_scaling_factor=cfg.routed_scaling_factor, **grp)
    assert v.passed, f"layer{i} " + v.summary()


def _perturbed_v3_router(seed: int, gain: float):
    """(verdict, tokens whose groups differ) for a router that ranks the reference scores moved by
    +-gain x the token's fp32 score bound (the sign a function of the value, so exact ties stay
    exact). Gate weights x 0.001 crowd the scores around 0.5: gaps of a few ulps, many near-ties."""
    from references.router import routing_weights_f32, select_experts_topk
    from verify.verdicts.routing import router_score_error_bound

    x, w, _ = _wide_router(seed, t=256, e=64, h=256)
    w = (w.float() * 0.001).bfloat16()
    bias = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 5e-5
    grp = dict(n_group=8, topk_group=3)
    ref = route(x, w, scoring="sigmoid", top_k=6, routed_scaling_factor=2.5, bias_f32=bias, **grp)
    err = router_score_error_bound(x, w, ref, scoring="sigmoid").amax(1, keepdim=True)
    s = ref.scores_f32.double()
    sign = torch.where(torch.frac(s * 2**26 * 0.618034) < 0.5, 1.0, -1.0)
    ids = select_experts_topk((s + gain * sign * err).float(), top_k=6, bias_f32=bias, **grp)
    wt = routing_weights_f32(ref.scores_f32, ids, routed_scaling_factor=2.5, renormalize=True)
    v = router_verdict(ref, ids, wt, x=x, gate_weight=w, bias_f32=bias, scoring="sigmoid", routed_scaling_factor=2.5,
                       **grp)
    moved = sum(set((a // 8).tolist()) != set((b // 8).tolist()) for a, b in zip(ids, ref.ids_i64))
    return v, moved


def test_v3_score_errors_within_the_bound_are_near_ties_at_both_levels():
    v, moved = _perturbed_v3_router(7, 0.9)
    assert v.passed and v.near_ties >= 2 and moved >= 1, (moved, v.summary())


def test_v3_score_errors_beyond_the_bound_are_mismatches():
    v, _ = _perturbed_v3_router(7, 4.0)
    assert not v.passed and len(v.mismatched_tokens) >= 2, v.summary()
