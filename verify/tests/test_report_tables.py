"""The per-layer tables of `python -m verify layer` (verify/report/tables.py): every check's status
stays visible at 80 columns and in a 140-column CI log, nothing is cut mid-word, bound ratios
print with enough digits to tell a pass from a fail, and a loss row's status shows when present."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from references.layer import RunOptions
from references.stages import Check
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.layer_report import backend_for_verdicts, layer_inputs
from verify.report.tables import CHECK_ABBREVIATIONS, format_ratio, loss_table, render_text, verdict_table
from verify.run import run_layer


@pytest.fixture(scope="module")
def run_with_a_late_fail():
    """A real emulator run of mini-v4 layer 0 with one planted failure in the last check column
    (graph) of a stage, and one in a middle column (ids of the router)."""
    ckpt = Checkpoint.open(GOLDEN_DIR / "mini-v4")
    layer = ckpt.load_layer(0)
    inputs = layer_inputs(ckpt, layer, tokens=8, seed=0, device="cpu")
    run = run_layer(ckpt, layer, inputs, options=RunOptions(), backend=backend_for_verdicts("emulator",
                                                                                           torch.device("cpu")))
    last = [c.value for c in Check if any(v.check == c.value for v in run.verdicts)][-1]
    assert last == "graph"
    planted = [v for v in run.verdicts if (v.stage, v.check) in {("moe.l2", "graph"), ("router", "ids")}]
    assert len(planted) == 2
    for v in planted:
        v.status, v.message = "fail", f"{v.check}: planted failure of {v.stage} with a message long enough to wrap " * 2
    return run


def _rows(text: str, stages: list[str]) -> dict[str, str]:
    """stage -> its table lines joined (every line that starts with the stage name and a space: one per table
    where the narrow layout splits its checks over two tables)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        for s in stages:
            if re.match(rf"\W*{re.escape(s)}\s", line):
                out[s] = f"{out[s]} {line}" if s in out else line
    return out


def _status_tokens(line: str) -> list[str]:
    return re.findall(r"(?<![\w/])(ok|pass|FAIL|n/s|not served|n/a)(?![\w/])", line)


@pytest.mark.parametrize("width", [80, 100, 140], ids=lambda w: f"{w}cols")
def test_every_check_status_is_visible_and_whole(run_with_a_late_fail, width):
    run = run_with_a_late_fail
    text = render_text(verdict_table(0, "emulator", run), width)
    assert max(map(len, text.splitlines())) <= width, text
    assert "…" not in text, f"something was cut at {width} columns:\n{text}"
    stages = list(dict.fromkeys(v.stage for v in run.verdicts))
    rows = _rows(text, stages)
    assert set(rows) == set(stages), f"stage names missing or truncated at {width} columns:\n{text}"
    for stage, line in rows.items():
        expected = [v.status for v in run.verdicts if v.stage == stage]
        got = _status_tokens(line)
        assert len(got) == len(expected), f"{stage}: {len(expected)} verdicts, {len(got)} statuses shown:\n{line}"
        assert got.count("FAIL") == expected.count("fail"), line
    # the FAIL sits in the last check column: right of every other status of its row
    line = rows["moe.l2"]
    assert _status_tokens(line)[-1] == "FAIL", line
    assert "FAIL moe.l2: graph: planted failure" in " ".join(text.split()), text


def test_the_narrow_layout_names_its_abbreviations(run_with_a_late_fail):
    text = render_text(verdict_table(0, "emulator", run_with_a_late_fail), 80)
    headers = [line.split() for line in text.splitlines() if line.startswith("stage")]  # one per split table
    columns = [w for h in headers for w in h[1:] if w != "ratio"]
    present = [c.value for c in Check if any(v.check == c.value for v in run_with_a_late_fail.verdicts)]
    assert columns == [CHECK_ABBREVIATIONS[c] for c in present] and headers[-1][-1] == "ratio", headers
    flat = " ".join(text.split())
    for c in present:
        assert CHECK_ABBREVIATIONS[c] == c or f"{CHECK_ABBREVIATIONS[c]} {c}" in flat, f"legend lacks {c}"


def test_columns_80_in_the_environment_selects_the_narrow_layout(run_with_a_late_fail, monkeypatch):
    from rich.console import Console

    monkeypatch.setenv("COLUMNS", "80")
    buf = io.StringIO()
    console = Console(file=buf, color_system=None)
    assert console.width == 80
    console.print(verdict_table(0, "emulator", run_with_a_late_fail))
    text = buf.getvalue()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    assert _status_tokens(_rows(text, ["moe.l2"])["moe.l2"])[-1] == "FAIL", text


def test_the_loss_table_fits_80_columns_and_shows_a_status_when_rows_carry_one(run_with_a_late_fail):
    run = run_with_a_late_fail
    # every loss row carries a status (verify.metrics.stage_metrics): the column is always there
    assert all("status" in m for m in run.loss.values()) and "status" in render_text(loss_table(0, "x", 8, run), 140)
    loss = {s: dict(m) for s, m in run.loss.items()}
    loss["moe.l2"].update(status="fail", problem="all-zero result where the reference is not")
    for s in loss:
        loss[s].setdefault("status", "pass")

    class Run:  # the loss table reads only loss and emulated
        pass

    r = Run()
    r.loss, r.emulated = loss, run.emulated
    for width in (80, 140):
        text = render_text(loss_table(0, "x", 8, r), width)
        assert max(map(len, text.splitlines())) <= width and "…" not in text, text
        rows = _rows(text, list(loss))
        assert set(rows) == set(loss), text
        assert "FAIL" in rows["moe.l2"] and sum("FAIL" in line for line in rows.values()) == 1, text
        assert "FAIL moe.l2: all-zero result where the reference is not" in " ".join(text.split())


@pytest.mark.parametrize("x, text", [
    (0.9999, "0.9999"), (1.0001, "1.0001"), (1.0, "1.0000"), (0.99999, "1.0000"), (1.00001, "1.00001"),
    (1 + 2**-23, "1.0000001"), (0.5, "0.5000"), (12.5, "12.5"), (512.0, "512"), (2.5e-5, "2.5e-05"),
    (0.0, "0.0000"), (math.inf, "inf"), (math.nan, "nan"),
], ids=lambda v: repr(v) if isinstance(v, float) else None)
def test_bound_ratios_tell_a_pass_from_a_fail(x, text):
    assert format_ratio(x) == text
    if math.isfinite(x) and x != 0:
        assert (float(format_ratio(x)) > 1) == (x > 1), "the printed ratio is on the other side of the bound"


def test_messages_in_brackets_are_printed_not_read_as_markup(run_with_a_late_fail):
    import copy

    run = copy.copy(run_with_a_late_fail)
    run.verdicts = [copy.copy(v) for v in run.verdicts]
    v = next(v for v in run.verdicts if v.status == "fail")
    v.message = "act_quant codes [sm100 vs emulator:te] (4096, 3584) uint8: 3/14680064 bytes differ [/bold]"
    text = " ".join(render_text(verdict_table(0, "emulator", run), 140).split())
    assert "[sm100 vs emulator:te] (4096, 3584) uint8: 3/14680064 bytes differ [/bold]" in text
