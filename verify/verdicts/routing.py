"""Stage verdicts that need more than byte equality (DESIGN.md "Verdicts").

Router: a backend's expert ids must equal the reference's except at near-ties, i.e. tokens
whose k-th and (k+1)-th biased scores are closer than the backend's score error can
explain; near-ties are reported, not failed. Its weights must lie within the error bound
of an fp32 computation of the same formula.

DeepSeek-V3 group-limited top-k (n_group, topk_group) is judged at both levels: a token's ids may
come from other groups only where the group scores (sum of each group's two largest biased
scores) are within the group slack, and other experts only where the expert scores are within the
expert slack; exact ties, in either, must go to the lower id as in the reference.

Score error bound (per token, expert), for a backend computing in float32:
    logits: |l - l_ref| <= gamma(H + 1, 2^-24) * sum_h |x_h w_h|          (fp32 GEMM, one final rounding)
    scores: |s - s_ref| <= |ds/dl| * logit bound + SCORE_ULPS ulp(s)       (elementwise fp32 math)
    weights: |w - w_ref| <= w_ref * (rel_s[k] + max_j rel_s[j] + (k + 4) u) (sum of k, divide, scale)
with ds/dl = sigmoid(l) / (2 sqrt(softplus(l))) for sqrtsoftplus and s (1 - s) for sigmoid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from references.gemm import gamma
from references.router import Routing

__all__ = ["SCORE_ULPS", "RouterVerdict", "router_score_error_bound", "router_verdict"]

U32 = 2.0**-24
SCORE_ULPS = 4  # softplus/log1p/exp/sqrt or sigmoid in fp32: a few ulps each, 4 in total is generous for CUDA libm


@dataclass
class RouterVerdict:
    """tokens; identical: tokens whose id sets are equal; near_ties: tokens whose sets differ within
    the bound; mismatched_tokens: differing beyond it (first 16); weight_violations: weights outside
    the bound on identical tokens; max_weight_ratio: max |w - w_ref| / bound; topk_overlap: mean
    fraction of shared ids; first_weight_bound: (token, bound / |w_ref|) of the first judged token's first
    weight, or None when no token's weights were judged (a negative control plants outside it)."""

    tokens: int
    identical: int
    near_ties: int
    mismatched_tokens: list[int] = field(default_factory=list)
    weight_violations: int = 0
    max_weight_ratio: float = 0.0
    topk_overlap: float = 1.0
    first_weight_bound: tuple[int, float] | None = None

    @property
    def passed(self) -> bool:
        return not self.mismatched_tokens and self.weight_violations == 0

    def summary(self) -> str:
        return (f"router: {self.identical}/{self.tokens} tokens identical, {self.near_ties} near-ties, "
                f"{len(self.mismatched_tokens)} mismatched (first: {self.mismatched_tokens[:4]}), "
                f"{self.weight_violations} weights outside the bound (max ratio {self.max_weight_ratio:.3g}), "
                f"top-k overlap {self.topk_overlap:.4f}")


def router_score_error_bound(x: Tensor, gate_weight: Tensor, ref: Routing, *, scoring: str) -> Tensor:
    """[T, E] float64 bound on |s_backend - s_ref| for an fp32 backend (module docstring)."""
    abs_dot = x.double().abs() @ gate_weight.double().abs().T
    logit_bound = gamma(x.shape[1] + 1, U32) * abs_dot
    l64, s64 = ref.logits_f32.double(), ref.scores_f32.double()
    if scoring == "sqrtsoftplus":
        sp = torch.clamp(l64, min=0) + torch.log1p(torch.exp(-l64.abs()))
        deriv = torch.sigmoid(l64) / (2 * torch.sqrt(sp).clamp_min(1e-300))
    elif scoring == "sigmoid":
        deriv = s64 * (1 - s64)
    else:
        raise ValueError(f"scoring={scoring!r}: the router verdict covers 'sqrtsoftplus' and 'sigmoid'")
    ulp = torch.exp2(torch.floor(torch.log2(s64.abs().clamp_min(2.0**-126)))) * 2.0**-23
    return deriv * logit_bound + SCORE_ULPS * ulp


def router_verdict(ref: Routing, got_ids_i64: Tensor, got_weights_f32: Tensor, *, x: Tensor, gate_weight: Tensor,
                   bias_f32: Tensor | None, scoring: str, routed_scaling_factor: float, renormalize: bool = True,
                   n_group: int | None = None, topk_group: int | None = None) -> RouterVerdict:
    """Compare a backend's routing with the reference's on the same x (module docstring).

    A token whose id set differs is a near-tie only if every expert the backend chose instead
    scores within the error of the reference's k-th biased score and every reference expert it
    dropped scores within the error of the (k+1)-th, and no exact tie was resolved to the higher
    expert id (the reference's rule): any other difference is a mismatch. With n_group > 1
    (DeepSeek-V3 group-limited top-k) the same holds at both levels, see `_grouped_near_tie`.
    A token that names an expert twice or one out of range is a mismatch. Weights are checked on
    identical and near-tie tokens against the reference scores at the backend's ids.
    """
    grouped = bool(n_group and n_group > 1) and not ref.hashed
    t, k = ref.ids_i64.shape
    e = ref.scores_f32.shape[1]
    if grouped and (not topk_group or not 1 <= topk_group <= n_group or e % n_group):
        raise ValueError(f"n_group={n_group}, topk_group={topk_group}: the router verdict needs E={e} divisible "
                         f"by n_group and 1 <= topk_group <= n_group")
    if got_ids_i64.shape != (t, k) or got_weights_f32.shape != (t, k):
        raise ValueError(f"got ids {tuple(got_ids_i64.shape)} / weights {tuple(got_weights_f32.shape)}: "
                         f"expected [{t}, {k}] like the reference")
    err = router_score_error_bound(x, gate_weight, ref, scoring=scoring).cpu()
    ref_ids, got_ids = ref.ids_i64.cpu(), got_ids_i64.cpu()
    scores = ref.scores_f32.double().cpu()
    same = (torch.sort(ref_ids, 1).values == torch.sort(got_ids, 1).values).all(1)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ref_ids, got_ids)]
    v = RouterVerdict(tokens=t, identical=int(same.sum()), near_ties=0,
                      topk_overlap=sum(overlap) / t if t else 1.0)
    explained = same.clone()
    if not ref.hashed:  # hash ids are a table lookup: any difference is a mismatch
        # the reference ranks the fp32 sum s + bias: its exact ties are ties of these values
        f32 = ref.scores_f32.cpu()
        biased = (f32 if bias_f32 is None else f32 + bias_f32.float().cpu()).double()
        top = torch.sort(biased, dim=1, descending=True).values
        for i in (~same).nonzero().flatten().tolist():
            g, r = got_ids[i].tolist(), ref_ids[i].tolist()
            if len(set(g)) != k or not all(0 <= j < e for j in g):
                explained[i] = False
            elif grouped:
                # both sides' score errors + the fp32 bias add, at the largest biased score of the token
                slack = 2 * (float(err[i].max()) + abs(float(top[i, 0])) * U32)
                explained[i] = _grouped_near_tie(biased[i], g, k=k, n_group=n_group, topk_group=topk_group,
                                                 slack=slack, by_max=bias_f32 is None)
            else:
                slack = 2 * (float(err[i].max()) + abs(float(top[i, k - 1])) * U32)
                kth, next_ = float(top[i, k - 1]), float(top[i, k]) if k < e else -float("inf")
                added, dropped = list(set(g) - set(r)), list(set(r) - set(g))
                ok = bool((biased[i, added] >= kth - slack).all()) and bool((biased[i, dropped] <= next_ + slack).all())
                # an EXACT tie (equal biased scores in the reference) is decided by the tie rule, not by
                # rounding: the lower expert id wins, so picking the higher one is a mismatch
                explained[i] = ok and not any(float(biased[i, a]) == float(biased[i, d]) and a > d
                                              for a in added for d in dropped)
    v.near_ties = int((explained & ~same).sum())
    v.mismatched_tokens = [int(i) for i in (~explained).nonzero().flatten()][:16]
    rows = explained.nonzero().flatten()
    if rows.numel():
        ids = got_ids[rows]
        s_sel = scores[rows].gather(1, ids)
        w_exp = (s_sel / s_sel.sum(1, keepdim=True) if renormalize else s_sel) * routed_scaling_factor
        rel = err[rows].gather(1, ids) / s_sel.clamp_min(1e-300)
        bound = w_exp * (rel + rel.amax(1, keepdim=True) + (k + 4) * U32)  # k-term sum, divide, scale, roundings
        ratio = (got_weights_f32.double().cpu()[rows] - w_exp).abs() / bound.clamp_min(1e-300)
        # a NaN / Inf weight compares false with any bound: counted as a violation (garbage never passes)
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, float("inf")))
        v.weight_violations = int((ratio > 1).sum())
        v.max_weight_ratio = float(ratio.max())
        v.first_weight_bound = (int(rows[0]), float(bound[0, 0] / w_exp[0, 0].abs().clamp_min(1e-300)))
    return v


def _outranks(a: float, b: float, ia: int, ib: int, slack: float) -> bool:
    """Whether `a` (id ia) ranks above `b` (id ib) whatever fp32 errors within `slack` did: by more
    than the slack, or an exact tie won by the lower id (exact ties stay exact and follow the rule)."""
    return a - b > slack or (a == b and ia < ib)


def _grouped_near_tie(biased: Tensor, got: list[int], *, k: int, n_group: int, topk_group: int, slack: float,
                      by_max: bool) -> bool:
    """Whether a token's differing V3 ids are explained by fp32 errors within `slack` per biased score.

    The reference keeps the topk_group groups of highest group score (the sum of each group's two
    largest biased scores, or its largest without a bias) and takes the top-k experts of those
    groups, exact ties to the lower id at both levels. The backend's ids are explained when some
    set A of topk_group groups holds every group they come from and (1) no group outside A
    certainly outranks one inside (a group-score gap above the group slack: each of the two summed
    scores off by `slack`, plus the fp32 sum's rounding, or an exact tie won by the lower group id)
    and (2) within A no expert left out certainly outranks one chosen (expert slack, same tie rule).
    The groups the ids come from, and every group that certainly outranks one of them, must be in
    A; the remaining places are tried in every combination (at most C(n_group, topk_group)).
    """
    size = biased.numel() // n_group
    grouped = biased.view(n_group, size)
    gs = (grouped.amax(-1) if by_max else grouped.topk(min(2, size), dim=-1).values.sum(-1)).tolist()
    gslack = slack if by_max else 2 * slack + 2 * max(abs(s) for s in gs) * U32
    b = biased.tolist()

    def certainly_above(h: int, a: int) -> bool:
        return _outranks(gs[h], gs[a], h, a, gslack)

    need = {j // size for j in got}
    while True:  # close under "certainly outranks a needed group"
        more = {h for h in range(n_group) if h not in need and any(certainly_above(h, a) for a in need)}
        if not more:
            break
        need |= more
    if len(need) > topk_group:
        return False
    chosen = set(got)
    lowest = min(b[c] for c in chosen)
    highest_id_at = {}  # chosen score -> the highest chosen id with it (an exact tie must not lose to a lower id)
    for c in chosen:
        highest_id_at[b[c]] = max(c, highest_id_at.get(b[c], -1))
    # groups that could be among the topk_group best at all (fewer than topk_group certainly above them)
    rest = [h for h in range(n_group) if h not in need and
            sum(certainly_above(o, h) for o in range(n_group) if o != h) < topk_group]
    for extra in itertools.combinations(rest, topk_group - len(need)):
        groups = need | set(extra)
        if any(certainly_above(h, a) for h in range(n_group) if h not in groups for a in groups):
            continue
        left_out = [j for grp in groups for j in range(grp * size, (grp + 1) * size) if j not in chosen]
        if not any(b[u] - lowest > slack or u < highest_id_at.get(b[u], -1) for u in left_out):
            return True
    return False
