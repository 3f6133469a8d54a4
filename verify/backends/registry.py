"""The backend registry: the one list of backends every entry point derives from."""

from __future__ import annotations

import torch

from verify.backends.protocol import Backend

__all__ = ["registered_backend_names", "get_backend"]


def registered_backend_names() -> tuple[str, ...]:
    return ("emulator", "sm90", "sm100")


def get_backend(name: str, device: torch.device | None = None) -> Backend:
    """The named backend; "auto" picks sm100 on a Blackwell GPU, sm90 on Hopper, else the emulator.
    Production backends import their kernels (and triton / cutlass) only here, lazily."""
    if name == "auto":
        if torch.cuda.is_available():
            major, _ = torch.cuda.get_device_capability(device)
            name = {10: "sm100", 9: "sm90"}.get(major, "emulator")
        else:
            name = "emulator"
    if name == "emulator":
        from verify.backends.emulator import EmulatorBackend  # noqa: PLC0415

        return EmulatorBackend()
    if name == "sm90":
        from verify.backends.sm90 import Sm90Adapter  # noqa: PLC0415 (lazy: needs triton)

        return Sm90Adapter()
    if name == "sm100":
        from verify.backends.sm100 import Sm100Adapter  # noqa: PLC0415 (lazy: needs cutlass)

        return Sm100Adapter()
    raise ValueError(f"backend={name!r}: expected 'auto' or one of {registered_backend_names()}")
