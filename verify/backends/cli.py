"""`python -m verify backends`: the registry as tables, for this machine.

One summary row per backend: where it comes from (built-in, entry point <dist>, module:attr), its
version, recipe, declared u_acc and accumulator, the declared numerics mode of the GEMM ops it serves
here per weight format (Backend.numerics_mode), whether it is graph-safe, and how many forward ops it
serves on the device; then, per backend, each forward op served or not with its reason. A backend
that cannot be loaded here (a missing dependency, a broken entry point) is listed with why, and the
listing goes on: it exits 0 whatever the backends serve (2 for a bad --backend / --device).
"""

from __future__ import annotations

import argparse

import torch

from verify.backends.protocol import FORWARD_OPS, WEIGHT_FORMATS, Op
from verify.backends.registry import (BACKEND_HELP, BackendEntry, auto_backend_name, backend_arg, get_backend,
                                      module_version, registered_backends, resolve_backend_spec)

__all__ = ["add_backends_arguments", "cli_backends", "describe_backend"]


def add_backends_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", action="append", default=None, type=backend_arg,
                   help=f"List only this backend (repeatable): {BACKEND_HELP}. Default: every registered backend.")
    p.add_argument("--device", default="auto",
                   help="The device each op's status is for: auto (cuda when present, else cpu), cpu, cuda[:N]. "
                        "Default: %(default)r.")


def describe_backend(spec: str, device: torch.device) -> dict:
    """What the listing shows of one backend spec: spec, name (the backend's own), origin, version (its
    declared one, then its provider's in parentheses), recipe, u_acc, accumulator, graph_safe, ops
    ({op: None or why it is not served on `device`}), or error (why it cannot be loaded here; then
    nothing else is known)."""
    entry = resolve_backend_spec(spec, device)
    row = {"spec": spec, "name": entry.name, "origin": entry.origin, "version": _version(entry)}
    try:
        b = get_backend(spec, device)
    except Exception as e:  # noqa: BLE001 (a listing shows a broken backend with its reason and goes on)
        return {**row, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
    recipe = getattr(b, "recipe", None)
    declared = getattr(b, "version", None)
    version = f"{declared} ({row['version']})" if declared and row["version"] else declared or row["version"]
    ops = {op.value: b.unsupported_reason(op, device) for op in FORWARD_OPS}
    return {**row, "name": b.name, "version": version,
            "recipe": getattr(recipe, "name", str(recipe)), "u_acc": float(b.u_acc),
            "accumulator": getattr(b, "accumulator", "undeclared"), "graph_safe": getattr(b, "graph_safe", True),
            "ops": ops, "modes": _modes(b, [op for op in _GEMM_OPS if ops[op.value] is None])}


_GEMM_OPS = (Op.DENSE_GEMM, Op.DENSE_LINEAR, Op.GROUPED_GEMM, Op.L1_FUSED, Op.MOE_BLOCK)


def _modes(b, served: list) -> dict[str, dict[str, str]]:
    """{weight format: {op: declared mode}} of the GEMM ops served here (a backend without numerics_mode, one
    that only satisfies the protocol, declares none)."""
    mode_of = getattr(b, "numerics_mode", None)
    if mode_of is None:
        return {}
    return {fmt: {op.value: mode_of(op, fmt).value for op in served} for fmt in WEIGHT_FORMATS if served}


def _modes_text(modes: dict[str, dict[str, str]]) -> str:
    """"nvfp4 w4a4; fp8_block fp8_block" (one mode per format), or the ops named where a format's differ."""
    parts = []
    for fmt, by_op in modes.items():
        kinds = sorted(set(by_op.values()))
        parts.append(f"{fmt} {kinds[0]}" if len(kinds) == 1 else
                     f"{fmt} " + ", ".join(f"{m} ({op})" for op, m in by_op.items()))
    return "; ".join(parts) or "-"


def _version(entry: BackendEntry) -> str:
    if entry.version or entry.origin != "module:attr":
        return entry.version
    return module_version(entry.target.partition(":")[0])


def cli_backends(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    specs = args.backend or list(registered_backends())
    rows = [describe_backend(s, device) for s in specs]
    console = Console() if Console().is_terminal else Console(width=200)
    here = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    summary = Table(title=f"backends on {device} ({here}); auto = {auto_backend_name(device)}")
    for col in ("backend", "from", "version", "recipe", "u_acc", "accumulator", "numerics (GEMMs here)", "graph-safe",
                "forward ops here"):
        summary.add_column(col, overflow="fold")
    for r in rows:
        label = r["spec"] if r["spec"] == r["name"] else f"{r['spec']} ({r['name']})"
        if "error" in r:
            summary.add_row(label, r["origin"], r["version"] or "-", "", "", "", "", "",
                            f"[bold red]not loadable[/]: {r['error']}")
            continue
        served = sum(reason is None for reason in r["ops"].values())
        summary.add_row(label, r["origin"], r["version"] or "-", r["recipe"], f"2^{_log2(r['u_acc'])}",
                        r["accumulator"], _modes_text(r["modes"]), "yes" if r["graph_safe"] else "no",
                        f"{served}/{len(r['ops'])} served")
    console.print(summary)
    for r in rows:
        if "error" in r:
            continue
        table = Table(title=f"{r['spec']}: forward ops on {device}")
        table.add_column("op", no_wrap=True)
        table.add_column("here", no_wrap=True)
        table.add_column("reason", overflow="fold")
        for op, reason in r["ops"].items():
            table.add_row(op, "[green]served[/]" if reason is None else "[yellow]not served[/]", reason or "")
        console.print(table)
    return 0


def _log2(x: float) -> str:
    import math  # noqa: PLC0415

    e = math.log2(x)
    return f"{e:.0f}" if e == int(e) else f"{e:.2f}"
