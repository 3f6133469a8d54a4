"""The one place the sm90 launchers read their environment (no triton import here)."""

from __future__ import annotations

import os

__all__ = ["triton_interpreting"]


def triton_interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU tests): kernels run on CPU tensors, bf16 dot operands are
    widened first and the inline-PTX decode is replaced by its portable form."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
