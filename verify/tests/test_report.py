"""Model reports: the JSON schema (validation that passes and fails), non-finite values, error
histograms, the self-contained HTML and `python -m verify report` (verify/report/)."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

# the schema validator is in the test extra; a machine without it (the H200 image) skips the module
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema: not installed (pip install -e '.[test]')")

from verify.__main__ import main
from verify.report.document import (
    HIST_EDGES_LOG10, as_float, error_histogram, finite_json, load_json, merge_report, validate,
)
from verify.report.html import render_html
from verify.tests.sweep_runs import UNITS, baseline_run_dir, copy_run


@pytest.fixture(scope="module")
def report() -> dict:
    return load_json(baseline_run_dir() / "report.json")


def test_the_report_and_its_units_follow_the_schema(report):
    validate(report)
    assert [u["unit"]["name"] for u in report["units"]] == UNITS
    for path in sorted((baseline_run_dir() / "units").glob("*.json")):
        unit = load_json(path)
        validate({**report, "units": [unit]})


@pytest.mark.parametrize("break_it, where", [
    (lambda d: d["units"][0]["verdicts"][0].update(status="maybe"), "status"),
    (lambda d: d["units"][0]["digests"].update(x="not-a-sha256"), "digests"),
    (lambda d: d.update(schema_version="0.9"), "schema_version"),
    (lambda d: d["units"][0]["metrics"]["attn.wq_a"].update(cosine="Infinity"), "cosine"),
    (lambda d: d.pop("timings"), "timings"),
], ids=["bad-status", "bad-digest", "old-version", "bad-nonfinite-spelling", "missing-timings"])
def test_the_schema_rejects_a_broken_report(report, break_it, where):
    doc = copy.deepcopy(report)
    break_it(doc)
    with pytest.raises(jsonschema.ValidationError) as e:
        validate(doc)
    assert where in str(e.value.path) + str(e.value.message), e.value


def test_non_finite_floats_are_strings_in_json_and_read_back():
    doc = finite_json({"a": math.inf, "b": [-math.inf, math.nan, 1.5], "c": {"d": 2}})
    assert doc == {"a": "inf", "b": ["-inf", "nan", 1.5], "c": {"d": 2}}
    json.dumps(doc, allow_nan=False)  # strict JSON
    assert as_float("inf") == math.inf and math.isnan(as_float("nan")) and as_float(3) == 3.0
    assert as_float("fast") is None and as_float(True) is None


def test_the_report_file_is_strict_json():
    text = (baseline_run_dir() / "report.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c} in report.json"))


def test_error_histogram_bins_relative_errors_by_quarter_decades():
    high = torch.ones(100, dtype=torch.float64)
    emulated = high.clone()
    emulated[:30] += 2e-3          # log10 = -2.70 -> bin floor((-2.70 + 7) / 0.25) = 17
    emulated[30:40] += 0.5         # log10 = -0.30 -> bin floor(26.8) = 26
    emulated[40] = math.nan
    h = error_histogram(emulated, high)
    assert h["exact"] == 59 and h["nonfinite"] == 1 and sum(h["counts"]) == 40
    assert h["counts"][17] == 30 and h["counts"][26] == 10
    assert len(h["counts"]) == len(HIST_EDGES_LOG10) - 1


def test_the_html_is_one_self_contained_file_with_every_plot(report):
    page = render_html(report)
    assert 'data-expected-figures="5"' in page
    assert len(re.findall(r'<img alt="[a-z]+" src="data:image/svg\+xml;base64,', page)) == 5
    for needle in ("src=\"http", "href=\"http", "<link", "@import", "url(http", "src=\"//"):
        assert needle not in page, f"the page fetches something: {needle}"
    for fid in ("loss", "bound", "heatmap", "probes", "histograms"):
        assert f'id="fig-{fid}"' in page
    assert "projected 61-layer sweep" in page and "Environment" in page and "u_acc" in page


def test_report_rerenders_from_json(tmp_path, capsys):
    out = tmp_path / "again.html"
    assert main(["report", str(baseline_run_dir()), "--html", str(out)]) == 0
    text = capsys.readouterr().out
    # 146 = 116 NVFP4 and FP8 verdicts + the bytes verdicts of the 6 FP8 stages on layers 1-3 (FP8 activations
    # became a boundary tensor: skipped -> pass) + the 12 of the MTP block mtp.0, verified since it has stage rows
    # (mtp.e_proj, mtp.h_proj: bytes, bound, batch; mtp.experts.l1, mtp.experts.l2: bytes, bound, batch);
    # 150 = 146 + the moe.block valid verdict of each of the 4 decoder layers; 218 = 150 + the mode and prepare
    # verdicts (issue 24) of the 8 GEMM stages of each of the 4 layers (64) and of mtp.e_proj / mtp.h_proj (4);
    # 238 = 218 + attn.wo_a's bytes, prepare, bound, mode and batch on each of the 4 layers (issue 23: a kernel stage)
    assert "PASS: 238 pass, 0 fail" in text and "projected 61-layer sweep" in text
    assert out.read_text() == render_html(load_json(baseline_run_dir() / "report.json"))


def test_report_of_a_sweep_killed_before_its_merge_merges_the_units(tmp_path, capsys):
    run = copy_run(baseline_run_dir(), tmp_path / "run")
    (run / "report.json").unlink()
    assert main(["report", str(run)]) == 1  # not finished (never merged): incomplete, never PASS
    out = capsys.readouterr().out
    assert "over 5 unit(s)" in out and (run / "report.html").exists()
    assert "INCOMPLETE" in out and "report was never merged" in " ".join(out.split()) and "PASS" not in out


def test_a_failed_verdict_makes_the_report_fail(report, tmp_path, capsys):
    units = copy.deepcopy(report["units"])
    v = next(v for v in units[2]["verdicts"] if v["stage"] == "moe.l2" and v["check"] == "bound")
    v.update(status="fail", message="moe.l2: max |y - y64| / bound = 512 (planted)")
    units[2]["counts"] = {**units[2]["counts"], "pass": units[2]["counts"]["pass"] - 1, "fail": 1}
    keep = {k: report[k] for k in ("run", "backend", "environment", "distributed", "command", "created")}
    doc = merge_report(units, timings={"phases_s": {}, "wall_s": None}, **keep)
    validate(doc)
    assert doc["summary"]["status"] == "fail"
    assert doc["summary"]["failures"] == [{"unit": "layer2", "stage": "moe.l2", "check": "bound",
                                           "message": "moe.l2: max |y - y64| / bound = 512 (planted)"}]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(doc))
    assert main(["report", str(path)]) == 1
    assert "FAIL layer2 moe.l2 bound" in capsys.readouterr().out
    assert '<span class="badge fail">FAIL</span>' in (tmp_path / "report.html").read_text()


def test_report_of_a_directory_without_results_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("verify report: error: RUN_DIR") and "not a" in err[0], err


def test_unit_files_hold_numpy_and_torch_scalars_as_plain_json(tmp_path):
    import numpy as np

    from verify.report.document import write_json

    path = tmp_path / "u.json"
    write_json(path, {"a": np.int64(3), "b": torch.tensor(2.5), "c": np.float32("inf"), "d": torch.Size([2, 3])})
    assert load_json(path) == {"a": 3, "b": 2.5, "c": "inf", "d": [2, 3]}
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file of the atomic write was left behind"


def _svg_of(page: str, fid: str) -> str:
    import base64

    m = re.search(rf'<figure id="fig-{fid}">.*?src="data:image/svg\+xml;base64,([^"]+)"', page)
    assert m, f"no figure {fid}"
    return base64.b64decode(m.group(1)).decode()


def _fail_strokes(svg: str) -> int:
    from verify.report.plots import STATUS_COLORS

    return len(re.findall(rf"stroke: {STATUS_COLORS['fail']}", svg))


def test_a_failing_line_is_drawn_in_the_fail_colour_and_only_then(report):
    """The bound and loss plots: every line of a passing report in other colours (the bound itself
    included); a stage whose bound ratio exceeds 1 in one layer, or whose loss row fails, in the fail
    colour, named '(FAIL)' in its panel's legend."""
    page = render_html(report)
    assert _fail_strokes(_svg_of(page, "bound")) == 0 and _fail_strokes(_svg_of(page, "loss")) == 0
    doc = copy.deepcopy(report)
    unit = doc["units"][2]
    v = next(v for v in unit["verdicts"] if v["stage"] == "moe.l2" and v["check"] == "bound")
    v.update(status="fail", metrics={**v["metrics"], "bound_ratio": 1.0001})
    unit["metrics"]["shared.l2"].update(status="fail", problem="all-zero result (planted)")
    page = render_html(doc)
    bound, loss = _svg_of(page, "bound"), _svg_of(page, "loss")
    assert _fail_strokes(bound) > 0 and "l2 (FAIL)" in bound, "the failing bound line is not in the fail colour"
    assert _fail_strokes(loss) > 0 and "l2 (FAIL)" in loss, "the failing loss line is not in the fail colour"
    assert "1.0001 (moe.l2)" in page  # the units table: four decimals, not "1"


def test_the_loss_plot_has_one_panel_per_stage_family(report):
    from verify.report.plots import loss_figure, stage_family

    svg = loss_figure(report)
    families = list(dict.fromkeys(stage_family(s) for u in report["units"] if u["verified"] for s in u["metrics"]))
    assert len(families) >= 3
    for family in families:
        assert f"{family}: SQNR dB" in svg and f"{family}: 1 - cosine (log)" in svg
