"""`python -m verify`'s promises beyond the one-line errors (test_cli_errors.py): what it prints first,
the environment variables, help without a command, one JSON shape for a layer's result, sweeps
without a backend or killed midway, Ctrl-C, the memory estimate and the thread choice."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time

import pytest
import torch

from verify.__main__ import main
from verify.config import GOLDEN_DIR, REPO_ROOT
from verify.report.document import load_json, normalized

MINI_V4 = GOLDEN_DIR / "mini-v4"
QUICK = ["--tokens", "4", "--layers", "3"]


def _first_line(text: str) -> str:
    return next(ln for ln in text.splitlines() if ln.strip())


@pytest.mark.parametrize("argv,backend", [
    pytest.param(["layer", *QUICK], "backend none", id="layer-no-backend"),
    pytest.param(["layer", *QUICK, "--backend", "emulator"], "backend emulator", id="layer-emulator"),
    pytest.param(["model", *QUICK, "--backend", "emulator", "--tables", "off"], "backend emulator", id="model"),
    pytest.param(["accumulator", "--backend", "emulator", "--device", "cpu"], "backend emulator", id="accumulator"),
])
def test_the_first_line_names_checkpoint_backend_and_device(argv, backend, capsys):
    assert main(argv) == 0
    line = _first_line(capsys.readouterr().out)
    assert line.startswith(f"verify {argv[0]}: "), line
    where = "no checkpoint (synthetic probe data)" if argv[0] == "accumulator" else "checkpoint golden/mini-v4"
    assert where in line and backend in line and "device cpu" in line, line


def test_selftest_first_line_and_a_line_per_injected_bug_in_a_log(monkeypatch, capsys):
    """Two injectors keep it short; in a log (not a terminal) each finished bug is one line."""
    import verify.selftest as st

    two = tuple(i for i in st.INJECTORS if i.bug in ("swapped-nibbles", "one-clear-winner-swapped"))
    monkeypatch.setattr(st, "INJECTORS", two)
    assert main(["selftest", "--backend", "emulator", "--device", "cpu", "--layers", "0"]) == 0
    out = capsys.readouterr().out
    line = _first_line(out)
    assert line.startswith("verify selftest: checkpoint golden/mini-v4; backend emulator; device cpu"), line
    assert f"[1/2] {two[0].bug}: caught" in out and f"[2/2] {two[1].bug}: caught" in out, out


def test_environment_variables_choose_checkpoint_and_backend_as_in_pytest(tmp_path, monkeypatch, capsys):
    """NVFP4V_CHECKPOINT / NVFP4V_BACKEND are the defaults of --checkpoint / --backend (the command line
    still wins), as verify/plugin.py's addoption defaults are for pytest."""
    import shutil

    copy = shutil.copytree(MINI_V4, tmp_path / "other-ckpt")
    monkeypatch.setenv("NVFP4V_CHECKPOINT", str(copy))
    monkeypatch.setenv("NVFP4V_BACKEND", "emulator")
    assert main(["layer", *QUICK]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {copy}" in _first_line(out) and "backend emulator" in _first_line(out), _first_line(out)
    assert "emulator verdicts per stage" in out
    assert main(["layer", *QUICK, "--checkpoint", str(MINI_V4)]) == 0  # the option wins over the variable
    assert "checkpoint golden/mini-v4" in _first_line(capsys.readouterr().out)


def test_without_a_command_it_prints_the_help_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m verify") and "layer" in out and "selftest" in out


def test_model_help_states_the_exit_status_policy(capsys):
    with pytest.raises(SystemExit):
        main(["model", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 1 when any verdict failed" in text and "without --backend" in text


def test_layer_json_and_a_sweep_unit_are_one_shape(tmp_path, capsys):
    """`layer --json`'s result for a layer equals the sweep's units/<layer>.json for the same
    configuration (timings, host, rank aside: normalized)."""
    pytest.importorskip("jsonschema", reason="jsonschema: not installed (pip install -e '.[test]')")
    import jsonschema

    from verify.report.document import SCHEMA_PATH

    args = [*QUICK, "--backend", "emulator"]
    assert main(["layer", *args, "--json", str(tmp_path / "layer.json")]) == 0
    assert main(["model", *args, "--tables", "off", "--no-html", "--report-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    layer_doc = load_json(tmp_path / "layer.json")
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(layer_doc, {"$ref": "#/$defs/layer_report", "$defs": schema["$defs"]})
    from_layer = layer_doc["runs"]["layer3/dynamic-after_w2-te"]
    from_sweep = load_json(tmp_path / "run" / "units" / "layer3.json")
    assert from_layer["verdicts"] and from_layer["counts"]["pass"] > 0
    assert normalized(from_layer) == normalized(from_sweep)


def test_a_sweep_without_backend_says_so_and_exits_0_by_policy(capsys):
    assert main(["model", *QUICK, "--tables", "off"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "no kernel backend: 0 kernel verdicts ran" in out and "PASS" not in out, out[-2000:]


def test_report_on_a_killed_sweep_lists_the_missing_units_and_never_says_pass(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["model", "--backend", "emulator", "--tokens", "4", "--layers", "2-3", "--tables", "off", "--no-html",
                 "--report-dir", str(run)]) == 0
    (run / "report.json").unlink()
    (run / "units" / "layer3.json").unlink()
    capsys.readouterr()
    assert main(["report", str(run)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "INCOMPLETE" in out and "1 of 2 planned units missing: layer3" in out, out[-2000:]
    assert "PASS" not in out and "resume with: python -m verify model" in out, out[-2000:]


def test_report_on_a_sweep_dir_without_plan_says_missing_units_are_unknown(tmp_path, capsys):
    """A run directory written before sweep.json existed (schema 1.0): still read, still incomplete."""
    run = tmp_path / "run"
    assert main(["model", "--backend", "emulator", *QUICK, "--tables", "off", "--no-html", "--report-dir", str(run)]) == 0
    (run / "report.json").unlink()
    (run / "sweep.json").unlink()
    unit = load_json(run / "units" / "layer3.json")
    (run / "units" / "layer3.json").write_text(json.dumps({**unit, "schema_version": "1.0"}))
    capsys.readouterr()
    assert main(["report", str(run)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "INCOMPLETE" in out and "which units are missing is unknown" in out and "PASS" not in out, out[-2000:]


def test_ctrl_c_in_a_sweep_is_one_line_with_the_resume_command_and_status_130(tmp_path):
    out = tmp_path / "run"
    cmd = [os.sys.executable, "-m", "verify", "model", "--backend", "emulator", "--tokens", "4", "--tables", "off",
           "--no-html", "--report-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = out / "units" / "layer0.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert first.exists(), err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if proc.returncode == 0:
        pytest.skip("the sweep finished before the signal arrived")
    assert proc.returncode == 130, err
    assert len(lines) == 1 and lines[0].startswith("verify model: interrupted: "), err
    assert "resume with: python -m verify model" in lines[0] and str(out) in lines[0], lines[0]


def test_ctrl_c_without_report_dir_says_nothing_was_kept(monkeypatch, capsys):
    import verify.sweep as sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "_sweep", interrupted)
    assert main(["model", *QUICK]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing was kept (no --report-dir)" in err[0], err


@pytest.mark.parametrize("argv", [["layer", "--tokens", "10000000"], ["layer", "--layers", "0-999999999"]],
                         ids=["tokens-10000000", "layers-0-999999999"])
def test_argument_ranges_are_refused_before_allocating(argv, capsys):
    """ru_maxrss (the peak resident size so far) grows by less than 200 MB: nothing was allocated for
    the 10^7 tokens or the 10^9 layers, and the refusal comes in seconds."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 20
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 200e6
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_memory_estimate_is_above_what_a_run_keeps():
    """estimate_run_bytes >= the bytes a layer's run holds in its stage outputs (emulated and high),
    and within 10x of it (an estimate that refuses runs that fit is as wrong as one that lets an
    impossible one start)."""
    from references.layer import RunOptions
    from verify.checkpoint import Checkpoint
    from verify.layer_report import layer_inputs
    from verify.preflight import estimate_run_bytes
    from verify.run import run_layer

    ckpt = Checkpoint.open(MINI_V4)
    layer = ckpt.load_layer(3)
    tokens = 64
    run = run_layer(ckpt, layer, layer_inputs(ckpt, layer, tokens=tokens, seed=0, device="cpu"), options=RunOptions())
    kept = sum(t.numel() * t.element_size() for d in (run.emulated, run.high) for t in d.values())
    estimate = estimate_run_bytes(ckpt.config, tokens=tokens, layer_nbytes=0)
    assert kept < estimate < 10 * kept, (kept, estimate)


def test_threads_honour_omp_num_threads(monkeypatch):
    from verify.config import configure_torch_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "(OMP_NUM_THREADS)" in configure_torch_threads()


def test_threads_leave_the_busy_cores_alone(monkeypatch):
    """2 cores with a load of 1.6 from other processes: 1 thread (2 would wait on each other)."""
    import verify.config as config

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(config, "physical_cores", lambda: 2)
    monkeypatch.setattr(config.os, "getloadavg", lambda: (1.6, 1.0, 1.0))
    before = torch.get_num_threads()
    try:
        assert config.configure_torch_threads().startswith("torch threads 1 (2 cores, load 1.6")
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(config.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
        assert config.configure_torch_threads().startswith("torch threads 2 ")
    finally:
        torch.set_num_threads(before)
