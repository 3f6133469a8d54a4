"""Provenance (issue 26 item 6): which kernels ran for each stage, built for which architecture, and a
failed verdict for a stage whose kernel was not built for the device it ran on.

A backend says what it launched through one optional method, Backend.launch_recorder() (base default:
None, so its stages' provenance reads "unknown"): a context manager that yields a list and appends a
KernelBuild to it for every kernel the backend launches inside the block. The harness opens one around
each stage's verdicts (verify.verdicts.layer.judge_layer, `provenance=` sink), so a stage's list is what
its checks launched: the kernel (name), the architecture its code was built for, and how it was built.

    how          arch                                    what it means
    "reference"  "reference"                             the emulator: references/ in torch, no kernel
    "triton"     "sm_90a", "sm_100a", ...                Triton compiled the kernel to a cubin for that target
                                                         (ptxas with sm_arch_from_capability(target.arch))
    "cute-dsl"   "sm_100a"                               a CuTe DSL cubin compiled for CUTE_DSL_ARCH (checked
                                                         equal to the kernel's CompileKey.arch at compile time)
    "cubin"      "sm_90a", "sm_90", ...                  an nvcc/other cubin of that SASS architecture
    "ptx-jit"    "compute_90", ...                       the driver JIT-compiled PTX of that virtual arch
    "torch"      torch's arch list entry, or compute_XY  torch's own CUDA kernels (its build's arch list)

A build matches a device of compute capability X.Y ("sm_XY") when (arch_mismatch):
- "reference", an unknown arch (None): always (reported, never failed: unknown is not wrong);
- an arch-specific target "sm_XYa" (tcgen05 / wgmma code): exactly sm_XY (these are not forward
  compatible: an sm_90a cubin does not run on sm_100, an sm_100a kernel not on sm_90);
- a plain "sm_XY" cubin: the same major, a minor <= the device's (binary compatibility within a major);
- PTX JIT ("ptx-jit", or an arch "compute_XY"): never: the code was not built for this device, the driver
  compiled it at load time (the class of bug where a PTX-JIT'd kernel silently computed wrong results);
- on a CPU device nothing is checked (no CUDA kernel runs there).
A stage with a mismatching build gets a failed "provenance" verdict naming the kernel and both archs
(stage_mismatches; verify.run adds the verdicts).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

__all__ = ["KernelBuild", "REFERENCE_BUILD", "device_arch", "arch_mismatch", "static_recorder", "stage_provenance",
           "stage_mismatches", "provenance_document", "triton_launch_recorder", "torch_build",
           "provenance_rows", "provenance_lines"]

REFERENCE_BUILD_ARCH = "reference"
_ARCH = re.compile(r"^(sm|compute)_(\d+)(\d)([af]?)$")


@dataclass(frozen=True)
class KernelBuild:
    """One kernel a stage launched: kernel (its name), arch (the architecture its code was built for,
    e.g. "sm_90a"; "reference" for the emulator; None unknown), how ("reference", "triton", "cute-dsl",
    "cubin", "ptx-jit", "torch")."""

    kernel: str
    arch: str | None
    how: str

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "arch": self.arch, "how": self.how}


REFERENCE_BUILD = KernelBuild("references (emulator, torch)", REFERENCE_BUILD_ARCH, "reference")


def device_arch(device: torch.device | str) -> str | None:
    """"sm_XY" of a CUDA device's compute capability X.Y; None for a CPU (or any non-CUDA) device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def arch_mismatch(build: KernelBuild, dev_arch: str | None) -> str | None:
    """Why `build` was not built for a device of `dev_arch` ("sm_XY"), or None when it was (module
    docstring: the rules)."""
    if dev_arch is None or build.arch is None or build.arch == REFERENCE_BUILD_ARCH:
        return None
    dev = _ARCH.match(dev_arch)
    got = _ARCH.match(build.arch)
    if dev is None:
        return None
    if build.how == "ptx-jit" or (got is not None and got.group(1) == "compute"):
        return (f"{build.kernel} was JIT-compiled from PTX ({build.arch}) on this {dev_arch} device: no code "
                f"built for {dev_arch}")
    if got is None:
        return f"{build.kernel}: its build arch {build.arch!r} is not an sm_XY architecture (device {dev_arch})"
    d_major, d_minor = int(dev.group(2)), int(dev.group(3))
    b_major, b_minor = int(got.group(2)), int(got.group(3))
    if got.group(4):  # sm_90a / sm_100a / sm_100f: arch-specific code, this exact major.minor only
        ok = (b_major, b_minor) == (d_major, d_minor) if got.group(4) == "a" else \
            b_major == d_major and b_minor <= d_minor
    else:
        ok = b_major == d_major and b_minor <= d_minor
    if ok:
        return None
    return f"{build.kernel} was built for {build.arch} ({build.how}) but runs on a {dev_arch} device"


# ----------------------------------------------------------------------------- recorders


@contextlib.contextmanager
def static_recorder(*builds: KernelBuild):
    """A launch recorder for a backend whose every op is the same code (the emulator): yields a list that
    holds `builds` whenever anything ran inside the block."""
    launched: list[KernelBuild] = []
    yield launched
    launched.extend(builds)


def _sm_arch_of_triton_target(arch: int | str) -> str:
    """Triton's NVIDIA cubin target for a capability (its backend's sm_arch_from_capability: the "a" suffix
    from sm_90 on)."""
    cap = int(arch)
    return f"sm_{cap}{'a' if cap >= 90 else ''}"


@contextlib.contextmanager
def triton_launch_recorder():
    """Records every Triton kernel launched inside the block (triton.knobs.runtime.launch_enter_hook): its
    name and the cubin target of the device it was compiled for (Triton compiles at first launch for the
    current device's target, or TRITON_OVERRIDE_ARCH's). Imports triton lazily (backends that run Triton
    kernels only). Without triton installed nothing can launch: the block records no kernel."""
    launched: list[KernelBuild] = []
    try:
        import triton  # noqa: PLC0415
        from triton.runtime import driver  # noqa: PLC0415
    except ImportError:  # a machine without triton: the backend serves nothing here (its not-served reasons say so)
        yield launched
        return
    seen: set[str] = set()
    knobs = triton.knobs.runtime
    if knobs.interpret:  # TRITON_INTERPRET: no cubin at all, the kernels run in Python on the host
        yield launched
        launched.append(KernelBuild("triton interpreter (TRITON_INTERPRET=1)", None, "interpreter"))
        return
    override = knobs.override_arch

    def hook(metadata) -> None:
        name = metadata.get()["name"] if hasattr(metadata, "get") else getattr(metadata, "name", "?")
        if name in seen:
            return
        seen.add(name)
        arch = override if override else _sm_arch_of_triton_target(driver.active.get_current_target().arch)
        launched.append(KernelBuild(f"triton:{name}", arch, "triton"))

    knobs.launch_enter_hook.add(hook)
    try:
        yield launched
    finally:
        knobs.launch_enter_hook.remove(hook)


def torch_build(kernel: str, device: torch.device | str) -> KernelBuild:
    """torch's own CUDA kernels (a backend's torch ops: routing, permutations) on `device`: built for the
    device when torch's arch list has its sm_XY (or an sm of the same major and lower minor), else run from
    the PTX of the list's compute_XY entry (JIT)."""
    dev = device_arch(device)
    archs = torch.cuda.get_arch_list() if dev is not None else []
    if dev is None:
        return KernelBuild(kernel, None, "torch")
    if dev in archs:
        return KernelBuild(kernel, dev, "torch")
    compat = [a for a in archs if a.startswith("sm_") and arch_mismatch(KernelBuild(kernel, a, "torch"), dev) is None]
    if compat:
        return KernelBuild(kernel, compat[-1], "torch")
    ptx = [a for a in archs if a.startswith("compute_")]
    return KernelBuild(kernel, ptx[-1] if ptx else None, "ptx-jit" if ptx else "torch")


# ----------------------------------------------------------------------------- per stage


def stage_provenance(backend) -> contextlib.AbstractContextManager:
    """The backend's launch recorder for one stage, or a null one yielding None (unknown)."""
    make = getattr(backend, "launch_recorder", None)
    recorder = make() if callable(make) else None
    return recorder if recorder is not None else contextlib.nullcontext(None)


def _unique(builds) -> list[KernelBuild]:
    return list(dict.fromkeys(builds))


def stage_mismatches(provenance: dict[str, list[KernelBuild] | None],
                     device: torch.device | str) -> list[tuple[str, str, dict]]:
    """(stage, message, metrics) per stage with a kernel not built for `device`, the message naming the kernel
    and both architectures (verify.run makes each a failed "provenance" verdict); nothing for stages whose
    builds match or are unknown."""
    dev = device_arch(device)
    out = []
    for stage, builds in provenance.items():
        problems = [m for b in _unique(builds or []) if (m := arch_mismatch(b, dev))]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            out.append((stage, f"{stage} provenance: {problems[0]}{more}",
                        {"device_arch": dev, "mismatches": len(problems)}))
    return out


def provenance_document(provenance: dict[str, list[KernelBuild] | None], device: torch.device | str) -> dict:
    """The report block: {"device_arch": "sm_90" | None, "stages": {stage: [build dicts] | "unknown"}}."""
    return {"device_arch": device_arch(device),
            "stages": {s: "unknown" if b is None else [x.as_dict() for x in _unique(b)]
                       for s, b in provenance.items()}}


# ----------------------------------------------------------------------------- rendering


def _build_text(b: dict) -> str:
    if b["how"] == "reference":
        return f"{b['kernel']} (no kernel: reference)"
    return f"{b['kernel']} ({b['arch'] or 'arch unknown'}, {b['how']})"


def provenance_rows(docs: list[dict]) -> tuple[list[str], list[tuple[str, str]]]:
    """(device archs, [(stages, kernels)]) of one or more provenance blocks (units of a report), stages with the
    same kernels on one row, in first-seen order; "unknown" where the backend does not say."""
    archs = list(dict.fromkeys(str(d.get("device_arch") or "cpu") for d in docs))
    per_stage: dict[str, list[str]] = {}
    for d in docs:
        for stage, builds in d.get("stages", {}).items():
            texts = ["unknown"] if builds == "unknown" else [_build_text(b) for b in builds] or ["no kernel launched"]
            per_stage[stage] = list(dict.fromkeys(per_stage.get(stage, []) + texts))
    groups: dict[str, list[str]] = {}
    for stage, texts in per_stage.items():
        groups.setdefault("; ".join(texts), []).append(stage)
    return archs, [(", ".join(stages), kernels) for kernels, stages in groups.items()]


def provenance_lines(docs: list[dict]) -> list[str]:
    """Terminal lines: "kernels on sm_90: <stages>: <kernel (arch, how)>; ...", one per group of stages."""
    docs = [d for d in docs if d]
    if not docs:
        return []
    archs, rows = provenance_rows(docs)
    return [f"kernels on {'/'.join(archs)}: {stages}: {kernels}" for stages, kernels in rows]
