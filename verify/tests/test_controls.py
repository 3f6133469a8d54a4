"""Negative controls (issue 26 item 3, verify/verdicts/controls.py): each passing verdict's check is judged
again on the stage's real output with one planted known-bad change and must fail it; the reports show a
control row per check column; a check that passes its control fails the run; controls change no verdict and
no golden entry, and cost less than the rest of the run."""

from __future__ import annotations

import json

import pytest
import torch

from references.layer import RunOptions
from references.stages import Check, Op
from verify.__main__ import main
from verify.backends import EmulatorBackend
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.golden import backend_golden_run
from verify.layer_report import layer_inputs
from verify.run import run_layer
from verify.verdicts.checks import Judge
from verify.verdicts.judges import JUDGES


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(GOLDEN_DIR / "mini-v4")


@pytest.fixture(scope="module")
def runs(ckpt):
    """Layer 3, static: (without controls, with controls)."""
    layer = ckpt.load_layer(3)
    inputs = layer_inputs(ckpt, layer, tokens=32, seed=0, device="cpu")
    opts = RunOptions(act_scale="static")
    return (run_layer(ckpt, layer, inputs, options=opts, backend=EmulatorBackend()),
            run_layer(ckpt, layer, inputs, options=opts, backend=EmulatorBackend(), controls=True))


def test_every_passing_verdict_has_a_control_that_fails_its_planted_input(runs):
    _, run = runs
    assert [(c.stage, c.check) for c in run.controls] == [(v.stage, v.check) for v in run.verdicts]
    for v, c in zip(run.verdicts, run.controls):
        if v.status == "pass" and c.check not in ("sync", "graph"):  # those need CUDA (skipped verdicts here)
            assert c.status == "pass" and "fails as it must" in c.message, (v.stage, v.check, c.message)
        else:
            assert c.status == "skipped", (v.stage, v.check, v.status, c.message)


def test_controls_change_no_verdict_and_no_golden_entry(runs):
    plain, with_controls = runs
    strip = lambda vs: [(v.stage, v.check, v.status, v.message, {k: x for k, x in v.metrics.items() if k != "seconds"})
                        for v in vs]  # noqa: E731
    assert strip(plain.verdicts) == strip(with_controls.verdicts)
    assert backend_golden_run(plain.digests, plain.verdicts) == backend_golden_run(with_controls.digests,
                                                                                   with_controls.verdicts)
    assert not with_controls.failed


def test_controls_cost_less_than_the_rest_of_the_run(runs):
    """The run with controls takes less than twice the run without them (measured on the fixture: controls
    are about half of the rest on the CPU)."""
    _, run = runs
    t = run.timings_s
    rest = t["emulated"] + t["high"] + t["verdicts"] - t["controls"]
    assert t["controls"] < rest, t


def test_a_blind_check_fails_the_run_and_the_report_says_which(ckpt, monkeypatch, capsys, tmp_path):
    """The dense bound weakened to pass anything: every dense stage's bound verdict still passes (the backend
    is right), but its control passes too: the table's control row says BLIND (BLND narrow), the run exits 1,
    the JSON report holds the failed controls."""
    real = JUDGES[Op.DENSE_LINEAR]
    checks = {**real.checks, Check.BOUND: lambda ctx, stage, out, metrics: "passes anything"}
    monkeypatch.setitem(JUDGES, Op.DENSE_LINEAR, Judge(real.collect, checks, real.ops))
    out_json = tmp_path / "layer.json"
    code = main(["layer", "--backend", "emulator", "--layers", "3", "--tokens", "16", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 1, out[-3000:]
    assert ("BLIND" in out or "BLND" in out) and "PASSED a known-bad input" in out, out[-3000:]  # wide / narrow
    doc = json.loads(out_json.read_text())
    (unit,) = doc["runs"].values()
    blind = {(c["stage"], c["check"]) for c in unit["controls"] if c["status"] == "fail"}
    assert ("attn.wq_a", "bound") in blind and all(c == "bound" for _, c in blind), blind


def test_the_layer_json_holds_the_controls_and_validates(ckpt, tmp_path):
    import jsonschema

    from verify.report.document import SCHEMA_PATH

    out_json = tmp_path / "layer.json"
    assert main(["layer", "--backend", "emulator", "--layers", "0", "--tokens", "16", "--json", str(out_json)]) == 0
    doc = json.loads(out_json.read_text())
    (unit,) = doc["runs"].values()
    assert unit["control_counts"]["pass"] > 0 and unit["control_counts"].get("fail", 0) == 0, unit["control_counts"]
    assert {c["check"] for c in unit["controls"] if c["status"] == "pass"} >= {"bytes", "bound", "batch", "padding",
                                                                              "ids", "weights", "exact", "rounding"}
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(doc, {"$ref": "#/$defs/layer_report", "$defs": schema["$defs"]})


def test_every_check_has_a_control_that_says_what_it_plants():
    """A new check (references.stages.Check) gets its own control, or at least its words here: without one it
    is controlled only through its first verify.assertions comparison, and skipped when it makes none."""
    from verify.verdicts.controls import CONTROL_WORDS

    assert set(CONTROL_WORDS) == set(Check), sorted(c.value for c in set(Check) - set(CONTROL_WORDS))


class _W4A16TransposedDecode(EmulatorBackend):
    """humming's shape on the dense linears: W4A16 declared and computed, its decoded weights a transposed view."""

    name = "emulator-w4a16-transposed-decode"

    def dequantize_prepared(self, prepared):
        w = super().dequantize_prepared(prepared)
        return w.t().contiguous().t() if isinstance(w, torch.Tensor) else w


def test_the_mode_prepare_and_valid_controls_fail_on_a_w4a16_backend(ckpt):
    """The H100 report of humming (W4A16 on the dense linears): the fallback plant (one element past the first
    comparison, the W4A4 candidate's) left the declared W4A16 matching, so the mode control passed its input and
    the run failed as blind. The mode control re-declares the mode the output matches least and must fail naming
    both; the prepare control plants a decoded weight that is a non-contiguous view; the valid control the block."""
    layer = ckpt.load_layer(0)
    inputs = layer_inputs(ckpt, layer, tokens=16, seed=0, device="cpu")
    run = run_layer(ckpt, layer, inputs, options=RunOptions(act_scale="static"),
                    backend=_W4A16TransposedDecode(modes={"nvfp4": "w4a16"}), controls=True)
    passed = {(v.stage, v.check) for v in run.verdicts if v.status == "pass"}
    mine = {(c.stage, c.check): c for c in run.controls if c.check in ("mode", "prepare", "valid")
            and (c.stage, c.check) in passed}
    assert {check for _, check in mine} == {"mode", "prepare", "valid"}, sorted(mine)
    for (st, check), c in mine.items():
        assert c.status == "pass" and "fails as it must" in c.message, (st, check, c.message)
    dense_modes = [c.message for (st, check), c in mine.items() if check == "mode" and st.startswith("attn.")]
    assert dense_modes and all("instead of w4a16" in m and "output matches w4a16" in m for m in dense_modes), dense_modes
    assert not run.failed
