"""Stage metrics (DESIGN "Verdicts"): cosine, calc_diff, SQNR dB, rel-L2, max abs/rel, bit-exact fraction.

All computed in float64 from `got` against `ref`; NaN/Inf counted, not hidden.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["stage_metrics", "calc_diff"]


def calc_diff(x: Tensor, y: Tensor) -> float:
    """DeepGEMM's calc_diff: 1 - 2 <x, y> / (<x, x> + <y, y>) (0 for identical tensors)."""
    x, y = x.double(), y.double()
    denom = float((x * x + y * y).sum())
    return 0.0 if denom == 0 else 1.0 - 2.0 * float((x * y).sum()) / denom


def stage_metrics(got: Tensor, ref: Tensor) -> dict[str, float]:
    """Metrics of `got` against `ref` (same shape). Non-finite elements are excluded from
    the norms and counted in nan_count / inf_count."""
    if got.shape != ref.shape:
        raise ValueError(f"got {tuple(got.shape)} and ref {tuple(ref.shape)} must have the same shape")
    g, r = got.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(g) & torch.isfinite(r)
    gf, rf = g[finite], r[finite]
    err = gf - rf
    sig = float((rf * rf).sum())
    noise = float((err * err).sum())
    norm_g, norm_r = float(gf.norm()), float(rf.norm())
    return {
        "cosine": float((gf * rf).sum()) / (norm_g * norm_r) if norm_g and norm_r else (1.0 if norm_g == norm_r else 0.0),
        "calc_diff": calc_diff(gf, rf),
        "sqnr_db": math.inf if noise == 0 else (10 * math.log10(sig / noise) if sig else -math.inf),
        "rel_l2": math.sqrt(noise / sig) if sig else (0.0 if noise == 0 else math.inf),
        "max_abs": float(err.abs().max()) if err.numel() else 0.0,
        "max_rel": float((err.abs() / rf.abs().clamp_min(1e-30)).max()) if err.numel() else 0.0,
        "frac_bit_exact": float((got.detach().cpu() == ref.detach().to(got.dtype).cpu()).double().mean()) if got.numel() else 1.0,
        "nan_count": int(torch.isnan(g).sum()),
        "inf_count": int(torch.isinf(g).sum()),
    }
