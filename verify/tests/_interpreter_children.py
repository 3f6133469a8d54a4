"""The sm90 test files' CPU cases under the Triton interpreter, run in child processes side by side.

The interpreter is single-threaded Python, so a file's cases run in `children` processes at once (CI has two
cores), dealt longest first to the child with the least work so far (`cpu_seconds`: measured seconds of the long
cases, 1 s for any other; only the dealing depends on them). Each child runs `python <script> --cases OUT NAME...`,
which the test file implements with `child_main`; every case runs exactly once and reports {"ok", "message"}."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]


def deal(names: list[str], cpu_seconds: dict[str, float], children: int) -> list[list[str]]:
    """The cases of each child: longest first, each to the child with the least estimated work so far."""
    parts: list[list[str]] = [[] for _ in range(children)]
    load = [0.0] * children
    for name in sorted(names, key=lambda c: -cpu_seconds.get(c, 1.0)):
        i = load.index(min(load))
        parts[i].append(name)
        load[i] += cpu_seconds.get(name, 1.0)
    return [p for p in parts if p]


def run_cases(script: str | Path, names: list[str], tmp_dir: Path, *, cpu_seconds: dict[str, float] | None = None,
              children: int = 2, timeout: float = 2400) -> dict[str, dict]:
    """{case: {"ok": bool, "message": str}} for every name, from `script --cases` children run side by side."""
    pytest.importorskip("triton", reason="the CPU cases run the kernels under the Triton interpreter: "
                                         "pip install triton==3.6.0 (.ci/run does)")
    # this checkout first on the path: the children run the test file as a script
    path_env = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path_env, OMP_NUM_THREADS="1")
    procs = []
    for i, part in enumerate(deal(names, cpu_seconds or {}, children)):
        path = tmp_dir / f"results{i}.json"
        procs.append((path, subprocess.Popen([sys.executable, str(script), "--cases", str(path), *part], cwd=REPO,
                                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    results: dict[str, dict] = {}
    failed = []
    for path, proc in procs:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0 or not path.exists():
            failed.append(f"interpreter child failed (rc {proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
        else:
            results.update(json.loads(path.read_text()))
    if failed:
        pytest.fail("\n".join(failed))
    lost = sorted(set(names) - set(results))
    assert not lost, f"the interpreter children lost cases: {lost}"
    return results


def child_main(argv: list[str], cases: dict[str, tuple[Callable, tuple]]) -> None:
    """`--cases OUT NAME...`: run the named cases (fn(*args) -> message, raising on a failure), write OUT."""
    if len(argv) < 2 or argv[0] != "--cases":
        raise SystemExit(f"usage: --cases OUT NAME...; got {argv}")
    out = {}
    for name in argv[2:]:
        fn, args = cases[name]
        try:
            out[name] = {"ok": True, "message": fn(*args)}
        except Exception as exc:  # noqa: BLE001 - reported per case to the parent test
            out[name] = {"ok": False, "message": f"{type(exc).__name__}: {exc}"}
    Path(argv[1]).write_text(json.dumps(out))
