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
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from verify.config import env_default, format_layers, positive_int
from verify.errors import CliError, UsageError

__all__ = ["Unit", "plan_units", "assign_units", "DistContext", "add_model_arguments", "cli_model",
           "RankFailedError", "UNITS_DIR", "REPORT_JSON", "REPORT_HTML"]

UNITS_DIR = "units"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


class RankFailedError(CliError):
    """Another rank of a distributed sweep failed; the message is that rank's error."""


# ----------------------------------------------------------------------------- units and the plan


@dataclass(frozen=True)
class Unit:
    """One piece of work: a decoder layer (kind "decoder", index = layer) or an MTP block (kind
    "mtp", index = its number; tensors under `prefix`). nbytes: its tensors' stored bytes."""

    name: str
    kind: str
    index: int
    nbytes: int
    prefix: str

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "index": self.index, "nbytes": self.nbytes,
                "prefix": self.prefix}


def mtp_prefixes(ckpt) -> list[tuple[int, str]]:
    """(j, prefix) of every MTP block in the weight_map: V4 `mtp.{j}.`, V3 `model.layers.{n + j}.`
    (the layers past num_hidden_layers)."""
    n = ckpt.config.num_layers
    found: set[int] = set()
    if ckpt.config.schema == "deepseek_v4":
        pattern, offset, fmt = re.compile(r"mtp\.(\d+)\."), 0, "mtp.{}."
    else:
        pattern, offset, fmt = re.compile(r"model\.layers\.(\d+)\."), n, "model.layers.{}."
    for name in ckpt.weight_map:
        m = pattern.match(name)
        if m and int(m.group(1)) >= offset:
            found.add(int(m.group(1)) - offset)
    return [(j, fmt.format(j + offset)) for j in sorted(found)]


def plan_units(ckpt, layers, *, include_mtp: bool) -> list[Unit]:
    """The units of a sweep, in model order, each with its size. Every decoder layer is validated
    against the schema from its headers here (no tensor data read), so a structural defect stops
    the sweep before any work."""
    units = [Unit(f"layer{i}", "decoder", i, ckpt.plan_layer(i).nbytes, f"layers.{i}.") for i in layers]
    if include_mtp:
        for j, prefix in mtp_prefixes(ckpt):
            infos = ckpt.headers_for(ckpt.names_with_prefix(prefix))
            units.append(Unit(f"mtp.{j}", "mtp", j, sum(i.nbytes for i in infos.values()), prefix))
    return units


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

    def close(self) -> None:
        if self.launched and self.dist.is_initialized():
            self.dist.destroy_process_group()


# ----------------------------------------------------------------------------- CLI


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    from verify.layer_report import add_layer_arguments  # noqa: PLC0415

    add_layer_arguments(p)
    p.set_defaults(layers=None)
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


def _fingerprint(ckpt, args, backend_name: str | None, device: torch.device) -> tuple[str, dict]:
    """What makes two sweeps' unit results interchangeable (resume only reuses a matching one)."""
    cfg_bytes = (Path(ckpt.directory) / "config.json").read_bytes()
    wm = json.dumps(sorted(ckpt.weight_map.items())).encode()
    inputs = None
    if args.inputs:
        inputs = hashlib.sha256(Path(args.inputs).read_bytes()).hexdigest()
    fields = {"config_sha256": hashlib.sha256(cfg_bytes).hexdigest(), "weight_map_sha256": hashlib.sha256(wm).hexdigest(),
              "tokens": args.tokens, "seed": args.seed, "inputs_sha256": inputs, "act_scale": args.act_scale,
              "placement": args.placement, "recipe": args.recipe, "fp8_scale_fmt": args.fp8_scale_fmt,
              "backend": backend_name, "device_type": device.type}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16], fields


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
        if doc.get("kind") != UNIT_KIND:
            continue
        if doc.get("fingerprint") != fingerprint:
            raise UsageError(f"--report-dir {units_dir.parent}: invalid value ({path.name} holds results of another "
                             f"configuration, fingerprint {doc.get('fingerprint')} != {fingerprint}; pass --fresh "
                             "to start over or use another --report-dir)", argument="--report-dir")
        done.append(u.name)
    return done


def _backend_declaration(backend, device: torch.device) -> dict | None:
    if backend is None:
        return None
    from verify.backends import FORWARD_OPS  # noqa: PLC0415

    recipe = getattr(backend, "recipe", None)
    return {"name": backend.name, "recipe": getattr(recipe, "name", str(recipe)), "u_acc": float(backend.u_acc),
            "ops": {op.value: backend.unsupported_reason(op, device) for op in FORWARD_OPS}}


class _Progress:
    """A rich progress bar on rank 0 (unit, phase or stage, ETA over this rank's units by bytes)."""

    def __init__(self, console, units: list[Unit], enabled: bool):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: PLC0415

        self.enabled = enabled and bool(units)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[done]}/{task.fields[count]} units"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, transient=True) if self.enabled else None
        self.units = units
        self.task = None

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
            self.task = self.progress.add_task("starting", total=sum(u.nbytes for u in self.units) or 1,
                                               done=0, count=len(self.units))
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def phase(self, unit: Unit, text: str) -> None:
        if self.enabled:
            self.progress.update(self.task, description=f"{unit.name} · {text}")

    def finished(self, unit: Unit, done: int) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=unit.nbytes, done=done)


def _verify_unit(ckpt, unit: Unit, *, args, options, backend, device, fingerprint: str, ctx: DistContext,
                 progress: _Progress, console, tables: bool) -> dict:
    """Load, verify and free one unit; its document."""
    from verify.layer_report import layer_inputs, loss_table, verdict_table  # noqa: PLC0415
    from verify.report.document import unit_document  # noqa: PLC0415
    from verify.run import run_layer  # noqa: PLC0415

    host = socket.gethostname()
    t0 = time.perf_counter()
    progress.phase(unit, "load")
    if unit.kind == "mtp":
        linears = ckpt.load_prefix_linears(unit.prefix, device=device)
        formats = sorted({type(lin).__name__ for lin in linears.values()})
        t_load = time.perf_counter() - t0
        del linears
        note = (f"{unit.prefix}*: loaded and checked against its formats ({', '.join(formats) or 'no linears'}); "
                "not verified: the stage table has no MTP stages")
        return unit_document(unit=unit.as_dict(), fingerprint=fingerprint, timings_s={"load": t_load, "total": t_load},
                             rank=ctx.rank, host=host, device=str(device), note=note)
    layer = ckpt.load_layer(unit.index, device=device)
    inputs = layer_inputs(ckpt, layer, tokens=args.tokens, seed=args.seed, device=device, inputs_path=args.inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_load = time.perf_counter() - t0
    run = run_layer(ckpt, layer, inputs, options=options, backend=backend,
                    on_phase=lambda name: progress.phase(unit, name))
    timings = {"load": t_load, **run.timings_s}
    timings["total"] = time.perf_counter() - t0
    doc = unit_document(unit=unit.as_dict(), fingerprint=fingerprint, run=run, timings_s=timings, rank=ctx.rank,
                        host=host, device=str(device))
    if tables:
        name = f"{args.act_scale}-{args.placement}-{args.recipe}"
        console.print(loss_table(unit.index, name, args.tokens, run))
        if backend is not None:
            console.print(verdict_table(unit.index, backend.name, run))
    del layer, inputs, run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return doc


def cli_model(args: argparse.Namespace) -> int:
    """The sweep (see the module docstring). Exit 1 when a verdict fails."""
    t_start = time.perf_counter()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if args.inputs and not Path(args.inputs).is_file():
        raise UsageError(f"--inputs {args.inputs}: invalid value (no such file)", argument="--inputs")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UsageError(f"--json {args.json}: invalid value (directory {Path(args.json).parent} does not exist)",
                         argument="--json")
    report_dir = Path(args.report_dir) if args.report_dir else None
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_torchelastic_launched() and report_dir is None:
        raise UsageError("--report-dir: required under torchrun (the ranks write their units there and rank 0 "
                         "merges them; on several nodes it must be on a shared filesystem)", argument="--report-dir")
    ctx = DistContext(args.device, args.dist_timeout_min)
    try:
        return _sweep(args, ctx, report_dir, t_start, created)
    finally:
        ctx.close()


def _sweep(args, ctx: DistContext, report_dir: Path | None, t_start: float, created: str) -> int:
    from rich.console import Console  # noqa: PLC0415

    from references.layer import RunOptions  # noqa: PLC0415
    from references.recipes import recipe_by_name  # noqa: PLC0415
    from verify.checkpoint import Checkpoint  # noqa: PLC0415
    from verify.golden import environment  # noqa: PLC0415
    from verify.layer_report import backend_for_verdicts, display_path, select_layers  # noqa: PLC0415
    from verify.report.document import load_json, merge_report, write_json  # noqa: PLC0415

    device = ctx.device
    console = Console() if sys.stdout.isatty() else Console(width=140)
    backend = backend_for_verdicts(args.backend, device) if args.backend else None
    ckpt = Checkpoint.open(args.checkpoint)
    layers, layers_line = select_layers(ckpt, args.layers, label=display_path(args.checkpoint))
    units = plan_units(ckpt, layers, include_mtp=args.mtp and not args.layers)
    fp8_fmt = args.fp8_scale_fmt if args.fp8_scale_fmt != "auto" else \
        ("ue8m0" if ckpt.config.schema == "deepseek_v4" else "f32")
    options = RunOptions(recipe=recipe_by_name(args.recipe), act_scale=args.act_scale,
                         weight_placement=args.placement, fp8_scale_fmt=fp8_fmt)
    fingerprint, fp_fields = _fingerprint(ckpt, args, backend.name if backend else None, device)
    units_dir = report_dir / UNITS_DIR if report_dir else None
    t_startup = time.perf_counter() - t_start

    def make_plan():
        done = _scan_done(units_dir, units, fingerprint, fresh=args.fresh) if units_dir else []
        todo = [u for u in units if u.name not in done]
        return done, assign_units(todo, ctx.world_size)

    done, assignment = ctx.on_main(make_plan)
    mine = assignment[ctx.rank]
    if ctx.is_main:
        mtp = [u.name for u in units if u.kind == "mtp"]
        console.print(layers_line + (f"; MTP: {', '.join(mtp)}" if mtp else ""))
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
        with _Progress(console, mine, enabled=ctx.is_main) as progress:
            for k, unit in enumerate(mine):
                where = unit.name
                doc = _verify_unit(ckpt, unit, args=args, options=options, backend=backend, device=device,
                                   fingerprint=fingerprint, ctx=ctx, progress=progress, console=console, tables=tables)
                if units_dir is not None:
                    write_json(units_dir / f"{unit.name}.json", doc)
                docs[unit.name] = doc
                progress.finished(unit, k + 1)
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
        run = {"checkpoint": str(args.checkpoint), "checkpoint_schema": ckpt.config.schema,
               "num_layers": ckpt.config.num_layers, "layers": format_layers(layers),
               "units": [u.as_dict() for u in units], "fingerprint": fingerprint, "options": fp_fields,
               "device": str(device.type)}
        distributed = {"world_size": ctx.world_size, "backend": ctx.backend_name, "resumed": done,
                       "assignment": {str(r): [u.name for u in a] for r, a in enumerate(assignment)}}
        timings = {"phases_s": {"startup": t_startup}, "wall_s": None}
        doc = merge_report(all_docs, run=run, backend=_backend_declaration(backend, device),
                           environment=environment(), distributed=distributed, timings=timings,
                           command=" ".join(["python -m verify model", *sys.argv[2:]]) if sys.argv[1:2] == ["model"]
                           else "python -m verify model", created=created)
        if args.json:
            _write_legacy_json(Path(args.json), doc, args)
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
        return 1 if doc["summary"]["status"] == "fail" else 0

    return ctx.on_main(merge)


def _write_legacy_json(path: Path, doc: dict, args) -> None:
    """--json: the `layer` command's document (runs keyed layer<i>/<config>) for the decoder layers."""
    name = f"{args.act_scale}-{args.placement}-{args.recipe}"
    runs = {f"layer{u['unit']['index']}/{name}": {k: u[k] for k in ("metrics", "digests", "saturated_block_fraction",
                                                                       "verdicts", "timings_s")}
            for u in doc["units"] if u["unit"]["kind"] == "decoder"}
    path.write_text(json.dumps({"environment": doc["environment"], "checkpoint": str(args.checkpoint),
                                "tokens": args.tokens, "runs": runs,
                                "timings": {r: v["timings_s"] for r, v in runs.items()}}, indent=1))

