"""Defect checks on loaded weights: NaN scale bytes and bad global scales (`scale_defects`).

These read tensor values, so they run after a layer is loaded; the loader raises the first as
a NanScaleError, lint reports each as a finding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from verify.checkpoint.weights import Fp8BlockLinear, Linear, Mxfp4Linear, Nvfp4Linear

__all__ = ["scale_defects"]


def _named(module: str, role: str, bad: Tensor) -> str:
    """The tensor name of the first bad element: an expert stack's `*` becomes that expert's index."""
    if ".*." in module and bad.dim() >= 1:
        e = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0])
        module = module.replace(".*.", f".{e}.")
    return f"{module}.{role}"


def scale_defects(lin: Linear) -> list[tuple[str, str]]:
    """(tensor, message) for NaN scale bytes and bad global scales of one linear (or stack);
    for a stack the tensor names the first defective expert and the message counts all."""
    out: list[tuple[str, str]] = []
    m = lin.module
    if isinstance(lin, Nvfp4Linear):
        b = lin.weight_scale_e4m3.view(torch.uint8)
        bad = (b & 0x7F) == 0x7F
        if bool(bad.any()):
            out.append((_named(m, "weight_scale", bad),
                        f"{int(bad.sum())} NaN E4M3 scale bytes (0x7F/0xFF) of {b.numel()}"))
        for role, t in (("weight_scale_2", lin.weight_scale_2_f32), ("input_scale", lin.input_scale_f32)):
            bad = ~(torch.isfinite(t) & (t > 0))
            if bool(bad.any()):
                out.append((_named(m, role, bad), f"{int(bad.sum())} of {t.numel()} values are zero, negative, NaN "
                                                  f"or Inf (first {float(t[bad].flatten()[0])})"))
    elif isinstance(lin, (Mxfp4Linear, Fp8BlockLinear)) and getattr(lin, "scale_ue8m0", None) is not None:
        b = lin.scale_ue8m0.view(torch.uint8)
        bad = b == 0xFF
        if bool(bad.any()):
            out.append((_named(m, "scale", bad), f"{int(bad.sum())} NaN E8M0 scale bytes (0xFF) of {b.numel()}"))
    elif isinstance(lin, Fp8BlockLinear):
        t = lin.scale_inv_f32
        bad = ~(torch.isfinite(t) & (t > 0))
        if bool(bad.any()):
            out.append((_named(m, "weight_scale_inv", bad), f"{int(bad.sum())} of {t.numel()} block scales are zero, "
                                                            "negative, NaN or Inf"))
    return out
