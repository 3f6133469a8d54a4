"""The sm90 MoE block beyond the stage verdicts (which test_layer_stages / test_backend_ops run over
backends): router, dispatch, combine, grouped quantize, SwiGLU + requant and the whole block.

CPU: every kernel runs under the Triton interpreter (TRITON_INTERPRET=1) in child processes (the
interpreter must be chosen before triton decorates the kernels, and this process may already hold
compiled ones; two side by side, verify/tests/_interpreter_children.py); each case below is one test item
reading that run's JSON. Expected values come from
references/ (router, dispatch, combine, quantize bytes), from the emulator's stage composition on the
same backend ops (verify.backends.run_moe_block: the block equals its own stages, bit for bit), and
from the block itself on fewer tokens (valid-token count). `slow` (minutes each under the interpreter):
the block cases, and the harness's MoE stage verdicts of mini-v4 through the sm90 adapter.

GPU (markers gpu, sm90): CUDA graph of the whole block captured once at capacity and replayed after
new values, a new routing (one hot expert set: zero-token experts), fewer tokens (down to 1), new
static scales and new hash token ids, bit-identical to eager; determinism; compute-sanitizer memcheck
and racecheck on a small block.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from verify.tests._interpreter_children import child_main, run_cases

CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[2]

# ============================================================================= interpreter cases


def _t(x):
    return torch.as_tensor(x)


def _case_router(kind: str) -> str:
    from references.router import route
    from verify.verdicts.routing import router_verdict
    from kernels.sm90 import moe_router

    g = torch.Generator().manual_seed(len(kind))
    t, e, h, k = 37, 16, 96, 6
    scoring, bias, tid, tok, ng, tg = "sqrtsoftplus", True, None, None, None, None
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    w = (torch.randn(e, h, generator=g) * 0.05).to(torch.bfloat16)
    if kind == "ties":  # experts 4/5 and 9/10 identical: every token has exact ties
        w[5], w[10] = w[4], w[9]
    if kind in ("sigmoid-grouped", "sigmoid-grouped-nobias"):
        scoring, e, k, ng, tg = "sigmoid", 64, 8, 8, 3
        w = (torch.randn(e, h, generator=g) * 0.05).to(torch.bfloat16)
        bias = kind == "sigmoid-grouped"
    if kind == "sigmoid":
        scoring = "sigmoid"
    if kind == "hash":
        bias = False
        tid = torch.randint(0, e, (500, k), generator=g)
        tok = torch.randint(0, 500, (t,), generator=g)
    b = (torch.randn(e, generator=g) * 0.1) if bias else None
    if kind == "ties":
        b[5], b[10] = b[4], b[9]
    ids, wt, logits = moe_router.launch(x, w, top_k=k, routed_scaling_factor=2.5, scoring=scoring, bias_f32=b,
                                        tid2eid=tid, token_ids_i64=tok, n_group=ng, topk_group=tg)
    r = route(x, w, scoring=scoring, top_k=k, routed_scaling_factor=2.5, bias_f32=b, tid2eid=tid, token_ids_i64=tok,
              n_group=ng, topk_group=tg)
    assert torch.equal(ids, r.ids_i64), f"ids differ at {(ids != r.ids_i64).nonzero()[:4].tolist()}"
    if ng:  # router_verdict does not model group-limited ties: ids equal and weights within 4 ulps
        rel = ((wt.double() - r.weights_f32.double()).abs() / r.weights_f32.double()).max().item()
        assert rel < 4 * 2.0**-24 * (k + 4), f"weights rel error {rel}"
        return f"ids equal, weights rel error {rel:.3g}"
    v = router_verdict(r, ids, wt, x=x, gate_weight=w, bias_f32=b, scoring=scoring, routed_scaling_factor=2.5)
    assert v.passed and v.identical == t, v.summary()
    return v.summary()


def _case_router_split_k() -> str:
    """The split-K logits (small T) and the one-program logits give the same bits, for the batch and for
    each token alone: H = 1088 is 17 tiles, 9 chunks of 2 (the last one short)."""
    from kernels.sm90 import moe_router

    g = torch.Generator().manual_seed(3)
    t, e, h, k = 5, 80, 1088, 6
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    w = (torch.randn(e, h, generator=g) * 0.05).to(torch.bfloat16)
    b = torch.randn(e, generator=g) * 0.1
    outs = {s: moe_router.launch(x, w, top_k=k, routed_scaling_factor=2.5, bias_f32=b, split_k=s) for s in (False, True)}
    for name, a, c in zip(("ids", "weights", "logits"), outs[False], outs[True]):
        assert torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                           c.view(torch.int32) if c.is_floating_point() else c), f"split-K {name} differ from one program"
    alone = moe_router.launch(x[2:3].contiguous(), w, top_k=k, routed_scaling_factor=2.5, bias_f32=b, split_k=True)
    assert torch.equal(alone[2].view(torch.int32), outs[False][2][2:3].view(torch.int32)), "token 2 alone differs"
    return f"{t} tokens x {e} experts, H={h}: split-K and one-program logits, ids and weights bit-equal"


def _case_router_hash_out_of_range() -> str:
    from kernels.sm90 import moe_router

    x = torch.randn(3, 32).to(torch.bfloat16)
    w = torch.randn(8, 32).to(torch.bfloat16)
    tid = torch.randint(0, 8, (10, 2))
    ids, _, _ = moe_router.launch(x, w, top_k=2, routed_scaling_factor=1.0, tid2eid=tid,
                                  token_ids_i64=torch.tensor([3, 10, -1]))
    assert torch.equal(ids[0], tid[3]) and bool((ids[1:] == -1).all()), ids.tolist()
    return "token ids outside [0, vocab) give ids -1"


def _case_dispatch(t: int, k: int, e: int, hot: bool, n: int | None) -> str:
    from references import moe as ref_moe
    from kernels.sm90 import moe_dispatch

    g = torch.Generator().manual_seed(t * 31 + k + e)
    ids = torch.randint(0, e, (t, k), generator=g)
    if hot:  # every token to the first token's experts: the others have zero rows
        ids[:] = ids[0]
    nv = None if n is None else torch.tensor([n], dtype=torch.int32)
    d = moe_dispatch.dispatch(ids, e, num_valid_tokens_i32=nv)
    m = t if n is None else min(n, t)
    r = ref_moe.dispatch(ids[:m], e)
    rows = int(r.offsets_i64[-1])
    assert torch.equal(d.offsets_i32.long(), r.offsets_i64), (d.offsets_i32.tolist(), r.offsets_i64.tolist())
    assert torch.equal(d.row_token_i64[:rows], r.token_of_row_i64) and torch.equal(d.row_slot_i64[:rows],
                                                                                   r.slot_of_row_i64)
    assert torch.equal(d.row_of_pair_i32[:m * k].long(), r.row_of_pair_i64.reshape(-1))
    assert bool((d.row_of_pair_i32[m * k:] == -1).all()), "pairs of tokens >= n must reach no row"
    pairs = torch.sort(d.row_token_i64 * k + d.row_slot_i64).values
    assert torch.equal(pairs, torch.arange(t * k)), "row_token/row_slot must be a permutation of all pairs"
    y = torch.randn(t * k, 40, generator=g).to(torch.bfloat16)
    wts = torch.rand(t, k, generator=g)
    for weights in (wts, None):
        got = moe_dispatch.combine(y, d.row_of_pair_i32, weights, num_tokens=t, top_k=k, num_valid_tokens_i32=nv)
        exp = ref_moe.combine(y[:rows], r, None if weights is None else weights[:m], mode="emulated")
        # float32 sum of k terms in slot order vs the exact sum rounded once: within the combine bound
        terms = y[:rows].double()[r.row_of_pair_i64] * (1.0 if weights is None else weights[:m].double()[..., None])
        bound = (k + 1) * 2.0**-24 * terms.abs().sum(1) + exp.double().abs() * 2.0**-8
        assert bool(((got[:m].double() - exp.double()).abs() <= bound).all()), "combine outside its bound"
        assert bool((got[m:] == 0).all()), "tokens >= n must give zero rows"
    return f"{rows} routed rows, offsets and order equal references.moe.dispatch"


def _case_grouped_quantize(counts: tuple[int, ...], static: bool, gather: bool) -> str:
    from references import layouts as ref_layouts
    from references import moe as ref_moe
    from references.recipes import TE
    from kernels.sm90 import moe_dispatch, quantize_grouped

    g = torch.Generator().manual_seed(sum(counts) + 7 * static)
    e, kdim = len(counts), 272
    d_scale = torch.linspace(0.004, 0.03, e) if static else None
    if gather:  # token rows + dispatch (as the MoE block runs it), 3 of the 9 tokens past the valid count
        t, k, n = 9, 2, 6
        ids = torch.randint(0, e, (t, k), generator=g)
        x = (torch.randn(t, kdim, generator=g) * torch.exp(torch.randn(t, kdim, generator=g))).to(torch.bfloat16)
        x[n:] = float("nan")  # never read: past the valid count
        nv = torch.tensor([n], dtype=torch.int32)
        d = moe_dispatch.dispatch(ids, e, num_valid_tokens_i32=nv)
        packed, sf, dec = quantize_grouped.launch(x, d.offsets_i32, input_dec_scale_f32=d_scale,
                                                  row_token=d.row_token_i64, rows_cap=t * k, num_valid_tokens_i32=nv)
        r = ref_moe.dispatch(ids[:n], e)
        rows, off = x[r.token_of_row_i64], r.offsets_i64
    else:
        off = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
        rows = (torch.randn(int(off[-1]), kdim, generator=g) * torch.exp(torch.randn(int(off[-1]), kdim,
                                                                                      generator=g))).to(torch.bfloat16)
        if rows.shape[0]:
            rows.view(-1)[::41] = float("nan")
            rows[0, :16] = 0.0
        packed, sf, dec = quantize_grouped.launch(rows, off.to(torch.int32), input_dec_scale_f32=d_scale)
    ref = ref_moe.act_quant(rows, off, recipe=TE, act_scale="static" if static else "dynamic", input_scale_f32=d_scale)
    sf_ref, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(ref.sf_u8, off)
    r_n = rows.shape[0]
    assert torch.equal(packed[:r_n], ref.packed_u8), "codes differ"
    assert not packed[r_n:].any(), "capacity rows past the routed rows must be zero"
    assert torch.equal(sf[:sf_ref.shape[0]], sf_ref), "swizzled scales differ"
    assert not sf[sf_ref.shape[0]:].any(), "scale rows past the experts' tiles must be zero"
    assert torch.equal(dec.view(torch.int32), ref.global_dec_f32.view(torch.int32)), "global decode scales differ"
    return f"{r_n} rows: codes, {sf_ref.shape[0]} scale rows and {e} global scales equal the emulator's"


def _case_swiglu_requant(static: bool, limit: float | None, row_weight: bool) -> str:
    from references import layouts as ref_layouts
    from references import moe as ref_moe
    from references.recipes import TE
    from verify.assertions import assert_within_ulps
    from kernels.sm90 import swiglu_requant

    g = torch.Generator().manual_seed(3 + static)
    counts = (5, 0, 140, 2)
    off = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    r_n, n = int(off[-1]), 96
    gate, up = torch.randn(r_n, n, generator=g) * 6, torch.randn(r_n, n, generator=g) * 6
    gate[0, :6] = torch.tensor([-70.0, -90.0, -100.0, float("nan"), 200.0, -1.2784645])
    w = torch.rand(r_n, generator=g) if row_weight else None
    d_scale = torch.linspace(0.002, 0.01, len(counts)) if static else None
    h, (packed, sf, dec) = swiglu_requant.launch(gate, up, off.to(torch.int32), swiglu_limit=limit, row_weight_f32=w,
                                                 input_dec_scale_f32=d_scale)
    assert_within_ulps(h, ref_moe.swiglu(gate, up, limit=limit, row_weight_f32=w, mode="high"), ulps=1.0, label="h",
                       nonfinite="match")  # the NaN planted in gate must come out NaN
    ref = ref_moe.act_quant(h, off, recipe=TE, act_scale="static" if static else "dynamic", input_scale_f32=d_scale)
    sf_ref, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(ref.sf_u8, off)
    assert torch.equal(packed, ref.packed_u8) and torch.equal(sf[:sf_ref.shape[0]], sf_ref)
    assert not sf[sf_ref.shape[0]:].any()
    assert torch.equal(dec.view(torch.int32), ref.global_dec_f32.view(torch.int32))
    return "h within one bf16 ulp; requant bytes equal the emulator's on that h"


def _mini_layer(i: int):
    from verify.checkpoint import Checkpoint
    from verify.config import GOLDEN_DIR
    from verify.reference_layer import moe_spec_from

    ckpt = Checkpoint.open(GOLDEN_DIR / "mini-v4")
    return ckpt.load_layer(i, device="cuda" if CUDA and torch.cuda.is_available() else "cpu"), \
        moe_spec_from(ckpt.config), ckpt.config.vocab_size


def _case_block(layer_i: int, act: str, placement: str) -> str:
    """launch(fused_l1=False) equals the emulator's composition of the same backend's stage ops, bit for
    bit; the fused path equals it where the fused requant picks the same codes (counted); a valid-token
    count n gives the rows of a call on x[:n] (static) and zeros past n."""
    from verify.backends import run_moe_block
    from verify.backends.sm90 import Sm90Adapter
    from kernels.sm90 import moe_block

    layer, spec, vocab = _mini_layer(layer_i)
    b = Sm90Adapter()
    router = b.prepare_router(layer.router, spec)
    experts = b.prepare_experts(layer.experts)
    g = torch.Generator().manual_seed(layer_i)
    t = 21
    x = torch.randn(t, layer.router.gate_weight_bf16.shape[1], generator=g).to(torch.bfloat16)
    tok = torch.randint(0, vocab, (t,), generator=g) if layer.router.tid2eid_i64 is not None else None
    static = (experts.l1_input_dec_scale_f32, experts.l2_input_dec_scale_f32) if act == "static" else None
    kw = dict(swiglu_limit=spec.swiglu_limit, weight_placement=placement, act_scale=act, token_ids_i64=tok)
    got = moe_block.launch(x, router, experts, fused_l1=False, **kw)
    exp = run_moe_block(b, x, router, experts, swiglu_limit=spec.swiglu_limit, weight_placement=placement,
                        act_scale=act, static_scales=static, token_ids_i64=tok)
    assert torch.equal(got.view(torch.int16), exp.view(torch.int16)), \
        f"block != its stages in {int((got.view(torch.int16) != exp.view(torch.int16)).sum())} elements"
    n = 8
    part = moe_block.launch(x, router, experts, num_valid_tokens_i32=torch.tensor([n], dtype=torch.int32),
                            fused_l1=False, **kw)
    alone = moe_block.launch(x[:n].contiguous(), router, experts, fused_l1=False,
                             **{**kw, "token_ids_i64": None if tok is None else tok[:n].contiguous()})
    assert torch.equal(part[:n].view(torch.int16), alone.view(torch.int16)), "valid-token count: rows differ"
    assert bool((part[n:] == 0).all()), "tokens >= n must be zero"
    msg = f"block == stages ({t} tokens); n={n} == a call on x[:{n}], zeros after"
    if act == "static" and placement == "after_w2":
        fused = moe_block.launch(x, router, experts, **kw)
        diff = int((fused.view(torch.int16) != exp.view(torch.int16)).sum())
        msg += f"; fused L1 path differs from the unfused in {diff}/{fused.numel()} outputs (requant choices)"
    return msg


CASES = {
    **{f"router-{k}": (_case_router, (k,)) for k in ("bias", "ties", "sigmoid", "hash", "sigmoid-grouped",
                                                      "sigmoid-grouped-nobias")},
    "router-hash-out-of-range": (_case_router_hash_out_of_range, ()),
    "router-split-k": (_case_router_split_k, ()),
    **{f"dispatch-T{t}-k{k}-E{e}{'-hot' if hot else ''}{'' if n is None else f'-n{n}'}": (_case_dispatch,
                                                                                        (t, k, e, hot, n))
       for (t, k, e, hot, n) in ((1, 6, 16, False, None), (48, 6, 16, False, None), (48, 6, 16, True, None),
                                 (300, 2, 5, False, 17), (50, 4, 1, False, 1), (33, 8, 64, False, 0))},
    **{f"grouped-quantize-{'-'.join(map(str, c))}-{'static' if s else 'dynamic'}": (_case_grouped_quantize,
                                                                                     (c, s, False))
       for c in ((3, 0, 130, 1), (0, 0, 257, 0), (1, 1, 1, 1)) for s in (False, True)},
    **{f"grouped-quantize-gather-{'static' if s else 'dynamic'}": (_case_grouped_quantize, ((0,) * 5, s, True))
       for s in (False, True)},
    **{f"swiglu-requant-{'static' if s else 'dynamic'}-L{lim}{'-w' if w else ''}": (_case_swiglu_requant, (s, lim, w))
       for s in (False, True) for (lim, w) in ((None, False), (10.0, True))},
}
# the whole block under the interpreter takes about two minutes a case (the grouped GEMMs): `slow`
BLOCK_CASES = {f"block-layer{i}-{a}-{p}": (_case_block, (i, a, p))
               for (i, a, p) in ((3, "static", "after_w2"), (3, "dynamic", "after_w2"), (0, "dynamic", "before_w2"),
                                 (0, "static", "before_w2"))}


def _interpret(tmp_path_factory, names) -> dict[str, dict]:
    return run_cases(__file__, names, tmp_path_factory.mktemp("sm90_moe"))


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    return _interpret(tmp_path_factory, list(CASES))


@pytest.fixture(scope="module")
def interpreter_block_results(tmp_path_factory):
    return _interpret(tmp_path_factory, list(BLOCK_CASES))


_ON_GPU = "CPU interpreter cases (on a GPU the kernels run natively in the GPU tests)"


@pytest.mark.skipif(CUDA, reason=_ON_GPU)
@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_case(interpreter_results, case):
    r = interpreter_results[case]
    assert r["ok"], r["message"]


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason=_ON_GPU)
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_interpreted_block_case(interpreter_block_results, case):
    r = interpreter_block_results[case]
    assert r["ok"], r["message"]


# ============================================================================= GPU


def _gpu_block(layer_i: int, tokens: int):
    from verify.backends.sm90 import Sm90Adapter

    layer, spec, vocab = _mini_layer(layer_i)
    b = Sm90Adapter()
    router, experts = b.prepare_router(layer.router, spec), b.prepare_experts(layer.experts)
    g = torch.Generator().manual_seed(5)
    h = layer.router.gate_weight_bf16.shape[1]
    x = torch.randn(tokens, h, generator=g).to(torch.bfloat16).cuda()
    tok = torch.randint(0, vocab, (tokens,), generator=g).cuda() if layer.router.tid2eid_i64 is not None else None
    return b, spec, router, experts, x, tok, vocab


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("layer_i", [3, 0], ids=["layer3-bias", "layer0-hash"])
@pytest.mark.parametrize("act", ["static", "dynamic"])
@pytest.mark.parametrize("placement", ["after_w2", "before_w2"])
def test_moe_block_graph_replays_bit_identical(layer_i, act, placement):
    b, spec, router, experts, x0, tok0, vocab = _gpu_block(layer_i, 64)
    x, n = x0.clone(), torch.full((1,), x0.shape[0], dtype=torch.int32, device="cuda")
    tok = None if tok0 is None else tok0.clone()
    kw = dict(swiglu_limit=spec.swiglu_limit, weight_placement=placement, act_scale=act)

    def forward():
        return b.moe_block(x, router, experts, token_ids_i64=tok, num_valid_tokens_i32=n, **kw)

    forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = forward()
    s1, s2 = experts.l1_input_dec_scale_f32, experts.l2_input_dec_scale_f32
    mutations = [
        ("new values", lambda: x.copy_((x0.roll(3, 0) * -0.75).to(torch.bfloat16))),
        ("one hot expert set (every token alike: zero-token experts)", lambda: x.copy_(x0[:1].expand_as(x))),
        ("17 tokens", lambda: (x.copy_(x0), n.fill_(17))),
        ("1 token", lambda: n.fill_(1)),
        ("0 tokens", lambda: n.fill_(0)),
        ("back to capacity, new static scales", lambda: (n.fill_(x.shape[0]), s1.mul_(1.5), s2.mul_(0.5))),
    ]
    if tok is not None:
        mutations.append(("new hash token ids", lambda: tok.copy_((tok0 * 7 + 1) % vocab)))
    for name, mutate in mutations:
        mutate()
        graph.replay()
        torch.cuda.synchronize()
        y_eager = forward()
        bad = int((y_graph.view(torch.int16) != y_eager.view(torch.int16)).sum())
        assert bad == 0, f"after {name}: replay differs from eager in {bad} of {y_eager.numel()} outputs"
        m = int(n)
        assert bool((y_eager[m:] == 0).all()), f"after {name}: tokens >= {m} must be zero"
    s1.div_(1.5)
    s2.div_(0.5)


@pytest.mark.gpu
@pytest.mark.sm90
def test_moe_block_and_ops_are_deterministic():
    from verify.backends import run_moe_block

    b, spec, router, experts, x, tok, _ = _gpu_block(3, 256)
    kw = dict(swiglu_limit=spec.swiglu_limit, weight_placement="after_w2", act_scale="dynamic")
    y1 = b.moe_block(x, router, experts, **kw)
    y2 = b.moe_block(x, router, experts, **kw)
    assert torch.equal(y1.view(torch.int16), y2.view(torch.int16))
    s = run_moe_block(b, x, router, experts, static_scales=None, **kw)
    assert torch.equal(s.view(torch.int16), run_moe_block(b, x, router, experts, static_scales=None,
                                                          **kw).view(torch.int16))


@pytest.mark.gpu
@pytest.mark.sm90
def test_router_split_k_is_bit_equal_to_one_program():
    """V4-Pro router shape (E=384, H=7168): split-K logits (chosen for small T) and one-program logits
    agree bit for bit on the H200's tensor cores, and a token alone equals the token inside a large batch
    (which runs without split-K)."""
    from kernels.sm90 import moe_router

    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(3000, 7168, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(384, 7168, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    b = torch.randn(384, device="cuda", generator=g) * 0.01
    kw = dict(top_k=6, routed_scaling_factor=2.5, bias_f32=b)
    for t in (1, 16, 256):
        one, split = (moe_router.launch(x[:t], w, split_k=s, **kw) for s in (False, True))
        for name, a, c in zip(("ids", "weights", "logits"), one, split):
            assert torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                               c.view(torch.int32) if c.is_floating_point() else c), f"T={t}: split-K {name} differ"
    big = moe_router.launch(x, w, **kw)  # 47 x 6 tiles: no split-K
    alone = moe_router.launch(x[1234:1235].contiguous(), w, **kw)  # split-K
    assert torch.equal(alone[2].view(torch.int32), big[2][1234:1235].view(torch.int32)), "token 1234 alone differs"
    assert torch.equal(alone[0], big[0][1234:1235])


_SANITIZER_SCRIPT = """
import torch
from verify.tests.test_sm90_moe import _gpu_block
for layer_i, act in ((3, "static"), (0, "dynamic")):
    b, spec, router, experts, x, tok, _ = _gpu_block(layer_i, 40)
    n = torch.tensor([29], dtype=torch.int32, device="cuda")
    for placement in ("after_w2", "before_w2"):
        y = b.moe_block(x, router, experts, swiglu_limit=spec.swiglu_limit, weight_placement=placement, act_scale=act,
                        token_ids_i64=tok, num_valid_tokens_i32=n)
torch.cuda.synchronize()
print("done")
"""


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool, tmp_path):
    exe = shutil.which("compute-sanitizer") or next(
        (str(p) for p in (Path("/usr/local/cuda/bin/compute-sanitizer"),) if p.exists()), None)
    if exe is None:
        pytest.skip("compute-sanitizer not found (PATH, /usr/local/cuda/bin)")
    script = tmp_path / "moe_small.py"
    script.write_text(_SANITIZER_SCRIPT)
    proc = subprocess.run([exe, f"--tool={tool}", "--error-exitcode=3", sys.executable, str(script)], cwd=REPO,
                          capture_output=True, text=True, timeout=560, env=dict(os.environ, PYTHONPATH=str(REPO)))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "done" in out, f"{tool} (rc {proc.returncode}):\n{out[-4000:]}"
    assert "ERROR SUMMARY: 0 errors" in out or "RACECHECK SUMMARY: 0 hazards" in out, out[-2000:]


# ============================================================================= slow: the harness under the interpreter


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="the GPU runs these verdicts natively (test_layer_stages --backend sm90)")
def test_moe_stage_verdicts_pass_under_the_interpreter(tmp_path):
    path = tmp_path / "verdicts.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__, "--verdicts", str(path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = [v for v in json.loads(path.read_text()) if v["status"] == "fail"]
    assert not failed, failed[:3]


def _verdicts_main(path: str) -> None:
    from references.layer import RunOptions
    from references.stages import Op
    from verify.backends.sm90 import Sm90Adapter
    from verify.checkpoint import Checkpoint
    from verify.config import GOLDEN_DIR
    from verify.layer_report import layer_inputs
    from verify.run import run_layer

    class Interpreted(Sm90Adapter):  # the MoE ops only: the dense GEMM paths use inline PTX
        def unsupported_reason(self, op, device):
            if op in (Op.QUANTIZE, Op.DENSE_GEMM, Op.DENSE_LINEAR, Op.REFERENCE):
                return "sm90 dense ops: not run under the Triton interpreter"
            return None

    ckpt = Checkpoint.open(GOLDEN_DIR / "mini-v4")
    out = []
    for i, act, placement in ((3, "static", "after_w2"), (0, "dynamic", "after_w2"), (3, "dynamic", "before_w2")):
        layer = ckpt.load_layer(i)
        inputs = layer_inputs(ckpt, layer, tokens=48, seed=11, device="cpu")
        run = run_layer(ckpt, layer, inputs, options=RunOptions(act_scale=act, weight_placement=placement),
                        backend=Interpreted())
        out += [{"layer": i, "act": act, "placement": placement, "stage": v.stage, "check": v.check,
                 "status": v.status, "message": v.message} for v in run.verdicts]
    Path(path).write_text(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "--cases":
        child_main(sys.argv[1:], {**CASES, **BLOCK_CASES})
    elif sys.argv[1] == "--verdicts":
        _verdicts_main(sys.argv[2])
