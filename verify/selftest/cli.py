"""`python -m verify selftest`: its arguments and the table it prints."""

from __future__ import annotations

import argparse
import time

import torch

from verify.backends.registry import BACKEND_HELP, backend_arg
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR, positive_int

__all__ = ["add_selftest_arguments", "cli_selftest"]


def add_selftest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", type=backend_arg,
                   help=f"Backend to wrap with the bug injectors: {BACKEND_HELP}. Default: %(default)r.")
    p.add_argument("--checkpoint", default=str(GOLDEN_DIR / "mini-v4"),
                   help="Checkpoint whose layers the injected runs verify (env NVFP4V_CHECKPOINT). Default: "
                        "%(default)r.")
    p.add_argument("--layers", default=None, help="Layers, e.g. '0,3'. Default: every layer the checkpoint holds.")
    p.add_argument("--tokens", type=positive_int, default=32, help="Tokens per layer. Default: %(default)r.")
    p.add_argument("--device", default="auto", help="Where to run: auto (cuda when present, else cpu), cpu, cuda. "
                                                     "Default: %(default)r.")


def cli_selftest(args: argparse.Namespace) -> int:
    """The first line names the checkpoint, backend and device; a progress bar (a line per injected bug
    in a log) shows the bug and the layer phase now running; then the table."""
    from rich.table import Table

    import verify.selftest as package  # noqa: PLC0415 (its selftest, as a test may wrap it)
    from verify.config import check_env_backend, target_line  # noqa: PLC0415
    from verify.layer_report import backend_for_verdicts, console_for_run, display_path, select_layers  # noqa: PLC0415
    from verify.preflight import check_memory  # noqa: PLC0415
    from verify.progress import StepProgress  # noqa: PLC0415

    check_env_backend(args.backend)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    console = console_for_run()
    backend = backend_for_verdicts(args.backend, device)
    console.print(target_line("selftest", checkpoint=args.checkpoint, backend=backend.name, device=device,
                              threads_note=getattr(args, "threads_note", None)), highlight=False, soft_wrap=True)
    ckpt = Checkpoint.open(args.checkpoint)
    layers, line = select_layers(ckpt, args.layers, label=display_path(args.checkpoint))
    check_memory(ckpt.config, tokens=args.tokens, layer_nbytes=sum(ckpt.plan_layer(i).nbytes for i in layers),
                 device=device, what=f"--tokens {args.tokens}")
    injectors = package.INJECTORS
    console.print(f"{line}; {len(injectors)} injected bugs")
    t0 = time.perf_counter()
    with StepProgress(console, len(injectors), what="injected bugs", log_steps=True) as bar:
        rows = package.selftest(ckpt, backend, list(layers), tokens=args.tokens, device=str(device), injectors=injectors,
                        progress=lambda row: bar.advance(row.bug, row.status),
                        on_phase=bar.phase)
    table = Table(title=f"selftest: {backend.name}, {len(injectors)} injected bugs ({time.perf_counter() - t0:.1f} s)")
    table.add_column("bug", no_wrap=True)
    for col in ("class (NVFP4_FACTS 6)", "verdict", "caught by (stage check)", "first line of the verdict"):
        table.add_column(col, overflow="fold")
    style = {"caught": "[green]caught[/]", "MISSED": "[bold red]MISSED[/]", "MISBLAMED": "[bold red]MISBLAMED[/]",
             "not applicable": "[yellow]not applicable[/]"}
    for r in rows:
        table.add_row(r.bug, r.facts, style[r.status], ", ".join(r.caught_by + [f"WRONG: {w}" for w in r.misblamed]),
                      r.message[:140])
    console.print(table)
    bad = [r for r in rows if r.status in ("MISSED", "MISBLAMED")]
    console.print(f"[{'bold red' if bad else 'bold green'}]{len(bad)} of {len(rows)} injected bugs missed or "
                  f"misblamed[/]")
    return 1 if bad else 0
