"""CUDA-graph capture and replay with a changing TOKEN COUNT (plus new values, routing and
scales), on a B200. Markers gpu + sm100: the tcgen05 block-scaled kernels need compute
capability 10.x, so on any other machine (a CPU, a Hopper) every test here is skipped by
the plugin with the reason ("gpu: no CUDA device ..." or "sm100: needs compute
capability 10.x (B200/GB200), this is ..."). None of these has run yet: there is no B200
where they were written. Their CPU-side counterparts (the torch half of the mechanism)
are in test_sm100_valid_tokens.py; the kernels' PTX is checked in test_sm100_compile.py.

Mechanism under test: buffers keep T_max rows, an int32 [1] device tensor n (mutated in
place before replay) says how many tokens are real; kernels read n on the device, rows
past n are zero, tokens past n reach no expert. Contract checked for every replay:
- graph output == an eager call on the same buffers (bit-equal, all rows);
- rows < n == an eager call on the first n tokens alone (bit-equal);
- rows >= n are zero, even though the stale tail of the input holds NaN.
"""

import pytest
import torch

from kernels.sm100 import gemm_nvfp4_blockscaled as gemm
from kernels.sm100 import host_bridge as hb
from kernels.sm100 import moe_routing as mr
from kernels.sm100 import quantize_nvfp4_1x16 as quant
from kernels.sm100.api import Sm100Kernels
from references import layouts as ref_layouts
from references.nvfp4 import quantize_nvfp4
from references.recipes import TE
from verify.assertions import assert_bits_equal, assert_bytes_equal
from verify.tests.test_sm100_kernels import _grouped_inputs, _moe_case, _q, _rand

pytestmark = [pytest.mark.gpu, pytest.mark.sm100]

BACKEND = Sm100Kernels()
DEV = "cuda"


def _count(n: int) -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int32, device=DEV)


def _assert_zero_rows(t: torch.Tensor, start: int, label: str) -> None:
    __tracebackhide__ = True
    tail = t[start:]
    bad = int(tail.count_nonzero()) if tail.dtype == torch.uint8 else int((tail.view(torch.int16) != 0).sum())
    assert bad == 0, f"{label}: {bad} nonzero entries in rows >= {start} (must be zero)"


# ----------------------------------------------------------------------------- kernels with a count


@pytest.mark.parametrize("m,n", [(300, 300), (300, 129), (300, 128), (300, 1), (300, 0), (64, 100)],
                         ids=lambda v: str(v))
def test_quantizer_valid_rows_prefix_bytes_and_zero_tail(m, n):
    k = 512
    nv = min(n, m)
    x = _rand(m, k, seed=m + n).to(torch.bfloat16).to(DEV)
    x[nv:] = float("nan")  # stale rows: never read
    packed, sf, s = quant.launch(x, num_valid_rows_i32=_count(n))
    sf_lin = ref_layouts.sf_swizzled_128x4_to_linear(sf.cpu(), rows=m, cols=k // 16)
    _assert_zero_rows(packed.cpu(), nv, "codes past the valid count")
    _assert_zero_rows(sf_lin, nv, "scale bytes past the valid count")
    if nv:
        xv = x[:nv].contiguous()
        _, _, s_prefix = quant.launch(xv)
        assert_bits_equal(s, s_prefix, label="dynamic S over the valid rows")
        q = quantize_nvfp4(xv.cpu(), recipe=TE, global_enc_scale_f32=s.cpu())
        assert_bytes_equal(packed[:nv], q.packed_u8, label=f"codes of valid rows [sm100 vs emulator:te] m={m} n={n}")
        assert_bytes_equal(sf_lin[:nv], q.sf_u8, label=f"scales of valid rows [sm100 vs emulator:te] m={m} n={n}")


@pytest.mark.parametrize("n", [300, 257, 256, 129, 5, 0], ids=lambda n: f"n{n}")
def test_dense_gemm_valid_rows_prefix_bits_and_zero_tail(n):
    m, nn, k = 300, 256, 512
    a_p, a_sf, _, a_d = _q(_rand(m, k, seed=31))
    b_p, b_sf, _, b_d = _q(_rand(nn, k, seed=32))
    w = hb.prepare_nvfp4_weight(b_p.to(DEV), b_sf.to(DEV), b_d.to(DEV))
    a_stale = a_p.clone()
    a_stale[n:] = torch.randint(0, 256, a_stale[n:].shape, dtype=torch.uint8)  # stale codes past n
    y = gemm.launch_dense(a_stale.to(DEV), hb.sf_linear_to_swizzled_128x4(a_sf).to(DEV), a_d.to(DEV), w,
                          num_valid_rows_i32=_count(n))
    _assert_zero_rows(y, n, f"dense gemm rows past n={n}")
    if n:
        y_prefix = gemm.launch_dense(a_p[:n].contiguous().to(DEV), hb.sf_linear_to_swizzled_128x4(a_sf[:n]).to(DEV),
                                     a_d.to(DEV), w)
        assert_bits_equal(y[:n], y_prefix, label=f"dense gemm valid rows n={n} vs prefix call")


@pytest.mark.parametrize("cut", [0, 1, 127, 128, 300], ids=lambda c: f"cut{c}")
def test_grouped_gemm_valid_rows_cut_tiles(cut):
    counts = [3, 0, 130, 1, 0, 256, 77, 0]
    n, k = 256, 1024
    _, _, (_, _, a_d), (b_p, b_sf, b_d), (a_pad, a_sf_sw, table) = _grouped_inputs(counts, n, k, 33)
    w = hb.prepare_nvfp4_weight(b_p.to(DEV), b_sf.to(DEV), b_d.to(DEV))
    args = (a_pad.to(DEV), a_sf_sw.to(DEV), a_d.to(DEV), w, table.to(DEV))
    full = gemm.launch_grouped(*args)
    y = gemm.launch_grouped(*args, num_valid_rows_i32=_count(cut))
    assert_bits_equal(y[:cut], full[:cut], label=f"grouped gemm rows below the count {cut}")
    _assert_zero_rows(y, cut, f"grouped gemm rows past {cut}")


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("scale", ["dynamic", "static"])
def test_dense_path_graph_replays_with_fewer_tokens_new_values_and_scales(scale):
    t_max, nn, k = 300, 256, 512
    b_p, b_sf, _, b_d = _q(_rand(nn, k, seed=41))
    w = hb.prepare_nvfp4_weight(b_p.to(DEV), b_sf.to(DEV), b_d.to(DEV))
    x = _rand(t_max, k, seed=42).to(torch.bfloat16).to(DEV)
    d = torch.full((1,), 0.01, dtype=torch.float32, device=DEV)  # static input_scale (amax/2688)
    nv = _count(t_max)

    def forward(xx, count):
        return BACKEND.linear_nvfp4(xx, w, input_dec_scale_f32=d if scale == "static" else None,
                                    num_valid_rows_i32=count)

    forward(x, nv)  # warm-up: every kernel compiles and every cached buffer is allocated outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = forward(x, nv)
    for step, n in enumerate([300, 257, 129, 100, 1, 0]):
        x.copy_(_rand(t_max, k, seed=100 + step).to(torch.bfloat16) * (1 + step))
        x[n:] = float("nan")  # the stale tail of the captured buffer
        d.fill_(0.005 * (step + 1))
        nv.fill_(n)
        graph.replay()
        assert_bits_equal(y_graph, forward(x, nv), label=f"dense replay {step} (n={n}) vs eager, same buffers")
        if n:
            y_prefix = forward(x[:n].contiguous(), None)
            assert_bits_equal(y_graph[:n], y_prefix, label=f"dense replay {step}: valid rows vs {n}-token call")
        _assert_zero_rows(y_graph, n, f"dense replay {step}")


@pytest.mark.parametrize("routing", ["topk_bias", "hash"])
def test_moe_path_graph_replays_with_fewer_tokens_new_values_and_routing(routing):
    t_max, e, k_top, vocab = 64, 8, 2, 1000
    x, gate, w13, w2 = _moe_case(t_max, e, k_top, 256, 256, seed=90)
    bias = torch.zeros(e, dtype=torch.float32, device=DEV)
    tid2eid = torch.randint(0, e, (vocab, k_top), device=DEV)
    token_ids = torch.randint(0, vocab, (t_max,), device=DEV)
    nv = _count(t_max)
    b = BACKEND

    def route(xx, ids, count):
        if routing == "hash":
            return b.router(xx, gate, top_k=k_top, routed_scaling_factor=1.5, tid2eid_i64=tid2eid,
                            token_ids_i64=ids, num_valid_tokens_i32=count)
        return b.router(xx, gate, top_k=k_top, routed_scaling_factor=2.5, bias_f32=bias, num_valid_tokens_i32=count)

    def forward():
        r = route(x, token_ids, nv)
        return r, b.moe_experts(x, r, w13, w2, swiglu_limit=10.0, num_valid_tokens_i32=nv)

    _, y0 = forward()  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r_graph, y_graph = forward()
    seen_ids = set()
    for step, n in enumerate([64, 37, 5, 1, 0]):
        g = torch.Generator().manual_seed(200 + step)
        x.copy_((torch.randn(x.shape, generator=g) * (1 + step)).to(torch.bfloat16))
        x[n:] = float("nan")  # stale tail: its routing must reach no expert
        gate.copy_((torch.randn(gate.shape, generator=g) * 0.05).to(torch.bfloat16))  # new routing
        bias.copy_(torch.randn(e, generator=g) * 0.1)
        token_ids.copy_(torch.randint(0, vocab, (t_max,), generator=g))
        token_ids[n:] = 10**9  # out of range: must not be looked up
        nv.fill_(n)
        graph.replay()
        r_eager, y_eager = forward()
        assert_bits_equal(y_graph, y_eager, label=f"moe replay {step} (n={n}) vs eager, same buffers")
        assert_bits_equal(r_graph.ids_i64[:n], r_eager.ids_i64[:n], label=f"replay {step}: routing differs from eager")
        seen_ids.add(tuple(r_eager.ids_i64[:n].reshape(-1).tolist()[:8]))
        if n:
            prefix = mr.Routing(r_eager.ids_i64[:n], r_eager.weights_f32[:n], r_eager.scores_f32[:n])
            y_prefix = b.moe_experts(x[:n].contiguous(), prefix, w13, w2, swiglu_limit=10.0)
            assert_bits_equal(y_graph[:n], y_prefix, label=f"moe replay {step}: valid tokens vs {n}-token call")
        _assert_zero_rows(y_graph, n, f"moe replay {step}")
    assert len(seen_ids) > 2, "the replays did not exercise new routing"


def test_moe_path_with_valid_count_has_no_host_sync():
    x, gate, w13, w2 = _moe_case(32, 4, 2, 256, 256, seed=61)
    dense_w = hb.Sm100Nvfp4Weight(w2.packed_u8[:1], w2.sf_swizzled_u8[:1], w2.dec_scale_f32[:1])  # [256, 256]
    nv = _count(19)

    def forward():
        r = BACKEND.router(x, gate, top_k=2, routed_scaling_factor=1.5, num_valid_tokens_i32=nv)
        BACKEND.moe_experts(x, r, w13, w2, swiglu_limit=10.0, num_valid_tokens_i32=nv)
        BACKEND.linear_nvfp4(x, dense_w, num_valid_rows_i32=nv)

    forward()  # warm-up: compiles and cached buffers outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
