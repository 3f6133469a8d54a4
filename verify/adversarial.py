"""Adversarial inputs (issue 26, item 1): seeded generators that reach the corners where the NVFP4 / MoE
bugs of 2026 lived, which random data never reaches.

Every `make_*` function is deterministic in its seed (verify.rng.CounterRng: the same bits on any CPU,
on CUDA and under any torch release) and builds its tensors on `device`. The Hypothesis strategies
(`*_params`) draw only parameters (seed, sizes, a corner's knob); the tensors come from the `make_*`
functions, so a shrunk counterexample replays from its printed arguments. These are test-data
generators, not references: nothing here decides what a kernel should compute.

corner (public bug report)                        generator                     check that sees a backend fail it
exact ties at the top-k boundary, duplicated      make_router_ties (rows),      router ids (an exact tie goes to the
  biases (NaN weights, "!!!!" at long context)    router_tie_layer (a layer)      lower id), moe.block bound
f32 bias a bf16 copy would flip                   make_router_ties(bias_gap=)   router ids
all-very-negative logits: log(1 + exp(x)) is 0    make_negative_logit_router    router ids (no bias) / weights (0/0)
  in fp32 for x <= NAIVE_SOFTPLUS_ZERO_BELOW
gate / up beyond +-swiglu_limit (clamp dropped)   clamp_active_inputs           moe.swiglu rounding, moe.l1_fused
                                                                                  interval, moe.block bound
distinct per-expert, per-projection global        distinct_global_scales        moe.l1 / moe.l2 bound
  scales (gate/up mix-up, another expert's scale)
E4M3 block-scale bytes 0x01..0x3F, global scale   make_low_scale_linear         GEMM bound
  1.0 (Marlin's scale conversion underflow)
raw partial sums above 65504 (an fp16 epilogue    make_large_partial_sum_case   GEMM bound (non-finite output)
  cast before the global scale)
NaN / Inf / huge values in the activation rows    garbage_past_count,           moe.block valid
  past the valid token count (not only in the     stale_token_ids
  scale padding)
more than 8192 (token, expert) pairs              tokens_for_pairs_above        moe.dispatch exact, moe.combine /
                                                                                  moe.block bound
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from verify.checkpoint import GatedMlp, Nvfp4Linear, Router
from verify.rng import CounterRng

__all__ = ["NAIVE_SOFTPLUS_ZERO_BELOW", "PAIRS_LIMIT", "GARBAGE_KINDS", "HUGE_GAINS", "RouterRows", "make_router_ties",
           "router_tie_layer",
           "make_negative_logit_router", "clamp_active_inputs", "clamp_active_fraction", "distinct_global_scales",
           "make_low_scale_linear", "LOW_SCALE_BYTES", "LargeSumCase", "make_large_partial_sum_case",
           "garbage_past_count", "stale_token_ids", "tokens_for_pairs_above",
           "router_tie_params", "negative_logit_params", "low_scale_params"]

# fp32: 1 + e^x rounds to 1 once e^x <= 2^-24 (half an ulp of 1, a tie to even), i.e. x <= -24 ln 2 = -16.6355;
# a softplus written as log(1 + exp(x)) returns exactly 0 there (sqrt-softplus scores 0, weights 0 / 0)
NAIVE_SOFTPLUS_ZERO_BELOW = -24 * math.log(2.0)
# the (token, expert) pair count above which a shipped dispatch went wrong (issue 26)
PAIRS_LIMIT = 8192
GARBAGE_KINDS = ("nan-inf", "huge", "mixed")
HUGE_GAINS = (4.0, 2.0**20, 16.0, 2.0)  # powers of two: exact in bf16 (garbage_past_count)
LOW_SCALE_BYTES = (0x01, 0x3F)  # E4M3 block-scale bytes below 0x40 (2.0): 0x01..0x07 are the subnormals

# bias levels of the tie rows: the rows' logits stay within +-8 (gate N(0, 0.05^2), H <= a few thousand), where
# sqrt(softplus(l)) < 3, so +-8 separates the groups
_BIAS_HIGH, _BIAS_TIE, _BIAS_LOW = 8.0, 0.25, -8.0


@dataclass(frozen=True)
class RouterRows:
    """Router inputs: x_bf16 [T, H], gate_bf16 [E, H], bias_f32 [E] or None; `tied` = (a, b), a < b: the
    experts whose keys (score + bias) are bitwise equal on every token (bias_gap 0) and sit at sorted
    positions k-1 and k of every token's ranking, straddling the top-k boundary."""

    x_bf16: Tensor
    gate_bf16: Tensor
    bias_f32: Tensor | None
    tied: tuple[int, int]
    top_k: int


def make_router_ties(tokens: int, experts: int, hidden: int, top_k: int, *, seed: int,
                     device: str | torch.device = "cpu", bias_gap: float = 0.0) -> RouterRows:
    """Router rows with an exact tie at the top-k boundary on every token, and duplicated biases.

    Experts a < b (drawn) get the same gate row and the same bias, so their fp32 logits, scores and keys
    are bitwise equal in the reference, and in any GEMM that sums every output column in the same order
    (the tests check the keys on the device they run on). k-1 other experts
    share a bias of +8 (always selected), the rest share -8 (never): a and b are the k-th and (k+1)-th
    of every token, and the reference's rule (the lower id wins an exact tie) alone decides the k-th slot.
    bias_gap > 0 adds the gap to b's float32 bias: a gap below half a bf16 ulp of the tie bias (0.25:
    2^-10) makes b win in float32 and tie again once a backend stores the bias in bf16 (then a wins)."""
    if not 1 <= top_k < experts - 1 or experts < 3:
        raise ValueError(f"top_k={top_k}, experts={experts}: need 1 <= top_k < experts - 1")
    g = CounterRng(seed, device=device)
    x = g.normal((tokens, hidden)).to(torch.bfloat16)
    gate = (g.normal((experts, hidden)) * 0.05).to(torch.bfloat16)
    perm = g.permutation(experts).tolist()
    high, (a, b) = perm[:top_k - 1], sorted(perm[top_k - 1:top_k + 1])
    gate[b] = gate[a]
    bias = torch.full((experts,), _BIAS_LOW, dtype=torch.float32, device=device)
    bias[high] = _BIAS_HIGH
    bias[a] = bias[b] = _BIAS_TIE
    if bias_gap:
        if not 0 < bias_gap < 2.0**-10:
            raise ValueError(f"bias_gap={bias_gap}: expected in (0, 2^-10) (below half a bf16 ulp of {_BIAS_TIE})")
        bias[b] = _BIAS_TIE + bias_gap
    return RouterRows(x, gate, bias, (a, b), top_k)


def router_tie_layer(router: Router, top_k: int, *, seed: int) -> tuple[Router, tuple[int, int]]:
    """A fixture layer's router (a checkpoint Router with a bias) rebuilt so that, on ANY input, two experts a < b
    tie exactly at the top-k boundary of every token: b gets a's gate row and bias, k-1 drawn experts a bias of
    +8, the rest -8, the pair 0.25 (make_router_ties' levels; the layer's own gate rows are kept otherwise).
    Returns (router, (a, b))."""
    if router.gate_bias_f32 is None or router.tid2eid_i64 is not None:
        raise ValueError("router: expected a score-routed router with a bias (layers >= num_hash_layers)")
    e = router.gate_weight_bf16.shape[0]
    perm = CounterRng(seed).permutation(e).tolist()
    high, (a, b) = perm[:top_k - 1], sorted(perm[top_k - 1:top_k + 1])
    gate = router.gate_weight_bf16.clone()
    gate[b] = gate[a]
    bias = torch.full_like(router.gate_bias_f32, _BIAS_LOW)
    bias[high] = _BIAS_HIGH
    bias[a] = bias[b] = _BIAS_TIE
    return dataclasses.replace(router, gate_weight_bf16=gate, gate_bias_f32=bias), (a, b)


def make_negative_logit_router(tokens: int, experts: int, hidden: int, *, seed: int, lo: float = -80.0,
                               hi: float = -17.0, bias: bool = True,
                               device: str | torch.device = "cpu") -> RouterRows:
    """Router rows whose every logit lies in [lo, hi] (default [-80, -17]: below NAIVE_SOFTPLUS_ZERO_BELOW,
    where log(1 + exp(x)) is 0 in fp32, and above -87.3, where e^x leaves the fp32 normals, so a correct
    fp32 kernel keeps its score error within a few ulps). x[:, 0] = 1 carries a per-expert offset in the
    gate's column 0; the other columns add noise of about +-0.2. bias: a small float32 bias (N(0, 0.05)),
    so the selection runs on bias + tiny scores, else none. `tied` is (-1, -1): no tie is planted."""
    if not NAIVE_SOFTPLUS_ZERO_BELOW > hi > lo > -87.0:
        raise ValueError(f"[lo, hi] = [{lo}, {hi}]: expected -87 < lo < hi < {NAIVE_SOFTPLUS_ZERO_BELOW:.4f}")
    g = CounterRng(seed, device=device)
    x = g.normal((tokens, hidden))
    x[:, 0] = 1.0
    gate = g.normal((experts, hidden)) * (0.01 / max(1.0, hidden / 256) ** 0.5)
    margin = 1.0  # the noise of the other columns stays well inside it
    gate[:, 0] = lo + margin + (hi - lo - 2 * margin) * g.uniform(experts)
    b = (g.normal(experts) * 0.05).to(torch.float32) if bias else None
    return RouterRows(x.to(torch.bfloat16), gate.to(torch.bfloat16), b, (-1, -1), 0)


def clamp_active_inputs(x_ffn_bf16: Tensor, *, gain_log2: int) -> Tensor:
    """x scaled by 2^gain_log2 (exact in bf16 unless it overflows): the MoE's gate / up grow by the same
    factor (before quantization), so a gain of a few octaves drives a measured fraction of them beyond
    +-swiglu_limit (clamp_active_fraction)."""
    out = (x_ffn_bf16.float() * 2.0**gain_log2).to(torch.bfloat16)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"gain_log2={gain_log2}: x_ffn overflows bf16")
    return out


def clamp_active_fraction(gate: Tensor, up: Tensor, limit: float) -> float:
    """The fraction of (row, column) elements the SwiGLU clamp changes: gate > L or |up| > L."""
    active = (gate.double() > limit) | (up.double().abs() > limit)
    return float(active.double().mean()) if active.numel() else 0.0


def distinct_global_scales(experts: GatedMlp) -> GatedMlp:
    """The routed experts with a different weight_scale_2 for every (expert, projection): expert e of
    projection p (w1, w3, w2 = 0, 1, 2) multiplied by 2^((3e + p) % 7 - 3), an exact power of two, so every
    expert and the gate / up pair differ (a backend that takes another expert's scale, or the gate's for
    the up projection, moves its outputs by a visible factor). The weights' bytes are unchanged."""
    out = []
    for p, lin in enumerate((experts.w1, experts.w3, experts.w2)):
        if not isinstance(lin, Nvfp4Linear) or lin.weight_scale_2_f32.dim() != 1:
            raise TypeError(f"{getattr(lin, 'module', lin)}: expected an NVFP4 expert stack")
        e = torch.arange(lin.weight_scale_2_f32.shape[0], device=lin.weight_scale_2_f32.device)
        gain = torch.exp2(((3 * e + p) % 7 - 3).to(torch.float32))
        out.append(dataclasses.replace(lin, weight_scale_2_f32=(lin.weight_scale_2_f32 * gain).contiguous()))
    return GatedMlp(*out)


def make_low_scale_linear(n: int, k: int, *, seed: int, experts: int | None = None,
                          device: str | torch.device = "cpu") -> Nvfp4Linear:
    """A checkpoint NVFP4 linear (or a stack of `experts`) whose E4M3 block-scale bytes cover 0x01..0x3F
    (block scales 2^-9 .. 1.875, the subnormals included) with weight_scale_2 = 1.0: the scales Marlin's
    conversion underflowed. Codes are random (all 16), input_scale 0.01."""
    if k % 16:
        raise ValueError(f"k={k}: expected a multiple of 16")
    g = CounterRng(seed, device=device)
    lead = (experts,) if experts else ()
    codes = (g.u32((*lead, n, k)) % 16).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    lo, hi = LOW_SCALE_BYTES
    sf = (lo + g.u32((*lead, n, k // 16)) % (hi - lo + 1)).to(torch.uint8)
    every = min(sf.numel(), hi - lo + 1)  # every byte once where the grid holds them all
    sf.view(-1)[:every] = torch.arange(lo, lo + every, dtype=torch.uint8, device=sf.device)
    ones = torch.ones(lead, dtype=torch.float32, device=sf.device)
    return Nvfp4Linear("adversarial.low_scale", packed, sf.view(torch.float8_e4m3fn), ones, ones * 0.01)


@dataclass(frozen=True)
class LargeSumCase:
    """x_bf16 [M, K] whose every element has magnitude `amax` (signs sigma_k shared by all rows) and a
    weight whose codes are +-6 with the same signs and block scales 448 (0x7E): every product of decoded
    operands is 6 * 448 * 6 * 448, so the raw (pre-global-scale) accumulator reaches K * 2688^2 (above
    65504 for any K >= 1) while the scaled output K * amax * w_amax stays small."""

    x_bf16: Tensor
    weight: Nvfp4Linear
    raw_partial_sum: float


def make_large_partial_sum_case(m: int, n: int, k: int, *, seed: int, amax: float = 0.5,
                                device: str | torch.device = "cpu") -> LargeSumCase:
    """See LargeSumCase; the weight's global decode scale makes w_amax = 2^-10 (so y = K * amax * 2^-10)."""
    if k % 16:
        raise ValueError(f"k={k}: expected a multiple of 16")
    g = CounterRng(seed, device=device)
    sign = (g.u32(k) % 2).to(torch.bool)
    x = torch.where(sign, -amax, amax).to(torch.float32).expand(m, k).to(torch.bfloat16).contiguous()
    codes = torch.where(sign, 0xF, 0x7).to(torch.uint8).expand(n, k)  # -6 / +6
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    sf = torch.full((n, k // 16), 0x7E, dtype=torch.uint8, device=x.device).view(torch.float8_e4m3fn)
    w_dec = torch.tensor(2.0**-10 / 2688.0, dtype=torch.float32, device=x.device)
    lin = Nvfp4Linear("adversarial.large_sum", packed, sf, w_dec, torch.tensor(amax / 2688.0, device=x.device))
    return LargeSumCase(x, lin, float(k) * 2688.0**2)


def garbage_past_count(x_bf16: Tensor, n: int, kind: str = "mixed") -> Tensor:
    """A copy of x whose rows t >= n hold garbage (the stale tail of a buffer captured at capacity):
    "nan-inf" cycles NaN, +Inf, -Inf over the elements; "huge": tail row i is valid row i mod n times
    HUGE_GAINS[i mod 4] (4, 2^20, 16, 2: finite; a kernel that lets those rows into an amax moves every global
    scale, and a kernel that quantizes them with the valid rows' scale saturates the larger elements, so their
    gate / up, and h, outgrow the valid rows' by a margin that depends on the weights: a spread of gains, since
    a single one can land where saturation cancels the gain); "mixed" (one pass that sees both classes):
    nan-inf in the tail's even rows, huge in its odd rows."""
    if kind not in GARBAGE_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {GARBAGE_KINDS}")
    if n < 1 and kind != "nan-inf":
        raise ValueError(f"n={n}: huge garbage is made from the valid rows; needs n >= 1")
    out = x_bf16.clone()
    tail = out[n:]
    if not tail.numel():
        return out
    idx = torch.arange(tail.numel(), device=out.device).view(tail.shape)
    specials = torch.tensor([float("nan"), float("inf"), float("-inf")], device=out.device)[idx % 3]
    rows = torch.arange(tail.shape[0], device=out.device)
    shape = (-1, *([1] * (tail.dim() - 1)))
    if kind != "nan-inf":
        hop = rows // 2 if kind == "mixed" else rows  # the mixed pattern's huge rows are its odd ones
        gains = torch.tensor(HUGE_GAINS, device=out.device)[hop % len(HUGE_GAINS)].view(shape)
        huge = x_bf16[:n].float()[hop % n] * gains
    if kind == "mixed":
        tail.copy_(torch.where((rows % 2 == 1).view(shape), huge, specials).to(out.dtype))
    else:
        tail.copy_((specials if kind == "nan-inf" else huge).to(out.dtype))
    return out


def stale_token_ids(token_ids_i64: Tensor | None, n: int, vocab: int) -> Tensor | None:
    """Hash layers: token ids whose entries t >= n are stale but in range (other tokens' ids shifted by
    one), so a kernel that ignores the count routes those tokens to real experts (an id out of range would
    reach no expert and hide the bug)."""
    if token_ids_i64 is None:
        return None
    out = token_ids_i64.clone()
    out[n:] = (token_ids_i64.roll(1, 0)[n:] + 1) % vocab
    return out


def tokens_for_pairs_above(limit: int, top_k: int, *, margin: int = 16) -> int:
    """The smallest token count whose (token, expert) pairs exceed `limit` (PAIRS_LIMIT), plus `margin` tokens."""
    return limit // top_k + 1 + margin


# ============================================================================= Hypothesis strategies (parameters only)


def router_tie_params():
    """Hypothesis: keyword arguments of make_router_ties (tokens 1..64, experts 8..64, hidden 16..256, 1 <= k
    < experts - 1, any seed)."""
    from hypothesis import strategies as st  # noqa: PLC0415 (a test dependency)

    @st.composite
    def draw(d):
        e = d(st.integers(8, 64))
        return {"tokens": d(st.integers(1, 64)), "experts": e, "hidden": d(st.sampled_from((16, 32, 96, 256))),
                "top_k": d(st.integers(1, min(8, e - 2))), "seed": d(st.integers(0, 2**31 - 1))}
    return draw()


def negative_logit_params():
    """Hypothesis: keyword arguments of make_negative_logit_router (lo in [-80, -20], hi in (lo + 3, -17])."""
    from hypothesis import strategies as st  # noqa: PLC0415

    @st.composite
    def draw(d):
        lo = d(st.floats(-80.0, -20.0))
        return {"tokens": d(st.integers(1, 32)), "experts": d(st.integers(8, 64)),
                "hidden": d(st.sampled_from((16, 64, 256))), "seed": d(st.integers(0, 2**31 - 1)), "lo": lo,
                "hi": d(st.floats(lo + 3.0, -17.0)), "bias": d(st.booleans())}
    return draw()


def low_scale_params():
    """Hypothesis: keyword arguments of make_low_scale_linear (n 1..64, k a multiple of 16 up to 1024)."""
    from hypothesis import strategies as st  # noqa: PLC0415

    return st.fixed_dictionaries({"n": st.integers(1, 64), "k": st.integers(4, 64).map(lambda b: 16 * b),
                                  "seed": st.integers(0, 2**31 - 1)})
