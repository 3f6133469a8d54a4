"""lint's checkpoint contract (issue 26 item 5): the re-quantization contract of NVFP4 blocks and the config's
declared formats against the stored ones (verify.checkpoint.requant, verify.checkpoint.lint).

Planted defects: codes quantized with unrounded scales next to the rounded scales (flagged where the stored
scale contradicts the codes: a scale that underflowed to zero, te; invisible in E4M3's normal range by
construction, which a test pins so the docstring's claim is checked, not only stated); codes quantized with
scales rounded UP to a power of two next to E4M3-rounded scales (flagged under the default modelopt recipe);
codes quantized with the tensor's scale instead of the block's. A clean fixture is clean.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from references.codecs import e4m3_bytes_to_f32, f32_to_e2m1_codes, f32_to_e4m3_bytes
from references.nvfp4 import (block_scale_f32, decode_nvfp4_block_scaled, global_dec_scale_from_amax,
                              global_enc_scale_from_dec, pack_e2m1x2_low_first, quantize_nvfp4,
                              quantize_nvfp4_weight_checkpoint)
from references.recipes import MODELOPT, TE
from verify.checkpoint.lint import lint_checkpoint
from verify.checkpoint.requant import feasible_max_codes, requant_contract
from verify.checkpoint.writer import make_edited_checkpoint
from verify.config import GOLDEN_DIR

pytestmark = pytest.mark.lint
MINI_V4 = GOLDEN_DIR / "mini-v4"
EXPERT = "layers.0.ffn.experts.3.w1"


def _weights(rows=64, cols=256, *, seed=0, tiny_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-3, 3, (rows, 1), generator=g).float())
    for r in tiny_rows:
        w[r] *= 2.0**-22  # its blocks' scales underflow E4M3 (t < 2^-10)
    return w


def _export_unrounded(w, recipe):
    """A buggy exporter: block scale t by the recipe, stored rounded (E4M3 RNE), codes quantized with t unrounded."""
    dec = global_dec_scale_from_amax(w.abs().amax().float())
    g = dec if recipe.global_convention == "dec" else global_enc_scale_from_dec(dec)
    xb = w.reshape(w.shape[0], -1, 16)
    t = block_scale_f32(xb.abs().amax(-1), recipe=recipe, global_scale_f32=g)
    codes = f32_to_e2m1_codes(xb / (t.unsqueeze(-1) * dec), sign_rule=recipe.sign_rule).reshape(w.shape)
    return pack_e2m1x2_low_first(codes), f32_to_e4m3_bytes(t, saturate=True), dec


def _contract(packed, sf_u8, dec, recipe):
    return requant_contract("w", packed, sf_u8.view(torch.float8_e4m3fn), dec, recipe=recipe)


# ============================================================================= the contract, unit level


@pytest.mark.parametrize("recipe", [MODELOPT, TE], ids=lambda r: r.name)
def test_a_correct_export_comes_back_or_is_classed(recipe):
    w = _weights(tiny_rows=(5, 9))
    dec = global_dec_scale_from_amax(w.abs().amax().float())
    g = dec if recipe.global_convention == "dec" else global_enc_scale_from_dec(dec)
    q = quantize_nvfp4(w, recipe=recipe, **{f"global_{recipe.global_convention}_scale_f32": g})
    r = _contract(q.packed_u8, q.sf_u8, dec, recipe)
    assert r.flagged == 0, r
    assert r.returned + sum(r.by_design.values()) == r.blocks
    if recipe is TE:
        assert r.by_design.get("zero_scale", 0) == 2 * 16, "tiny rows underflow to zero scales, codes saturated"


def test_unrounded_scale_codes_next_to_an_underflowed_zero_scale_are_flagged():
    packed, sf, dec = _export_unrounded(_weights(tiny_rows=(5, 9)), TE)
    assert int((sf[5] == 0).sum()) == 16, "the planted rows' scales underflow to zero"
    r = _contract(packed, sf, dec, TE)
    assert r.flagged == 2 * 16 and r.first_flagged == (None, 5, 0), r
    assert "zero block scale" in r.first_reason and "other than the one stored" in r.first_reason


def test_unrounded_scale_codes_in_the_normal_range_are_the_recipes_codes_of_another_input():
    """The blind spot the docstring proves: such a block is byte for byte the recipe's output for x * s / t,
    so it comes back; if this ever fails, the contract can see more than documented."""
    w = _weights()
    packed, sf, dec = _export_unrounded(w, MODELOPT)
    s = e4m3_bytes_to_f32(sf).unsqueeze(-1)
    t = block_scale_f32(w.reshape(64, -1, 16).abs().amax(-1), recipe=MODELOPT, global_scale_f32=dec).unsqueeze(-1)
    assert bool((s != t).any()), "the planted export must use scales that differ from the stored ones"
    other = (w.reshape(64, -1, 16) * (s / t)).reshape(w.shape)
    q = quantize_nvfp4(other, recipe=MODELOPT, global_dec_scale_f32=dec)
    same = f32_to_e2m1_codes(decode_nvfp4_block_scaled(q.packed_u8, q.sf_u8), sign_rule="lt_zero") & 7
    got = f32_to_e2m1_codes(decode_nvfp4_block_scaled(packed, sf), sign_rule="lt_zero") & 7
    assert torch.equal(same, got) and torch.equal(q.sf_u8, sf)
    assert _contract(packed, sf, dec, MODELOPT).flagged == 0


def test_codes_quantized_with_scales_rounded_up_to_a_power_of_two_next_to_rne_scales_are_flagged():
    """The exporter quantized codes with UE8M0-style scales (t rounded UP to a power of two, up to 2 t) but
    stored t rounded to nearest E4M3: the largest code falls below 6 under a normal scale."""
    w = _weights()
    dec = global_dec_scale_from_amax(w.abs().amax().float())
    xb = w.reshape(w.shape[0], -1, 16)
    t = block_scale_f32(xb.abs().amax(-1), recipe=MODELOPT, global_scale_f32=dec)
    codes = f32_to_e2m1_codes(xb / (torch.exp2(torch.ceil(torch.log2(t))).unsqueeze(-1) * dec), sign_rule="lt_zero")
    r = _contract(pack_e2m1x2_low_first(codes.reshape(w.shape)), f32_to_e4m3_bytes(t, saturate=True), dec, MODELOPT)
    assert r.flagged > r.blocks // 10, r
    assert "this recipe gives that scale a largest code of 6" in r.first_reason


def test_codes_quantized_with_the_tensor_scale_instead_of_the_block_scale_are_flagged():
    w = _weights()
    ck = quantize_nvfp4_weight_checkpoint(w, recipe=MODELOPT)
    codes = f32_to_e2m1_codes(w / (448 * ck["weight_scale_2"]), sign_rule="lt_zero")
    r = requant_contract("w", pack_e2m1x2_low_first(codes), ck["weight_scale"], ck["weight_scale_2"], recipe=MODELOPT)
    assert r.flagged > r.blocks // 2, r


def test_feasible_largest_codes_follow_the_e4m3_cell_of_each_scale():
    assert feasible_max_codes(0x38, MODELOPT) == {7: "exact"}, "a normal scale: the largest code is 6"
    assert feasible_max_codes(0x7E, MODELOPT) == {7: "exact"}, "448 saturates: still 6"
    assert feasible_max_codes(0x01, TE) == {5: "exact", 6: "exact", 7: "exact"}, "2^-9: 6t/s in [3, 9]"
    assert feasible_max_codes(0x03, TE) == {6: "tie", 7: "exact"}, "3 x 2^-9: 6t/s in [5, 7], 5 ties to 4"
    assert set(feasible_max_codes(0x01, MODELOPT)) == set(range(8)), "modelopt's lower clamp 2^-9"


# ============================================================================= lint, end to end


def _replace_expert(tmp_path: Path, packed, sf_u8, dec) -> Path:
    def edit(name, t):
        if name == f"{EXPERT}.weight":
            return packed
        if name == f"{EXPERT}.weight_scale":
            return sf_u8.view(torch.float8_e4m3fn)
        if name == f"{EXPERT}.weight_scale_2":
            return dec.reshape(())
        return t
    return make_edited_checkpoint(MINI_V4, tmp_path / "ck", edit)


def _expert_weight(rows_tiny=()):
    from verify.checkpoint import Checkpoint

    lin = Checkpoint.open(MINI_V4).load_layer(0).experts.w1
    w = decode_nvfp4_block_scaled(lin.weight_u8[3], lin.weight_scale_e4m3[3].view(torch.uint8))
    w = w * (1 + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
    for r in rows_tiny:
        w[r] *= 2.0**-22
    return w


def test_the_clean_fixture_has_no_contract_finding():
    report = lint_checkpoint(MINI_V4, layers=[0, 1])
    bad = [f for f in report.findings if f.code in ("requant_mismatch", "declared_format_mismatch")]
    assert not bad, bad


def test_lint_names_the_first_flagged_block_of_a_planted_export(tmp_path):
    w = _expert_weight(rows_tiny=(7,))
    packed, sf, dec = _export_unrounded(w, TE)
    d = _replace_expert(tmp_path, packed, sf, dec)
    f = [x for x in lint_checkpoint(d, layers=[0], weight_recipe="te").errors if x.code == "requant_mismatch"]
    assert len(f) == 1 and f[0].tensor.endswith("w1.weight"), f
    assert f[0].numbers["expert"] == 3 and f[0].numbers["row"] == 7 and f[0].numbers["block"] == 0, f[0]
    assert f"{f[0].numbers['flagged']} of " in f[0].message and "expert 3, row 7, block 0" in f[0].message


def test_lint_classes_what_the_recipe_cannot_reproduce_by_design(tmp_path):
    w = _expert_weight(rows_tiny=(7,))
    dec = global_dec_scale_from_amax(w.abs().amax().float())
    q = quantize_nvfp4(w, recipe=TE, global_enc_scale_f32=global_enc_scale_from_dec(dec))
    d = _replace_expert(tmp_path, q.packed_u8, q.sf_u8, dec)
    report = lint_checkpoint(d, layers=[0], weight_recipe="te")
    assert "requant_mismatch" not in report.codes()
    info = [x for x in report.findings if x.code == "requant_by_design"]
    assert len(info) == 1 and info[0].numbers["zero_scale"] >= 1, info


# ============================================================================= declared formats


def _mixed(d: Path, layers: dict[str, str]) -> None:
    p = d / "hf_quant_config.json"
    q = json.loads(p.read_text())
    q["quantization"]["quantized_layers"] = {m: {"quant_algo": a} for m, a in layers.items()}
    p.write_text(json.dumps(q))


def test_declared_formats_are_compared_with_the_stored_ones_per_module(tmp_path):
    bf16_module = "layers.1.attn.wo_b"

    def to_bf16(name, t):  # an FP8 module written out as BF16 (scale dropped)
        if name == f"{bf16_module}.weight":
            return t.view(torch.float8_e4m3fn).to(torch.bfloat16) if t.dtype == torch.uint8 else t.to(torch.bfloat16)
        if name == f"{bf16_module}.scale":
            return None
        return t

    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", to_bf16)
    _mixed(d, {"layers.1.attn.wq_a": "FP8", "layers.1.attn.wkv": "NVFP4", bf16_module: "FP8",
               "layers.0.attn.wq_a": "NVFP4"})
    got = {(f.tensor, f.message.split(" (")[0]) for f in lint_checkpoint(d, layers=[0, 1]).errors
           if f.code == "declared_format_mismatch"}
    assert got == {("layers.1.attn.wkv", "declared nvfp4"), (bf16_module, "declared fp8_block128")}, got
    msg = {f.tensor: f.message for f in lint_checkpoint(d, layers=[1]).errors}
    assert "stored as bf16" in msg[bf16_module] and "stored as fp8_block128" in msg["layers.1.attn.wkv"]


def test_quant_algo_fp8_declares_every_non_excluded_linear_fp8(tmp_path):
    def fp8_everywhere(c):
        q = c.get("quantization", c)
        q.update(quant_algo="FP8", exclude_modules=["embed", "head", "mtp.*", "layers.*.ffn.gate",
                                                    "layers.1.attn.wo_b"])
        return c

    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", None, edit_json={
        "hf_quant_config.json": fp8_everywhere,
        "config.json": lambda c: dict(c, quantization_config=fp8_everywhere(dict(c["quantization_config"])))})
    got = {f.tensor: f.message for f in lint_checkpoint(d, layers=[1]).errors if f.code == "declared_format_mismatch"}
    assert "layers.1.attn.wo_b" in got and "declared bf16" in got["layers.1.attn.wo_b"], got
    assert "layers.1.attn.wq_a" not in got, "declared FP8, stored FP8"


def test_the_cli_takes_the_weight_recipe_and_exits_1_on_a_flagged_block(tmp_path, capsys):
    import argparse

    from verify.checkpoint.lint import add_lint_arguments, cli_lint

    packed, sf, dec = _export_unrounded(_expert_weight(rows_tiny=(7,)), TE)
    d = _replace_expert(tmp_path, packed, sf, dec)
    p = argparse.ArgumentParser()
    add_lint_arguments(p)
    out = tmp_path / "lint.json"
    assert cli_lint(p.parse_args(["--checkpoint", str(d), "--layers", "0", "--weight-recipe", "te",
                                  "--json", str(out)])) == 1
    codes = [f["code"] for f in json.loads(out.read_text())["findings"] if f["severity"] == "error"]
    assert codes == ["requant_mismatch"], codes
    assert "1 errors" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        p.parse_args(["--checkpoint", str(d), "--weight-recipe", "fp4"])


@pytest.mark.parametrize("case", ["clean_modelopt", "clean_te", "unrounded_te", "pow2_ceil_codes", "tensor_scale"])
def test_the_settled_shortcut_gives_what_the_codec_gives_on_every_block(case):
    """requant_contract counts blocks with a largest code of 6 under a normal scale as returned without the
    codec; the exhaustive round trip must agree block for block in every count (a wrong shortcut fails here)."""
    w = _weights(tiny_rows=(5, 9))
    dec = global_dec_scale_from_amax(w.abs().amax().float())
    recipe = TE if case.endswith("_te") else MODELOPT
    if case.startswith("clean"):
        g = dec if recipe.global_convention == "dec" else global_enc_scale_from_dec(dec)
        q = quantize_nvfp4(w, recipe=recipe, **{f"global_{recipe.global_convention}_scale_f32": g})
        packed, sf = q.packed_u8, q.sf_u8
    elif case == "unrounded_te":
        packed, sf, dec = _export_unrounded(w, TE)
    else:
        xb = w.reshape(w.shape[0], -1, 16)
        t = block_scale_f32(xb.abs().amax(-1), recipe=MODELOPT, global_scale_f32=dec)
        used = torch.exp2(torch.ceil(torch.log2(t))) if case == "pow2_ceil_codes" else torch.full_like(t, 448.0)
        codes = f32_to_e2m1_codes(xb / (used.unsqueeze(-1) * dec), sign_rule="lt_zero").reshape(w.shape)
        packed, sf = pack_e2m1x2_low_first(codes), f32_to_e4m3_bytes(t, saturate=True)
    fast = requant_contract("w", packed, sf.view(torch.float8_e4m3fn), dec, recipe=recipe)
    full = requant_contract("w", packed, sf.view(torch.float8_e4m3fn), dec, recipe=recipe, exhaustive=True)
    assert fast == full
