"""Property-based fuzz suite of the scale layouts and weight views (references/layouts.py).

The byte-offset formulas of NVFP4_FACTS.md section 3 are written again here, in
numpy, and every swizzled buffer is rebuilt from them by scattering: the whole
buffer must equal that rebuild (so placement AND zero padding are checked at
once), and every layout must round-trip. Scale values are identity planes (each
(row, col) gets a distinct nonzero byte pair), so a wrong permutation cannot hide
behind equal bytes and padding cannot hide behind zero data, plus a random plane
that includes 0x00, 0x7F/0xFF (E4M3 NaN) bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from references.layouts import (
    deinterleave_gate_up,
    interleave_gate_up,
    is_k_major,
    k_major_view,
    layout_8x4_offset,
    sf_8x4_to_linear,
    sf_grouped_linear_to_swizzled_128x4,
    sf_grouped_swizzled_128x4_to_linear,
    sf_linear_to_8x4,
    sf_linear_to_swizzled_128x4,
    sf_swizzled_128x4_to_linear,
    swizzled_128x4_offset,
)
from verify.assertions import assert_bits_equal, assert_bytes_equal


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def offset_128x4(r: np.ndarray, c: np.ndarray, cols: int) -> np.ndarray:
    """NVFP4_FACTS section 3: ((r//128)*(Cp//4) + c//4)*512 + (r%32)*16 + ((r//32)%4)*4 + c%4."""
    cp = _round_up(cols, 4)
    return ((r // 128) * (cp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4


def offset_8x4(r: np.ndarray, c: np.ndarray, cols: int) -> np.ndarray:
    """NVFP4_FACTS section 3: (r//8)*(Cp//4)*32 + (c//4)*32 + (r%8)*4 + c%4."""
    cp = _round_up(cols, 4)
    return (r // 8) * (cp // 4) * 32 + (c // 4) * 32 + (r % 8) * 4 + c % 4


def planes(lead: tuple[int, ...], rows: int, cols: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """Two identity planes (together distinct per element, never 0) and one random plane."""
    n = int(np.prod(lead, dtype=np.int64)) * rows * cols
    idx = np.arange(n, dtype=np.int64).reshape(*lead, rows, cols)
    rnd = np.random.default_rng(seed).integers(0, 256, size=idx.shape, dtype=np.int64)
    rnd.reshape(-1)[: min(n, 3)] = [0x00, 0x7F, 0xFF][: min(n, 3)]
    return [("id_lo", (idx % 251 + 1).astype(np.uint8)), ("id_hi", (idx // 251 % 251 + 1).astype(np.uint8)),
            ("random", rnd.astype(np.uint8))]


def scatter_by_offsets(sf: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """Zero buffer [..., size] with sf[..., r, c] written at offsets[r, c] (independently of references/)."""
    lead = sf.shape[:-2]
    out = np.zeros((*lead, size), dtype=np.uint8)
    out[..., offsets.reshape(-1)] = sf.reshape(*lead, -1)
    return out


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).copy())


LEAD = st.sampled_from(((), (), (1,), (2,), (3,)))


# ----------------------------------------------------------------------------- 128x4


@pytest.mark.fuzz
@given(lead=LEAD, rows=st.integers(1, 300), cols=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
@example(lead=(), rows=1, cols=1, seed=0)
@example(lead=(), rows=128, cols=4, seed=0)      # exactly one tile, no padding
@example(lead=(2,), rows=129, cols=5, seed=0)    # one row and one column into the next tiles
@example(lead=(), rows=7168 // 16, cols=3, seed=0)
def test_swizzle_128x4_is_the_offset_formula_and_round_trips(lead, rows, cols, seed):
    rp, cp = _round_up(rows, 128), _round_up(cols, 4)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    off = offset_128x4(r, c, cols)
    assert np.array_equal(swizzled_128x4_offset(_t(r), _t(c), cols=cols).numpy(), off), \
        "references.layouts.swizzled_128x4_offset differs from NVFP4_FACTS' formula"
    for name, sf in planes(lead, rows, cols, seed):
        buf = sf_linear_to_swizzled_128x4(_t(sf))
        assert tuple(buf.shape) == (*lead, rp, cp), f"swizzled shape {tuple(buf.shape)} != {(*lead, rp, cp)}"
        assert_bytes_equal(buf.reshape(*lead, rp * cp), _t(scatter_by_offsets(sf, off, rp * cp)),
                           label=f"128x4 swizzle [{name} plane, {rows}x{cols}, lead {lead}] vs offset formula "
                                 "(padding must be zero)")
        back = sf_swizzled_128x4_to_linear(buf, rows=rows, cols=cols)
        assert_bytes_equal(back, _t(sf), label=f"128x4 round trip [{name} plane, {rows}x{cols}]")
        flat_back = sf_swizzled_128x4_to_linear(buf.reshape(*lead, rp * cp), rows=rows, cols=cols)
        assert_bytes_equal(flat_back, _t(sf), label=f"128x4 round trip from the flat buffer [{name} plane]")
    as_e4m3 = sf_linear_to_swizzled_128x4(_t(sf).view(torch.float8_e4m3fn))
    assert_bytes_equal(as_e4m3, buf, label="128x4 swizzle of a float8_e4m3fn view == of its bytes")


# ----------------------------------------------------------------------------- 8x4


@pytest.mark.fuzz
@given(lead=LEAD, rows=st.integers(1, 48), cols=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
@example(lead=(), rows=1, cols=1, seed=0)
@example(lead=(), rows=32, cols=8, seed=0)
@example(lead=(3,), rows=9, cols=5, seed=0)
def test_layout_8x4_is_the_offset_formula_and_round_trips(lead, rows, cols, seed):
    rp, cp = _round_up(rows, 8), _round_up(cols, 4)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    off = offset_8x4(r, c, cols)
    assert np.array_equal(layout_8x4_offset(_t(r), _t(c), cols=cols).numpy(), off), \
        "references.layouts.layout_8x4_offset differs from NVFP4_FACTS' formula"
    for name, sf in planes(lead, rows, cols, seed):
        buf = sf_linear_to_8x4(_t(sf))
        assert tuple(buf.shape) == (*lead, rp, cp), f"8x4 shape {tuple(buf.shape)} != {(*lead, rp, cp)}"
        assert_bytes_equal(buf.reshape(*lead, rp * cp), _t(scatter_by_offsets(sf, off, rp * cp)),
                           label=f"8x4 layout [{name} plane, {rows}x{cols}, lead {lead}] vs offset formula "
                                 "(padding rows must be zero)")
        assert_bytes_equal(sf_8x4_to_linear(buf, rows=rows, cols=cols), _t(sf),
                           label=f"8x4 round trip [{name} plane, {rows}x{cols}]")


# ----------------------------------------------------------------------------- grouped (MoE)

COUNT = st.one_of(st.just(0), st.integers(1, 260), st.sampled_from((1, 127, 128, 129, 256)))


@pytest.mark.fuzz
@given(counts=st.lists(COUNT, min_size=1, max_size=5), cols=st.integers(1, 10), seed=st.integers(0, 2**32 - 1))
@example(counts=[0], cols=1, seed=0)              # no tokens at all
@example(counts=[0, 0, 5, 0], cols=3, seed=0)     # zero-token experts around one ragged expert
@example(counts=[128, 0, 1, 129], cols=4, seed=0)
def test_grouped_swizzle_pads_each_expert_and_round_trips(counts, cols, seed):
    counts_np = np.array(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts_np)])
    padded_rows = np.array([_round_up(int(n), 128) for n in counts], dtype=np.int64)
    padded_offsets = np.concatenate([[0], np.cumsum(padded_rows)])
    total, total_p, cp = int(offsets[-1]), int(padded_offsets[-1]), _round_up(cols, 4)
    # destination row of every source row: expert e's local row i -> padded_offsets[e] + i
    dest = np.concatenate([np.arange(n) + padded_offsets[e] for e, n in enumerate(counts)] + [np.zeros(0, np.int64)])
    r, c = np.meshgrid(dest, np.arange(cols), indexing="ij")
    off = offset_128x4(r, c, cols)
    for name, sf in planes((), total, cols, seed)[:2]:  # the identity planes fix the permutation
        buf, got_padded = sf_grouped_linear_to_swizzled_128x4(_t(sf), _t(offsets))
        assert got_padded.tolist() == padded_offsets.tolist(), \
            f"padded offsets {got_padded.tolist()} != {padded_offsets.tolist()} for counts {counts}"
        assert tuple(buf.shape) == (total_p, cp), f"grouped buffer shape {tuple(buf.shape)} != {(total_p, cp)}"
        assert_bytes_equal(buf.reshape(-1), _t(scatter_by_offsets(sf, off, total_p * cp)),
                           label=f"grouped 128x4 [{name} plane, counts {counts}, cols {cols}] vs offset formula "
                                 "(padding must be zero)")
        # second route: swizzle each expert alone and concatenate
        parts = [sf_linear_to_swizzled_128x4(_t(sf[offsets[e]:offsets[e + 1]])).reshape(-1)
                 for e, n in enumerate(counts) if n > 0]
        concat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
        assert_bytes_equal(buf.reshape(-1), concat, label=f"grouped 128x4 vs per-expert swizzles concatenated [{name}]")
        back = sf_grouped_swizzled_128x4_to_linear(buf, _t(offsets), cols=cols)
        assert_bytes_equal(back, _t(sf), label=f"grouped round trip [{name} plane, counts {counts}]")


# ----------------------------------------------------------------------------- gate/up interleave

GRANULARITY = st.one_of(st.sampled_from((1, 2, 4, 8, 16, 32, 64, 128)), st.integers(1, 48))


@pytest.mark.fuzz
@pytest.mark.parametrize("name,dtype", [pytest.param("int64 identity", np.int64, id="identity"),
                                        pytest.param("packed bytes", np.uint8, id="bytes")])
@given(g=GRANULARITY, groups=st.integers(1, 8), rest=st.sampled_from(((), (3,), (8,), (2, 4))),
       seed=st.integers(0, 2**32 - 1))
@example(g=8, groups=2, rest=(8,), seed=0)   # NVFP4_FACTS: [g0..g7, u0..u7, ...]
@example(g=1, groups=1, rest=(), seed=0)
def test_gate_up_interleave_puts_rows_where_the_formula_says(name, dtype, g, groups, rest, seed):
    n = g * groups
    rng = np.random.default_rng(seed)
    if dtype is np.int64:
        tag = np.arange(n * max(1, int(np.prod(rest, dtype=np.int64))), dtype=np.int64).reshape(n, *rest)
        gate, up = tag + 1, -(tag + 1)  # every gate and up element distinct
    else:
        gate = rng.integers(0, 256, size=(n, *rest)).astype(np.uint8)
        up = rng.integers(0, 256, size=(n, *rest)).astype(np.uint8)
    j = np.arange(n)
    gate_pos = (j // g) * 2 * g + j % g          # row j of gate
    up_pos = (j // g) * 2 * g + g + j % g        # row j of up
    expected = np.zeros((2 * n, *rest), dtype=dtype)
    expected[gate_pos], expected[up_pos] = gate, up
    fused = interleave_gate_up(_t(gate), _t(up), granularity=g)
    assert_bits_equal(fused, _t(expected), label=f"gate/up interleave [{name}, granularity {g}, N {n}]")
    g2, u2 = deinterleave_gate_up(fused, granularity=g)
    assert_bits_equal(g2, _t(gate), label=f"deinterleave gate [{name}, granularity {g}]")
    assert_bits_equal(u2, _t(up), label=f"deinterleave up [{name}, granularity {g}]")
    if dtype is np.int64 and g % 2 == 0:
        # the shipped bug (granularity // 2, "one byte holds two columns") is told apart
        halved = interleave_gate_up(_t(gate), _t(up), granularity=g // 2)
        assert not torch.equal(halved, _t(expected)), "granularity // 2 should not match the formula"


# ----------------------------------------------------------------------------- K-major view


def _n_major(e: int, n: int, k2: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(e, n, k2)).astype(np.uint8))
    return w, w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [E, N, K/2] with N contiguous


# K/2 >= 2: the stride of a size-1 dimension is meaningless (torch keeps any value there).
KMAJOR_ARGS = dict(e=st.integers(1, 3), n=st.integers(1, 40), k2=st.integers(2, 40), seed=st.integers(0, 2**32 - 1))


@pytest.mark.fuzz
@given(**KMAJOR_ARGS)
def test_k_major_view_keeps_shape_and_values(e, n, k2, seed):
    w, n_major = _n_major(e, n, k2, seed)
    v = k_major_view(n_major)
    assert tuple(v.shape) == (e, n, k2), f"shape changed: {tuple(v.shape)}"
    assert_bytes_equal(v, w, label=f"k_major_view values [{e}x{n}x{k2}]")
    assert k_major_view(w) is w, "a K-major tensor is returned as is"


# Regression: this property found that k_major_view returned transpose(-1,-2).contiguous()
# .transpose(-1,-2) of an N-major [..., N, K/2] tensor, i.e. the same N-major layout (the
# transposed view is already contiguous, so nothing was copied): strides (4, 1, 2) in and out
# for the pinned example. Fixed in 64f488b (.contiguous()).
@pytest.mark.fuzz
@given(**KMAJOR_ARGS)
@example(e=1, n=2, k2=2, seed=0)  # the minimal counterexample: strides (4, 1, 2) in, (4, 1, 2) out
def test_k_major_view_returns_k_contiguous_strides(e, n, k2, seed):
    _, n_major = _n_major(e, n, k2, seed)
    v = k_major_view(n_major)
    assert v.stride(-1) == 1 and is_k_major(v), \
        f"k_major_view of an N-major {tuple(n_major.shape)} tensor (strides {n_major.stride()}) " \
        f"returned strides {v.stride()}: not K-major"
