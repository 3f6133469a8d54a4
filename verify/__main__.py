"""`python -m verify <command>`: demo (emulator self-check), lint, fixture, layer, model.

Each command's arguments and body live in its own module; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, add-arguments function, run function, help)
COMMANDS = {
    "demo": ("verify.selfcheck", "add_demo_arguments", "cli_demo",
             "emulator self-check on embedded data (rich table; exit 1 on any failure)"),
    "lint": ("verify.lint", "add_lint_arguments", "cli_lint", "lint a checkpoint directory"),
    "fixture": ("verify.fixtures", "add_fixture_arguments", "cli_fixture", "write a fixture checkpoint"),
    "layer": ("verify.layer_report", "add_layer_arguments", "cli_layer",
              "reference layer, stage by stage: emulated NVFP4 vs high precision (rich table, JSON)"),
    "model": ("verify.layer_report", "add_model_arguments", "cli_model",
              "every layer of a checkpoint (the layer command over all layers, with a progress bar)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m verify", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add_args, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            getattr(importlib.import_module(module), add_args)(p)
        except (ImportError, AttributeError) as exc:  # a command whose module is absent stays listed
            p.set_defaults(unavailable=f"{name}: not available in this checkout ({exc})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    if getattr(args, "unavailable", None):
        print(args.unavailable, file=sys.stderr)
        return 2
    module, _, run, _ = COMMANDS[args.command]
    return int(getattr(importlib.import_module(module), run)(args))


if __name__ == "__main__":
    sys.exit(main())
