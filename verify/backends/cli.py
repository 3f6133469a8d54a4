"""`python -m verify backends`: the registry as tables, for this machine.

One summary row per backend: where it comes from (built-in, entry point <dist>, module:attr), its
version, recipe, declared u_acc, whether it is graph-safe, and how many forward ops it serves on the
device; then, per backend, its accumulator (NVFP4 and FP8 GEMMs) and each forward op served or not with its
reason and, for the GEMM ops, the numerics mode it declares per weight format (Backend.numerics_mode:
"nvfp4 w4a4", "fp8 fp8_block"; the `mode` check holds it to that). A backend that cannot be loaded here (a
missing dependency, a broken entry point) is listed with why, and the listing goes on: it exits 0 whatever
the backends serve (2 for a bad --backend / --device). Tables fit 80 columns (long cells wrap, never cut).
"""

from __future__ import annotations

import argparse

import torch

from references.stages import Op
from verify.backends.base import declared_fp8_accumulator
from verify.backends.protocol import FORWARD_OPS
from verify.backends.registry import (BACKEND_HELP, BackendEntry, auto_backend_name, backend_arg, get_backend,
                                      module_version, registered_backends, resolve_backend_spec)

__all__ = ["add_backends_arguments", "cli_backends", "describe_backend", "GEMM_OP_FORMATS"]

# The GEMM ops and the weight formats each can meet (dense_gemm takes NVFP4 activations and weights only;
# dense_linear and grouped_dense_linear (V4's wo_a) also FP8 block-128 linears; the grouped ops and the block the
# routed experts, NVFP4 or, in MTP layers, MXFP4).
GEMM_OP_FORMATS: dict[Op, tuple[str, ...]] = {
    Op.DENSE_GEMM: ("nvfp4",), Op.DENSE_LINEAR: ("nvfp4", "fp8_block"), Op.GROUPED_DENSE_LINEAR: ("nvfp4", "fp8_block"),
    Op.GROUPED_GEMM: ("nvfp4", "mxfp4"),
    Op.L1_FUSED: ("nvfp4",), Op.MOE_BLOCK: ("nvfp4", "mxfp4"),
}
_FORMAT_WORD = {"nvfp4": "nvfp4", "fp8_block": "fp8", "mxfp4": "mxfp4"}


def add_backends_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", action="append", default=None, type=backend_arg,
                   help=f"List only this backend (repeatable): {BACKEND_HELP}. Default: every registered backend.")
    p.add_argument("--device", default="auto",
                   help="The device each op's status is for: auto (cuda when present, else cpu), cpu, cuda[:N]. "
                        "Default: %(default)r.")


def describe_backend(spec: str, device: torch.device) -> dict:
    """What the listing shows of one backend spec: spec, name (the backend's own), origin, version (its
    declared one, then its provider's in parentheses), recipe, u_acc, accumulator, fp8_accumulator ((unit
    roundoff, promotion interval or None) of its FP8 GEMMs), graph_safe, ops ({op: None or why it is not
    served on `device`}), modes ({GEMM op: {weight format: declared numerics mode}}, GEMM_OP_FORMATS), or
    error (why it cannot be loaded here; then nothing else is known)."""
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
            "fp8_accumulator": declared_fp8_accumulator(b),
            "ops": {op.value: b.unsupported_reason(op, device) for op in FORWARD_OPS},
            "modes": {op.value: {fmt: _declared(b, op, fmt) for fmt in fmts} for op, fmts in GEMM_OP_FORMATS.items()}}


def _declared(backend: object, op: Op, fmt: str) -> str:
    from verify.verdicts.judges.mode import declared_mode  # noqa: PLC0415 (verdicts import the backends)

    try:
        return declared_mode(backend, op, fmt)
    except Exception as e:  # noqa: BLE001 (a listing shows a broken declaration and goes on)
        return f"invalid ({type(e).__name__})"


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
    console = Console() if Console().is_terminal else Console(width=80)
    here = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    summary = Table(title=f"backends on {device} ({here}); auto = {auto_backend_name(device)}")
    # a registered name never wraps; a long module:attr spec folds rather than squeeze every other column
    summary.add_column("backend", no_wrap=all(len(r["spec"]) <= 24 for r in rows), overflow="fold")
    # a word of the origin (an entry point's distribution name) is never split across lines
    summary.add_column("from", min_width=max((len(w) for r in rows for w in r["origin"].split()), default=4))
    for col in ("version", "recipe", "u_acc", "graph-safe", "ops here"):
        summary.add_column(col, overflow="fold")
    for r in rows:
        label = r["spec"] if r["spec"] == r["name"] else f"{r['spec']} ({r['name']})"
        if "error" in r:
            summary.add_row(label, r["origin"], r["version"] or "-", "", "", "", "[bold red]not loadable[/]")
            continue
        served = sum(reason is None for reason in r["ops"].values())
        summary.add_row(label, r["origin"], r["version"] or "-", r["recipe"], f"2^{_log2(r['u_acc'])}",
                        "yes" if r["graph_safe"] else "no", f"{served}/{len(r['ops'])}")
    console.print(summary)
    for r in rows:
        if "error" in r:
            console.print(f"[bold]{r['spec']}[/]: [bold red]not loadable[/]: {r['error']}")
            continue
        u8, interval = r["fp8_accumulator"]
        fp8 = f"FP8 GEMMs u 2^{_log2(u8)}" + ("" if interval is None else f", promoted to fp32 every {interval} of K")
        table = Table(title=f"{r['spec']}: forward ops on {device}",
                      caption=f"accumulator: {r['accumulator']}; {fp8}", caption_justify="left")
        table.add_column("op", no_wrap=True)
        table.add_column("here", no_wrap=True)
        table.add_column("mode", no_wrap=True)
        table.add_column("reason", overflow="fold")
        for op, reason in r["ops"].items():
            modes = r["modes"].get(op, {})
            cell = "\n".join(f"{_FORMAT_WORD[fmt]} {m}" for fmt, m in modes.items())
            table.add_row(op, "[green]served[/]" if reason is None else "[yellow]not served[/]", cell, reason or "")
        console.print(table)
    return 0


def _log2(x: float) -> str:
    import math  # noqa: PLC0415

    e = math.log2(x)
    return f"{e:.0f}" if e == int(e) else f"{e:.2f}"
