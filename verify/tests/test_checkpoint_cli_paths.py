"""Checkpoint paths the OS refuses, and the checkpoint commands' path arguments: one line, never a
traceback (issue 22 item 3).

A checkpoint whose config.json, index, quantization config or a shard is a directory, a symlink
loop, or unreadable (permission denied): `layer` prints one line naming the file with exit 2
(UnreadableFileError, or NotACheckpointError for the directory itself); `lint` reports it as an
error finding naming the file (exit 1). `lint --layers 99`, `lint --json DIR` and `fixture --out`
/ `--json` of the wrong kind: one line naming the argument, exit 2, before any work.

The permission cases run in-process with `open` refusing that one path (this suite may run as
root, which reads any file); the same cases with a real chmod run where the user is not root.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from verify.__main__ import main
from verify.config import GOLDEN_DIR, REPO_ROOT

MINI_V4 = GOLDEN_DIR / "mini-v4"
INDEX = "model.safetensors.index.json"


def _copy(tmp: Path) -> Path:
    return Path(shutil.copytree(MINI_V4, tmp / "ck"))


def _layer0_shard(d: Path) -> str:
    """The shard that holds most of layer 0's tensors: `layer --layers 0` reads it."""
    shards = [s for n, s in json.loads((d / INDEX).read_text())["weight_map"].items() if n.startswith("layers.0.")]
    return max(set(shards), key=shards.count)


def _replace_with_directory(name_of: Callable[[Path], str]) -> Callable[[Path], tuple[Path, Path]]:
    def make(tmp: Path) -> tuple[Path, Path]:
        d = _copy(tmp)
        target = d / name_of(d)
        target.unlink()
        target.mkdir()
        return d, target
    return make


def _replace_with_loop(name_of: Callable[[Path], str]) -> Callable[[Path], tuple[Path, Path]]:
    def make(tmp: Path) -> tuple[Path, Path]:
        d = _copy(tmp)
        target = d / name_of(d)
        target.unlink()
        other = d / (target.name + ".loop")
        os.symlink(other.name, target)
        os.symlink(target.name, other)
        return d, target
    return make


def _checkpoint_dir_loop(tmp: Path) -> tuple[Path, Path]:
    a, b = tmp / "a", tmp / "b"
    os.symlink(b, a)
    os.symlink(a, b)
    return a, a


def _const(name: str) -> Callable[[Path], str]:
    return lambda d: name


# (build(tmp) -> (checkpoint, file at fault), error class `layer` prints, words, lint finding code)
PATH_CASES = {
    "config-is-a-directory": (_replace_with_directory(_const("config.json")), "UnreadableFileError",
                              ["is a directory"], "UnreadableFileError"),
    "index-is-a-directory": (_replace_with_directory(_const(INDEX)), "UnreadableFileError", ["is a directory"],
                             "UnreadableFileError"),
    "hf_quant_config-is-a-directory": (_replace_with_directory(_const("hf_quant_config.json")),
                                       "UnreadableFileError", ["is a directory"], "UnreadableFileError"),
    "shard-is-a-directory": (_replace_with_directory(_layer0_shard), "UnreadableFileError", ["is a directory"],
                             "shard_unreadable"),
    "config-symlink-loop": (_replace_with_loop(_const("config.json")), "UnreadableFileError", ["symlink loop"],
                            "UnreadableFileError"),
    "shard-symlink-loop": (_replace_with_loop(_layer0_shard), "UnreadableFileError", ["symlink loop"],
                           "shard_unreadable"),
    "checkpoint-dir-symlink-loop": (_checkpoint_dir_loop, "UnreadableFileError", ["symlink loop"],
                                    "UnreadableFileError"),
}


def _one_line(rc: int, err: str, command: str, words: list[str]) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert rc == 2 and len(lines) == 1, f"exit {rc}, stderr:\n{err}"
    assert lines[0].startswith(f"verify {command}: error: "), lines[0]
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"the line does not name {missing}:\n{lines[0]}"
    return lines[0]


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_unreadable_path_is_one_line_in_layer(case, tmp_path, capsys):
    build, error, words, _ = PATH_CASES[case]
    d, bad = build(tmp_path)
    rc = main(["layer", "--checkpoint", str(d), "--layers", "0", "--tokens", "4"])
    _one_line(rc, capsys.readouterr().err, "layer", [f"{error}: ", str(bad), *words])


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_unreadable_path_is_an_error_finding_in_lint(case, tmp_path, capsys):
    build, _, words, code = PATH_CASES[case]
    d, bad = build(tmp_path)
    out = tmp_path / "lint.json"
    rc = main(["lint", "--checkpoint", str(d), "--layers", "0", "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    hits = [f for f in json.loads(out.read_text())["findings"] if f["code"] == code and f["severity"] == "error"]
    assert hits and any(Path(f["file"] or "") == bad for f in hits), hits
    assert all(w in hits[0]["message"] for w in words), hits[0]["message"]


def _refuse_open(monkeypatch, path: Path) -> None:
    """`open` raises PermissionError for `path` (as it does for a user without read permission)."""
    real = builtins.open

    def fake(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake)


PERMISSION_CASES = {"config-permission-denied": _const("config.json"), "shard-permission-denied": _layer0_shard,
                    "index-permission-denied": _const(INDEX)}


@pytest.mark.parametrize("case", list(PERMISSION_CASES))
@pytest.mark.parametrize("command", ["layer", "lint"])
def test_permission_denied_is_one_line(case, command, tmp_path, capsys, monkeypatch):
    d = _copy(tmp_path)
    bad = d / PERMISSION_CASES[case](d)
    _refuse_open(monkeypatch, bad)
    argv = [command, "--checkpoint", str(d), "--layers", "0"]
    if command == "layer":
        rc = main([*argv, "--tokens", "4"])
        _one_line(rc, capsys.readouterr().err, "layer", ["UnreadableFileError: ", "permission denied", str(bad)])
        return
    out = tmp_path / "lint.json"
    rc = main([*argv, "--json", str(out)])
    assert rc == 1 and "Traceback" not in capsys.readouterr().err
    findings = json.loads(out.read_text())["findings"]
    assert any(f["severity"] == "error" and "permission denied" in f["message"] and Path(f["file"] or "") == bad
               for f in findings), findings


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode; the in-process cases above "
                                              "refuse open() instead")
@pytest.mark.parametrize("case", list(PERMISSION_CASES))
def test_permission_denied_through_python_dash_m(case, tmp_path):
    d = _copy(tmp_path)
    bad = d / PERMISSION_CASES[case](d)
    bad.chmod(0)
    proc = subprocess.run([sys.executable, "-m", "verify", "layer", "--checkpoint", str(d), "--layers", "0",
                           "--tokens", "4"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    _one_line(proc.returncode, proc.stderr, "layer", ["UnreadableFileError: ", "permission denied", str(bad)])


def test_shard_symlink_loop_through_python_dash_m(tmp_path):
    d, bad = PATH_CASES["shard-symlink-loop"][0](tmp_path)
    proc = subprocess.run([sys.executable, "-m", "verify", "layer", "--checkpoint", str(d), "--layers", "0",
                           "--tokens", "4"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    _one_line(proc.returncode, proc.stderr, "layer", ["UnreadableFileError: ", "symlink loop", str(bad)])


# ----------------------------------------------------------------------------- arguments


def _file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("x")
    return tmp / "a-file"


def _loop(tmp: Path) -> Path:
    os.symlink(tmp / "l2", tmp / "l1")
    os.symlink(tmp / "l1", tmp / "l2")
    return tmp / "l1"


ARGUMENT_CASES = {
    "lint-layers-99": (lambda tmp: ["lint", "--checkpoint", str(MINI_V4), "--layers", "99"],
                       ["--layers 99", "layer out of range", "layers 0-3"]),
    "lint-layers-3-99": (lambda tmp: ["lint", "--checkpoint", str(MINI_V4), "--layers", "3,99"],
                         ["--layers 99", "layer out of range"]),
    "lint-json-a-directory": (lambda tmp: ["lint", "--checkpoint", str(MINI_V4), "--json", str(tmp)],
                              ["--json", "a directory"]),
    "lint-json-parent-missing": (lambda tmp: ["lint", "--checkpoint", str(MINI_V4), "--json",
                                              str(tmp / "no" / "x.json")], ["--json", "does not exist"]),
    "fixture-out-a-file": (lambda tmp: ["fixture", "--preset", "mini-v4", "--out", str(_file(tmp))],
                           ["--out", "a file; expected a directory"]),
    "fixture-out-under-a-file": (lambda tmp: ["fixture", "--preset", "mini-v4", "--out", str(_file(tmp) / "ck")],
                                 ["--out", "a path component is a file"]),
    "fixture-out-symlink-loop": (lambda tmp: ["fixture", "--preset", "mini-v4", "--out", str(_loop(tmp))],
                                 ["--out", "symlink loop"]),
    "fixture-out-holds-config-directory": (
        lambda tmp: (tmp.joinpath("ck", "config.json").mkdir(parents=True),
                     ["fixture", "--preset", "mini-v4", "--out", str(tmp / "ck")])[1],
        ["--out", "config.json in it is a directory"]),
    "fixture-json-a-directory": (lambda tmp: ["fixture", "--preset", "mini-v4", "--out", str(tmp / "ck"),
                                              "--json", str(tmp)], ["--json", "a directory"]),
}


@pytest.mark.parametrize("case", list(ARGUMENT_CASES))
def test_path_argument_is_one_line_and_exit_2(case, tmp_path, capsys):
    make, words = ARGUMENT_CASES[case]
    argv = make(tmp_path)
    rc = main(argv)
    _one_line(rc, capsys.readouterr().err, argv[0], words)
    if argv[0] == "fixture":  # refused before writing anything
        assert not list(tmp_path.rglob("*.safetensors"))


def test_lint_layers_99_through_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "verify", "lint", "--checkpoint", str(MINI_V4), "--layers", "99"],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    _one_line(proc.returncode, proc.stderr, "lint", ["--layers 99", "layer out of range"])


def test_lint_reads_the_checkpoint_from_the_environment(monkeypatch, capsys):
    """`lint` without --checkpoint lints NVFP4V_CHECKPOINT, as `pytest -m lint` does, and says which."""
    monkeypatch.setenv("NVFP4V_CHECKPOINT", str(MINI_V4))
    assert main(["lint", "--layers", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"checkpoint: {MINI_V4}"
