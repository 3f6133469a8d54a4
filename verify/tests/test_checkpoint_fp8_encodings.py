"""Every shipped FP8 block-scale encoding loads as the one Fp8BlockLinear (NVFP4_FACTS.md 5b), and the
known encoding mistakes are refused by the loader (exit 2) and by lint (exit 1), naming the tensor.

Each encoding is the mini-v4 fixture with layer 1's FP8 linears (attention and shared expert)
re-encoded to decode to exactly the same weights: the E8M0 scale 2^(b-127) as V3 `weight_scale_inv`
F32, compressed-tensors `weight_scale` BF16 / F32, ModelOpt FP8_PB_WO 4-D [ob, 1, ib, 1], or one
per-tensor `weight_scale` (+ `input_scale`) with the E4M3 bytes re-quantized to it (exactness
asserted; only the 7 linears whose block scales are all equal: wq_a stays V4, see _per_tensor).
`python -m verify layer --backend emulator --layers 1` must then give the same verdict statuses and
the same emulated digests as the V4-encoded original. A layer that stores the indexer's wq_b gets
its stage (indexer.wq_b); the fixture, without it, skips the stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from references.codecs import e4m3_bytes_to_f32, f32_to_e4m3_bytes
from verify.backends.sm90 import fp8_block_dec_f32
from verify.checkpoint import Checkpoint, Fp8BlockLinear, iter_linears
from verify.checkpoint.lint import add_lint_arguments, cli_lint
from verify.checkpoint.writer import make_edited_checkpoint
from verify.config import GOLDEN_DIR
from verify.verdicts.judges.dense import _fp8_block_weight

MINI_V4 = GOLDEN_DIR / "mini-v4"
LAYER = 1
EDITED = "layers.1.attn.wq_a"  # the module a mistake is planted in: weight [128, 256], scale [1, 2]


def _fp8_modules() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (E4M3 weight bytes uint8 [N, K], E8M0 scale bytes uint8) of layer 1's FP8 linears."""
    layer = Checkpoint.open(MINI_V4).load_layer(LAYER)
    fp8 = {m: lin for m, lin in iter_linears(layer) if isinstance(lin, Fp8BlockLinear)}
    assert len(fp8) == 8 and {lin.encoding for lin in fp8.values()} == {"v4_e8m0_scale"}
    return {m: (lin.weight_e4m3.view(torch.uint8), lin.scale_ue8m0.view(torch.uint8)) for m, lin in fp8.items()}


def _pow2(b_u8: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones(b_u8.shape, dtype=torch.float32), b_u8.to(torch.int32) - 127)


def _decoded(w_u8: torch.Tensor, s_f32: torch.Tensor) -> torch.Tensor:
    full = s_f32.repeat_interleave(128, 0)[: w_u8.shape[0]].repeat_interleave(128, 1)[:, : w_u8.shape[1]]
    return e4m3_bytes_to_f32(w_u8).double() * full.double()


def _per_tensor(w_u8: torch.Tensor, s_u8: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The same weight with one scale, where its block scales are all equal (None: keep the V4
    encoding; wq_a's blocks differ, 2^-6 and 2^-7, and E4M3 cannot hold one block at the other's scale
    exactly: the larger block's values above 224 would overflow, the smaller one's low bits fall off)."""
    if int(s_u8.min()) != int(s_u8.max()):
        return None
    s = _pow2(s_u8.max().reshape(()))
    w = _decoded(w_u8, _pow2(s_u8))
    q = f32_to_e4m3_bytes((w / s.double()).float(), saturate=False)
    assert torch.equal(e4m3_bytes_to_f32(q).double() * s.double(), w), "per-tensor re-encoding is not exact"
    return {"weight": q.view(torch.float8_e4m3fn), "weight_scale": s, "input_scale": torch.tensor(0.03125)}


ENCODINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]] = {
    "v3_weight_scale_inv": lambda w, s: {"weight_scale_inv": _pow2(s)},
    "ct_fp8_block-bf16": lambda w, s: {"weight_scale": _pow2(s).to(torch.bfloat16)},
    "ct_fp8_block-f32": lambda w, s: {"weight_scale": _pow2(s)},
    "modelopt_fp8_pb_wo": lambda w, s: {"weight_scale": _pow2(s)[:, None, :, None].contiguous()},
    "per_tensor": _per_tensor,
}


def _reencoding_edit(encode) -> Callable:
    """make_edited_checkpoint's edit: each FP8 module's `.scale` becomes the encoding's tensors (the
    `.weight` too where the encoding re-quantizes it)."""
    modules = _fp8_modules()
    new = {m: t for m, (w, s) in modules.items() if (t := encode(w, s)) is not None}

    def edit(name: str, t: torch.Tensor):
        module, _, suffix = name.rpartition(".")
        if module not in new:
            return t
        if suffix == "scale":
            return {f"{module}.{k}": v for k, v in new[module].items() if k != "weight"}
        return new[module].get(suffix, t)
    return edit


def _layer_json(tmp_path: Path, checkpoint: Path, capsys) -> tuple[int, dict, str]:
    from verify.__main__ import main

    out = tmp_path / f"{checkpoint.name}.json"
    rc = main(["layer", "--backend", "emulator", "--checkpoint", str(checkpoint), "--layers", str(LAYER),
               "--json", str(out)])
    text = capsys.readouterr()
    return rc, (json.loads(out.read_text()) if out.exists() else {}), text.out + text.err


def _statuses_and_digests(report: dict) -> tuple[dict, dict]:
    (run,) = report["runs"].values()
    return ({(v["stage"], v["check"]): v["status"] for v in run["verdicts"]}, run["digests"])


def _lint(checkpoint: Path, tmp_path: Path) -> tuple[int, dict]:
    p = argparse.ArgumentParser()
    add_lint_arguments(p)
    out = tmp_path / "lint.json"
    rc = cli_lint(p.parse_args(["--checkpoint", str(checkpoint), "--layers", str(LAYER), "--json", str(out)]))
    return rc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[dict, dict]:
    from verify.__main__ import main

    out = tmp_path_factory.mktemp("orig") / "orig.json"
    assert main(["layer", "--backend", "emulator", "--checkpoint", str(MINI_V4), "--layers", str(LAYER),
                 "--json", str(out)]) == 0
    statuses, digests = _statuses_and_digests(json.loads(out.read_text()))
    assert any(s == "pass" for (stage, _), s in statuses.items() if stage == "attn.wq_a")
    assert any(k.startswith("attn.wq_a") for k in digests)
    return statuses, digests


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_each_fp8_encoding_loads_and_verifies_like_the_v4_original(encoding, original, tmp_path, capsys):
    ck_dir = make_edited_checkpoint(MINI_V4, tmp_path / encoding, _reencoding_edit(ENCODINGS[encoding]))
    ck = Checkpoint.open(ck_dir)
    layer = ck.load_layer(LAYER)
    want = encoding.split("-")[0]
    fp8 = {m: lin for m, lin in iter_linears(layer) if isinstance(lin, Fp8BlockLinear)}
    kept = {EDITED} if want == "per_tensor" else set()  # see _per_tensor
    assert len(fp8) == 8 and {m for m, lin in fp8.items() if lin.encoding != want} == kept
    ref = {m: _decoded(w, _pow2(s)) for m, (w, s) in _fp8_modules().items()}
    for m, lin in fp8.items():  # the same weight, to the bit, in the form the backends consume
        assert m in kept or (lin.scale_ue8m0 is None and lin.scale_inv_f32.dtype == torch.float32)
        assert torch.equal(_decoded(lin.weight_e4m3.view(torch.uint8), lin.block_dec_scale_f32()), ref[m]), m
        # the sm90 adapter's decode and the dense judge's typed weight (the FP8 bound on a GPU backend)
        assert torch.equal(_decoded(lin.weight_e4m3.view(torch.uint8), fp8_block_dec_f32(lin)), ref[m]), m
        assert torch.equal(_fp8_block_weight(lin).decode_f64(), ref[m]), m
    if want == "per_tensor":
        assert all(float(lin.input_scale_f32) == 0.03125 for m, lin in fp8.items() if m not in kept)

    rc, report, text = _layer_json(tmp_path, ck_dir, capsys)
    assert rc == 0, text
    statuses, digests = _statuses_and_digests(report)
    assert statuses == original[0]
    assert digests == original[1]

    lint_rc, j = _lint(ck_dir, tmp_path)
    assert lint_rc == 0 and j["counts"]["error"] == 0, [f for f in j["findings"] if f["severity"] == "error"]
    named = {f["tensor"]: f["message"] for f in j["findings"] if f["code"] == "fp8_encoding"}
    assert set(named) == set(fp8), named
    assert all(msg.startswith(("v4_e8m0_scale" if m in kept else want) + ":") for m, msg in named.items()), named


def test_lint_names_the_v4_encoding_of_the_fixture(tmp_path):
    rc, j = _lint(MINI_V4, tmp_path)
    named = {f["tensor"]: f["message"] for f in j["findings"] if f["code"] == "fp8_encoding"}
    assert rc == 0 and set(named) == set(_fp8_modules())
    assert all(m.startswith("v4_e8m0_scale:") for m in named.values())


# ----------------------------------------------------------------------------- mistakes


def _only(module_suffix: str, fn) -> Callable:
    """An edit applying fn(name, tensor) -> tensor | dict | None to layer-1 wq_a's `suffix` tensor only."""
    target = f"{EDITED}.{module_suffix}"
    return lambda name, t: fn(name, t) if name == target else t


def _nan_byte(name, t):
    b = t.view(torch.uint8).clone()
    b.view(-1)[0] = 0xFF
    return b.view(torch.float8_e8m0fnu)


MISTAKES = {
    # E8M0 exponent bytes written as float numbers (121.0, not 2^-6) into a V3 weight_scale_inv
    "e8m0_bytes_as_numbers-v3": (
        _only("scale", lambda n, t: {f"{EDITED}.weight_scale_inv": t.view(torch.uint8).float()}),
        "ScaleEncodingError", "e8m0_bytes_as_numbers", f"{EDITED}.weight_scale_inv"),
    # the same numbers in a compressed-tensors weight_scale
    "e8m0_bytes_as_numbers-ct": (
        _only("scale", lambda n, t: {f"{EDITED}.weight_scale": t.view(torch.uint8).to(torch.bfloat16)}),
        "ScaleEncodingError", "e8m0_bytes_as_numbers", f"{EDITED}.weight_scale"),
    # V4's own `.scale` tensor stored as F32 numbers
    "e8m0_bytes_as_numbers-v4_f32": (
        _only("scale", lambda n, t: t.view(torch.uint8).float()),
        "DtypeMismatchError", "DtypeMismatchError", f"{EDITED}.scale"),
    "scale_grid_transposed": (
        _only("scale", lambda n, t: t.view(torch.uint8).T.contiguous().view(torch.float8_e8m0fnu)),
        "ShapeMismatchError", "ShapeMismatchError", f"{EDITED}.scale"),
    "scale_grid_not_ceil_div": (
        _only("scale", lambda n, t: t[:, :1].contiguous()),
        "ShapeMismatchError", "ShapeMismatchError", f"{EDITED}.scale"),
    "scale_grid_transposed-v3": (
        _only("scale", lambda n, t: {f"{EDITED}.weight_scale_inv": _pow2(t.view(torch.uint8)).T.contiguous()}),
        "ShapeMismatchError", "ShapeMismatchError", f"{EDITED}.weight_scale_inv"),
    "nan_e8m0_0xff": (_only("scale", _nan_byte), "NanScaleError", "nan_scale_bytes", f"{EDITED}.scale"),
    # ModelOpt's 4-D grid laid out [ob, ib, 1, 1] instead of [ob, 1, ib, 1]
    "modelopt_4d_not_ob_1_ib_1": (
        _only("scale", lambda n, t: {f"{EDITED}.weight_scale": _pow2(t.view(torch.uint8))[:, :, None, None]
                                     .contiguous()}),
        "ShapeMismatchError", "ShapeMismatchError", f"{EDITED}.weight_scale"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_fp8_encoding_mistake_is_refused_by_lint_and_layer_naming_the_tensor(mistake, tmp_path, capsys):
    edit, error, code, tensor = MISTAKES[mistake]
    ck_dir = make_edited_checkpoint(MINI_V4, tmp_path / "ck", edit)

    rc, j = _lint(ck_dir, tmp_path)
    errors = [f for f in j["findings"] if f["severity"] == "error"]
    assert rc == 1 and [(f["code"], f["tensor"]) for f in errors] == [(code, tensor)], errors

    rc, _, text = _layer_json(tmp_path, ck_dir, capsys)
    lines = [ln for ln in text.splitlines() if error in ln]
    assert rc == 2 and len(lines) == 1 and f"tensor '{tensor}'" in lines[0], text
    if "transposed" in mistake:
        assert "transposed" in lines[0], lines[0]
    if mistake.startswith("modelopt"):
        assert "[out_blk, 1, in_blk, 1]" in lines[0], lines[0]


# ----------------------------------------------------------------------------- the indexer's wq_b


INDEXER = "layers.1.attn.indexer.wq_b"


def _with_indexer(rows: int = 128, k_cols: int | None = None) -> Callable:
    """An edit adding layer 1's indexer wq_b (FP8, V4 encoding): the first `rows` rows of attn.wq_b
    (q_lora_rank -> rows), or a K cut to `k_cols` columns (a wrong shape)."""
    def edit(name: str, t: torch.Tensor):
        if name == "layers.1.attn.wq_b.weight":
            w = t[:rows] if k_cols is None else t[:rows, :k_cols]
            return {name: t, f"{INDEXER}.weight": w.contiguous()}
        if name == "layers.1.attn.wq_b.scale":
            return {name: t, f"{INDEXER}.scale": t[: -(-rows // 128)].contiguous()}
        return t
    return edit


def test_indexer_wq_b_is_loaded_verified_and_linted_where_stored(original, tmp_path, capsys):
    ck_dir = make_edited_checkpoint(MINI_V4, tmp_path / "idx", _with_indexer())
    lin = Checkpoint.open(ck_dir).load_layer(LAYER).attention["indexer.wq_b"]
    assert isinstance(lin, Fp8BlockLinear) and (lin.n, lin.k, lin.encoding) == (128, 128, "v4_e8m0_scale")

    rc, report, text = _layer_json(tmp_path, ck_dir, capsys)
    assert rc == 0, text
    statuses, digests = _statuses_and_digests(report)
    idx = {check: s for (stage, check), s in statuses.items() if stage == "indexer.wq_b"}
    assert idx["bytes"] in ("pass", "skipped") and idx["bound"] == "pass", idx
    assert {k: v for k, v in statuses.items() if k[0] != "indexer.wq_b"} == original[0]
    assert {k: v for k, v in digests.items() if not k.startswith("indexer.wq_b")} == original[1]
    assert "indexer.wq_b" in digests

    lint_rc, j = _lint(ck_dir, tmp_path)
    assert lint_rc == 0 and any(f["code"] == "fp8_encoding" and f["tensor"] == INDEXER for f in j["findings"])


def test_the_fixture_without_an_indexer_skips_its_stage(original):
    assert not any(stage == "indexer.wq_b" for stage, _ in original[0])


def test_an_indexer_wq_b_whose_k_is_not_q_lora_rank_is_refused(tmp_path, capsys):
    ck_dir = make_edited_checkpoint(MINI_V4, tmp_path / "idx", _with_indexer(k_cols=64))
    rc, j = _lint(ck_dir, tmp_path)
    errors = [(f["code"], f["tensor"]) for f in j["findings"] if f["severity"] == "error"]
    assert rc == 1 and errors == [("ShapeMismatchError", f"{INDEXER}.weight")], errors
    rc, _, text = _layer_json(tmp_path, ck_dir, capsys)
    assert rc == 2 and f"tensor '{INDEXER}.weight'" in text, text


def test_the_v4_pro_layer_preset_stores_the_indexer_wq_b_and_keeps_every_other_tensor(tmp_path):
    """At the reduced size of test_fixture_generation: layer 3 holds attn.indexer.wq_b (FP8, V4 encoding,
    [index_n_heads * index_head_dim, q_lora_rank]); without it, every other tensor has the same bytes."""
    import dataclasses

    from verify.checkpoint.writer import PRESETS, make_checkpoint

    p = PRESETS["v4-pro-layer"]
    small = dataclasses.replace(p, config=dict(p.config, hidden_size=256, n_routed_experts=6, moe_intermediate_size=128,
                                               vocab_size=512, num_attention_heads=4, head_dim=64, q_lora_rank=128,
                                               o_groups=2, o_lora_rank=64), experts_per_shard=2)
    make_checkpoint(tmp_path / "with", small)
    make_checkpoint(tmp_path / "without", dataclasses.replace(small, with_indexer=False))
    a, b = Checkpoint.open(tmp_path / "with"), Checkpoint.open(tmp_path / "without")
    lin = a.load_layer(3).attention["indexer.wq_b"]
    assert isinstance(lin, Fp8BlockLinear) and (lin.n, lin.k, lin.encoding) == (64 * 128, 128, "v4_e8m0_scale")
    assert set(a.weight_map) - set(b.weight_map) == {"layers.3.attn.indexer.wq_b.weight",
                                                     "layers.3.attn.indexer.wq_b.scale"}
    for name in b.weight_map:
        assert torch.equal(a.get_tensor(name).reshape(-1).view(torch.uint8),
                           b.get_tensor(name).reshape(-1).view(torch.uint8)), name
