"""`python -m verify <command>`: demo (emulator self-check), lint, fixture, layer, model, report.

Each command's arguments and body live in its own module; this file only dispatches, applies the
NVFP4V_ environment defaults (NVFP4V_CHECKPOINT, NVFP4V_BACKEND, NVFP4V_REPORT_DIR: a command line
option wins over the variable), picks the torch thread count, and turns user errors into one line
on stderr. `python -m verify` without a command prints this help and exits 2.

Threads (CPU): OMP_NUM_THREADS when set; else the physical cores not busy with other processes
(cores minus the 1-minute load average, at least 1, at most 8). More threads than idle cores make
torch's OpenMP threads wait on each other (61-83 s instead of 5 s for `layer` on a busy 2-core
machine). The first line of layer, model, selftest and accumulator names the count.

Exit status:
  0  success
  1  a verdict failed (demo, layer, model, report), lint found an error finding, or `report`
     read a sweep that did not finish (units missing: it lists them, never PASS)
  2  a usage or input error, printed as one line `verify <command>: error: <message>`:
       UsageError              bad argument value (argparse's errors too: unknown option,
                               invalid choice, --tokens 0, --layers 3-1 or x, --device meta,
                               --json / --report-dir naming the wrong kind of path)
       InputsError             --inputs: missing, not a file, not safetensors, no x_ffn, a tensor
                               of the wrong shape or dtype, NaN / Inf values (names the tensor)
       ResourceError           --tokens more than this machine's free memory holds (the estimate)
       UnreadableReportError   `report` on a truncated or foreign unit / report file
       LayerRangeError         --layers names a layer past num_hidden_layers or one the
                               checkpoint does not hold
       DeviceUnavailableError  --device this machine lacks; --backend that cannot run here
                               (the backend's own reason: no triton, no CUDA device, wrong arch)
       CheckpointError         a defective checkpoint, printed with its subclass name:
                               NotACheckpointError, UnreadableFileError, MalformedConfigError,
                               ConfigValueError, ConfigMismatchError, MissingIndexError,
                               UnsupportedSchemaError, MalformedShardError, TruncatedShardError,
                               MissingTensorError, DtypeMismatchError, ShapeMismatchError,
                               NanScaleError, ZeroScaleError, TensorValueError; the message names
                               the file, the tensor or the config key
  An implausible checkpoint value (verify.checkpoint.CheckpointWarning) prints one line
  `verify <command>: warning: <message>` on stderr and does not change the exit status.
     (verify.errors defines the first three; verify.checkpoint the checkpoint errors.)
130  interrupted (Ctrl-C): one line; a `model` sweep with --report-dir names the command that
     resumes it
Any other exception is a bug: its traceback is printed and the status is 1. `--debug` (before
or after the command) prints the traceback of the errors above too, then their line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from verify.errors import CliError, UsageError, one_line

__all__ = ["COMMANDS", "build_parser", "main"]

PROG = "python -m verify"

# command -> (module, add-arguments function, run function, help)
COMMANDS = {
    "demo": ("verify.demo", "add_demo_arguments", "cli_demo",
             "emulator self-check on embedded data (rich table; exit 1 on any failure)"),
    "lint": ("verify.checkpoint.lint", "add_lint_arguments", "cli_lint", "lint a checkpoint directory"),
    "fixture": ("verify.checkpoint.writer", "add_fixture_arguments", "cli_fixture", "write a fixture checkpoint"),
    "layer": ("verify.layer_report", "add_layer_arguments", "cli_layer",
              "reference layer, stage by stage: emulated NVFP4 vs high precision (rich table, JSON)"),
    "model": ("verify.sweep", "add_model_arguments", "cli_model",
              "streaming sweep over every layer (and MTP block) the checkpoint holds: one layer at a time, "
              "resumable with --report-dir, many GPUs under torchrun; JSON + HTML report"),
    "report": ("verify.report.cli", "add_report_arguments", "cli_report",
               "re-render a model sweep's report (rich summary, HTML) from its JSON"),
    "accumulator": ("verify.accumulator", "add_accumulator_arguments", "cli_accumulator",
                    "measure each GEMM path's accumulator bits and rounding; exit 1 if the declared u_acc is looser"),
    "selftest": ("verify.selftest.cli", "add_selftest_arguments", "cli_selftest",
                 "inject one known bug class at a time into a backend; every one must fail its own stage"),
    "backends": ("verify.backends.cli", "add_backends_arguments", "cli_backends",
                 "list the backends (built-in, entry points, module:attr): origin, version, and each op served here"),
}
DEBUG_HELP = "On a usage or input error, print the traceback too. Default: %(default)r."


class _Parser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError (one line from main) instead of printing the usage."""

    def error(self, message: str):
        command = self.prog[len(PROG):].strip() or None
        raise UsageError(f"{message}; see {self.prog} --help", command=command)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="\n".join(__doc__.splitlines()[5:]))
    parser.add_argument("--debug", action="store_true", default=False, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add_args, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        # SUPPRESS: a subcommand's default must not overwrite a top-level --debug
        # (its help cannot show %(default)r: a suppressed default is not a value, and --help would crash)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="On a usage or input error, print the traceback too. Default: False.")
        try:
            getattr(importlib.import_module(module), add_args)(p)
        except (ImportError, AttributeError) as exc:  # a command whose module is absent stays listed
            p.set_defaults(unavailable=f"{name}: not available in this checkout ({exc})")
        _apply_env_defaults(p)
    return parser


def _apply_env_defaults(p: argparse.ArgumentParser) -> None:
    """The NVFP4V_ variable of each option in config.ENV_OPTIONS becomes that option's default (and
    its --help shows it), as pytest's addoption defaults do: the command line still wins."""
    from verify.config import ENV_OPTIONS, env_default  # noqa: PLC0415

    for action in p._actions:  # noqa: SLF001 - argparse has no public accessor for an option's action
        for option, var in ENV_OPTIONS.items():
            if option in action.option_strings and (value := env_default(var, None)) is not None:
                # argparse would run the option's `type` on a string default itself and blame the command
                # line; the value is checked in _dispatch instead, naming the variable it came from
                action.default = _FromEnv(value, f"NVFP4V_{var}", option, action.type)


class _FromEnv:
    """An option's default taken from an NVFP4V_ variable, converted by the option's `type` only when the
    command runs (_dispatch), so a bad value is a one-line error naming the variable."""

    def __init__(self, value: str, var: str, option: str, convert) -> None:
        self.value, self.var, self.option, self.convert = value, var, option, convert

    def __repr__(self) -> str:  # --help: "Default: 'sm90'"
        return repr(self.value)

    def resolve(self):
        if self.convert is None:
            return self.value
        try:
            return self.convert(self.value)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise UsageError(f"{self.option} {self.value}: invalid value from {self.var} ({e})",
                             argument=self.option) from None


def _dispatch(args: argparse.Namespace) -> int:
    for name, value in vars(args).items():
        if isinstance(value, _FromEnv):
            setattr(args, name, value.resolve())
    if getattr(args, "unavailable", None):
        raise UsageError(args.unavailable)
    if getattr(args, "device", "auto") != "auto":  # every command's --device, before any work
        from verify.config import check_device

        check_device(args.device)
    from verify.config import configure_torch_threads  # noqa: PLC0415

    args.threads_note = configure_torch_threads()
    module, _, run, _ = COMMANDS[args.command]
    return int(getattr(importlib.import_module(module), run)(args))


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (see the module docstring)."""
    from verify.checkpoint import CheckpointError, checkpoint_warnings_as_lines

    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.command is None:  # no command: the help (a usage error, so exit 2)
            parser.print_help()
            return 2
        command = args.command
        if extra:  # argparse's own message would not name the command
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}; see {PROG} {command} --help")
        with checkpoint_warnings_as_lines(command):
            return _dispatch(args)
    except (CliError, CheckpointError) as exc:
        if "--debug" in argv:  # also when argparse failed before it could parse --debug
            traceback.print_exc()
        print(one_line(exc, command or getattr(exc, "command", None)), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (a sweep's says how to resume), status 130
        if "--debug" in argv:
            traceback.print_exc()
        where = f"verify {command}" if command else "verify"
        print(f"{where}: interrupted" + (f": {' '.join(str(exc).split())}" if str(exc) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
