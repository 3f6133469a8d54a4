"""FP8 block-128 bugs (NVFP4_FACTS 5b, issue 23's planted bugs): E8M0 scale bytes read as numbers, the
block-scale grid transposed, the UE8M0 activation scale rounded down, the float32 promotion skipped (and
the data on which a skipped promotion shows)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from references.codecs import e4m3_bytes_to_f32, f32_to_e4m3_bytes, f32_to_ue8m0_bytes, ue8m0_bytes_to_f32
from references.fp8_act import FP8_ACT_GROUP, FP8_ACT_UE8M0, f32_to_e4m3_bytes_group_scaled, group_amax_f32_1x128
from references.fp8_weight import fp8_weight_from_v3_weight_scale_inv, fp8_weight_from_v4_e8m0_scale
from verify.backends import Fp8QuantizedAct
from verify.backends.emulator import fp8_act_scale_fmt
from verify.checkpoint import Fp8BlockLinear
from verify.reference_layer import LayerInputs, to_reference_weight

__all__ = ["e8m0_read_as_numbers", "fp8_scale_grid_transposed", "ue8m0_rounded_down", "UnpromotedFp8",
           "NARROW_ACC_BITS", "NARROW_DECLARED", "unpromoted", "fp8_swallowing"]


def e8m0_read_as_numbers(lin):
    """A V4 `.scale` (F8_E8M0 bytes) copied into float32 as numbers: byte b becomes the scale b, not 2^(b-127)."""
    if not isinstance(lin, Fp8BlockLinear) or lin.scale_ue8m0 is None:
        return lin
    return dataclasses.replace(lin, scale_ue8m0=None, scale_inv_f32=lin.scale_ue8m0.view(torch.uint8).to(torch.float32))


def fp8_scale_grid_transposed(lin):
    """The [ceil(N/128), ceil(K/128)] block-scale grid laid out transposed (read back row-major): invisible
    where the grid is one row or one column (the same bytes in the same order)."""
    if not isinstance(lin, Fp8BlockLinear):
        return lin
    field = "scale_ue8m0" if lin.scale_ue8m0 is not None else "scale_inv_f32"
    s = getattr(lin, field)
    return dataclasses.replace(lin, **{field: s.transpose(-1, -2).contiguous().reshape(s.shape)})


def ue8m0_rounded_down(a: Fp8QuantizedAct, x_bf16: torch.Tensor) -> Fp8QuantizedAct:
    """a (UE8M0 rule) with every group scale rounded DOWN to a power of two (2^floor(log2(amax/448))) instead
    of up, and its codes encoded with that scale (saturating at 448): other bytes wherever amax/448 is not a
    power of two."""
    if a.scale_rule != "ue8m0_ceil":
        return a
    m, k = x_bf16.shape
    pad = (-k) % FP8_ACT_GROUP
    xg = torch.nn.functional.pad(x_bf16.to(torch.float32), (0, pad)).view(m, (k + pad) // FP8_ACT_GROUP, FP8_ACT_GROUP)
    amax = group_amax_f32_1x128(xg, amax_nan=FP8_ACT_UE8M0.amax_nan)
    s = torch.clamp(amax, min=FP8_ACT_UE8M0.amax_floor_f32) / torch.tensor(448.0, device=amax.device)
    down = f32_to_ue8m0_bytes(s, rounding="floor")
    codes = f32_to_e4m3_bytes_group_scaled(xg, ue8m0_bytes_to_f32(down), encode_rule="divide").flatten(1)[:, :k]
    return Fp8QuantizedAct(codes.contiguous(), down, a.scale_rule)


@dataclass(frozen=True)
class UnpromotedFp8:
    """An FP8 block-128 linear for the promotion-skipped bug: the checkpoint linear (its references' weight and
    the activation scale rule its scales imply) and the wrapped backend's own operand."""

    weight: object
    scale_rule: str
    inner: object


NARROW_ACC_BITS = 14           # Hopper's FP8 wgmma accumulator (NVFP4_FACTS 5b), truncating
NARROW_DECLARED = (2.0**-13, 128)  # what the bugged backend declares: (fp8_u_acc, fp8_promotion_interval)


def unpromoted(lin, inner_prepared) -> UnpromotedFp8:
    w = (fp8_weight_from_v4_e8m0_scale(lin.weight_e4m3, lin.scale_ue8m0, module=lin.module)
         if lin.scale_ue8m0 is not None else
         fp8_weight_from_v3_weight_scale_inv(lin.weight_e4m3, lin.scale_inv_f32, module=lin.module))
    rule = {"ue8m0": "ue8m0_ceil", "f32": "f32"}[fp8_act_scale_fmt(to_reference_weight(lin))]
    return UnpromotedFp8(w, rule, inner_prepared)


def fp8_swallowing(layer, inputs: LayerInputs) -> tuple[object, LayerInputs]:
    """Data on which a skipped float32 promotion shows (the layer's first FP8 attention projection, wq_a or
    q_a_proj, K = 256 or more): its weight row 0 is 64 at k = 0 and 1.875 elsewhere (codes; every block scale
    set to block [0, 0]'s), the last token's x_attn is 256 at k = 0 and 1 elsewhere. Output (last token, 0):
    the first product is 2^14 block-scale units, every later one 1.875 (below the 14-bit accumulator's ulp of
    2 there), so a truncating accumulator drops them all when it never promotes (error 255 x 1.875 against a
    bound of about 330), and only group 0's 127 when it promotes every 128 (within the bound)."""
    name = next((n for n in ("wq_a", "q_a_proj") if isinstance(layer.attention.get(n), Fp8BlockLinear)), None)
    if name is None or layer.attention[name].weight_e4m3.shape[-1] < 2 * FP8_ACT_GROUP:
        return layer, inputs
    lin = layer.attention[name]
    w = e4m3_bytes_to_f32(lin.weight_e4m3.view(torch.uint8))
    w[0] = 1.875
    w[0, 0] = 64.0
    codes = f32_to_e4m3_bytes(w, saturate=True).view(torch.float8_e4m3fn)
    field = "scale_ue8m0" if lin.scale_ue8m0 is not None else "scale_inv_f32"
    s = getattr(lin, field)
    flat = s.view(torch.uint8) if s.dtype == torch.float8_e8m0fnu else s
    same = flat.reshape(-1)[:1].expand(flat.shape).clone()
    new = dataclasses.replace(lin, weight_e4m3=codes, **{field: same.view(s.dtype)})
    layer = dataclasses.replace(layer, attention={**layer.attention, name: new})
    x = inputs.x_attn_bf16.clone()
    x[-1] = 1.0
    x[-1, 0] = 256.0
    return layer, LayerInputs(inputs.token_ids_i64, x, inputs.x_ffn_bf16)
