"""Lint findings on the fixtures and on defective copies of them (one defect per test)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from verify.config import GOLDEN_DIR
from verify.fixtures import make_checkpoint, make_edited_checkpoint
from verify.lint import Z_DECIDE, add_lint_arguments, cli_lint, lint_checkpoint

pytestmark = pytest.mark.lint
MINI_V4 = GOLDEN_DIR / "mini-v4"


def _swap_nibbles(name: str, t: torch.Tensor) -> torch.Tensor:
    if name.endswith(".weight") and t.dtype == torch.uint8:
        return (t << 4) | (t >> 4)
    return t


@pytest.fixture(scope="module")
def mini_v3(tmp_path_factory) -> Path:
    return Path(make_checkpoint(tmp_path_factory.mktemp("mini-v3"), "mini-v3")["out"])


@pytest.fixture(scope="module")
def swapped_v4(tmp_path_factory) -> Path:
    return make_edited_checkpoint(MINI_V4, tmp_path_factory.mktemp("sw") / "ck", _swap_nibbles)


def _run_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    add_lint_arguments(p)
    return cli_lint(p.parse_args(argv))


def test_checkpoint_under_test_lints_clean(run_cfg):
    """`pytest -m lint --checkpoint DIR` lints DIR (default: the committed fixture)."""
    report = lint_checkpoint(run_cfg.checkpoint or MINI_V4)
    assert not report.errors, "\n".join(f"{f.code} {f.tensor}: {f.message}" for f in report.errors)


def test_mini_v3_lints_clean(mini_v3):
    report = lint_checkpoint(mini_v3)
    assert not report.errors and "nibble_order_ok" in report.codes("info")


def test_cli_exit_status_and_json(tmp_path, swapped_v4):
    out = tmp_path / "clean.json"
    assert _run_cli(["--checkpoint", str(MINI_V4), "--json", str(out)]) == 0
    j = json.loads(out.read_text())
    assert j["counts"]["error"] == 0 and j["schema"] == "deepseek_v4"
    assert _run_cli(["--checkpoint", str(swapped_v4), "--json", str(tmp_path / "bad.json")]) == 1


def test_nibble_order_separates_real_from_swapped(swapped_v4):
    good = {f.tensor: f.numbers for f in lint_checkpoint(MINI_V4).findings if f.code == "nibble_order_ok"}
    bad = {f.tensor: f.numbers for f in lint_checkpoint(swapped_v4).findings if f.code == "nibble_order_swapped"}
    experts = [t for t in good if ".experts.*." in t]
    assert len(experts) == 4 and set(experts) <= set(bad)
    for t in experts:
        assert good[t]["score"] > 0.5 and good[t]["z"] >= Z_DECIDE
        assert bad[t]["score"] < -0.5 and bad[t]["z"] <= -Z_DECIDE
        assert good[t]["score"] == pytest.approx(-bad[t]["score"], abs=1e-9)  # exact mirror: pair swap is an involution


def test_nan_scale_bytes_finding(tmp_path):
    def poison(n, t):
        if n == "layers.2.ffn.experts.4.w3.weight_scale":
            b = t.view(torch.uint8).clone()
            b[0, :3] = torch.tensor([0x7F, 0xFF, 0x7F], dtype=torch.uint8)
            return b.view(torch.float8_e4m3fn)
        return t

    f = [f for f in lint_checkpoint(make_edited_checkpoint(MINI_V4, tmp_path / "ck", poison)).errors]
    assert [(x.code, x.tensor) for x in f] == [("nan_scale_bytes", "layers.2.ffn.experts.4.w3.weight_scale")]
    assert "3 NaN" in f[0].message


@pytest.mark.parametrize("value", [0.0, -1e-3, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"])
def test_bad_global_scale_finding(tmp_path, value):
    name = "layers.3.ffn.experts.1.w2.weight_scale_2"
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: torch.tensor(value) if n == name else t)
    assert [(x.code, x.tensor) for x in lint_checkpoint(d).errors] == [("bad_global_scale", name)]


@pytest.mark.parametrize("role", ["weight_scale_2", "input_scale"])
def test_w1_w3_scale_mismatch_finding(tmp_path, role):
    name = f"layers.3.ffn.experts.7.w3.{role}"
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: t * 1.25 if n == name else t)
    f = [x for x in lint_checkpoint(d).findings if x.code == f"w1_w3_{role}_mismatch"]
    assert len(f) == 1 and f[0].severity == "warning"
    assert f[0].numbers["count"] == 1 and f[0].numbers["max_rel_diff"] == pytest.approx(0.2, rel=1e-6)
    assert "index 7" in f[0].message


def test_block_scale_saturation_finding(tmp_path):
    name = "layers.3.ffn.experts.0.w1.weight_scale"
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck",
                               lambda n, t: torch.full_like(t.view(torch.uint8), 0x7E).view(torch.float8_e4m3fn)
                               if n == name else t)
    f = [x for x in lint_checkpoint(d).findings if x.code == "block_scale_saturation" and x.severity == "warning"]
    assert [x.tensor for x in f] == ["layers.3.ffn.experts.*.w1.weight_scale"]
    assert f[0].numbers["frac_448"] == pytest.approx(1 / 16, abs=2e-3)  # plus the fixture's own few


def test_clean_fixture_has_few_saturated_or_zero_block_scales():
    for f in lint_checkpoint(MINI_V4).findings:
        if f.code == "block_scale_saturation":
            assert f.severity == "info" and f.numbers["frac_448"] < 0.01 and f.numbers["frac_0"] < 0.01, f


def test_exclude_modules_consistency(tmp_path):
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: t)
    q = json.loads((d / "hf_quant_config.json").read_text())
    q["quantization"]["exclude_modules"].remove("layers.1.attn*")
    q["quantization"]["exclude_modules"].append("layers.0.attn.wq_a")
    (d / "hf_quant_config.json").write_text(json.dumps(q))
    errs = {(f.code, f.tensor) for f in lint_checkpoint(d).errors}
    assert ("excluded_but_nvfp4", "layers.0.attn.wq_a") in errs
    assert ("not_excluded_but_fp8_block128", "layers.1.attn.wkv") in errs


def test_schema_defects_are_findings_one_each(tmp_path):
    a, b = "layers.1.ffn.experts.3.w2.weight_scale", "layers.1.attn.wq_b.weight"

    def edit(n, t):
        if n == a:
            return t.view(torch.uint8)  # wrong dtype
        if n == b:
            return t[:-1].contiguous()  # wrong shape
        return t

    errs = {(f.code, f.tensor) for f in lint_checkpoint(make_edited_checkpoint(MINI_V4, tmp_path / "ck", edit)).errors}
    assert errs == {("DtypeMismatchError", a), ("ShapeMismatchError", b)}


def test_not_a_checkpoint_is_one_error(tmp_path):
    r = lint_checkpoint(tmp_path)
    assert [f.code for f in r.findings] == ["NotACheckpointError"]
