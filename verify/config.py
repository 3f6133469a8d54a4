"""One frozen run configuration, built by the pytest options and by `python -m verify`.

`run_config_from_args` is the one function that turns the parsed options of `python -m verify
layer` and `model` into a RunConfig (verify/plugin.py builds one from pytest's options).

Environment variables (all optional, prefix NVFP4V_), read the same way by the CLI and by pytest:
the command line wins, then the variable, then the built-in default (ENV_OPTIONS):
  NVFP4V_CHECKPOINT   default for --checkpoint (CLI: layer, model, selftest; pytest)
  NVFP4V_BACKEND      default for --backend (CLI: layer, model, selftest, accumulator; pytest)
  NVFP4V_REPORT_DIR   default for --report-dir (CLI: model; pytest)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from verify.layer_ranges import format_layers
from verify.errors import DeviceUnavailableError, LayerRangeError, UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO_ROOT / "golden"
DEFAULT_CHECKPOINT = GOLDEN_DIR / "mini-v4"
# option -> the NVFP4V_ variable that gives its default (CLI: __main__ applies them to every command
# that has the option; pytest: verify/plugin.py's addoption defaults)
ENV_OPTIONS = {"--checkpoint": "CHECKPOINT", "--backend": "BACKEND", "--report-dir": "REPORT_DIR"}
# --layers above this index is refused before anything is expanded (a range of 10^9 layers would
# otherwise be a list of 10^9 ints); DeepSeek-V4-Pro has 61 decoder layers plus MTP
MAX_LAYER_INDEX = 4095
# the devices the references and kernels are written for (named in messages; meta is refused)
RUN_DEVICE_TYPES = ("cpu", "cuda")


def env_default(name: str, fallback: str | None) -> str | None:
    """Value of NVFP4V_<name>, or `fallback` when unset or empty."""
    value = os.environ.get(f"NVFP4V_{name}", "")
    return value or fallback


@dataclass(frozen=True)
class RunConfig:
    """What to verify and where to put the results.

    checkpoint: a Hugging Face style checkpoint directory, or None for the committed fixture.
    backend: a backend spec (verify.backends.registry: a registered name, 'auto', or module:attr).
    layers: layer indices to verify; empty means every layer the entry point defaults to.
    update_golden: rewrite golden files (the run then fails with the diff, for review).
    report_dir: where JSON reports go; None disables them.

    What one layer run does (`python -m verify layer` / `model`; pytest uses the golden configs):
    layers_arg: --layers as typed (messages and the check against the checkpoint); tokens, seed: the
    token ids / Gaussian inputs; inputs: a safetensors file of activations instead; act_scale,
    placement, recipe, fp8_scale_fmt: the references' RunOptions (fp8_scale_fmt "auto" resolves per
    schema, `run_options`); device: where the references run; json: `layer --json` / `model --json`.
    backend None: references only, no kernel verdicts.
    """

    checkpoint: Path | None = None
    backend: str | None = "auto"
    layers: tuple[int, ...] = field(default_factory=tuple)
    update_golden: bool = False
    report_dir: Path | None = None
    layers_arg: str | None = None
    tokens: int = 64
    seed: int = 0
    inputs: Path | None = None
    act_scale: str = "dynamic"
    placement: str = "after_w2"
    recipe: str = "te"
    fp8_scale_fmt: str = "auto"
    device: str = "cpu"
    json: Path | None = None

    def __post_init__(self) -> None:
        if self.backend is not None:  # None: the references only, no kernel verdicts
            from verify.backends.registry import backend_spec  # noqa: PLC0415 (the registry imports torch)

            backend_spec(self.backend)  # UsageError naming it and the registered names
        if any(i < 0 for i in self.layers):
            raise ValueError(f"layers={self.layers!r}: layer indices must be >= 0")

    @property
    def checkpoint_dir(self) -> Path:
        """The checkpoint directory this run verifies (the committed fixture when none is given)."""
        return self.checkpoint if self.checkpoint is not None else DEFAULT_CHECKPOINT

    @property
    def config_name(self) -> str:
        """The run configuration's name in run ids and reports: `<act_scale>-<placement>-<recipe>`."""
        return f"{self.act_scale}-{self.placement}-{self.recipe}"

    def run_options(self, schema: str):
        """The references' RunOptions; fp8_scale_fmt "auto" is E8M0 for V4, float32 for V3."""
        from references.layer import RunOptions  # noqa: PLC0415
        from references.recipes import recipe_by_name  # noqa: PLC0415

        fmt = self.fp8_scale_fmt if self.fp8_scale_fmt != "auto" else ("ue8m0" if schema == "deepseek_v4" else "f32")
        return RunOptions(recipe=recipe_by_name(self.recipe), act_scale=self.act_scale,
                          weight_placement=self.placement, fp8_scale_fmt=fmt)


def check_env_backend(backend: str | None) -> None:
    """A backend spec that reached a command without argparse's check (an NVFP4V_BACKEND value): a
    registered name, 'auto' or module:attr (verify.backends.registry), else UsageError naming the variable."""
    if backend is None:
        return
    from verify.backends.registry import backend_spec_problem  # noqa: PLC0415 (the registry imports torch)

    why = backend_spec_problem(backend)
    if why:
        raise UsageError(f"--backend {backend}: invalid value from NVFP4V_BACKEND ({why})", argument="--backend")


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of `python -m verify layer` / `model` from their parsed options (defaults from
    the NVFP4V_ variables already applied by __main__). Every argument is checked here, before any
    work: --layers (syntax, and the MAX_LAYER_INDEX cap: nothing is expanded first), --device (a
    device this machine has, of RUN_DEVICE_TYPES), a backend name from NVFP4V_BACKEND (argparse checks
    only the command line's), and the kind of path --inputs / --json / --report-dir name. Checks that
    need the checkpoint (layers it holds, the inputs' shapes, the memory the run needs) are
    verify.preflight's."""
    from verify import preflight  # noqa: PLC0415

    backend = getattr(args, "backend", None)
    check_env_backend(backend)
    check_device(args.device)
    inputs = preflight.existing_file(args.inputs, "--inputs") if getattr(args, "inputs", None) else None
    json_path = preflight.writable_file(args.json, "--json") if getattr(args, "json", None) else None
    report_dir = getattr(args, "report_dir", None)
    report_dir = preflight.writable_dir(report_dir, "--report-dir") if report_dir else None
    checkpoint = getattr(args, "checkpoint", None)
    return RunConfig(checkpoint=Path(checkpoint) if checkpoint else None, backend=backend,
                     layers=parse_layers(args.layers), report_dir=report_dir, layers_arg=args.layers or None,
                     tokens=args.tokens, seed=args.seed, inputs=inputs, act_scale=args.act_scale,
                     placement=args.placement, recipe=args.recipe, fp8_scale_fmt=args.fp8_scale_fmt,
                     device=args.device, json=json_path)


def parse_layer_ranges(text: str | None) -> tuple[tuple[int, int], ...]:
    """'0,3,5-7' -> ((0, 0), (3, 3), (5, 7)), nothing expanded; None or '' -> (). Raises UsageError (a
    ValueError) naming the bad token: not an integer, negative, a range whose first index is above
    its last; and LayerRangeError for an index above MAX_LAYER_INDEX."""
    if not text:
        return ()
    out: list[tuple[int, int]] = []
    for token in text.split(","):
        token = token.strip()
        try:
            lo, hi = (int(t) for t in token.split("-", 1)) if "-" in token else (int(token),) * 2
        except ValueError:
            raise UsageError(f"--layers {text}: invalid value (cannot parse {token!r}; layer indices are >= 0, "
                             "e.g. '0,3,5-7')", argument="--layers") from None
        if lo > hi:
            raise UsageError(f"--layers {text}: invalid value (range {token!r} runs backwards; "
                             f"write '{hi}-{lo}')", argument="--layers")
        if hi > MAX_LAYER_INDEX:
            raise LayerRangeError(f"--layers {text}: layer {hi} out of range (no checkpoint has more than "
                                  f"{MAX_LAYER_INDEX + 1} layers; DeepSeek-V4-Pro has 61)", argument="--layers")
        out.append((lo, hi))
    return tuple(out)


def parse_layers(text: str | None) -> tuple[int, ...]:
    """'0,3,5-7' -> (0, 3, 5, 6, 7); None or '' -> (). The errors of parse_layer_ranges, raised
    before any range is expanded."""
    return tuple(sorted({i for lo, hi in parse_layer_ranges(text) for i in range(lo, hi + 1)}))


def positive_int(text: str) -> int:
    """argparse type of counts such as --tokens: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (must be an integer >= 1)")
    return value


def check_device(text: str, *, argument: str = "--device"):
    """torch.device(text) when this machine has it; else UsageError (not a device name) or
    DeviceUnavailableError saying why (torch built without CUDA, no GPU visible, index too high)."""
    import torch  # noqa: PLC0415 (nothing heavy at import time)

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"{argument} {text}: invalid value (not a torch device; e.g. cpu, cuda, cuda:1)",
                         argument=argument) from None
    if dev.type == "meta":  # torch can allocate there, but a meta tensor holds no values to compare
        raise UsageError(f"{argument} {text}: invalid value (meta tensors hold no data to verify; "
                         f"use {' or '.join(RUN_DEVICE_TYPES)})", argument=argument)
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise DeviceUnavailableError(f"{argument} {text}: device unavailable ({why})", argument=argument)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceUnavailableError(f"{argument} {text}: device unavailable (this machine has {count} CUDA "
                                         f"device(s): cuda:0-{count - 1})", argument=argument)
        return dev
    try:  # mps, xpu, ...: ask torch
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeviceUnavailableError(f"{argument} {text}: device unavailable ({reason})", argument=argument) from None
    return dev


MAX_TORCH_THREADS = 8  # the references' tensors are small per op; more threads mostly wait on each other


def physical_cores() -> int:
    """Physical cores this process may run on: the CPUs of its affinity mask, counted once per
    (package, core) pair where /proc/cpuinfo says which CPU is which core (hyper-threads share one)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        cores, cpu, package = set(), None, "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                package = value
            elif key == "core id" and cpu in allowed:
                cores.add((package, value))
        if cores:
            return len(cores)
    except (OSError, ValueError):
        pass
    return max(1, len(allowed))


def configure_torch_threads() -> str:
    """Set torch's intra-op thread count for a CLI run and say how it was chosen (the first line of
    each run prints it). OMP_NUM_THREADS, when set, wins (torch has read it already). Otherwise: the
    physical cores that other processes leave idle (cores minus the 1-minute load average, rounded),
    at least 1, at most MAX_TORCH_THREADS. On a 2-core machine busy with another process this is 1:
    two OpenMP threads sharing one idle core wait on each other at every op (measured: `layer` 61-83 s
    with 2 threads, 4.7 s with 1)."""
    import torch  # noqa: PLC0415

    if os.environ.get("OMP_NUM_THREADS"):
        return f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS)"
    cores = physical_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    n = max(1, min(MAX_TORCH_THREADS, cores - int(load + 0.5)))
    torch.set_num_threads(n)
    return f"torch threads {n} ({cores} cores, load {load:.1f}; OMP_NUM_THREADS overrides)"


def target_line(command: str, *, checkpoint, backend: str | None, device, threads_note: str | None = None) -> str:
    """The first line of every run: what is verified, by which backend, where (a user who meant
    another checkpoint or backend sees it before reading any verdict)."""
    parts = [f"verify {command}: checkpoint {display_path(checkpoint) if checkpoint else '(none)'}",
             f"backend {backend or 'none (references only; pass --backend for kernel verdicts)'}",
             f"device {device}"]
    if threads_note and torch_device_type(device) == "cpu":
        parts.append(threads_note)
    return "; ".join(parts)


def torch_device_type(device) -> str:
    return str(device).split(":")[0]


def display_path(path: str | Path) -> str:
    """`path` relative to the working directory when below it (golden/mini-v4), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop (pathlib before 3.13)
        return str(path)
