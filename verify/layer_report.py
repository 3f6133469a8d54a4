"""`python -m verify layer`: the reference layer's quantization loss, stage by stage, and its golden file.

(`python -m verify model`, the streaming sweep over every layer, is verify.sweep; it reuses the
arguments, layer selection, inputs and tables defined here.)

For each layer and each run configuration (activation scale dynamic/static, routing
weight after/before w2) both reference modes run on the same inputs; the report holds,
per stage, emulated-vs-high metrics (cosine, SQNR dB, calc_diff, rel-L2, max abs) and
the sha256 of every emulated tensor. golden/mini-v4/emulator.json pins it.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass

import torch
from rich.markup import escape

from references.layer import RunOptions
from references.linear import rms_norm
from references.recipes import RECIPES
from verify.checkpoint import Checkpoint, LayerWeights
from verify.backends import FORWARD_OPS, get_backend
from verify.backends.registry import BACKEND_HELP, backend_arg
from verify.config import (DEFAULT_CHECKPOINT, GOLDEN_DIR, RunConfig, display_path, format_layers, parse_layers,
                           positive_int, run_config_from_args, target_line)
from verify.errors import BackendRefusedError, DeviceUnavailableError, LayerRangeError
from verify.golden import environment
from verify.provenance import provenance_lines
from verify.preflight import check_inputs_for_layers, check_memory, read_inputs_file
from verify.reference_layer import RMS_EPS, LayerInputs, default_token_ids, inputs_from_token_ids
from verify.report.tables import loss_table, verdict_table
from verify.run import run_layer, verdict_counts

__all__ = ["GOLDEN_CONFIGS", "GOLDEN_TOKENS", "layer_inputs", "run_unit", "run_id", "layer_report", "held_layers",
           "select_layers", "add_layer_arguments", "cli_layer", "loss_table", "verdict_table", "backend_for_verdicts",
           "OpenedRun", "open_run", "display_path", "console_for_run"]

GOLDEN_CONFIGS: dict[str, RunOptions] = {
    "dynamic-after_w2": RunOptions(act_scale="dynamic", weight_placement="after_w2"),
    "static-after_w2": RunOptions(act_scale="static", weight_placement="after_w2"),
    "dynamic-before_w2": RunOptions(act_scale="dynamic", weight_placement="before_w2"),
}
GOLDEN_TOKENS = 64
GOLDEN_METRICS = ("cosine", "sqnr_db", "calc_diff", "rel_l2", "max_abs", "nan_count", "inf_count")
GOLDEN_PATH = GOLDEN_DIR / "mini-v4" / "emulator.json"


def layer_inputs(ckpt: Checkpoint, layer: LayerWeights, *, tokens: int, seed: int, device: str | torch.device,
                 inputs_file: dict | None = None) -> LayerInputs:
    """Token ids -> embed -> RMSNorm when the checkpoint has embed.weight; the tensors of an --inputs
    file when given (verify.preflight.read_inputs_file, already checked); else (a single-layer
    checkpoint) seeded Gaussian hidden states through the layer's norms."""
    if inputs_file is not None:
        ids = inputs_file["token_ids"]
        return LayerInputs(None if ids is None else ids.to(device),
                           inputs_file["x_attn"].to(device=device, dtype=torch.bfloat16),
                           inputs_file["x_ffn"].to(device=device, dtype=torch.bfloat16))
    ids = default_token_ids(ckpt.config.vocab_size, tokens, seed=seed, device=device)
    if "embed.weight" in ckpt.weight_map or "model.embed_tokens.weight" in ckpt.weight_map:
        return inputs_from_token_ids(ckpt, layer, ids)
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(tokens, ckpt.config.hidden_size, generator=g).to(device=device, dtype=torch.bfloat16)
    n = layer.norms
    return LayerInputs(ids, rms_norm(h, n["attn_norm"], eps=RMS_EPS, mode="emulated"),
                       rms_norm(h, n["ffn_norm"], eps=RMS_EPS, mode="emulated"))



def run_unit(opened, unit, *, seed: int, backend, device: torch.device, on_phase) -> tuple:
    """Load one unit of `layer` / `model` (a decoder layer, or DeepSeek-V4's mtp.{j} block with its own rows of
    the stage table, verify.mtp) and run it through the references and, with a backend, the verdicts and their
    negative controls: (verify.run.LayerRun, seconds spent loading). `opened`: the run's OpenedRun (open_run)."""
    ckpt = opened.ckpt
    t0 = time.perf_counter()
    if unit.kind == "mtp":
        from verify.mtp import mtp_inputs, run_mtp  # noqa: PLC0415

        layer = ckpt.load_mtp(unit.index, device=device)
        inputs = mtp_inputs(ckpt, layer, tokens=opened.tokens, seed=seed, device=device)
        run_fn = run_mtp
    else:
        layer = ckpt.load_layer(unit.index, device=device)
        inputs = layer_inputs(ckpt, layer, tokens=opened.tokens, seed=seed, device=device,
                              inputs_file=opened.inputs_file)
        run_fn = run_layer
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    t_load = time.perf_counter() - t0
    run = run_fn(ckpt, layer, inputs, options=opened.options, backend=backend, on_phase=on_phase,
                 controls=backend is not None)
    return run, t_load

def run_id(layer: int | str, config_name: str) -> str:
    """"layer3/<config>"; an MTP block by its unit name: "mtp.0/<config>"."""
    return f"layer{layer}/{config_name}" if isinstance(layer, int) else f"{layer}/{config_name}"


_MTP_TOKEN = re.compile(r"mtp\.(\d+)")


def split_mtp_layers(layers_arg: str | None) -> tuple[tuple[int, ...], str | None]:
    """--layers 'mtp.0,1-3' -> ((0,), '1-3'): the MTP blocks asked for (DeepSeek-V4's mtp.{j}) and the decoder
    layer ranges left (None when none is left)."""
    if not layers_arg:
        return (), layers_arg
    parts = [p.strip() for p in layers_arg.split(",")]
    mtp = tuple(sorted({int(m.group(1)) for p in parts if (m := _MTP_TOKEN.fullmatch(p))}))
    rest = ",".join(p for p in parts if not _MTP_TOKEN.fullmatch(p))
    return mtp, rest or None


def select_mtp_units(ckpt: Checkpoint, asked: tuple[int, ...]) -> list:
    """The units of the MTP blocks asked for (verify.units.Unit, kind "mtp"); LayerRangeError naming the ones the
    checkpoint does not hold (DeepSeek-V4 naming mtp.{j} only)."""
    from verify.units import Unit, mtp_prefixes  # noqa: PLC0415

    if not asked:
        return []
    held = dict(mtp_prefixes(ckpt)) if ckpt.config.schema == "deepseek_v4" else {}
    missing = [j for j in asked if j not in held]
    if missing:
        have = ", ".join(f"mtp.{j}" for j in held) or "none"
        raise LayerRangeError(f"--layers {', '.join(f'mtp.{j}' for j in missing)}: not in the checkpoint (it holds "
                              f"MTP blocks: {have}; only DeepSeek-V4's mtp.{{j}} blocks are verified)",
                              argument="--layers")
    nbytes = {j: sum(i.nbytes for i in ckpt.headers_for(ckpt.names_with_prefix(held[j])).values()) for j in asked}
    return [Unit(f"mtp.{j}", "mtp", j, nbytes[j], held[j]) for j in asked]


def layer_report(ckpt: Checkpoint, layers: list[int], *, tokens: int = GOLDEN_TOKENS, seed: int = 0,
                 configs: dict[str, RunOptions] = GOLDEN_CONFIGS, device: str | torch.device = "cpu",
                 progress=None) -> dict:
    """The golden document for `layers` x `configs` (see verify.golden), plus per-run timings."""
    runs, timings = {}, {}
    for i in layers:
        layer = ckpt.load_layer(i, device=device)
        inputs = layer_inputs(ckpt, layer, tokens=tokens, seed=seed, device=device)
        for name, options in configs.items():
            t0 = time.perf_counter()
            run = run_layer(ckpt, layer, inputs, options=options)
            runs[run_id(i, name)] = {
                "metrics": {s: {m: v[m] for m in GOLDEN_METRICS} for s, v in run.loss.items()},
                "digests": run.digests,
            }
            timings[run_id(i, name)] = time.perf_counter() - t0
            if progress is not None:
                progress()
    return {"environment": environment(), "tokens": tokens, "seed": seed, "runs": runs, "timings_s": timings}


def held_layers(ckpt: Checkpoint) -> tuple[int, ...]:
    """The decoder layers with at least one tensor in the checkpoint's weight_map: `layers.{i}.`
    (V4 naming) or `model.layers.{i}.` (V3), i < num_hidden_layers. A full model holds them all,
    a single-layer fixture (v4-pro-layer) only its one; V3's MTP layer (model.layers.{num_hidden_layers})
    and V4's (mtp.{j}) are not decoder layers."""
    pattern = re.compile(r"layers\.(\d+)\." if ckpt.config.schema == "deepseek_v4" else r"model\.layers\.(\d+)\.")
    held = {int(m.group(1)) for name in ckpt.weight_map if (m := pattern.match(name))}
    return tuple(sorted(i for i in held if i < ckpt.config.num_layers))


def select_layers(ckpt: Checkpoint, layers_arg: str | None, *, label: str) -> tuple[tuple[int, ...], str]:
    """(layers, console line) for --layers: the parsed list, each checked against config.json's
    layer count and against the layers the checkpoint holds (LayerRangeError naming both); with no
    --layers, every held layer. `label` names the checkpoint in messages."""
    held = held_layers(ckpt)
    n = ckpt.config.num_layers
    if not layers_arg:
        if not held:
            prefix = "layers." if ckpt.config.schema == "deepseek_v4" else "model.layers."
            raise LayerRangeError(f"--checkpoint {label}: no decoder layer (its weight_map has no "
                                  f"'{prefix}{{i}}.' tensor with i < {n})", argument="--checkpoint")
        return held, f"layers: {format_layers(held)} (the layers this checkpoint holds)"
    asked = parse_layers(layers_arg)
    for bad, problem, context in (
            ([i for i in asked if i >= n], "out of range", f"checkpoint {label} has layers {format_layers(range(n))}"),
            ([i for i in asked if i not in held], "not in the checkpoint",
             f"checkpoint {label} holds {_layers_noun(held)} {format_layers(held) or 'none'} of "
             f"{format_layers(range(n))}")):
        if bad:
            which = _layers_noun(bad) + ("" if len(bad) == len(asked) else f" {format_layers(bad)}")
            raise LayerRangeError(f"--layers {layers_arg}: {which} {problem} ({context})", argument="--layers")
    return asked, f"layers: {format_layers(asked)} (--layers {layers_arg})"


def _layers_noun(layers) -> str:
    return "layer" if len(layers) == 1 else "layers"


# a backend that serves none of these ops on the device cannot run there
VERDICT_OPS = FORWARD_OPS


def backend_for_verdicts(name: str, device: torch.device, *, findings: list[str] | None = None):
    """The --backend that runs the verdicts on `device` (where the references run), or
    DeviceUnavailableError carrying the backend's own unsupported_reason. "auto" picks for `device`:
    the GPU's backend on cuda, the emulator on the CPU (also on a machine that has a GPU).
    Its accumulator is measured first (verify.accumulator): a declared u_acc looser than a path keeps is
    refused (BackendRefusedError); one tighter than a path keeps is refused too, unless `findings` is a list:
    then each such path's line is appended there for the caller to fail the run with (its verdicts still run:
    a bound that is too tight can only fail)."""
    try:
        backend = get_backend(name, device)  # "auto": the GPU's backend on cuda, the emulator on the CPU
    except ImportError as e:
        raise DeviceUnavailableError(f"--backend {name}: backend unavailable ({e})", argument="--backend") from None
    reasons = [backend.unsupported_reason(op, device) for op in VERDICT_OPS]
    if all(reasons):
        hint = f"; the references run on --device {device}, pass --device cuda" \
            if device.type != "cuda" and torch.cuda.is_available() else ""
        raise DeviceUnavailableError(f"--backend {name}: backend unavailable ({reasons[0]}{hint})",
                                     argument="--backend")
    from verify.accumulator import (AccumulatorRefused, accumulator_claims_more_than_kept,  # noqa: PLC0415
                                    check_declared_u_acc, probe_accumulator, probe_grouped_accumulator)

    readings = probe_accumulator(backend, device)
    try:
        readings += probe_grouped_accumulator(backend, device)
    except BackendRefusedError:  # its grouped GEMM crashed: the MoE stages' verdicts fail with that crash, in one line
        pass
    try:  # a looser declaration is always refused; a tighter one is reported by a caller that takes findings
        check_declared_u_acc(backend, readings, refuse_tighter=findings is None)
    except AccumulatorRefused as e:
        raise BackendRefusedError(f"--backend {name}: refused ({e})", argument="--backend") from None
    if findings is not None:
        findings.extend(accumulator_claims_more_than_kept(backend, readings))
    return backend


@dataclass(frozen=True)
class OpenedRun:
    """What a `layer` / `model` run verifies, every check that needs the checkpoint done, no layer
    loaded yet: the checkpoint (headers), the selected layers and their console line, the --inputs
    tensors (checked; None without --inputs), the references' RunOptions and the token count."""

    ckpt: Checkpoint
    layers: tuple[int, ...]
    layers_line: str
    inputs_file: dict | None
    options: RunOptions
    tokens: int


def open_run(config: RunConfig, device: torch.device) -> OpenedRun:
    """Open config's checkpoint and check what needs it, before any work: --layers against the layers
    it holds, the --inputs tensors against its hidden size and vocabulary (and token ids for
    hash-routed layers), and the memory one layer's run needs against the device's free memory
    (--tokens 10000000 is refused with the estimate, not after allocating)."""
    ckpt = Checkpoint.open(config.checkpoint_dir)
    layers, layers_line = select_layers(ckpt, config.layers_arg, label=display_path(config.checkpoint_dir))
    inputs_file, tokens = None, config.tokens
    if config.inputs is not None:
        inputs_file = read_inputs_file(config.inputs, hidden_size=ckpt.config.hidden_size,
                                       vocab_size=ckpt.config.vocab_size)
        check_inputs_for_layers(config.inputs, inputs_file, ckpt.config, layers)
        tokens = int(inputs_file["x_ffn"].shape[0])
    nbytes = max(ckpt.plan_layer(i).nbytes for i in layers)
    check_memory(ckpt.config, tokens=tokens, layer_nbytes=nbytes, device=device,
                 what=f"--tokens {tokens}" if config.inputs is None else f"--inputs {config.inputs} ({tokens} tokens)",
                 argument="--tokens" if config.inputs is None else "--inputs")
    return OpenedRun(ckpt, layers, layers_line, inputs_file, config.run_options(ckpt.config.schema), tokens)


# ----------------------------------------------------------------------------- CLI


def add_layer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="Checkpoint directory (env NVFP4V_CHECKPOINT). Default: %(default)r (the committed "
                        "mini-v4 fixture unless NVFP4V_CHECKPOINT is set).")
    p.add_argument("--layers", default=None,
                   help="Layers, e.g. '0,3,5-7' (`layer` also takes DeepSeek-V4 MTP blocks: 'mtp.0', '3,mtp.0'). "
                        "Default: every layer the checkpoint holds.")
    p.add_argument("--tokens", type=positive_int, default=GOLDEN_TOKENS,
                   help="Tokens per layer (refused before any work when the run's estimated memory exceeds "
                        "the free memory). Default: %(default)r.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the token ids / inputs. Default: %(default)r.")
    p.add_argument("--inputs", default=None,
                   help="safetensors file with x_ffn [T, hidden_size] float (and x_attn of the same shape, "
                        "token_ids [T] integer, required by hash-routed layers) instead of embeddings; every "
                        "value must be finite. Default: %(default)r.")
    p.add_argument("--act-scale", choices=("dynamic", "static"), default="dynamic",
                   help="NVFP4 activation global scale. Default: %(default)r.")
    p.add_argument("--placement", choices=("after_w2", "before_w2"), default="after_w2",
                   help="Where the routing weight is applied. Default: %(default)r.")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="te", help="Activation recipe. Default: %(default)r.")
    p.add_argument("--fp8-scale-fmt", choices=("auto", "ue8m0", "f32"), default="auto",
                   help="FP8 activation block-scale format (auto: ue8m0 for V4, f32 for V3). Default: %(default)r.")
    p.add_argument("--device", default="cpu", help="Where the references run: cpu, cuda, cuda:N. Default: %(default)r.")
    p.add_argument("--backend", default=None, type=backend_arg,
                   help=f"Also run this backend's verdicts on every stage it serves (quantize bytes, GEMM bound, "
                        f"host sync, CUDA-graph replay); exit 1 if any fails: {BACKEND_HELP}. Default: %(default)r.")
    p.add_argument("--json", default=None,
                   help="Write the report here: each layer's result as a sweep's unit document, under \"runs\" "
                        "(schema verify/report/model_report.schema.json, $defs/layer_report). Default: %(default)r.")


def console_for_run():
    """A rich console; in a log file or pipe 140 columns wide (80 would truncate stage names)."""
    from rich.console import Console  # noqa: PLC0415

    console = Console()
    return console if console.is_terminal else Console(width=140)


def cli_layer(args: argparse.Namespace) -> int:
    """Print per layer a rich table of the quantization loss per stage; optional JSON report.

    Every user error (bad --layers / --inputs / --json / --tokens, a device or backend this machine
    lacks, a checkpoint defect) is raised before any layer runs: verify.errors and verify.checkpoint's
    classes, which `python -m verify` prints as one line (exit status 2). The first line names the
    checkpoint, backend and device; a progress bar shows the layer and its phase."""
    from verify.progress import StepProgress  # noqa: PLC0415
    from verify.verdicts.controls import control_counts, control_line  # noqa: PLC0415
    from verify.units import layer_report_document, layer_result, plan_units, run_fingerprint  # noqa: PLC0415

    mtp_asked, decoder_arg = split_mtp_layers(args.layers)
    args = argparse.Namespace(**{**vars(args), "layers": decoder_arg})
    config = run_config_from_args(args)
    if mtp_asked and config.inputs is not None:
        from verify.errors import UsageError  # noqa: PLC0415

        raise UsageError(f"--inputs {config.inputs}: an MTP block ({', '.join(f'mtp.{j}' for j in mtp_asked)} in "
                         "--layers) takes enorm / hnorm of embeddings, not a decoder layer's x_attn / x_ffn; run it "
                         "without --inputs", argument="--inputs")
    device = torch.device(config.device)
    console = console_for_run()
    acc_findings: list[str] = []
    backend = backend_for_verdicts(config.backend, device, findings=acc_findings) if config.backend else None
    console.print(target_line("layer", checkpoint=config.checkpoint_dir, backend=backend.name if backend else None,
                              device=device, threads_note=getattr(args, "threads_note", None)), highlight=False)
    for line in acc_findings:  # the declared accumulator is false on a path: the run fails, the verdicts still run
        console.print(f"[bold red]FAIL[/] accumulator: {escape(line)}", soft_wrap=True)
    opened = open_run(config, device)
    ckpt, layers = opened.ckpt, opened.layers
    mtp_units = select_mtp_units(ckpt, mtp_asked)
    if mtp_asked and decoder_arg is None:  # only MTP blocks were asked for
        layers = ()
    console.print(opened.layers_line if layers else f"MTP: {', '.join(u.name for u in mtp_units)} (--layers)")
    fingerprint, _ = run_fingerprint(ckpt, config, backend.name if backend else None, device)
    name = config.config_name
    results, failed, totals, controls = {}, len(acc_findings), {}, {}
    with StepProgress(console, len(layers) + len(mtp_units), what="layers") as progress:
        for unit in [*plan_units(ckpt, layers, include_mtp=False), *mtp_units]:
            i = unit.index if unit.kind == "decoder" else unit.name
            t0 = time.perf_counter()
            progress.phase(unit.name, "load")
            run, t_load = run_unit(opened, unit, seed=config.seed, backend=backend, device=device,
                                   on_phase=lambda phase, u=unit.name: progress.phase(u, phase))
            timings = {"load": t_load, **run.timings_s, "total": time.perf_counter() - t0}
            results[run_id(i, name)] = layer_result(unit, run=run, fingerprint=fingerprint, timings_s=timings,
                                                    device=device)
            progress.advance(unit.name)
            console.print(loss_table(i, name, opened.tokens, run))
            if run.saturated:
                console.print("blocks with scale 448 (saturated): " +
                              ", ".join(f"{k} {100 * v:.2f}%" for k, v in run.saturated.items()))
            console.print("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items() if isinstance(v, float)))
            loss_failed = run.loss_failures  # a garbage loss row (NaN, empty, all zero, a gain) fails the run
            failed += len(loss_failed)
            for v in loss_failed:
                console.print(f"[bold red]FAIL[/] {escape(v.message)}")
            if backend is not None:
                failed += sum(v.status == "fail" for v in run.verdicts) + len(run.control_failures)
                console.print(verdict_table(i, backend.name, run))
                for line in provenance_lines([run.provenance]):  # kernels per stage and their build arch
                    console.print(escape(line), highlight=False)
                for v in run.verdicts:  # a kernel not built for this device (not a column of the table)
                    if v.check == "provenance" and v.status == "fail":
                        console.print(f"[bold red]FAIL[/] {escape(v.message)}")
                for k, v in verdict_counts(run.verdicts).items():
                    totals[k] = totals.get(k, 0) + v
                for k, v in control_counts(run.controls).items():
                    controls[k] = controls.get(k, 0) + v
    if config.json is not None:
        from verify.report.document import write_json  # noqa: PLC0415

        write_json(config.json, layer_report_document(results, environment=environment(), checkpoint=config.checkpoint_dir,
                                                      tokens=opened.tokens, backend=backend.name if backend else None,
                                                      fingerprint=fingerprint, accumulator_findings=acc_findings))
    where = ",".join(w for w in (format_layers(layers), *(u.name for u in mtp_units)) if w)
    if backend is not None:
        style = "bold red" if failed else "bold green"
        console.print(f"[{style}]{backend.name} on {where}: " +
                      ", ".join(f"{v} {k}" for k, v in totals.items()) + "[/]" +
                      ("" if failed or not totals.get("pass") else " (every verdict the backend serves here passes)")
                      + ("" if totals.get("pass") else f" ({backend.name} serves none of these stages here)"))
        console.print(control_line(controls))
    elif failed:
        console.print(f"[bold red]{failed} loss row(s) failed on {where}[/]")
    return 1 if failed else 0
