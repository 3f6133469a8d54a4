"""The backend registry: the one list of backends that every entry point derives from (the CLI's
and pytest's `--backend`, `auto`, `python -m verify backends`, RunConfig's validation).

A backend spec (what `--backend` takes) is one of:
- a registered name: the built-ins (BUILTINS: emulator, sm90, sm100, torch), the shipped adapters of other
  people's kernels (ADAPTERS: humming, vllm, flashinfer, sgl-kernel; verify/backends/adapters/), then the entry
  points of the group `nvfp4_verify.backends` of the installed distributions (a built-in's name wins);
- "auto": the best of ours for the device (auto_backend_name): sm100 on compute capability 10,
  sm90 on 9, else (another GPU, a CPU device, no CUDA) the emulator;
- "module:attr": an importable module and an attribute of it that is a Backend subclass, a factory
  returning a backend, or a backend instance.

A class or factory is called with no arguments, or with `device=` (a torch.device) when it takes a
keyword `device` and the caller names one (every entry point does: the device the verdicts, tests or
probes run on), so a backend whose declarations depend on the device (torch's FP8 accumulator: the
tensor cores' on CUDA, float32 on the CPU) is made for the device it runs on.

A registered entry is a "module:attr" string too, imported only when the backend is asked for:
the registry never imports sm90's triton or sm100's cutlass (nor any outside package) to list
names. What a spec resolves to must be a verify.backends.Backend or satisfy BackendProtocol.

Errors name the spec on one line (verify.errors.UsageError, exit 2 in the CLI): an unknown name
(listing the known ones), a module that cannot be imported, a missing attribute, an object that is
not a backend. A built-in whose own dependencies are missing raises their ImportError (the CLI
reports it as "backend unavailable").
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import sys
from dataclasses import dataclass

import torch

from verify.backends.base import Backend
from verify.backends.protocol import BackendProtocol
from verify.errors import UsageError

__all__ = ["backend_spec_problem", "BUILTINS", "ADAPTERS", "ENTRY_POINT_GROUP", "AUTO", "BACKEND_HELP", "BackendEntry",
           "registered_backends", "registered_backend_names", "backend_specs_for", "backend_spec", "backend_arg",
           "auto_backend_name", "resolve_backend_spec", "get_backend", "module_version"]

AUTO = "auto"
ENTRY_POINT_GROUP = "nvfp4_verify.backends"
# name -> (where it lives, the package its kernels need: reported with its version)
BUILTINS: dict[str, tuple[str, str | None]] = {
    "emulator": ("verify.backends.emulator:EmulatorBackend", None),
    "sm90": ("verify.backends.sm90:Sm90Adapter", "triton"),
    "sm100": ("verify.backends.sm100:Sm100Adapter", "nvidia-cutlass-dsl"),
    "torch": ("verify.backends.adapters.torch_ops:TorchBackend", "torch"),
}
# adapters of other people's kernels shipped with the project (verify/backends/adapters/, each an optional extra
# that says why it cannot run where its package or device is absent); listed after ours, never picked by auto
ADAPTERS: dict[str, tuple[str, str | None]] = {
    "humming": ("verify.backends.adapters.humming:HummingBackend", "humming-kernels"),
    "vllm": ("verify.backends.adapters.vllm:VllmBackend", "vllm"),
    "flashinfer": ("verify.backends.adapters.flashinfer:FlashinferBackend", "flashinfer-python"),
    "sgl-kernel": ("verify.backends.adapters.sgl_kernel:SglKernelBackend", "sgl-kernel"),
}
_PROJECT = "nvfp4-verify"
# the help text of every --backend (static: building a parser never scans the installed packages)
BACKEND_HELP = ("a registered name (`python -m verify backends` lists them), 'auto' (the best of ours for the "
                "device), or module:attr (a verify.backends.Backend subclass or a factory returning one)")


@dataclass(frozen=True)
class BackendEntry:
    """How a backend spec is found. target: "module:attr"; origin: "built-in", "entry point <dist>"
    or "module:attr"; version: of what provides it (nvfp4-verify and the kernels' package for a
    built-in, the distribution of an entry point, the module's distribution or __version__ for a
    module:attr), "" when unknown."""

    name: str
    target: str
    origin: str
    version: str


def registered_backends() -> dict[str, BackendEntry]:
    """The built-ins, then every entry point of ENTRY_POINT_GROUP (read on each call, never cached,
    so a package installed since is seen), in that order."""
    out = {name: BackendEntry(name, target, "built-in", _builtin_version(requires))
           for name, (target, requires) in BUILTINS.items()}
    out.update({name: BackendEntry(name, target, "shipped adapter", _builtin_version(requires))
                for name, (target, requires) in ADAPTERS.items()})
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in out or ep.name == AUTO:
            continue  # a built-in's or shipped adapter's name (and "auto") cannot be taken over by a package
        dist = ep.dist
        out[ep.name] = BackendEntry(ep.name, ep.value, f"entry point {dist.name if dist else '?'}",
                                    dist.version if dist else "")
    return out


def registered_backend_names() -> tuple[str, ...]:
    return tuple(registered_backends())


def backend_specs_for(option: str) -> tuple[str, ...]:
    """The backends a pytest run parametrizes its backend tests over for a --backend value: every registered
    name for "auto" (each skipping with its own reason where it cannot run), else that one spec (a registered
    name or module:attr)."""
    return registered_backend_names() if option == AUTO else (option,)


def backend_spec(text: str) -> str:
    """`text` when it is "auto", a registered name or of the form module:attr (imported later, by
    get_backend); else UsageError naming it and listing the known names."""
    why = backend_spec_problem(text)
    if why:
        raise UsageError(f"--backend {text}: {why}", argument="--backend")
    return text


def backend_arg(text: str) -> str:
    """backend_spec as argparse's `type=` of every --backend (CLI and pytest): argparse shows an
    ArgumentTypeError's own message ("argument --backend: invalid choice: 'x' (known backends: ...)")."""
    why = backend_spec_problem(text)
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def backend_spec_problem(text: str) -> str | None:
    if text == AUTO:
        return None
    if ":" in text:
        return _target_problem(text)
    names = registered_backend_names()
    if text in names:
        return None
    return (f"invalid choice: {text!r} (known backends: {AUTO}, {', '.join(names)}; or module:attr, a Backend "
            "subclass or a factory returning one)")


def auto_backend_name(device: torch.device | str | None = None) -> str:
    """The best of our backends for `device`: sm100 on compute capability 10.x, sm90 on 9.x, the
    emulator on any other GPU and on a CPU device. device None: this machine's current CUDA device
    if it has one, else the CPU."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return "emulator"
    if not torch.cuda.is_available():
        return "emulator"
    major, _ = torch.cuda.get_device_capability(device)
    return {10: "sm100", 9: "sm90"}.get(major, "emulator")


def resolve_backend_spec(spec: str, device: torch.device | str | None = None) -> BackendEntry:
    """The entry a spec names: "auto" resolved for `device`, a registered name, or a module:attr."""
    backend_spec(spec)
    if spec == AUTO:
        spec = auto_backend_name(device)
    registry = registered_backends()
    if spec in registry:
        return registry[spec]
    return BackendEntry(spec, spec, "module:attr", "")


def get_backend(spec: str, device: torch.device | str | None = None) -> Backend:
    """A new instance of the backend `spec` names (see the module docstring); device: where "auto"
    picks for (None: this machine). UsageError naming the spec for a spec that names no backend."""
    entry = resolve_backend_spec(spec, device)
    module_name, _, attr = entry.target.partition(":")
    where = f"--backend {spec}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if entry.origin in ("built-in", "shipped adapter"):
            raise  # one of ours without its dependencies: "backend unavailable" (verify.layer_report)
        via = f" (entry point {entry.target} of {entry.origin.removeprefix('entry point ')})" \
            if entry.origin.startswith("entry point") else ""
        raise UsageError(f"{where}: module {module_name!r} is not importable{via} ({type(e).__name__}: {e})",
                         argument="--backend") from None
    if not hasattr(module, attr):
        raise UsageError(f"{where}: module {module_name!r} has no attribute {attr!r}", argument="--backend")
    return _instantiate(getattr(module, attr), where, entry.target,
                        None if device is None else torch.device(device))


def _instantiate(obj: object, where: str, target: str, device: torch.device | None = None) -> Backend:
    """A backend from what module:attr holds: a backend (kept), a class or a factory (called with no
    arguments, or with device= when it takes that keyword and a device is named; what it returns must be
    a backend)."""
    if _is_backend(obj) and not inspect.isclass(obj):
        return obj
    if not callable(obj):
        raise UsageError(f"{where}: {target} is a {type(obj).__name__}, not a backend (expected a "
                         "verify.backends.Backend subclass or a factory returning one)", argument="--backend")
    made = obj(device=device) if device is not None and _takes_device(obj) else obj()
    if not _is_backend(made):
        missing = [m for m in _PROTOCOL_MEMBERS if not hasattr(made, m)]
        raise UsageError(f"{where}: {target}() returned a {type(made).__name__}, not a backend (not a "
                         f"verify.backends.Backend; lacks {', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''})", argument="--backend")
    return made


def _takes_device(obj: object) -> bool:
    """Whether a class or factory takes a keyword argument `device`."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # a builtin without a signature: called with no arguments
        return False
    p = params.get("device")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


_PROTOCOL_MEMBERS = ("name", "recipe", "u_acc", "unsupported_reason", "quantize", "dense_gemm", "moe_block")


def _is_backend(obj: object) -> bool:
    return isinstance(obj, Backend) or (not inspect.isclass(obj) and isinstance(obj, BackendProtocol))


def _target_problem(text: str) -> str | None:
    module_name, sep, attr = text.partition(":")
    if sep and attr.isidentifier() and module_name and all(p.isidentifier() for p in module_name.split(".")):
        return None
    return (f"not a backend spec {text!r} (expected a registered name, {AUTO!r}, or module:attr such as "
            "mypkg.kernels:MyBackend)")


def _builtin_version(requires: str | None) -> str:
    own = _dist_version(_PROJECT) or "(not installed)"
    if requires is None:
        return f"{_PROJECT} {own}"
    return f"{_PROJECT} {own}, {requires} {_dist_version(requires) or 'not installed'}"


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def module_version(module_name: str) -> str:
    """The version of the distribution holding `module_name`'s top-level package, else its __version__,
    else "" (for a module:attr backend's listing; imports nothing not already imported)."""
    top = module_name.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top, [])
    if dists:
        return f"{dists[0]} {_dist_version(dists[0])}".strip()
    mod = sys.modules.get(top)
    return str(getattr(mod, "__version__", "")) if mod is not None else ""
