"""The float64 GEMM reference and its accumulation bound (DESIGN "Verdicts").

A candidate "kernel" here is the fp32-accumulated product of the decoded operands,
scaled by the fp32 alpha and rounded to bf16: what a faithful kernel computes up to
accumulation order. The bound must hold for it (also with a different summation
order), be exactly zero on exact-arithmetic data, and be exceeded by each shipped
layout bug: a misplaced block scale, a swapped nibble, a transposed scale matrix.
"""

from __future__ import annotations

import pytest
import torch

from references.gemm import (
    U_FP32,
    bound_ratio,
    gemm_error_bound,
    grouped_gemm_error_bound,
    nvfp4_gemm_f64,
    nvfp4_grouped_gemm_f64,
)
from references.nvfp4 import decode_nvfp4_block_scaled, quantize_nvfp4, te_global_enc_scale
from references.recipes import TE
from verify.assertions import assert_within_gemm_bound


def make_nvfp4(rows: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.exp(torch.randn(rows, k // 16, 1, generator=g)).repeat_interleave(16, -1).reshape(rows, k)
    return quantize_nvfp4(x, recipe=TE, global_enc_scale_f32=te_global_enc_scale(x.abs().max()))


def candidate_gemm(a_packed, a_sf, b_packed, b_sf, alpha_f32, *, k_chunk: int | None = None) -> torch.Tensor:
    """fp32 accumulation of exact products, alpha in fp32, bf16 out; optional chunked order."""
    a = decode_nvfp4_block_scaled(a_packed, a_sf)
    b = decode_nvfp4_block_scaled(b_packed, b_sf)
    if k_chunk is None:
        acc = a @ b.T
    else:
        acc = torch.zeros(a.shape[0], b.shape[0])
        for k0 in range(0, a.shape[1], k_chunk):  # a different, sequential summation order
            acc = acc + a[:, k0:k0 + k_chunk] @ b[:, k0:k0 + k_chunk].T
    return (acc * alpha_f32).to(torch.bfloat16)


@pytest.mark.parametrize("m,n,k", [(1, 24, 64), (7, 33, 256), (64, 48, 1024)], ids=lambda v: str(v))
@pytest.mark.parametrize("k_chunk", [None, 16], ids=["matmul", "chunk16"])
def test_faithful_fp32_gemm_is_within_bound(m, n, k, k_chunk):
    qa, qb = make_nvfp4(m, k, 1), make_nvfp4(n, k, 2)
    alpha = qa.global_dec_scale() * qb.global_dec_scale()
    y64, absdot = nvfp4_gemm_f64(qa.packed_u8, qa.sf_u8, qb.packed_u8, qb.sf_u8, alpha)
    y = candidate_gemm(qa.packed_u8, qa.sf_u8, qb.packed_u8, qb.sf_u8, alpha, k_chunk=k_chunk)
    bound = gemm_error_bound(absdot, y64, alpha, k=k, u_acc=U_FP32)
    assert_within_gemm_bound(y, y64, bound, label=f"candidate gemm m{m} n{n} k{k}")


def test_exact_arithmetic_data_gives_zero_error():
    """Codes in {0, +-0.5, +-1} and {0, +-1}, power-of-two scales and alpha, K = 64:
    every partial sum is a multiple of 2^-j with |y| <= 64 -> exact in fp32 and bf16."""
    g = torch.Generator().manual_seed(3)
    m, n, k = 16, 16, 64
    a_codes = torch.tensor([0, 1, 2, 9, 10], dtype=torch.uint8)[torch.randint(0, 5, (m, k), generator=g)]
    b_codes = torch.tensor([0, 2, 10], dtype=torch.uint8)[torch.randint(0, 3, (n, k), generator=g)]
    pack = lambda c: c[:, 0::2] | (c[:, 1::2] << 4)  # noqa: E731 (written independently of references)
    a_sf = torch.full((m, k // 16), 0x38, dtype=torch.uint8)   # 1.0
    b_sf = torch.full((n, k // 16), 0x38, dtype=torch.uint8)
    alpha = torch.tensor(0.125)
    y64, absdot = nvfp4_gemm_f64(pack(a_codes), a_sf, pack(b_codes), b_sf, alpha)
    y = candidate_gemm(pack(a_codes), a_sf, pack(b_codes), b_sf, alpha)
    assert float((y.double() - y64).abs().max()) == 0.0
    assert float(bound_ratio(y, y64, gemm_error_bound(absdot, y64, alpha, k=k, u_acc=U_FP32))) == 0.0
    assert float(y64.abs().max()) > 1.0, "the data must not be trivially zero"


def corrupt(kind: str, packed: torch.Tensor, sf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    packed, sf = packed.clone(), sf.clone()
    if kind == "misplaced_block_scale":
        r = int(torch.nonzero(sf[:, 0] != sf[:, 1])[0])  # a row whose first two scales differ
        sf[r, 0], sf[r, 1] = int(sf[r, 1]), int(sf[r, 0])
    elif kind == "swapped_nibble":
        lo, hi = packed & 0xF, packed >> 4
        r, c = (int(v) for v in torch.nonzero((lo != hi) & (lo != 0) & (hi != 0))[0])
        packed[r, c] = (lo[r, c] << 4) | hi[r, c]
    elif kind == "transposed_scale_matrix":
        assert sf.shape[0] == sf.shape[1]
        sf = sf.T.contiguous()
    return packed, sf


@pytest.mark.parametrize("kind", ["misplaced_block_scale", "swapped_nibble", "transposed_scale_matrix"])
def test_each_layout_bug_exceeds_the_bound(kind):
    m, n, k = 8, 32, 512  # B's scale matrix is square (32 x 32) so it can be transposed
    qa, qb = make_nvfp4(m, k, 4), make_nvfp4(n, k, 5)
    alpha = qa.global_dec_scale() * qb.global_dec_scale()
    y64, absdot = nvfp4_gemm_f64(qa.packed_u8, qa.sf_u8, qb.packed_u8, qb.sf_u8, alpha)
    bad_packed, bad_sf = corrupt(kind, qb.packed_u8, qb.sf_u8)
    y_bad = candidate_gemm(qa.packed_u8, qa.sf_u8, bad_packed, bad_sf, alpha)
    ratio = float(bound_ratio(y_bad, y64, gemm_error_bound(absdot, y64, alpha, k=k, u_acc=U_FP32)))
    assert ratio > 1.0, f"{kind}: bound ratio {ratio} should exceed 1"
    with pytest.raises(AssertionError, match="exceed the accumulation bound"):
        assert_within_gemm_bound(y_bad, y64, gemm_error_bound(absdot, y64, alpha, k=k, u_acc=U_FP32), label=kind)


def test_grouped_reference_with_zero_token_experts_matches_dense_per_expert():
    k, n = 128, 24
    counts = [3, 0, 5, 0, 1]
    offsets = torch.tensor([0] + torch.cumsum(torch.tensor(counts), 0).tolist())
    qa = make_nvfp4(int(offsets[-1]), k, 6)
    qbs = [make_nvfp4(n, k, 10 + e) for e in range(len(counts))]
    b_packed = torch.stack([q.packed_u8 for q in qbs])
    b_sf = torch.stack([q.sf_u8 for q in qbs])
    alphas = torch.stack([qa.global_dec_scale() * q.global_dec_scale() for q in qbs])
    y64, absdot = nvfp4_grouped_gemm_f64(qa.packed_u8, qa.sf_u8, b_packed, b_sf, offsets, alphas)
    for e, q in enumerate(qbs):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        ye, _ = nvfp4_gemm_f64(qa.packed_u8[lo:hi], qa.sf_u8[lo:hi], q.packed_u8, q.sf_u8, alphas[e])
        assert torch.equal(y64[lo:hi], ye), f"expert {e} rows {lo}:{hi}"
    y = torch.cat([candidate_gemm(qa.packed_u8[int(offsets[e]):int(offsets[e + 1])], qa.sf_u8[int(offsets[e]):int(offsets[e + 1])],
                                  q.packed_u8, q.sf_u8, alphas[e]) for e, q in enumerate(qbs)])
    bound = grouped_gemm_error_bound(absdot, y64, alphas, offsets, k=k, u_acc=U_FP32)
    assert_within_gemm_bound(y, y64, bound, label="grouped candidate")


def test_grouped_reference_rejects_inconsistent_offsets():
    qa = make_nvfp4(4, 32, 7)
    qb = make_nvfp4(8, 32, 8)
    with pytest.raises(ValueError, match="offsets_i64"):
        nvfp4_grouped_gemm_f64(qa.packed_u8, qa.sf_u8, qb.packed_u8[None], qb.sf_u8[None],
                               torch.tensor([0, 3]), torch.ones(1))
