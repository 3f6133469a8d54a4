"""Backends: the protocol (boundary types), the registry, and the adapters (emulator, sm90, sm100).

Only the adapters in this package import kernels/; everything else in verify/ reaches a backend
through the protocol and the registry.
"""

from verify.backends.emulator import EmulatorBackend, run_moe_block
from verify.backends.protocol import FORWARD_OPS, Backend, Dispatched, Op, QuantizedAct, RoutingOut
from verify.backends.registry import get_backend, registered_backend_names

__all__ = ["Op", "QuantizedAct", "Dispatched", "RoutingOut", "Backend", "FORWARD_OPS", "EmulatorBackend",
           "run_moe_block", "get_backend", "registered_backend_names"]
