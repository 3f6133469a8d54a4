"""Garbage never passes (DESIGN "Verdicts", issue 22 item 1, issue 26 item 2): NaN / Inf on either side,
an empty compared set, all-zero results and a pure scale factor fail stage_metrics (status "fail" and a
problem naming the reason, never cosine 1 / SQNR inf) and the value assertions (assert_within_gemm_bound,
assert_within_ulps); a failing quantization-loss row fails the layer run; a NaN the reference itself would
read (a norm weight, the inputs, a config scalar) stops `python -m verify layer` with one line naming it.
Test ids name the case (and the check it goes through)."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from verify.assertions import assert_bits_equal, assert_within_gemm_bound, assert_within_ulps
from verify.checkpoint import Checkpoint
from verify.checkpoint.writer import make_edited_checkpoint
from verify.config import GOLDEN_DIR
from verify.metrics import GAIN_SHARE_MAX, stage_metrics
from verify.reference_layer import quantization_loss
from verify.run import LayerRun

NAN, INF = float("nan"), float("inf")


def _ref() -> torch.Tensor:
    """64 float32-exact values of both signs, none zero."""
    return (torch.arange(1, 65, dtype=torch.float64) * 0.25) * torch.tensor([1.0, -1.0]).repeat(32)


def _with(t: torch.Tensor, at: int, value: float) -> torch.Tensor:
    t = t.clone()
    t[at] = value
    return t


@dataclass(frozen=True)
class Garbage:
    """got / ref (float64) and what each check must say: `metrics` a fragment of stage_metrics' problem,
    `bound` / `ulps` a fragment of the assertion's message; `match_passes`: the bad-input opt-in
    (nonfinite="match") accepts it (the same specials on both sides)."""

    id: str
    make: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    metrics: str
    bound: str
    ulps: str
    match_passes: bool = False


CASES = [
    Garbage("nan-vs-nan", lambda: (_with(_ref(), 3, NAN), _with(_ref(), 3, NAN)),
            "at the same positions on both sides", "garbage never passes", "garbage never passes", match_passes=True),
    Garbage("nan-vs-finite", lambda: (_with(_ref(), 3, NAN), _ref()),
            "1 of them where the other side is finite", "1 of them NaN/Inf: y 1 NaN", "got 1 NaN 0 Inf"),
    Garbage("finite-vs-nan", lambda: (_ref(), _with(_ref(), 7, NAN)),
            "ref 1 NaN 0 Inf", "expected 1 NaN 0 Inf", "expected 1 NaN 0 Inf"),
    Garbage("inf-vs-finite", lambda: (_with(_ref(), 5, INF), _ref()),
            "got 0 NaN 1 Inf", "y 0 NaN 1 Inf", "got 0 NaN 1 Inf"),
    Garbage("inf-vs-inf", lambda: (_with(_ref(), 5, -INF), _with(_ref(), 5, -INF)),
            "at the same positions on both sides", "garbage never passes", "garbage never passes", match_passes=True),
    Garbage("empty", lambda: (_ref()[:0], _ref()[:0]), "empty: no elements", "empty: no elements", "empty: no elements"),
    Garbage("all-zero-vs-nonzero", lambda: (torch.zeros(64, dtype=torch.float64), _ref()),
            "got is all zero where ref is not", "y is all zero where the expected value is not",
            "got is all zero where the expected value is not"),
    Garbage("nonzero-vs-all-zero", lambda: (_ref(), torch.zeros(64, dtype=torch.float64)),
            "ref is all zero where got is not", "the expected value is all zero where y is not",
            "the expected value is all zero where got is not"),
    Garbage("all-zero-vs-all-zero", lambda: (torch.zeros(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)),
            "both sides are all zero", "both all zero", "both all zero"),
    Garbage("scale-x2", lambda: (2 * _ref(), _ref()), "the difference is a scale factor", "exceed the accumulation bound",
            "beyond 1.0 ulp"),
]
IDS = [c.id for c in CASES]


def _bound(ref: torch.Tensor) -> torch.Tensor:
    """A tight bound (2^-20 relative): any real difference here exceeds it."""
    return torch.nan_to_num(ref.abs(), nan=0.0, posinf=0.0) * 2.0**-20 + 2.0**-40


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_stage_metrics_fails_garbage_and_says_why(case):
    got, ref = case.make()
    m = stage_metrics(got, ref)
    assert m["status"] == "fail" and case.metrics in m["problem"], m
    assert not (m["cosine"] == 1.0 and m["sqnr_db"] == math.inf), f"{case.id} reads as perfect: {m}"
    assert m["nan_count"] == int(torch.isnan(got).sum()) and m["ref_nan_count"] == int(torch.isnan(ref).sum())
    assert m["inf_count"] == int(torch.isinf(got).sum()) and m["ref_inf_count"] == int(torch.isinf(ref).sum())
    assert "norm_ratio" in m


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_gemm_bound_fails_garbage_and_says_why(case):
    got, ref = case.make()
    with pytest.raises(AssertionError, match=re.escape(case.bound)):
        assert_within_gemm_bound(got.float(), ref, _bound(ref), label=f"{case.id} y")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_ulps_check_fails_garbage_and_says_why(case):
    got, ref = case.make()
    with pytest.raises(AssertionError, match=re.escape(case.ulps)):
        assert_within_ulps(got.float(), ref, ulps=1.0, label=f"{case.id} h")


@pytest.mark.parametrize("case", [c for c in CASES if c.match_passes], ids=[c.id for c in CASES if c.match_passes])
@pytest.mark.parametrize("check", ["bound", "ulps"])
def test_the_nan_aware_opt_in_accepts_the_same_specials(case, check):
    """nonfinite="match" (bad-input tests only) is the NaN-aware defined result: the same special on both
    sides passes there, and only there."""
    got, ref = case.make()
    if check == "bound":
        assert assert_within_gemm_bound(got.float(), ref, _bound(ref), label=case.id, nonfinite="match") == 0.0
    else:
        assert_within_ulps(got.float(), ref, ulps=1.0, label=case.id, nonfinite="match")


@pytest.mark.parametrize("case", [c for c in CASES if not c.match_passes], ids=[c.id for c in CASES if not c.match_passes])
def test_the_nan_aware_opt_in_still_fails_the_rest(case):
    got, ref = case.make()
    with pytest.raises(AssertionError):
        assert_within_gemm_bound(got.float(), ref, _bound(ref), label=case.id, nonfinite="match")
    with pytest.raises(AssertionError):
        assert_within_ulps(got.float(), ref, ulps=1.0, label=case.id, nonfinite="match")


def test_an_unknown_nonfinite_mode_is_refused():
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        assert_within_gemm_bound(_ref(), _ref(), _bound(_ref()), label="y", nonfinite="ignore")


@pytest.mark.parametrize("case", ["nan-vs-finite", "inf-vs-finite", "finite-vs-nan"])
def test_the_bits_check_counts_specials_on_both_sides(case):
    got, ref = next(c for c in CASES if c.id == case).make()
    with pytest.raises(AssertionError, match=r"NaN/Inf: got \d+ NaN \d+ Inf, expected \d+ NaN \d+ Inf"):
        assert_bits_equal(got, ref, label=case)


# ----------------------------------------------------------------------------- norm ratio, scale factors


@pytest.mark.parametrize("factor", [2.0, 0.5, 1.0], ids=["x2", "x0.5", "x1"])
def test_every_row_reports_the_norm_ratio(factor):
    """A pure scale factor is invisible to cosine (1.000000) and visible in the norm ratio; x2 fails (no
    rounding makes the difference a gain > 1); x0.5 is reported, not failed: clipping by a static scale
    looks the same (see verify.metrics)."""
    ref = _ref()
    noise = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.05
    m = stage_metrics(factor * (ref + noise), ref)
    assert m["norm_ratio"] == pytest.approx(factor * float((ref + noise).norm() / ref.norm()))
    assert m["cosine"] > 0.999
    assert m["status"] == ("fail" if factor == 2.0 else "pass"), m


def test_rounding_noise_passes_and_the_gain_rule_has_margin():
    """Uncorrelated error of rel-L2 0.3 (the dynamic golden stages have 0.03 .. 0.2) keeps the gain share far
    below the threshold; identical non-zero tensors are a real cosine 1 / SQNR inf."""
    ref = _ref()
    noise = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = ref + noise * 0.3 * float(ref.norm() / noise.norm())
    m = stage_metrics(got, ref)
    assert m["status"] == "pass" and m["problem"] == "", m
    assert (float(got.norm()) - float(ref.norm())) / float((got - ref).norm()) < GAIN_SHARE_MAX / 2
    same = stage_metrics(ref, ref)
    assert same["status"] == "pass" and same["cosine"] == pytest.approx(1.0) and same["sqnr_db"] == math.inf


# ----------------------------------------------------------------------------- loss rows and the layer run


def test_a_garbage_loss_row_fails_the_layer_run():
    ref = _ref().reshape(8, 8)
    emulated = {"moe.l1.gate": _with(ref.reshape(-1), 0, NAN).reshape(8, 8), "moe.l1.up": ref.clone(),
                "moe.l2": 2 * ref}
    high = {"moe.l1.gate": ref, "moe.l1.up": ref, "moe.l2": ref}
    loss = quantization_loss(emulated, high)
    assert {s: m["status"] for s, m in loss.items()} == {"moe.l1.gate": "fail", "moe.l1.up": "pass", "moe.l2": "fail"}
    assert all("norm_ratio" in m for m in loss.values())
    run = LayerRun(0, emulated, high, loss, {}, {})
    assert [(v.stage, v.check) for v in run.failed] == [("moe.l1", "loss"), ("moe.l2", "loss")]
    assert run.failed[0].message.startswith("moe.l1 loss: moe.l1.gate emulated vs high: NaN/Inf"), run.failed[0].message
    assert "scale factor" in run.failed[1].message


def test_a_garbage_loss_row_fails_the_unit_document_of_a_sweep():
    from verify.report.document import unit_document

    ref = _ref().reshape(8, 8)
    emulated, high = {"moe.l2": 2 * ref, "moe.combine": ref.clone()}, {"moe.l2": ref, "moe.combine": ref}
    run = LayerRun(0, emulated, high, quantization_loss(emulated, high), {}, {})
    doc = unit_document(unit={"name": "layer0", "kind": "decoder", "index": 0, "nbytes": 0}, fingerprint="f",
                        run=run, timings_s={}, rank=0, host="h", device="cpu")
    assert doc["counts"]["fail"] == 1 and doc["metrics"]["moe.l2"]["status"] == "fail"
    assert [(v["stage"], v["check"], v["status"]) for v in doc["verdicts"]] == [("moe.l2", "loss", "fail")]


@pytest.fixture(scope="module")
def fixture_run():
    from verify.layer_report import GOLDEN_CONFIGS, layer_inputs
    from verify.run import run_layer

    ckpt = Checkpoint.open(GOLDEN_DIR / "mini-v4")
    layer = ckpt.load_layer(0)
    inputs = layer_inputs(ckpt, layer, tokens=16, seed=0, device="cpu")
    return run_layer(ckpt, layer, inputs, options=GOLDEN_CONFIGS["static-after_w2"])


def test_every_loss_row_of_the_fixture_passes_with_its_norm_ratio(fixture_run):
    assert fixture_run.loss and not fixture_run.failed, [v.message for v in fixture_run.failed]
    for stage, m in fixture_run.loss.items():
        assert 0 < m["norm_ratio"] < 2 and m["status"] == "pass", (stage, m)


# ----------------------------------------------------------------------------- end to end: python -m verify layer


def _layer_cli(capsys, checkpoint, *extra) -> tuple[int, str]:
    from verify.__main__ import main

    rc = main(["layer", "--backend", "emulator", "--checkpoint", str(checkpoint), "--layers", "0", "--tokens", "8",
               *extra])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _nan_in(name: str):
    def edit(tensor_name, t):
        if tensor_name == name:
            t = t.clone()
            t.view(-1)[3] = float("nan")
        return t
    return edit


def _bad_attn_norm(tmp_path):
    return make_edited_checkpoint(GOLDEN_DIR / "mini-v4", tmp_path / "ckpt", _nan_in("layers.0.attn_norm.weight")), ()


def _bad_router_gate(tmp_path):
    return make_edited_checkpoint(GOLDEN_DIR / "mini-v4", tmp_path / "ckpt", _nan_in("layers.0.ffn.gate.weight")), ()


def _bad_inputs(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "inputs.safetensors"
    save_file({"x_ffn": torch.full((8, 256), float("nan"), dtype=torch.bfloat16)}, str(path))
    return GOLDEN_DIR / "mini-v4", ("--inputs", str(path))


def _bad_routed_scaling_factor(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(GOLDEN_DIR / "mini-v4", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["routed_scaling_factor"] = float("nan")
    (dst / "config.json").write_text(json.dumps(cfg))  # json writes the NaN literal, as a broken exporter would
    return dst, ()


@pytest.mark.parametrize("make, named", [
    (_bad_attn_norm, "layers.0.attn_norm.weight"),
    (_bad_router_gate, "layers.0.ffn.gate.weight"),
    (_bad_inputs, "x_ffn"),
    (_bad_routed_scaling_factor, "routed_scaling_factor"),
], ids=["nan-in-attn_norm", "nan-in-router-gate", "nan-in-inputs", "routed_scaling_factor-nan"])
def test_a_nan_the_reference_would_read_fails_the_layer_command(capsys, tmp_path, make, named):
    checkpoint, extra = make(tmp_path)
    rc, text = _layer_cli(capsys, checkpoint, *extra)
    assert rc != 0, f"exit 0 with a NaN in {named}:\n{text[-2000:]}"
    lines = [line for line in text.splitlines() if named in line and "error" in line]
    assert lines, f"no error line naming {named} (exit {rc}):\n{text[-2000:]}"
    assert "Traceback" not in text, text[-2000:]


def test_all_zero_block_scales_are_refused_before_any_comparison(tmp_path):
    """All-zero block scales in attn.wq_a (E4M3 0x00 is a valid byte, but a whole weight of them decodes to
    zeros): the loader refuses the layer naming the tensor, and a layer loaded without the value checks is
    refused by the reference layer too; never an all-zero output scored cosine 1. (That a both-all-zero
    comparison fails the loss row and the bound is the parametrised all-zero-vs-all-zero case above.)"""
    from verify.backends import EmulatorBackend
    from verify.checkpoint import ZeroScaleError
    from verify.layer_report import GOLDEN_CONFIGS, layer_inputs
    from verify.run import run_layer

    name = "layers.0.attn.wq_a.weight_scale"
    ckpt = Checkpoint.open(make_edited_checkpoint(GOLDEN_DIR / "mini-v4", tmp_path / "ckpt",
                                                  lambda n, t: torch.zeros_like(t) if n == name else t))
    with pytest.raises(ZeroScaleError, match=name.replace(".", r"\.")):
        ckpt.load_layer(0)
    layer = ckpt.load_layer(0, check_values=False)
    inputs = layer_inputs(ckpt, layer, tokens=8, seed=0, device="cpu")
    with pytest.raises(ZeroScaleError, match=r"attn\.wq_a\.weight_scale"):
        run_layer(ckpt, layer, inputs, options=GOLDEN_CONFIGS["dynamic-after_w2"], backend=EmulatorBackend())
