"""CPU checks of the sm100 valid-token-count mechanism (CUDA-graph replay with fewer tokens).

The buffers keep T_max rows; an int32 [1] device tensor n says how many tokens are real.
The torch side of the mechanism (permutation with a sentinel expert, masked gather and
combine, masked dynamic amax, hash-id sanitising, the threading of the count through
Sm100Kernels) runs on any device, so it is checked here on the CPU against a plain
Python reference and against a call on the first n tokens alone. The kernels' side
(reading n on the device) is checked by PTX inspection in test_sm100_compile.py and
by graph replay on a B200 in test_sm100_graph_token_count.py.
"""

from __future__ import annotations

import pytest
import torch

from kernels.sm100 import gemm_nvfp4_blockscaled as gemm
from kernels.sm100 import moe_routing as mr
from kernels.sm100 import quantize_nvfp4_1x16 as quant
from kernels.sm100.api import Sm100Kernels
from verify.assertions import assert_all_zero, assert_bits_equal


def _n(v: int) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.int32)


def _ids(t: int, k: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])


def _reference_permutation(ids: list[list[int]], n: int, e: int):
    """Plain-Python permutation of the first n tokens' pairs: padded offsets, row of each
    valid pair (experts in order, each expert's pairs in token order, padded to 128)."""
    per_expert: list[list[int]] = [[] for _ in range(e)]
    k = len(ids[0]) if ids else 0
    for t in range(min(n, len(ids))):
        for slot in range(k):
            per_expert[ids[t][slot]].append(t * k + slot)
    offsets, padded, row = [0], [0], {}
    for ex in range(e):
        for rank, pair in enumerate(per_expert[ex]):
            row[pair] = padded[-1] + rank
        offsets.append(offsets[-1] + len(per_expert[ex]))
        padded.append(padded[-1] + (len(per_expert[ex]) + 127) // 128 * 128)
    return offsets, padded, row


CASES = [(1, 1, 4, 0), (1, 1, 4, 1), (9, 2, 8, 0), (9, 2, 8, 4), (9, 2, 8, 9), (9, 2, 8, 12),
         (300, 6, 16, 0), (300, 6, 16, 131), (300, 6, 16, 299), (40, 6, 384, 7)]


@pytest.mark.parametrize("t,k,e,n", CASES, ids=lambda v: str(v))
def test_permute_with_valid_count_equals_python_reference(t, k, e, n):
    ids = _ids(t, k, e, seed=t + n)
    p = mr.permute(ids, e, _n(n))
    offsets, padded, row = _reference_permutation(ids.tolist(), n, e)
    assert p.offsets_i64.tolist() == offsets, "expert offsets must count valid tokens only"
    assert p.padded_offsets_i64.tolist() == padded
    assert p.valid_rows_i32.dtype == torch.int32 and p.valid_rows_i32.tolist() == [padded[-1]]
    assert p.capacity_rows == mr.grouped_capacity_rows(t * k, e), "capacity depends on T_max only (static shapes)"
    rows = p.row_of_pair_i64.tolist()
    for pair, r in row.items():
        assert rows[pair] == r, f"valid pair {pair}: row {rows[pair]}, reference {r}"
    # Invalid pairs: distinct rows past the real experts, inside the capacity, in no expert's tile.
    invalid = [rows[pair] for pair in range(t * k) if pair not in row]
    assert len(invalid) == t * k - len(row)
    assert len(set(rows)) == t * k, "two pairs share a row"
    assert all(padded[-1] <= r < p.capacity_rows for r in invalid), "an invalid pair landed in an expert's rows"
    table = p.tile_expert_i32.tolist()
    assert all(table[r // 128] == -1 for r in invalid), "an invalid pair's tile is assigned to an expert"
    want_table = [-1] * (p.capacity_rows // 128)
    for ex in range(e):
        for tile in range(padded[ex] // 128, padded[ex + 1] // 128):
            want_table[tile] = ex
    assert table == want_table
    assert p.token_valid.tolist() == [i < n for i in range(t)]


@pytest.mark.parametrize("t,k,e,n", [(9, 2, 8, 4), (300, 6, 16, 131), (40, 6, 384, 7)], ids=lambda v: str(v))
def test_permute_with_valid_count_equals_permute_of_the_prefix(t, k, e, n):
    ids = _ids(t, k, e, seed=3 * t + n)
    p = mr.permute(ids, e, _n(n))
    q = mr.permute(ids[:n], e)
    assert_bits_equal(p.offsets_i64, q.offsets_i64, label='permute with a valid count vs the prefix: offsets_i64')
    assert_bits_equal(p.padded_offsets_i64, q.padded_offsets_i64, label='permute with a valid count vs the prefix: padded_offsets_i64')
    assert_bits_equal(p.row_of_pair_i64[: n * k], q.row_of_pair_i64, label='permute with a valid count vs the prefix: row_of_pair_i64[: n * k]')
    nt = q.tile_expert_i32.numel()
    assert_bits_equal(p.tile_expert_i32[:nt], q.tile_expert_i32, label='permute with a valid count vs the prefix: tile_expert_i32[:nt]')
    assert bool((p.tile_expert_i32[nt:] == -1).all())
    assert_bits_equal(p.valid_rows_i32, q.valid_rows_i32, label='permute with a valid count vs the prefix: valid_rows_i32')


def test_permute_without_count_is_unchanged_and_all_valid():
    ids = _ids(50, 3, 8, seed=1)
    p = mr.permute(ids, 8)
    offsets, padded, row = _reference_permutation(ids.tolist(), 50, 8)
    assert p.token_valid is None and p.offsets_i64.tolist() == offsets
    assert p.row_of_pair_i64.tolist() == [row[i] for i in range(150)]
    assert p.valid_rows_i32.tolist() == [padded[-1]]


def test_gather_drops_invalid_tokens_even_when_their_rows_hold_nan():
    t, k, e, h, n = 12, 2, 6, 32, 5
    ids = _ids(t, k, e, seed=2)
    x = torch.randn(t, h).to(torch.bfloat16)
    x[n:] = float("nan")  # stale tail of the captured buffer
    p = mr.permute(ids, e, _n(n))
    xp = mr.gather_rows_bf16(x, p, k)
    q = mr.permute(ids[:n], e)
    xq = mr.gather_rows_bf16(x[:n], q, k)
    assert_bits_equal(xp[: xq.shape[0]], xq, label="gathered rows of the valid tokens vs the prefix call")
    assert_all_zero(xp[xq.shape[0]:], label="gathered rows past the valid tokens")


def test_combine_zeroes_invalid_tokens_and_keeps_valid_bytes():
    t, k, e, h, n = 12, 3, 6, 48, 7
    ids = _ids(t, k, e, seed=4)
    w = torch.rand(t, k)
    w[n:] = float("nan")  # routing weights of padded tokens are whatever the router made of stale rows
    p = mr.permute(ids, e, _n(n))
    y_rows = torch.randn(p.capacity_rows, h).to(torch.bfloat16)
    got = mr.combine_bf16(y_rows, p, w)
    q = mr.permute(ids[:n], e)
    want = mr.combine_bf16(y_rows[: q.capacity_rows], q, w[:n])
    assert_bits_equal(got[:n], want, label="valid tokens changed")
    assert_all_zero(got[n:], label="rows past the valid count")


def test_combine_adds_slots_in_order_in_float32():
    t, k, e, h = 5, 4, 8, 16
    ids = _ids(t, k, e, seed=5)
    p = mr.permute(ids, e)
    y_rows = torch.randn(p.capacity_rows, h).to(torch.bfloat16)
    w = torch.rand(t, k)
    got = mr.combine_bf16(y_rows, p, w)
    rows = y_rows[p.row_of_pair_i64].float().reshape(t, k, h)
    acc = rows[:, 0] * w[:, :1]
    for s in range(1, k):
        acc = acc + rows[:, s] * w[:, s:s + 1]
    assert_bits_equal(got, acc.to(torch.bfloat16), label="rows past the valid count vs the float32 accumulation")


def test_hash_routing_reads_stale_token_ids_of_invalid_tokens_as_zero():
    t, k, e, vocab, n = 6, 3, 8, 100, 4
    logits = torch.randn(t, e)
    tid2eid = torch.randint(0, e, (vocab, k), generator=torch.Generator().manual_seed(6))
    tokens = torch.tensor([3, 99, 0, 42, 10**9, -5])  # the tail is out of range
    r = mr.route(logits, top_k=k, routed_scaling_factor=1.5, tid2eid_i64=tid2eid, token_ids_i64=tokens,
                 num_valid_tokens_i32=_n(n))
    assert r.ids_i64[:n].tolist() == tid2eid[tokens[:n]].tolist()
    assert r.ids_i64[n:].tolist() == tid2eid[torch.zeros(t - n, dtype=torch.int64)].tolist()


@pytest.mark.parametrize("bad,match", [(4, "Python int"), (torch.tensor([4]), "int32"),
                                       (torch.tensor([1, 2], dtype=torch.int32), "one int32")])
def test_valid_count_must_be_one_int32_device_element(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        mr.permute(_ids(4, 2, 4, seed=0), 4, bad)


@pytest.mark.parametrize("n", [0, 1, 37, 64, 100], ids=lambda n: f"n{n}")
def test_amax_of_valid_rows_ignores_the_stale_tail(n):
    x = (torch.randn(64, 96) * 3).to(torch.bfloat16)
    x[min(n, 64):] = torch.tensor([float("nan"), 1e30, -float("inf")]).to(torch.bfloat16).repeat(32)[:96]
    got = quant.amax_of_valid_rows(x, _n(n))
    want = x[:n].abs().amax() if n > 0 else torch.zeros((), dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), want.view(torch.int16))
    s = quant.te_global_enc_scale_device(got)
    s_want = quant.te_global_enc_scale_device(want)
    assert_bits_equal(s, s_want, label="dynamic S over the valid rows")


# ----------------------------------------------------------------------------- backend threading
#
# The kernels cannot run here, so quant.launch / gemm.launch_* are replaced by float
# stand-ins that honour the kernels' documented contract (rows >= the device count and
# tiles marked -1 are zero) and record what they were given. What is tested is the
# torch-side path of Sm100Kernels: which count reaches which kernel, and that the
# valid tokens' bytes equal a call on the first n tokens alone.


class _FakeKernels:
    def __init__(self, w13_f32, w2_f32, limit):
        self.w13, self.w2, self.limit = w13_f32, w2_f32, limit
        self.calls = []

    @staticmethod
    def _rows_valid(m, n_i32):
        assert isinstance(n_i32, torch.Tensor) and n_i32.dtype == torch.int32 and n_i32.numel() == 1, \
            "the kernels must get the count as an int32 [1] device tensor"
        return torch.arange(m) < n_i32.reshape(())

    def quant_launch(self, x_bf16, *, global_enc_scale_f32=None, input_dec_scale_f32=None, recipe="te", key=None,
                     num_valid_rows_i32=None):
        self.calls.append(("quant", num_valid_rows_i32))
        valid = self._rows_valid(x_bf16.shape[0], num_valid_rows_i32)
        s = quant.te_global_enc_scale_device(quant.amax_of_valid_rows(x_bf16, num_valid_rows_i32))
        # "packed" stands in as the masked bf16 rows; the decode scale 1/s is ignored below.
        return torch.where(valid.unsqueeze(1), x_bf16, torch.zeros_like(x_bf16)), None, s

    def launch_grouped(self, a, a_sf, a_dec, weight, table, *, swiglu_limit=None, key=None, num_valid_rows_i32=None):
        self.calls.append(("swiglu" if swiglu_limit is not None else "grouped", num_valid_rows_i32))
        valid = self._rows_valid(a.shape[0], num_valid_rows_i32)
        w = self.w13 if swiglu_limit is not None else self.w2
        out = torch.zeros(a.shape[0], w.shape[1] // (2 if swiglu_limit is not None else 1))
        for tile, ex in enumerate(table.tolist()):
            if ex < 0:
                continue
            y = a[tile * 128:(tile + 1) * 128].float() @ w[ex].T
            if swiglu_limit is not None:
                g, u = y.chunk(2, dim=1)
                g = torch.clamp(g, max=swiglu_limit)
                y = g * torch.sigmoid(g) * torch.clamp(u, -swiglu_limit, swiglu_limit)
            out[tile * 128:(tile + 1) * 128] = y
        return torch.where(valid.unsqueeze(1), out, torch.zeros_like(out)).to(torch.bfloat16)

    def launch_dense(self, a, a_sf, a_dec, weight, *, key=None, num_valid_rows_i32=None):
        self.calls.append(("dense", num_valid_rows_i32))
        valid = self._rows_valid(a.shape[0], num_valid_rows_i32)
        out = a.float() @ self.w2[0].T
        return torch.where(valid.unsqueeze(1), out, torch.zeros_like(out)).to(torch.bfloat16)


class _W:
    def __init__(self, e):
        self.num_batches = e


@pytest.fixture
def fake_kernels(monkeypatch):
    e, h, inter = 6, 32, 16
    g = torch.Generator().manual_seed(11)
    fk = _FakeKernels(torch.randn(e, 2 * inter, h, generator=g), torch.randn(e, h, inter, generator=g), 10.0)
    monkeypatch.setattr(quant, "launch", fk.quant_launch)
    monkeypatch.setattr(gemm, "launch_grouped", fk.launch_grouped)
    monkeypatch.setattr(gemm, "launch_dense", fk.launch_dense)
    return fk, e, h


@pytest.mark.parametrize("n", [0, 1, 9, 20], ids=lambda n: f"n{n}")
def test_moe_experts_threads_the_count_and_matches_the_prefix_call(fake_kernels, n):
    fk, e, h = fake_kernels
    t, k = 20, 2
    b = Sm100Kernels()
    x = torch.randn(t, h).to(torch.bfloat16)
    x[n:] = float("nan")  # stale rows of the captured buffer
    logits = torch.randn(t, e)
    r = mr.route(logits, top_k=k, routed_scaling_factor=2.5, num_valid_tokens_i32=_n(n))
    y = b.moe_experts(x, r, _W(e), _W(e), swiglu_limit=10.0, num_valid_tokens_i32=_n(n))
    calls, fk.calls = fk.calls, []
    assert [c[0] for c in calls] == ["quant", "swiglu", "quant", "grouped"]
    want_rows = mr.permute(r.ids_i64, e, _n(n)).valid_rows_i32
    for name, got_rows in calls:
        assert_bits_equal(got_rows, want_rows, label=f"{name}: valid rows passed to the launch vs the padded total")
    assert y.shape == (t, h), f"y shape {tuple(y.shape)}, expected {(t, h)}"
    assert_all_zero(y[n:], label="output rows of tokens past the valid count")
    if n > 0:
        prefix = mr.Routing(r.ids_i64[:n], r.weights_f32[:n], r.scores_f32[:n])
        y_prefix = b.moe_experts(x[:n], prefix, _W(e), _W(e), swiglu_limit=10.0)
        assert_bits_equal(y[:n], y_prefix, label="valid tokens differ from the prefix call")


def test_linear_nvfp4_threads_the_count_to_quantizer_and_gemm(fake_kernels):
    fk, e, h = fake_kernels
    b = Sm100Kernels()
    x = torch.randn(10, 16).to(torch.bfloat16)
    n = _n(4)
    y = b.linear_nvfp4(x, _W(1), num_valid_rows_i32=n)
    assert [c[0] for c in fk.calls] == ["quant", "dense"] and all(c[1] is n for c in fk.calls)
    assert_all_zero(y[4:], label="output rows of tokens past the valid count (4)")


# ----------------------------------------------------------------------------- fused L2 quantization: argument checks


def test_fused_l2_quant_needs_a_static_l2_scale(fake_kernels):
    fk, e, h = fake_kernels
    r = mr.route(torch.randn(4, e), top_k=2, routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match="fuse_l2_quant: needs the static l2_input_dec_scale_f32"):
        Sm100Kernels().moe_experts(torch.randn(4, h).to(torch.bfloat16), r, _W(e), _W(e), swiglu_limit=10.0,
                                   fuse_l2_quant=True)


def test_nvfp4_output_of_h_needs_the_swiglu_nvfp4_variant():
    a = torch.zeros(128, 32, dtype=torch.uint8)
    s = torch.ones(1)
    with pytest.raises(ValueError, match="h_global_enc_scale_f32 given"):
        gemm.launch_grouped(a, a, s, None, torch.zeros(1, dtype=torch.int32), h_global_enc_scale_f32=s)
    with pytest.raises(ValueError, match="h_global_enc_scale_f32 missing"):
        gemm.launch_grouped(a, a, s, None, torch.zeros(1, dtype=torch.int32), swiglu_limit=10.0,
                            key=gemm.CompileKey(variant="grouped_swiglu_nvfp4", tile_n=256, num_stages=4))
    with pytest.raises(ValueError, match="needs tile_n=256"):
        gemm.CompileKey(variant="grouped_swiglu_nvfp4", tile_n=128)
