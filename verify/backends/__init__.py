"""Backends: the protocol (boundary types), the `Backend` base class, the registry, and the
adapters (emulator, sm90, sm100).

- protocol.py: QuantizedAct, Fp8QuantizedAct, Dispatched, RoutingOut (the boundary tensors every backend speaks),
  BackendProtocol (the typing Protocol of a backend), FORWARD_OPS;
- base.py: `Backend`, the base class: every op raises NotImplementedError "not served: <name> has
  no <op>" and unsupported_reason says so, until a subclass overrides the op;
- registry.py: the one list of backends (built-ins, entry points of `nvfp4_verify.backends`, any
  module:attr), `auto`, get_backend;
- emulator.py (references/, every op, any device), sm90.py, sm100.py: the adapters. Only sm90.py and
  sm100.py import kernels/ (the import-rule test checks it); the registry imports them lazily.
- adapters/: other people's kernels behind the protocol, one module each (torch_ops.py: torch's scaled_mm
  and routing ops, registered as "torch"); they import neither references/ nor kernels/.
- cli.py: `python -m verify backends`, the registry as a table.
"""

from verify.backends.base import Backend
from verify.backends.emulator import EmulatorBackend, run_moe_block
from verify.backends.protocol import (FORWARD_OPS, WEIGHT_FORMATS, BackendProtocol, Dispatched, Fp8QuantizedAct,
                                      NumericsMode, Op, QuantizedAct, RoutingOut)
from verify.backends.registry import get_backend, registered_backend_names, registered_backends

__all__ = ["Op", "NumericsMode", "WEIGHT_FORMATS", "QuantizedAct", "Fp8QuantizedAct", "Dispatched", "RoutingOut", "Backend", "BackendProtocol",
           "FORWARD_OPS",
           "EmulatorBackend", "run_moe_block", "get_backend", "registered_backend_names", "registered_backends"]
