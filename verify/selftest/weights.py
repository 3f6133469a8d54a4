"""Bugs in the checkpoint tensors on their way into `prepare_*` (NVFP4_FACTS 6: layouts, packing, global
scales, gate/up), and the layer data some of them need to show (distinct gate/up weight_scale_2, tied
router rows). Each function takes a loader linear / expert stack / layer and returns a corrupted copy;
anything it does not apply to comes back unchanged."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from references import layouts as ref_layouts
from references.nvfp4 import pack_e2m1x2_low_first, unpack_e2m1x2_low_first
from verify.checkpoint import GatedMlp, Nvfp4Linear

__all__ = ["transpose_scales", "n_major", "global_scale_by", "mlp", "gate_up_halved", "k_vs_n_packing",
           "one_weight_scale_2", "wrong_experts_scales", "distinct_gate_up_scales", "tied_router"]


def transpose_scales(lin):
    """The block-scale matrix laid out transposed ([K/16, N] bytes read back as [N, K/16])."""
    if not isinstance(lin, Nvfp4Linear):
        return lin
    sf = lin.weight_scale_e4m3
    return dataclasses.replace(lin, weight_scale_e4m3=sf.transpose(-1, -2).contiguous().reshape(sf.shape))


def n_major(lin):
    """An N-major weight passed as K-major: the [N, K] codes stored transposed, read back row-major."""
    if not isinstance(lin, Nvfp4Linear):
        return lin
    codes = unpack_e2m1x2_low_first(lin.weight_u8)
    n, k = codes.shape[-2:]
    bad = codes.transpose(-1, -2).contiguous().reshape(codes.shape)
    return dataclasses.replace(lin, weight_u8=pack_e2m1x2_low_first(bad).reshape(lin.weight_u8.shape))


def global_scale_by(fn: Callable):
    def apply(lin):
        if not isinstance(lin, Nvfp4Linear):
            return lin
        return dataclasses.replace(lin, weight_scale_2_f32=fn(lin.weight_scale_2_f32))
    return apply


def mlp(experts: GatedMlp, fn) -> GatedMlp:
    return GatedMlp(fn(experts.w1), fn(experts.w3), fn(experts.w2))


def gate_up_halved(experts: GatedMlp) -> GatedMlp:
    """w1 | w3 interleaved per expert in groups of G/2 rows and split again in groups of G."""
    w1, w3 = experts.w1, experts.w3
    if not isinstance(w1, Nvfp4Linear):
        return experts
    n = w1.weight_u8.shape[-2]
    g = max(2, n // 4)

    def split(a, b):
        out = [ref_layouts.deinterleave_gate_up(ref_layouts.interleave_gate_up(a[e], b[e], granularity=g // 2),
                                                granularity=g) for e in range(a.shape[0])]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    p1, p3 = split(w1.weight_u8, w3.weight_u8)
    s1, s3 = split(w1.weight_scale_e4m3.view(torch.uint8), w3.weight_scale_e4m3.view(torch.uint8))
    e4 = w1.weight_scale_e4m3.dtype
    return GatedMlp(dataclasses.replace(w1, weight_u8=p1, weight_scale_e4m3=s1.view(e4)),
                    dataclasses.replace(w3, weight_u8=p3, weight_scale_e4m3=s3.view(e4)), experts.w2)


def k_vs_n_packing(lin):
    """The codes packed two per byte along N instead of K ([N, K] -> pairs of rows), stored as [N, K/2]."""
    if not isinstance(lin, Nvfp4Linear):
        return lin
    codes = unpack_e2m1x2_low_first(lin.weight_u8)
    along_n = pack_e2m1x2_low_first(codes.transpose(-1, -2).contiguous())  # [..., K, N/2]
    return dataclasses.replace(lin, weight_u8=along_n.reshape(lin.weight_u8.shape))


def one_weight_scale_2(experts: GatedMlp) -> GatedMlp:
    """Gate and up with different weight_scale_2, the gate's used for both (vLLM/SGLang did this)."""
    w1, w3 = experts.w1, experts.w3
    if not isinstance(w1, Nvfp4Linear) or not isinstance(w3, Nvfp4Linear):
        return experts
    return GatedMlp(w1, dataclasses.replace(w3, weight_scale_2_f32=w1.weight_scale_2_f32.clone()), experts.w2)


def wrong_experts_scales(lin):
    """An expert stack whose expert e reads expert (e + 1) mod E's scales: block scales and weight_scale_2
    (a pointer computed from the wrong expert index in a grouped GEMM's scale load)."""
    if not isinstance(lin, Nvfp4Linear) or lin.weight_scale_e4m3.dim() < 3:
        return lin
    ws2 = lin.weight_scale_2_f32
    return dataclasses.replace(lin, weight_scale_e4m3=lin.weight_scale_e4m3.roll(-1, 0),
                               weight_scale_2_f32=ws2.roll(-1, 0) if ws2.dim() else ws2)


def distinct_gate_up_scales(layer):
    """w3's weight_scale_2 doubled (its block scales unchanged), so gate and up differ in weight_scale_2 as
    in exports that do not force them equal (the fixture does, like DeepSeek-V4's official export)."""
    ex = layer.experts
    if ex is None or not isinstance(ex.w3, Nvfp4Linear):
        return layer
    w3 = dataclasses.replace(ex.w3, weight_scale_2_f32=ex.w3.weight_scale_2_f32 * 2.0)
    return dataclasses.replace(layer, experts=GatedMlp(ex.w1, w3, ex.w2))


def tied_router(layer):
    """Two experts with identical gate rows and biases: exact ties decide some tokens' k-th slot."""
    r = layer.router
    if r is None or r.tid2eid_i64 is not None or r.gate_bias_f32 is None:
        return layer
    g, b = r.gate_weight_bf16.clone(), r.gate_bias_f32.clone()
    e = g.shape[0] // 2
    g[e + 1], b[e + 1] = g[e], b[e]
    return dataclasses.replace(layer, router=dataclasses.replace(r, gate_weight_bf16=g, gate_bias_f32=b))
