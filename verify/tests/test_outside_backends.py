"""Backends from outside the repository: a Backend subclass that implements only `quantize`, found as
module:attr and by the entry-point group `nvfp4_verify.backends`, run through the CLI and the
registry (issue 24 item 1). The rest of its ops are "not served" with the base class's reason."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from references.stages import Op
from verify.__main__ import main
from verify.backends import FORWARD_OPS, Backend, get_backend, registered_backends
from verify.backends.cli import describe_backend
from verify.backends.registry import ENTRY_POINT_GROUP, backend_arg
from verify.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
MODULE = "outside_quant_only"

# wraps the emulator's quantize; Flipped returns its codes with every low nibble's sign flipped
SOURCE = textwrap.dedent('''
    import dataclasses

    from verify.backends import Backend, EmulatorBackend


    class QuantOnly(Backend):
        name = "quant-only"
        accumulator = "none (no GEMM)"
        version = "7.7"

        def __init__(self):
            self._emu = EmulatorBackend()
            self.recipe = self._emu.recipe

        def quantize(self, x_bf16, *, input_dec_scale_f32=None):
            return self._emu.quantize(x_bf16, input_dec_scale_f32=input_dec_scale_f32)


    class Flipped(QuantOnly):
        name = "quant-flipped"

        def quantize(self, x_bf16, *, input_dec_scale_f32=None):
            q = super().quantize(x_bf16, input_dec_scale_f32=input_dec_scale_f32)
            return dataclasses.replace(q, packed_u8=q.packed_u8 ^ 0x08)


    def make():
        return QuantOnly()


    NOT_A_BACKEND = 3
''')


@pytest.fixture
def outside(tmp_path, monkeypatch) -> Path:
    """tmp_path holding the outside module, on sys.path (this process and, by PYTHONPATH, subprocesses)."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _verify(args: list[str], pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "verify", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _verdicts(doc) -> list[dict]:
    """Every verdict record (a dict with stage, check and status) anywhere in a layer report, but the negative
    controls (their records say whether a check failed its planted input, not what the backend computed)."""
    if isinstance(doc, dict):
        found = [doc] if {"stage", "check", "status"} <= doc.keys() else []
        return found + [v for k, x in doc.items() if k not in ("controls", "control_failures") for v in _verdicts(x)]
    if isinstance(doc, list):
        return [v for x in doc for v in _verdicts(x)]
    return []


@pytest.mark.parametrize("attr,exit_status,bytes_status", [("QuantOnly", 0, "pass"), ("make", 0, "pass"),
                                                           ("Flipped", 1, "fail")],
                         ids=["class", "factory", "flipped-nibble-signs-fail"])
def test_layer_runs_an_outside_backend_given_as_module_attr(outside, tmp_path, attr, exit_status, bytes_status):
    """Its quantize is judged (dense stages' bytes: pass; a planted sign flip: fail, exit 1), every other
    verdict is "not served" with the base class's sentence, and nothing else fails."""
    out = tmp_path / "layer.json"
    proc = _verify(["layer", "--backend", f"{MODULE}:{attr}", "--layers", "0", "--tokens", "4", "--json", str(out)],
                   outside)
    assert proc.returncode == exit_status, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdicts = _verdicts(json.loads(out.read_text()))
    served = [v for v in verdicts if v["status"] != "not served"]
    assert served and all(v["check"] == "bytes" and v["status"] == bytes_status for v in served), served
    assert {"attn.wq_a", "attn.wq_b", "shared.l1"} <= {v["stage"] for v in served}
    name = "quant-flipped" if attr == "Flipped" else "quant-only"
    not_served = [v for v in verdicts if v["status"] == "not served"]
    assert not_served and all(v["message"].startswith(f"not served: {name} has no ") for v in not_served), \
        {v["message"] for v in not_served if not v["message"].startswith(f"not served: {name} has no ")}


def test_only_the_overridden_op_is_served_the_rest_say_why(outside):
    b = get_backend(f"{MODULE}:QuantOnly")
    cpu = torch.device("cpu")
    assert isinstance(b, Backend) and b.unsupported_reason(Op.QUANTIZE, cpu) is None
    for op in FORWARD_OPS:
        if op is not Op.QUANTIZE:
            assert b.unsupported_reason(op, cpu) == f"not served: quant-only has no {op.value}"
    with pytest.raises(NotImplementedError, match=r"^not served: quant-only has no dense_gemm$"):
        b.dense_gemm(None, None)
    with pytest.raises(NotImplementedError, match=r"^not served: quant-only has no prepare$"):
        b.prepare_linear(None)


@pytest.mark.parametrize("spec,message", [
    ("sm80", r"--backend sm80: invalid choice: 'sm80' \(known backends: auto, emulator, sm90, sm100"),
    ("no_such_module_xyz:Thing", r"--backend no_such_module_xyz:Thing: module 'no_such_module_xyz' is not importable "
                                 r"\(ModuleNotFoundError"),
    (f"{MODULE}:Missing", rf"--backend {MODULE}:Missing: module '{MODULE}' has no attribute 'Missing'"),
    (f"{MODULE}:NOT_A_BACKEND", rf"--backend {MODULE}:NOT_A_BACKEND: {MODULE}:NOT_A_BACKEND is a int, not a backend"),
    ("os:getcwd", r"--backend os:getcwd: os:getcwd\(\) returned a str, not a backend"),
    ("a-b:c", r"--backend a-b:c: not a backend spec 'a-b:c'"),
], ids=["unknown-name", "module-not-importable", "attr-missing", "not-callable", "factory-returns-no-backend",
        "malformed"])
def test_bad_specs_are_one_line_usage_errors_naming_the_spec(outside, spec, message):
    with pytest.raises(UsageError, match=message) as e:
        get_backend(spec)
    assert "\n" not in str(e.value) and e.value.argument == "--backend"


@pytest.mark.parametrize("command", ["layer", "selftest", "accumulator"])
def test_every_cli_backend_option_takes_module_attr_and_refuses_unknown_names(outside, command, capsys):
    assert main([command, "--backend", "sm80"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"verify {command}: error: argument --backend: invalid choice: 'sm80' "
                          "(known backends: auto,") and "\n" not in err
    assert main([command, "--backend", f"{MODULE}:Missing"]) == 2
    assert capsys.readouterr().err.strip() == (f"verify {command}: error: --backend {MODULE}:Missing: module "
                                               f"'{MODULE}' has no attribute 'Missing'")


def test_pytest_backend_option_takes_registered_names_and_module_attr():
    from verify.plugin import _backend_arg

    assert _backend_arg("sm100") == "sm100" and _backend_arg("mypkg.mod:make") == "mypkg.mod:make"
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="invalid choice: 'sm80'"):
        _backend_arg("sm80")


# ----------------------------------------------------------------------------- entry points


def _install_dist(where: Path, entry_points: str, name: str = "outside_kernels", version: str = "1.2.3") -> None:
    """A minimal installed distribution (a .dist-info directory on sys.path) declaring `entry_points`."""
    info = where / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points}\n")


def test_an_entry_point_is_discovered_listed_and_runs(outside):
    _install_dist(outside, f"quantonly = {MODULE}:QuantOnly\nbroken = {MODULE}:Missing\n"
                           f"emulator = {MODULE}:QuantOnly")
    entries = registered_backends()
    assert entries["quantonly"].origin == "entry point outside_kernels" and entries["quantonly"].version == "1.2.3"
    assert entries["emulator"].origin == "built-in", "an installed package cannot take over a built-in's name"
    assert backend_arg("quantonly") == "quantonly"
    b = get_backend("quantonly")
    assert b.name == "quant-only" and b.unsupported_reason(Op.QUANTIZE, torch.device("cpu")) is None
    with pytest.raises(UsageError, match=rf"^--backend broken: module '{MODULE}' has no attribute 'Missing'"):
        get_backend("broken")


def test_backends_command_lists_builtins_entry_points_and_module_attr(outside, capsys):
    _install_dist(outside, f"quantonly = {MODULE}:QuantOnly\nbroken = {MODULE}:Missing")
    cpu = torch.device("cpu")
    rows = {s: describe_backend(s, cpu) for s in ("emulator", "sm90", "sm100", "quantonly", "broken",
                                                   f"{MODULE}:QuantOnly")}
    assert rows["emulator"]["origin"] == "built-in" and rows["emulator"]["u_acc"] == 2.0**-53
    assert all(reason is None for reason in rows["emulator"]["ops"].values())
    assert rows["sm90"]["ops"]["dense_gemm"] and rows["sm100"]["ops"]["swiglu_requant"]  # each says why here
    q = rows["quantonly"]
    assert (q["name"], q["origin"], q["version"], q["accumulator"]) == \
        ("quant-only", "entry point outside_kernels", "7.7 (1.2.3)", "none (no GEMM)")
    assert q["ops"]["quantize"] is None and q["ops"]["moe_block"] == "not served: quant-only has no moe_block"
    assert rows["broken"]["error"].startswith("UsageError: --backend broken: module 'outside_quant_only' has no "
                                              "attribute 'Missing'")
    assert rows[f"{MODULE}:QuantOnly"]["origin"] == "module:attr"

    assert main(["backends", "--device", "cpu"]) == 0  # a broken entry point is listed, not fatal
    listing = capsys.readouterr().out
    for text in ("emulator", "sm90", "sm100", "quantonly (quant-only)", "broken", "not loadable", "outside_kernels"):
        assert text in listing, f"{text!r} not in the listing:\n{listing}"
    assert main(["backends", "--device", "cpu", "--backend", f"{MODULE}:QuantOnly"]) == 0
    listing = capsys.readouterr().out
    assert "module:attr" in listing and "sm90" not in listing


def test_pytest_runs_the_stage_tests_on_an_outside_backend(outside):
    """`pytest --backend module:attr`: the stage tests of what it serves pass, the rest skip with its reason."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(outside), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           "verify/tests/test_layer_stages.py", "--backend", f"{MODULE}:QuantOnly",
                           "-k", "layer0 and wq_a"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "quant-only has no prepare" in proc.stdout, proc.stdout[-3000:]


def test_selftest_through_an_outside_backend_catches_what_it_serves(outside):
    """The bug classes in its quantize are caught; those in ops it lacks are 'not applicable', never MISSED."""
    proc = _verify(["selftest", "--backend", f"{MODULE}:QuantOnly", "--layers", "0", "--tokens", "8"], outside)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    assert re.search(r"\b0 of \d+ injected bugs missed or misblamed", out), proc.stdout[-3000:]
    assert "caught" in out and "not applicable" in out


# ----------------------------------------------------------------------------- every entry point, every kind of spec

EXAMPLE = ROOT / "examples" / "nvfp4-verify-example"


def _example_installed(where: Path) -> None:
    """The example package as pip would install it: its module on the path (PYTHONPATH) and a .dist-info with
    the entry points its pyproject.toml declares (read from the file, so a renamed entry point fails here)."""
    import tomllib

    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    eps = "\n".join(f"{k} = {v}" for k, v in meta["entry-points"][ENTRY_POINT_GROUP].items())
    _install_dist(where, eps, name=meta["name"], version=meta["version"])


@pytest.fixture
def example(tmp_path, monkeypatch) -> Path:
    _example_installed(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _verify_with(args: list[str], *paths: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "verify", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_example_package_registers_by_entry_point_and_its_layer_run_passes(example, tmp_path):
    """What .ci/run does after `pip install --no-deps ./examples/nvfp4-verify-example`: listed with its
    distribution, and `verify layer --backend example-routing` exits 0 with router / dispatch / combine rows
    passing and every other row "not served" with its own sentence."""
    entry = registered_backends()["example-routing"]
    assert entry.origin == "entry point nvfp4-verify-example" and entry.version == "0.1.0"
    row = describe_backend("example-routing", torch.device("cpu"))
    assert {op for op, why in row["ops"].items() if why is None} == {"router", "dispatch", "combine"}
    out = tmp_path / "layer.json"
    proc = _verify_with(["layer", "--backend", "example-routing", "--layers", "0,3", "--tokens", "8", "--json",
                         str(out)], example, EXAMPLE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdicts = _verdicts(json.loads(out.read_text()))
    served = {(v["stage"], v["check"]) for v in verdicts if v["status"] == "pass"}
    assert {("router", "ids"), ("router", "weights"), ("moe.dispatch", "exact"), ("moe.combine", "bound")} <= served
    assert all(v["status"] in ("pass", "not served", "skipped") for v in verdicts)
    # every not-served row says the backend's own sentence, but the prepare checks: the example prepares its
    # router only, which those checks name (no prepare_experts; no prepared weight of a dense stage)
    assert all(v["message"].startswith("not served: example-routing computes no GEMM") for v in verdicts
               if v["status"] == "not served" and v["check"] != "prepare"
               ), {v["message"] for v in verdicts if v["status"] == "not served"}
    assert all(v["message"] == "not served: example-routing has no prepare" or
               v["message"].startswith(f"not served: example-routing prepared no weight of {v['stage']}")
               for v in verdicts if v["status"] == "not served" and v["check"] == "prepare")
    assert not any(v["check"] == "prepare" and v["status"] == "pass" for v in verdicts), "nothing decoded, a pass"


def test_model_runs_an_outside_backend_given_as_module_attr(outside, tmp_path):
    proc = _verify(["model", "--backend", f"{MODULE}:make", "--layers", "0", "--tokens", "4", "--no-mtp",
                    "--report-dir", str(tmp_path / "sweep")], outside)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "sweep" / "report.json").read_text())
    assert report["backend"]["name"] == "quant-only"
    assert any(v["status"] == "pass" and v["check"] == "bytes" for v in _verdicts(report))


def test_accumulator_takes_module_attr_and_probes_an_fp8_only_backend(tmp_path):
    """torch's rowwise variant serves no NVFP4 dense_gemm on the CPU: its FP8 paths are still probed (exit 0:
    its declared CPU accumulator is what they measure); an outside factory with both GEMMs gets both tables."""
    proc = _verify_with(["accumulator", "--backend", "verify.backends.adapters.torch_ops:rowwise", "--device", "cpu"])
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "serves no NVFP4 dense_gemm on cpu" in out and "measured FP8 block-scaled GEMM accumulator" in out
    assert "is what every path measures" in out
    (tmp_path / "outside_emu.py").write_text("from verify.backends import EmulatorBackend\n\n\n"
                                             "class Emu(EmulatorBackend):\n    name = 'outside-emu'\n\n\n"
                                             "def make():\n    return Emu()\n")
    proc = _verify_with(["accumulator", "--backend", "outside_emu:make", "--device", "cpu"], tmp_path)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "outside-emu on cpu: measured GEMM accumulator" in out and "is what every path measures" in out


def test_accumulator_through_an_entry_point_name_says_why_not(example):
    proc = _verify_with(["accumulator", "--backend", "example-routing", "--device", "cpu"], example, EXAMPLE)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        "verify accumulator: error: --backend example-routing: backend unavailable (not served: example-routing "
        "computes no GEMM"), proc.stderr


@pytest.mark.parametrize("test_file,select", [
    ("verify/tests/test_backend_ops.py", "quantize_bytes and normal and dynamic"),
    ("verify/tests/test_bad_inputs.py", "quantize-nan"),
], ids=["op-tests", "bad-input-tests"])
def test_pytest_backend_option_selects_the_op_tests_too(outside, test_file, select):
    """`pytest --backend module:attr` runs the op and bad-input tests on that backend only (no other backend's ids)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(outside), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", test_file,
                           "--backend", f"{MODULE}:QuantOnly", "-k", select], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = [ln for ln in proc.stdout.splitlines() if "::" in ln and ("PASSED" in ln or "SKIPPED" in ln)]
    assert any("PASSED" in ln for ln in ran) and all(f"{MODULE}:QuantOnly" in ln for ln in ran), ran[:5]


def test_pytest_runs_the_stage_tests_on_an_entry_point_name(example):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(example), str(EXAMPLE), str(ROOT)]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           "verify/tests/test_layer_stages.py", "--backend", "example-routing",
                           "-k", "layer3 and (router or dispatch or combine or wq_a) and dynamic"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "example-routing computes no GEMM" in proc.stdout, proc.stdout[-3000:]


def test_a_factory_taking_device_is_made_for_the_device_asked_for(outside):
    (outside / "dev_factory.py").write_text(textwrap.dedent('''
        from verify.backends import Backend

        class Dev(Backend):
            name = "dev"
            def __init__(self, device=None):
                self.made_for = device

        def make(*, device=None):
            return Dev(device)
    '''))
    assert get_backend("dev_factory:make", "cpu").made_for == torch.device("cpu")
    assert get_backend("dev_factory:Dev", "cpu").made_for == torch.device("cpu")
    assert get_backend("dev_factory:Dev").made_for is None  # no device named: called with no arguments
    assert get_backend(f"{MODULE}:make", "cpu").name == "quant-only"  # a factory without device: no arguments
