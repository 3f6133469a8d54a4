"""Shared sweeps of the mini-v4 fixture for the sweep, report and browser tests: each is run once
per test session (a cached temporary directory), so the tests compare against the same baseline."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from verify.config import REPO_ROOT

# few tokens: these runs test the sweep's machinery, not the numerics (the goldens pin those)
SWEEP_ARGS = ["--backend", "emulator", "--tokens", "4", "--tables", "off"]
UNITS = ["layer0", "layer1", "layer2", "layer3", "mtp.0"]


@functools.lru_cache(maxsize=None)
def baseline_run_dir() -> Path:
    """An uninterrupted single-process sweep of every unit of golden/mini-v4 (in this process)."""
    from verify.__main__ import main

    out = Path(tempfile.mkdtemp(prefix="nvfp4v-sweep-baseline-"))
    atexit.register(shutil.rmtree, out, True)  # removed when the test session's process exits
    rc = main(["model", *SWEEP_ARGS, "--report-dir", str(out)])
    assert rc == 0, f"baseline sweep exit status {rc}"
    return out


def verify_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "verify", *args]


def torchrun_command(nproc: int, *args: str, script: str | None = None) -> list[str]:
    """The torchrun CLI (the console script beside this python, else `python -m torch.distributed.run`,
    the same entry point) on `python -m verify` (or on `script`), one node, rendezvous on a free local port."""
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    target = [script] if script else ["-m", "verify"]
    return [*launcher, "--standalone", "--nproc-per-node", str(nproc), *target, *args]


def run(cmd: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
