"""references.linear.decode_weight_f64 remembers recent results (_decoded_memo): what it may never do is hand back a
stale or shared decode. A changed weight (in place, through a view, or a new tensor at another place) is decoded
again; a caller writing into a result cannot change the next one; an expert view of a stack is one entry."""

from __future__ import annotations

import torch

import references.linear as lin
from references.codecs import e4m3_bytes_to_f32
from references.linear import Fp8Block128Weight, Nvfp4Weight, decode_weight_f64
from references.nvfp4 import decode_nvfp4_block_scaled
from verify.assertions import assert_bits_equal


def _nvfp4(seed: int, e: int = 3, n: int = 8, k: int = 64) -> Nvfp4Weight:
    g = torch.Generator().manual_seed(seed)
    return Nvfp4Weight(torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=g),
                       torch.randint(0x20, 0x40, (e, n, k // 16), dtype=torch.uint8, generator=g),
                       torch.ones(e))


def _counting(monkeypatch) -> list[int]:
    calls = [0]

    def counted(*a, **k):
        calls[0] += 1
        return decode_nvfp4_block_scaled(*a, **k)

    monkeypatch.setattr(lin, "decode_nvfp4_block_scaled", counted)
    monkeypatch.setattr(lin, "_DECODE_MEMO", type(lin._DECODE_MEMO)())
    monkeypatch.setattr(lin, "_decode_memo_held", 0)
    return calls


def test_a_repeated_decode_is_remembered_and_never_shared(monkeypatch):
    calls = _counting(monkeypatch)
    w = _nvfp4(1)
    first = decode_weight_f64(w.expert(1))
    want = decode_nvfp4_block_scaled(w.packed_u8[1], w.sf_u8[1], dtype=torch.float64)
    first.fill_(7.0)  # a caller writing into its result
    again = decode_weight_f64(w.expert(1))  # a new view object of the same bytes
    assert calls[0] == 1, f"{calls[0]} decodes of one expert (the view of the stack should hit)"
    assert_bits_equal(again, want, label="second decode of expert 1 after the first result was overwritten")
    assert again.data_ptr() != first.data_ptr()


def test_a_changed_weight_is_decoded_again(monkeypatch):
    calls = _counting(monkeypatch)
    w = _nvfp4(2)
    decode_weight_f64(w.expert(0))
    w.packed_u8[0, 3, 5] ^= 0x77  # in place, through the stack (the view's version counter moves with it)
    got = decode_weight_f64(w.expert(0))
    assert calls[0] == 2
    assert_bits_equal(got, decode_nvfp4_block_scaled(w.packed_u8[0], w.sf_u8[0], dtype=torch.float64),
                      label="decode after an in-place change of the packed bytes")
    w.sf_u8[0].mul_(1)  # a write that leaves the values: still a new version, decoded again (never stale)
    decode_weight_f64(w.expert(0))
    assert calls[0] == 3
    other = _nvfp4(3)  # other bytes, same shapes
    assert_bits_equal(decode_weight_f64(other.expert(0)),
                      decode_nvfp4_block_scaled(other.packed_u8[0], other.sf_u8[0], dtype=torch.float64),
                      label="decode of another weight of the same shape")


def test_fp8_block_weights_are_remembered_by_bytes_and_scales(monkeypatch):
    monkeypatch.setattr(lin, "_DECODE_MEMO", type(lin._DECODE_MEMO)())
    monkeypatch.setattr(lin, "_decode_memo_held", 0)
    g = torch.Generator().manual_seed(4)
    w = Fp8Block128Weight(torch.randint(0, 0x7E, (130, 256), dtype=torch.uint8, generator=g),
                          torch.rand(2, 2, generator=g) + 0.5)
    a = decode_weight_f64(w)
    w.block_dec_f32[1, 1] = 4.0
    b = decode_weight_f64(w)
    want = e4m3_bytes_to_f32(w.e4m3_u8[128:, 128:]).double() * 4.0
    assert_bits_equal(b[128:, 128:], want, label="the block whose scale changed")
    assert not torch.equal(a, b), "a changed block scale must change the decode"
    assert_bits_equal(b[:128], a[:128], label="rows of the unchanged scale blocks")


def test_the_memo_stays_within_its_byte_bound(monkeypatch):
    monkeypatch.setattr(lin, "_DECODE_MEMO", type(lin._DECODE_MEMO)())
    monkeypatch.setattr(lin, "_decode_memo_held", 0)
    monkeypatch.setattr(lin, "_DECODE_MEMO_BYTES", 3 * 8 * 8 * 64)  # three [8, 64] float64 results
    ws = [_nvfp4(10 + i, e=1) for i in range(5)]
    for w in ws:
        decode_weight_f64(w.expert(0))
    assert len(lin._DECODE_MEMO) == 3 and lin._decode_memo_held == 3 * 8 * 8 * 64


def test_inference_mode_weights_are_decoded_every_time(monkeypatch):
    """Tensors made under torch.inference_mode have no version counter: never remembered (decoded each call)."""
    calls = _counting(monkeypatch)
    with torch.inference_mode():
        w = _nvfp4(5)
    a, b = decode_weight_f64(w.expert(2)), decode_weight_f64(w.expert(2))
    assert calls[0] == 2 and not lin._DECODE_MEMO
    assert_bits_equal(a, b, label="two decodes of one inference-mode expert")
