"""`python -m verify model`: the streaming model sweep, on one process or many (torchrun).

One unit at a time (a decoder layer, or an MTP block where the checkpoint has one): load it,
verify every stage through verify.run.run_layer, write that unit's JSON document, free it, go on;
memory stays at about one layer. A rich progress bar shows unit, phase or stage and ETA.

With --report-dir OUT the sweep is resumable: each finished unit is `OUT/units/<unit>.json`
(written atomically), and a sweep started again with the same configuration skips the units
already there (a different configuration in the same directory is refused; --fresh starts over).
At the end `OUT/report.json` (verify/report/model_report.schema.json) and the self-contained
`OUT/report.html` are written, and a rich summary is printed.

Many processes: the same command under `torchrun --nproc-per-node N` (torch.distributed; on one
node or several, `--nnodes M --node-rank R --rdzv-endpoint HOST:PORT`, with the checkpoint and
--report-dir on a filesystem every node sees). Rank 0 lists the units still to do and splits them
across the ranks balanced by size in bytes (largest first, each to the least loaded rank); every
rank verifies its units and writes their documents; after a barrier rank 0 merges them into one
report. Process groups: gloo on the CPU; with --device cuda, NCCL with one GPU per rank
(cuda:LOCAL_RANK), plus a gloo group for the small Python objects the ranks exchange (the plan,
each rank's status, the exit status). A rank that fails makes every rank stop with its message.

Timings: every unit records its phases (load, emulated, high, verdicts, of which graph_probe, and
the verdict seconds per stage); the report adds start-up (backend set-up and accumulator probe)
and report (merge + HTML), prints a summary line, and projects a 61-layer sweep on 1 and 8 GPUs
from the median per-layer time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import torch

from verify.config import env_default, format_layers, positive_int
from verify.errors import CliError, UsageError
from verify.units import Unit, mtp_prefixes, plan_units

__all__ = ["Unit", "plan_units", "mtp_prefixes", "assign_units", "DistContext", "add_model_arguments", "cli_model",
           "RankFailedError", "UNITS_DIR", "REPORT_JSON", "REPORT_HTML", "PLAN_JSON", "PLAN_KIND", "EXIT_POLICY",
           "exit_status"]

UNITS_DIR = "units"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
# written by rank 0 before any unit runs: the units the sweep will hold, its backend and command, so
# `python -m verify report` on a killed sweep can say which units are missing
PLAN_JSON = "sweep.json"
PLAN_KIND = "nvfp4-verify.sweep-plan"


class RankFailedError(CliError):
    """Another rank of a distributed sweep failed; the message is that rank's error."""


# ----------------------------------------------------------------------------- units and the plan


def assign_units(units: list[Unit], world_size: int) -> list[list[Unit]]:
    """Split units across ranks balanced by bytes: largest first, each to the rank with the fewest
    bytes so far (ties: the lower rank); each rank's list is then in model order. Deterministic."""
    loads = [0] * world_size
    out: list[list[Unit]] = [[] for _ in range(world_size)]
    order = {u.name: k for k, u in enumerate(units)}
    for u in sorted(units, key=lambda u: (-u.nbytes, order[u.name])):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        loads[r] += u.nbytes
        out[r].append(u)
    return [sorted(rank_units, key=lambda u: order[u.name]) for rank_units in out]


# ----------------------------------------------------------------------------- torch.distributed


class DistContext:
    """This process's place in a torchrun job (or a single process: rank 0 of 1, no process group).

    device: the torch device this rank verifies on (cuda:LOCAL_RANK under torchrun with --device
    cuda). Collectives go through a gloo group (`ctrl`): they carry small Python objects only."""

    def __init__(self, device_arg: str, timeout_min: int):
        import torch.distributed as dist  # noqa: PLC0415

        self.dist = dist
        self.launched = dist.is_torchelastic_launched()
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.ctrl = None
        self.backend_name = None
        dev = torch.device(device_arg)
        if not self.launched:
            self.device = dev
            return
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        timeout = _dt.timedelta(minutes=timeout_min)
        if dev.type == "cuda":
            if dev.index is not None and self.world_size > 1:
                raise UsageError(f"--device {device_arg}: invalid value under torchrun (each rank takes "
                                 "cuda:LOCAL_RANK; pass --device cuda)", argument="--device")
            if self.local_rank >= torch.cuda.device_count():
                raise UsageError(f"--device {device_arg}: LOCAL_RANK {self.local_rank} but this node has "
                                 f"{torch.cuda.device_count()} CUDA device(s); use --nproc-per-node <= that",
                                 argument="--device")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", timeout=timeout, device_id=self.device)
            self.backend_name = "nccl"
            self.ctrl = dist.new_group(backend="gloo", timeout=timeout)
        else:
            self.device = dev
            dist.init_process_group("gloo", timeout=timeout)
            self.backend_name = "gloo"
            self.ctrl = dist.group.WORLD

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def on_main(self, fn):
        """fn() on rank 0, its result on every rank; an exception on rank 0 is raised on every rank
        (so no rank waits for a result that will never come)."""
        if not self.launched:
            return fn()
        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                box[0] = ("error", exc)
        self.dist.broadcast_object_list(box, src=0, group=self.ctrl)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def barrier_with_status(self, error: BaseException | None, where: str) -> None:
        """The barrier after the work: every rank reports its error (or none); a rank that failed
        raises its own error, the others raise RankFailedError naming the failed rank."""
        if not self.launched:
            if error is not None:
                raise error
            return
        self.dist.barrier(group=self.ctrl)
        mine = None if error is None else f"{type(error).__name__}: {' '.join(str(error).split())}"
        statuses = [None] * self.world_size
        self.dist.all_gather_object(statuses, (self.rank, mine, where), group=self.ctrl)
        if error is not None:
            raise error
        failed = [s for s in statuses if s[1] is not None]
        if failed:
            r, msg, at = failed[0]
            raise RankFailedError(f"rank {r} failed at {at}: {msg}")

    def finish(self) -> None:
        """The end every rank reached: a last barrier, then the teardown (close).

        Rank 0 aborted in 3 of 9 two-rank CPU sweeps after writing a PASS report ("terminate called
        without an active exception", torchrun exit 1; not reproduced in 46 runs of that code on a
        2-core machine, 2026-12-06). Without this barrier the teardown was unsynchronized: a rank that
        had received on_main's broadcast destroyed its gloo group and exited, closing its connections,
        while rank 0 could still be completing that broadcast or tearing down its own group. After
        the barrier no collective is in flight on any rank when the groups go."""
        if self.launched and self.dist.is_initialized():
            self.dist.barrier(group=self.ctrl)
        self.close()

    def close(self) -> None:
        """Destroy the process groups (WORLD and ctrl) and free them now. Also on an error path, where
        no barrier is possible (a failed rank may never reach one).

        destroy_process_group() shuts a gloo group down but does not join its worker threads: the C++
        object's destructor does, when the last Python reference goes (this context holds one in
        `ctrl`; an exception's traceback can hold the context). Left to the interpreter's exit, that
        destructor runs while Python finalizes, where a thread that needs the GIL is terminated, which can
        end in the same abort (pytorch issue 190489 reports it for a gloo group never destroyed). So the references are dropped and collected here, and the threads are joined
        before `main` returns (test_sweep_distributed checks the thread count)."""
        if self.launched and self.dist.is_initialized():
            self.dist.destroy_process_group()
        self.ctrl = None
        gc.collect()


# ----------------------------------------------------------------------------- CLI


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    from verify.layer_report import add_layer_arguments  # noqa: PLC0415

    add_layer_arguments(p)
    p.set_defaults(layers=None)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "\n".join(textwrap.wrap(EXIT_POLICY, 100))
    p.add_argument("--report-dir", default=env_default("REPORT_DIR", None),
                   help="Directory of the sweep: units/<unit>.json as each finishes (a sweep started again "
                        "resumes from them), report.json and report.html at the end (env NVFP4V_REPORT_DIR). "
                        "Required under torchrun. Default: %(default)r (nothing written, no resume).")
    p.add_argument("--fresh", action="store_true", default=False,
                   help="Delete the unit results already in --report-dir and start over. Default: %(default)r.")
    p.add_argument("--no-mtp", dest="mtp", action="store_false", default=True,
                   help="Leave out the MTP block(s), which are otherwise included when --layers is not given. "
                        "Default: MTP included.")
    p.add_argument("--html", action=argparse.BooleanOptionalAction, default=True,
                   help="Write report.html beside report.json (--no-html: JSON only; `python -m verify report` "
                        "renders it later). Default: %(default)r.")
    p.add_argument("--tables", choices=("auto", "on", "off"), default="auto",
                   help="Print each unit's loss and verdict tables (auto: in a single process only). "
                        "Default: %(default)r.")
    p.add_argument("--dist-timeout-min", type=positive_int, default=120,
                   help="torch.distributed timeout in minutes (how long a rank waits for the others at the "
                        "barrier). Default: %(default)r.")


def _scan_done(units_dir: Path, units: list[Unit], fingerprint: str, *, fresh: bool) -> list[str]:
    """Names of the units whose documents are already in units_dir with this fingerprint. A
    document of another configuration is a UsageError (pass --fresh or another --report-dir); an
    unreadable one (a kill while a non-atomic copy was written) is ignored and redone."""
    from verify.report.document import UNIT_KIND, load_json  # noqa: PLC0415

    if fresh and units_dir.exists():
        shutil.rmtree(units_dir)
    done = []
    for u in units:
        path = units_dir / f"{u.name}.json"
        if not path.exists():
            continue
        try:
            doc = load_json(path)
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get("kind") != UNIT_KIND or not _holds_unit(doc, u):
            continue
        if doc.get("fingerprint") != fingerprint:
            raise UsageError(f"--report-dir {units_dir.parent}: invalid value ({path.name} holds results of another "
                             f"configuration, fingerprint {doc.get('fingerprint')} != {fingerprint}; pass --fresh "
                             "to start over or use another --report-dir)", argument="--report-dir")
        done.append(u.name)
    return done


def _holds_unit(doc: dict, unit: Unit) -> bool:
    """The unit document at units/<unit>.json is that unit's (a copied or renamed file holding another unit's
    result is redone, never reused for this one)."""
    held = doc.get("unit")
    return isinstance(held, dict) and held.get("name") == unit.name and held.get("kind") == unit.kind \
        and held.get("index") == unit.index


def _backend_declaration(backend, device: torch.device) -> dict | None:
    if backend is None:
        return None
    from verify.backends import FORWARD_OPS  # noqa: PLC0415

    recipe = getattr(backend, "recipe", None)
    return {"name": backend.name, "recipe": getattr(recipe, "name", str(recipe)), "u_acc": float(backend.u_acc),
            "ops": {op.value: backend.unsupported_reason(op, device) for op in FORWARD_OPS}}


def _verify_unit(opened, unit: Unit, *, config, backend, device, fingerprint: str, ctx: DistContext,
                 progress, console, tables: bool) -> dict:
    """Load, verify and free one unit; its document (verify.units.layer_result, as `layer --json`'s)."""
    from verify.layer_report import loss_table, run_unit, verdict_table  # noqa: PLC0415
    from verify.units import layer_result  # noqa: PLC0415

    ckpt = opened.ckpt
    t0 = time.perf_counter()
    progress.phase(unit.name, "load")
    if unit.kind == "mtp" and ckpt.config.schema != "deepseek_v4":
        linears = ckpt.load_prefix_linears(unit.prefix, device=device)
        formats = sorted({type(lin).__name__ for lin in linears.values()})
        t_load = time.perf_counter() - t0
        del linears
        note = (f"{unit.prefix}*: loaded and checked against its formats ({', '.join(formats) or 'no linears'}); "
                "not verified: the stage table's MTP rows are DeepSeek-V4's mtp.{j} block")
        return layer_result(unit, fingerprint=fingerprint, timings_s={"load": t_load, "total": t_load},
                            rank=ctx.rank, device=device, note=note)
    run, t_load = run_unit(opened, unit, seed=config.seed, backend=backend, device=device,
                           on_phase=lambda name: progress.phase(unit.name, name))
    timings = {"load": t_load, **run.timings_s}
    timings["total"] = time.perf_counter() - t0
    doc = layer_result(unit, run=run, fingerprint=fingerprint, timings_s=timings, rank=ctx.rank, device=device)
    if tables:
        label = unit.index if unit.kind == "decoder" else unit.name
        console.print(loss_table(label, config.config_name, opened.tokens, run))
        if backend is not None:
            console.print(verdict_table(label, backend.name, run))
    del run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return doc


def cli_model(args: argparse.Namespace) -> int:
    """The sweep (see the module docstring and EXIT_POLICY)."""
    from verify.config import run_config_from_args  # noqa: PLC0415

    t_start = time.perf_counter()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    config = run_config_from_args(args)
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_torchelastic_launched() and config.report_dir is None:
        raise UsageError("--report-dir: required under torchrun (the ranks write their units there and rank 0 "
                         "merges them; on several nodes it must be on a shared filesystem)", argument="--report-dir")
    ctx = DistContext(config.device, args.dist_timeout_min)
    try:
        return _sweep(args, config, ctx, t_start, created)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_resume_hint(config.report_dir)) from None
    finally:
        ctx.close()


def _resume_hint(report_dir: Path | None) -> str:
    """The one line a Ctrl-C prints: what was kept and how to go on."""
    command = " ".join(["python -m verify model", *sys.argv[2:]]) if sys.argv[1:2] == ["model"] else \
        "the same `python -m verify model` command"
    if report_dir is None:
        return "nothing was kept (no --report-dir); pass --report-dir DIR to make a sweep resumable"
    done = sorted(p.stem for p in (report_dir / UNITS_DIR).glob("*.json")) if (report_dir / UNITS_DIR).is_dir() else []
    return (f"{len(done)} finished unit(s) kept in {report_dir / UNITS_DIR}; resume with: {command} "
            "(without --fresh)")


def _sweep(args, config, ctx: DistContext, t_start: float, created: str) -> int:
    from verify.config import target_line  # noqa: PLC0415
    from verify.golden import environment  # noqa: PLC0415
    from verify.layer_report import backend_for_verdicts, console_for_run, open_run  # noqa: PLC0415
    from verify.progress import StepProgress  # noqa: PLC0415
    from verify.report.document import load_json, merge_report, write_json  # noqa: PLC0415
    from verify.units import run_fingerprint  # noqa: PLC0415

    device = ctx.device
    report_dir = config.report_dir
    console = console_for_run()
    backend = backend_for_verdicts(config.backend, device) if config.backend else None
    if ctx.is_main:
        console.print(target_line("model", checkpoint=config.checkpoint_dir, backend=backend.name if backend else None,
                                  device=device, threads_note=getattr(args, "threads_note", None)), highlight=False,
                      soft_wrap=True)
    opened = open_run(config, device)
    ckpt, layers = opened.ckpt, opened.layers
    units = plan_units(ckpt, layers, include_mtp=args.mtp and not config.layers_arg)
    fingerprint, fp_fields = run_fingerprint(ckpt, config, backend.name if backend else None, device)
    units_dir = report_dir / UNITS_DIR if report_dir else None
    t_startup = time.perf_counter() - t_start
    run_info = {"checkpoint": str(config.checkpoint_dir), "checkpoint_schema": ckpt.config.schema,
                "num_layers": ckpt.config.num_layers, "layers": format_layers(layers),
                "units": [u.as_dict() for u in units], "fingerprint": fingerprint, "options": fp_fields,
                "device": str(device.type)}
    command = " ".join(["python -m verify model", *sys.argv[2:]]) if sys.argv[1:2] == ["model"] \
        else "python -m verify model"

    def make_plan():
        done = _scan_done(units_dir, units, fingerprint, fresh=args.fresh) if units_dir else []
        todo = [u for u in units if u.name not in done]
        if report_dir is not None:  # what `report` needs to tell a killed sweep from a finished one
            write_json(report_dir / PLAN_JSON, {"kind": PLAN_KIND, "created": created, "command": command,
                                                "run": run_info, "backend": _backend_declaration(backend, device)})
        return done, assign_units(todo, ctx.world_size)

    done, assignment = ctx.on_main(make_plan)
    mine = assignment[ctx.rank]
    if ctx.is_main:
        mtp = [u.name for u in units if u.kind == "mtp"]
        console.print(opened.layers_line + (f"; MTP: {', '.join(mtp)}" if mtp else ""))
        if done:
            console.print(f"resuming: {len(done)} of {len(units)} units already in {units_dir} "
                          f"({', '.join(done)}); {len(units) - len(done)} to do")
        if ctx.world_size > 1:
            console.print(f"{ctx.world_size} ranks ({ctx.backend_name}): " + "; ".join(
                f"rank {r}: {', '.join(u.name for u in a) or '-'} ({sum(u.nbytes for u in a) / 2**20:.1f} MiB)"
                for r, a in enumerate(assignment)))
    tables = args.tables == "on" or (args.tables == "auto" and ctx.world_size == 1)
    docs: dict[str, dict] = {}
    error, where = None, "start"
    try:
        with StepProgress(console, len(mine), what="units", enabled=ctx.is_main,
                          total_weight=sum(u.nbytes for u in mine)) as progress:
            for unit in mine:
                where = unit.name
                doc = _verify_unit(opened, unit, config=config, backend=backend, device=device,
                                   fingerprint=fingerprint, ctx=ctx, progress=progress, console=console, tables=tables)
                if units_dir is not None:
                    write_json(units_dir / f"{unit.name}.json", doc)
                docs[unit.name] = doc
                progress.advance(unit.name, weight=unit.nbytes)
                c = doc["counts"]
                console.print(f"{'rank ' + str(ctx.rank) + ': ' if ctx.world_size > 1 else ''}{unit.name} done in "
                              f"{doc['timings_s']['total']:.2f} s: " +
                              (f"{c['pass']} pass, {c['fail']} fail, {c['not served']} not served"
                               if doc["verified"] else doc["note"]))
    except Exception as exc:  # noqa: BLE001 - reported to the other ranks, then re-raised
        error = exc
    ctx.barrier_with_status(error, where)

    def merge() -> int:
        t0 = time.perf_counter()
        all_docs = []
        for u in units:
            if u.name in docs:
                all_docs.append(docs[u.name])
                continue
            path = units_dir / f"{u.name}.json"
            if not path.exists():
                raise UsageError(f"--report-dir {report_dir}: invalid value ({path} is missing after the barrier: "
                                 "on several nodes --report-dir must be on a filesystem every node sees)",
                                 argument="--report-dir")
            all_docs.append(load_json(path))
        distributed = {"world_size": ctx.world_size, "backend": ctx.backend_name, "resumed": done,
                       "assignment": {str(r): [u.name for u in a] for r, a in enumerate(assignment)}}
        timings = {"phases_s": {"startup": t_startup}, "wall_s": None}
        doc = merge_report(all_docs, run=run_info, backend=_backend_declaration(backend, device),
                           environment=environment(), distributed=distributed, timings=timings,
                           command=command, created=created)
        if config.json is not None:
            _write_layer_json(config, doc, fingerprint)
        if report_dir is not None:
            if args.html:
                from verify.report.html import write_html  # noqa: PLC0415

                write_html(doc, report_dir / REPORT_HTML)
            doc["timings"]["phases_s"]["report"] = time.perf_counter() - t0
            doc["timings"]["wall_s"] = time.perf_counter() - t_start
            write_json(report_dir / REPORT_JSON, doc)
        else:
            doc["timings"]["phases_s"]["report"] = time.perf_counter() - t0
            doc["timings"]["wall_s"] = time.perf_counter() - t_start
        from verify.report.terminal import print_summary  # noqa: PLC0415

        print_summary(console, doc, report_dir=report_dir, html=args.html)
        if backend is None:
            console.print(NO_BACKEND_LINE, highlight=False)
        return exit_status(doc)

    status = ctx.on_main(merge)
    ctx.finish()
    return status


# The exit status of `model` (and of `report` on its JSON); README "Exit status" and `model --help` quote it.
EXIT_POLICY = ("Exit status: 1 when any verdict failed; 0 when none failed, including a sweep without "
               "--backend (references only: it runs no kernel verdict, and its summary says so); 1 from "
               "`report` on a sweep that did not finish (units missing); 2 on a usage or input error; 130 "
               "on Ctrl-C (the line names the command that resumes it).")
NO_BACKEND_LINE = ("[yellow]no kernel backend: 0 kernel verdicts ran (a references-only sweep: quantization loss "
                   "only); pass --backend auto|emulator|sm90|sm100 to judge kernels. Exit status 0 by policy "
                   "(model --help).[/]")


def exit_status(doc: dict) -> int:
    """EXIT_POLICY for a merged report: 1 when a verdict failed or units are missing, else 0."""
    return 1 if doc["summary"]["status"] in ("fail", "incomplete") else 0


def _write_layer_json(config, doc: dict, fingerprint: str) -> None:
    """--json: `layer --json`'s document (verify.units.layer_report_document) for the decoder layers."""
    from verify.units import layer_report_document  # noqa: PLC0415

    runs = {f"layer{u['unit']['index']}/{config.config_name}": u for u in doc["units"] if u["unit"]["kind"] == "decoder"}
    from verify.report.document import write_json  # noqa: PLC0415

    write_json(config.json, layer_report_document(runs, environment=doc["environment"], checkpoint=config.checkpoint_dir,
                                                  tokens=doc["run"]["options"]["tokens"],
                                                  backend=(doc["backend"] or {}).get("name"), fingerprint=fingerprint))
