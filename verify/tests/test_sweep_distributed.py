"""`python -m verify model` under torchrun (torch.distributed, gloo on the CPU): the ranks split the
units and rank 0's merged report equals the single-process one, ranks and timings aside."""

from __future__ import annotations

import pytest

from verify.report.document import load_json, normalized, validate
from verify.tests.sweep_runs import SWEEP_ARGS, UNITS, baseline_run_dir, copy_run, run, torchrun_command

pytestmark = pytest.mark.distributed


def test_two_torchrun_ranks_merge_the_report_of_one_process(tmp_path):
    pytest.importorskip("jsonschema", reason="jsonschema: not installed (pip install -e '.[test]'); the report is validated")
    out = tmp_path / "run"
    proc = run(torchrun_command(2, "model", *SWEEP_ARGS, "--no-html", "--report-dir", str(out)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 ranks (gloo)" in proc.stdout, proc.stdout[-3000:]
    doc = load_json(out / "report.json")
    validate(doc)
    dist = doc["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert sorted(u for names in dist["assignment"].values() for u in names) == sorted(UNITS)
    assert {u["rank"] for u in doc["units"]} == {0, 1}, "both ranks must have verified units"
    assert normalized(doc) == normalized(load_json(baseline_run_dir() / "report.json"))


def test_one_torchrun_rank_resumes_a_partial_sweep(tmp_path):
    """N = 1 under torchrun, on a sweep that lost two units and its report: rank 0's plan holds only
    the two, and the merged report equals the uninterrupted single-process one."""
    out = copy_run(baseline_run_dir(), tmp_path / "run")
    for name in ("layer1.json", "layer3.json"):
        (out / "units" / name).unlink()
    (out / "report.json").unlink()
    proc = run(torchrun_command(1, "model", *SWEEP_ARGS, "--no-html", "--report-dir", str(out)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming: 3 of 5 units already in" in proc.stdout, proc.stdout[-3000:]
    doc = load_json(out / "report.json")
    assert doc["distributed"]["world_size"] == 1 and doc["distributed"]["backend"] == "gloo"
    assert doc["distributed"]["assignment"] == {"0": ["layer1", "layer3"]}
    assert normalized(doc) == normalized(load_json(baseline_run_dir() / "report.json"))


def test_under_torchrun_a_missing_report_dir_is_a_one_line_error(monkeypatch, capsys):
    """torch.distributed.is_torchelastic_launched() reads TORCHELASTIC_RUN_ID, which torchrun sets."""
    from verify.__main__ import main

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    assert main(["model", *SWEEP_ARGS, "--layers", "3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "verify model: error: --report-dir: required under torchrun (the ranks write their units there and rank 0 "
        "merges them; on several nodes it must be on a shared filesystem)")


def test_a_rank_that_fails_stops_every_rank_with_its_message(tmp_path):
    """A NaN scale byte in layer 2 (found when that layer is loaded, not in the plan): the rank that
    loads it exits with the one-line NanScaleError, the other with 'rank R failed at layer2', nobody
    hangs at the barrier, no report is merged, and the units both ranks finished stay for a resume."""
    import torch

    from verify.config import GOLDEN_DIR
    from verify.checkpoint.writer import make_edited_checkpoint

    bad = "layers.2.ffn.experts.0.w1.weight_scale"

    def nan_scale(name, t):
        if name != bad:
            return t
        u8 = t.view(torch.uint8).clone()
        u8[0, 0] = 0x7F  # E4M3 NaN
        return u8.view(t.dtype)

    ckpt = make_edited_checkpoint(GOLDEN_DIR / "mini-v4", tmp_path / "ck", nan_scale)
    out = tmp_path / "run"
    proc = run(torchrun_command(2, "model", *SWEEP_ARGS, "--no-html", "--checkpoint", str(ckpt), "--report-dir", str(out)),
               timeout=180)
    assert proc.returncode != 0
    assert "verify model: error: NanScaleError" in proc.stderr and bad in proc.stderr, proc.stderr[-3000:]
    assert "failed at layer2: NanScaleError" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "report.json").exists()
    assert "layer2.json" not in {p.name for p in (out / "units").glob("*.json")}


LOOP_RUNS = 20


@pytest.mark.slow
def test_two_rank_sweep_exits_0_every_time(tmp_path):
    """The two-process CPU sweep LOOP_RUNS (20) times in a row: torchrun exits 0 every time. Before the final barrier of DistContext.finish, 3 of 9 such runs
    aborted rank 0 after it had written a PASS report ("terminate called without an active
    exception"), so torchrun exited 1."""
    failures = []
    for k in range(LOOP_RUNS):
        out = tmp_path / f"run{k}"
        proc = run(torchrun_command(2, "model", *SWEEP_ARGS, "--no-html", "--report-dir", str(out)), timeout=300)
        if proc.returncode != 0 or "terminate called" in proc.stderr:
            failures.append(f"run {k}: exit {proc.returncode}: {proc.stderr[-1500:]}")
        elif load_json(out / "report.json")["summary"]["status"] != "pass":
            failures.append(f"run {k}: exit 0 but the report does not pass")
    assert not failures, f"{len(failures)} of {LOOP_RUNS} runs failed:\n" + "\n".join(failures)


def test_the_teardown_joins_the_gloo_threads_before_exit(tmp_path):
    """DistContext.finish leaves no process-group thread for the interpreter's exit to tear down (the
    cause of the aborts the loop above guards against): the process's thread count after finish() is
    what it was before the process group was made."""
    script = tmp_path / "teardown.py"
    from verify.config import REPO_ROOT

    script.write_text(
        f"import os, sys\nsys.path.insert(0, {str(REPO_ROOT)!r})  # this checkout's verify, not an installed one\n"
        "from verify.sweep import DistContext\n"
        "threads = lambda: len(os.listdir('/proc/self/task'))\n"
        "before = threads()\n"
        "ctx = DistContext('cpu', 1)\n"
        "assert ctx.on_main(lambda: 'x') == 'x'\n"
        "during = threads()\n"
        "ctx.finish()\n"
        "print('threads', before, during, threads())\n")
    proc = run(torchrun_command(1, script=str(script)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("threads"))
    before, during, after = (int(x) for x in line.split()[1:])
    assert during > before, line  # the process group did start threads (else this test shows nothing)
    assert after == before, line
