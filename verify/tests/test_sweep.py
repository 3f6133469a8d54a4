"""`python -m verify model`: the streaming sweep's plan (units, MTP, balance by bytes), its files,
and resume after a kill (verify/sweep.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from verify.__main__ import COMMANDS, main
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR, REPO_ROOT
from verify.report.document import load_json, normalized, validate
from verify.sweep import Unit, assign_units, plan_units
from verify.tests.sweep_runs import SWEEP_ARGS, UNITS, baseline_run_dir, copy_run, verify_command

MINI_V4 = GOLDEN_DIR / "mini-v4"


def _units(sizes: dict[str, int]) -> list[Unit]:
    return [Unit(n, "decoder", k, b, f"layers.{k}.") for k, (n, b) in enumerate(sizes.items())]


def test_units_go_largest_first_to_the_least_loaded_rank():
    """a(10)->r0, b(7)->r1, c(6)->r1 (13), d(5)->r0 (15), e(2)->r1 (15); each rank's list in model order."""
    units = _units({"a": 10, "b": 7, "c": 6, "d": 5, "e": 2})
    split = assign_units(units, 2)
    assert [[u.name for u in r] for r in split] == [["a", "d"], ["b", "c", "e"]]
    assert [sum(u.nbytes for u in r) for r in split] == [15, 15]
    assert assign_units(units, 1) == [units]
    assert assign_units(units, 8)[5:] == [[], [], []]  # more ranks than units: the rest idle
    three = assign_units(units, 3)
    assert sorted(u.name for r in three for u in r) == sorted(u.name for u in units)  # each unit exactly once


def test_the_plan_holds_every_layer_and_the_mtp_block_with_their_bytes():
    ckpt = Checkpoint.open(MINI_V4)
    units = plan_units(ckpt, (0, 1, 2, 3), include_mtp=True)
    assert [u.name for u in units] == UNITS
    assert [u.nbytes for u in units[:4]] == [ckpt.plan_layer(i).nbytes for i in range(4)]
    mtp_bytes = sum(i.nbytes for i in ckpt.headers_for(ckpt.names_with_prefix("mtp.0.")).values())
    assert units[4].kind == "mtp" and units[4].nbytes == mtp_bytes > 0
    assert [u.name for u in plan_units(ckpt, (3,), include_mtp=False)] == ["layer3"]


def test_a_sweep_writes_one_document_per_unit_and_a_valid_report():
    pytest.importorskip("jsonschema", reason="jsonschema: not installed (pip install -e '.[test]'); the report is validated")
    out = baseline_run_dir()
    assert sorted(p.stem for p in (out / "units").glob("*.json")) == sorted(UNITS)
    doc = load_json(out / "report.json")
    validate(doc)
    assert doc["summary"]["status"] == "pass" and doc["summary"]["verdicts"]["fail"] == 0
    assert not doc["summary"]["not_verified"]  # mtp.0 has stage rows (references.stages, unit "mtp") since issue 23
    mtp = next(u for u in doc["units"] if u["unit"]["name"] == "mtp.0")
    judged = {(v["stage"], v["check"]): v["status"] for v in mtp["verdicts"]}
    assert judged[("mtp.experts.l1", "bound")] == judged[("mtp.e_proj", "bytes")] == "pass", judged
    phases = doc["timings"]["phases_s"]
    assert {"startup", "load", "emulated", "high", "verdicts", "graph_probe", "report"} <= phases.keys()
    layer0 = doc["units"][0]
    assert layer0["timings_s"]["stages"].keys() >= {"attn.wq_a", "moe.l1", "router"}
    proj = doc["timings"]["projection"]
    assert proj["layers"] == 61 and proj["gpus"].keys() == {"1", "8"}
    assert proj["gpus"]["1"] > proj["gpus"]["8"] > 0
    assert (out / "report.html").stat().st_size > 10_000


def test_a_killed_sweep_resumes_from_its_units_and_gives_the_same_report(tmp_path, capsys):
    """SIGKILL a sweep once its first unit is written; the same command again skips the units on disk
    and its report equals an uninterrupted sweep's, timings and run bookkeeping aside."""
    out = tmp_path / "run"
    proc = subprocess.Popen(verify_command("model", *SWEEP_ARGS, "--no-html", "--report-dir", str(out)), cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = out / "units" / "layer0.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert first.exists(), f"the sweep wrote no unit before it ended: {proc.stderr.read().decode()[-2000:]}"
    written = sorted(p.stem for p in (out / "units").glob("*.json"))
    assert not (out / "report.json").exists() and len(written) < len(UNITS), f"killed too late: {written}"

    assert main(["model", *SWEEP_ARGS, "--no-html", "--report-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"resuming: {len(written)} of {len(UNITS)} units already in" in text, text[-3000:]
    resumed, baseline = load_json(out / "report.json"), load_json(baseline_run_dir() / "report.json")
    assert resumed["distributed"]["resumed"] == written
    assert normalized(resumed) == normalized(baseline)


def test_a_report_dir_of_another_configuration_is_refused_then_fresh_starts_over(tmp_path, capsys):
    out = copy_run(baseline_run_dir(), tmp_path / "run")
    other = [a if a != "4" else "5" for a in SWEEP_ARGS]  # --tokens 5
    assert main(["model", *other, "--report-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("verify model: error: --report-dir") and "--fresh" in err[0], err
    assert main(["model", *other, "--layers", "3", "--fresh", "--no-html", "--report-dir", str(out)]) == 0
    assert sorted(p.stem for p in (out / "units").glob("*.json")) == ["layer3"]
    assert load_json(out / "report.json")["run"]["options"]["tokens"] == 5


def test_without_report_dir_the_sweep_writes_nothing_and_still_summarizes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["model", "--layers", "3", "--tokens", "2", "--tables", "off"]) == 0
    text = capsys.readouterr().out
    assert "model sweep:" in text and "projected 61-layer sweep" in text and "time: wall" in text
    assert list(tmp_path.iterdir()) == []


def test_the_judge_context_times_each_sync_and_graph_probe(monkeypatch):
    """run_layer's graph_probe phase: the sync and graph checks run their probes inside JudgeContext.probe,
    which adds each probe's seconds to the caller's sink and reports it to on_phase."""
    import verify.verdicts.checks as checks
    from references.stages import stage
    from verify.verdicts.context import JudgeContext

    def slow_probe(*args):
        time.sleep(0.02)
        return "probed"

    class Forward(checks.Outputs):
        def replay(self):
            return checks.Replay(lambda: None, ())

    monkeypatch.setattr(checks, "needs_cuda", lambda ctx, check: None)  # the probes themselves need a GPU
    monkeypatch.setattr(checks, "sync_probe", slow_probe)
    monkeypatch.setattr(checks, "graph_probe", slow_probe)
    sink, phases = {"emulated": 1.0}, []
    ctx = JudgeContext(None, None, sink, phases.append)
    assert checks.no_host_sync(ctx, stage("moe.l1"), Forward(), {}) == "probed"
    assert checks.graph_replay(ctx, stage("moe.l2"), Forward(), {}) == "probed"
    assert phases == ["sync probe moe.l1", "graph probe moe.l2"]
    assert sink["graph_probe"] >= 0.04 and sink["emulated"] == 1.0, sink


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_prints_its_help(command, capsys):
    """A subcommand's --help used to crash on the suppressed default of its --debug option."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "--debug" in capsys.readouterr().out
