"""The typed weights of a loaded layer: one frozen dataclass per linear format (NVFP4, FP8
block-128, MXFP4, BF16), `GatedMlp`, `Router` and `LayerWeights`.

Byte policy: scale tensors are reinterpreted from their bytes (`.view`), never value-cast.
NVFP4 weights stay packed uint8 [..., N, K/2] (element 2i in the low nibble), E4M3 block
scales float8_e4m3fn [..., N, K/16] linear layout. An expert stack gives every tensor a
leading [E].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Union

import torch
from torch import Tensor

from references.fp8_weight import FP8_WEIGHT_BLOCK, bf16_bits_to_f32, ceil_div

__all__ = ["fp8_act_scale_fmt", "Nvfp4Linear", "Fp8BlockLinear", "Mxfp4Linear", "Bf16Linear", "Linear", "GatedMlp", "Router",
           "LayerWeights", "MtpWeights", "MTP_PROJECTIONS",
           "iter_linears", "make_linear", "FP8_SCALE_SUFFIX", "FP8_SCALE_ROLE"]


class _LinearShape:
    """n and k (logical, unpacked) of a linear, from its weight tensor's last two dims."""

    _weight_attr: ClassVar[str]
    _elements_per_stored: ClassVar[int] = 1

    @property
    def n(self) -> int:
        return getattr(self, self._weight_attr).shape[-2]

    @property
    def k(self) -> int:
        return getattr(self, self._weight_attr).shape[-1] * self._elements_per_stored


@dataclass(frozen=True)
class Nvfp4Linear(_LinearShape):
    """ModelOpt NVFP4 linear (or a stack of E of them: every tensor gets a leading [E]).

    weight_u8: [..., N, K/2] packed E2M1, element 2i in the low nibble.
    weight_scale_e4m3: [..., N, K/16] float8_e4m3fn block scales, linear layout (bytes as stored).
    weight_scale_2_f32: [...] float32 global decode scale (amax_w / 2688).
    input_scale_f32: [...] float32 static activation decode scale (amax_x / 2688).
    """

    module: str
    weight_u8: Tensor
    weight_scale_e4m3: Tensor
    weight_scale_2_f32: Tensor
    input_scale_f32: Tensor
    format: str = field(default="nvfp4", init=False)
    _weight_attr: ClassVar[str] = "weight_u8"
    _elements_per_stored: ClassVar[int] = 2


@dataclass(frozen=True)
class Fp8BlockLinear(_LinearShape):
    """FP8 E4M3 weight with 128x128 block scales: W = fp8 * scale[n//128, k//128].

    Every FP8 scale encoding that ships (references.fp8_weight.FP8_WEIGHT_ENCODINGS) maps to this one
    type, in one of two exact scale forms the backends consume:
    weight_e4m3: [..., N, K] float8_e4m3fn.
    scale_ue8m0: [..., ceil(N/128), ceil(K/128)] float8_e8m0fnu (V4 `.scale`), or None.
    scale_inv_f32: the block grid as float32 [..., ceil(N/128), ceil(K/128)], or None: V3
      `.weight_scale_inv` as stored; compressed-tensors FP8_BLOCK `.weight_scale` (a BF16 one widened by
      bits); ModelOpt FP8_PB_WO's 4-D [ob, 1, ib, 1] as its 2-D view; per-tensor `.weight_scale`
      repeated into every block. Exactly one of the two is set.
    encoding: which checkpoint encoding it came from (FP8_WEIGHT_ENCODINGS; default from the scale
      form set: v4_e8m0_scale or v3_weight_scale_inv).
    input_scale_f32: per-tensor FP8's static activation decode scale (`.input_scale`, 0-d), else None
      (kept for reports; the FP8 stages quantize activations dynamically per 1x128 group).
    """

    module: str
    weight_e4m3: Tensor
    scale_ue8m0: Tensor | None
    scale_inv_f32: Tensor | None
    encoding: str | None = None
    input_scale_f32: Tensor | None = None
    format: str = field(default="fp8_block128", init=False)
    _weight_attr: ClassVar[str] = "weight_e4m3"

    def __post_init__(self) -> None:
        if self.encoding is None:
            object.__setattr__(self, "encoding",
                               "v4_e8m0_scale" if self.scale_ue8m0 is not None else "v3_weight_scale_inv")

    @property
    def scale_tensor_role(self) -> str:
        """The stored name (suffix) of this linear's block-scale tensor in its encoding."""
        return FP8_SCALE_SUFFIX[self.encoding]

    def block_dec_scale_f32(self) -> Tensor:
        """The block scales as float32 (exact for both storages)."""
        if self.scale_inv_f32 is not None:
            return self.scale_inv_f32
        e = self.scale_ue8m0.view(torch.uint8).to(torch.int32)
        return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e - 127).masked_fill(e == 255, float("nan"))


# the stored suffix of each FP8 encoding's block-scale tensor (references.fp8_weight.FP8_WEIGHT_ENCODINGS)
FP8_SCALE_SUFFIX = {"v4_e8m0_scale": "scale", "v3_weight_scale_inv": "weight_scale_inv",
                    "ct_fp8_block": "weight_scale", "modelopt_fp8_pb_wo": "weight_scale", "per_tensor": "weight_scale"}
# the loader's tensor roles (schema.linear_tensor_specs) of each FP8 encoding's block-scale tensor
FP8_SCALE_ROLE = {"v4_e8m0_scale": "scale", "v3_weight_scale_inv": "scale_inv", "ct_fp8_block": "ct_scale",
                  "modelopt_fp8_pb_wo": "pb_wo_scale", "per_tensor": "tensor_scale"}


def _fp8_block_linear(module: str, t: Mapping[str, Tensor]) -> Fp8BlockLinear:
    """The one typed FP8 linear from any encoding's tensors by role (FP8_SCALE_ROLE), scales exact:
    bf16 -> float32 by bits, the 4-D [..., ob, 1, ib, 1] grid viewed 2-D, a per-tensor scale repeated
    over the [ceil(N/128), ceil(K/128)] grid."""
    w = t["weight"]
    encoding = next(e for e, role in FP8_SCALE_ROLE.items() if role in t)
    s = t[FP8_SCALE_ROLE[encoding]]
    if encoding == "v4_e8m0_scale":
        return Fp8BlockLinear(module, w, s, None, encoding)
    if s.dtype == torch.bfloat16:
        s = bf16_bits_to_f32(s)
    if encoding == "modelopt_fp8_pb_wo":
        s = s[..., :, 0, :, 0].contiguous()
    input_scale = None
    if encoding == "per_tensor":
        lead = w.shape[:-2]
        grid = (ceil_div(w.shape[-2], FP8_WEIGHT_BLOCK), ceil_div(w.shape[-1], FP8_WEIGHT_BLOCK))
        s = s.reshape(*lead, 1, 1).expand(*lead, *grid).contiguous()
        input_scale = t.get("input_scale")
    return Fp8BlockLinear(module, w, None, s, encoding, input_scale)


@dataclass(frozen=True)
class Mxfp4Linear(_LinearShape):
    """MXFP4 linear (DeepSeek-V4 `mtp.*` experts): packed E2M1 [..., N, K/2] (stored I8 or U8,
    exposed as uint8 bytes), UE8M0 scales [..., N, K/32] float8_e8m0fnu, no global scale."""

    module: str
    weight_u8: Tensor
    scale_ue8m0: Tensor
    format: str = field(default="mxfp4", init=False)
    _weight_attr: ClassVar[str] = "weight_u8"
    _elements_per_stored: ClassVar[int] = 2


@dataclass(frozen=True)
class Bf16Linear(_LinearShape):
    """An unquantized linear: weight_bf16 [..., N, K] (BF16, or F32 stored weights kept as is)."""

    module: str
    weight_bf16: Tensor
    format: str = field(default="bf16", init=False)
    _weight_attr: ClassVar[str] = "weight_bf16"


Linear = Union[Nvfp4Linear, Fp8BlockLinear, Mxfp4Linear, Bf16Linear]


@dataclass(frozen=True)
class GatedMlp:
    """w1 (gate), w3 (up), w2 (down). For routed experts each is a stack with leading [E]."""

    w1: Linear
    w3: Linear
    w2: Linear


@dataclass(frozen=True)
class Router:
    """gate_weight_bf16 [E, H]; gate_bias_f32 [E] (score-routed layers; V3's
    e_score_correction_bias); tid2eid_i64 [vocab, top_k] (V4 hash layers)."""

    gate_weight_bf16: Tensor
    gate_bias_f32: Tensor | None
    tid2eid_i64: Tensor | None


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer. attention: role -> Linear (wq_a ... or q_a_proj ...);
    norms: role -> tensor (attn_norm, ffn_norm, q_norm, kv_norm, attn_sink);
    experts: stacked routed experts; shared_experts / dense_mlp where the layer has them;
    extras: tensors under the layer's prefix that the schema does not name (e.g. V4's
    compressor, indexer, hc_*), loaded as stored."""

    index: int
    schema: str
    attention: Mapping[str, Linear]
    norms: Mapping[str, Tensor]
    router: Router | None
    experts: GatedMlp | None
    shared_experts: GatedMlp | None
    dense_mlp: GatedMlp | None
    extras: Mapping[str, Tensor]


MTP_PROJECTIONS = ("e_proj", "h_proj")  # DeepSeek-V4 `mtp.{j}.e_proj|h_proj` (FP8 block-128 in every export)


@dataclass(frozen=True)
class MtpWeights:
    """One DeepSeek-V4 MTP block `mtp.{index}.*` (prefix "mtp.{index}.").
    projections: "e_proj", "h_proj" -> Linear (FP8 block-128 as shipped: E4M3 + E8M0 `.scale`);
    norms: the stored ones of enorm, hnorm, norm, attn_norm, ffn_norm (bf16 [H]);
    experts: the routed experts `ffn.experts.{e}.w1|w3|w2` as stacks with a leading [E] (MXFP4 as shipped),
      or None when none is stored;
    linears: every other linear under the prefix (the block's attention, shared expert ...), by module name,
      loaded and value-checked but not verified by a stage (references.stages has rows for the projections
      and the routed experts only);
    extras: every other tensor under the prefix, as stored (gate, hc_*, attn_sink ...)."""

    index: int
    schema: str
    prefix: str
    projections: Mapping[str, Linear]
    norms: Mapping[str, Tensor]
    experts: GatedMlp | None
    linears: Mapping[str, Linear]
    extras: Mapping[str, Tensor]
    router: None = None            # what verdict code reads of a decoder layer: an MTP block's stages have no
    shared_experts: None = None    # router, shared-expert or dense-MLP row (applicable_stages keeps its unit's)
    dense_mlp: None = None

    @property
    def name(self) -> str:
        return f"mtp.{self.index}"


def make_linear(fmt: str, module: str, t: Mapping[str, Tensor]) -> Linear:
    """The typed linear of format `fmt` ("nvfp4", "mxfp4", "fp8_block128", "bf16") from its tensors
    by role (weight, weight_scale, weight_scale_2, input_scale, scale; FP8: FP8_SCALE_ROLE), as read."""
    if fmt == "nvfp4":
        return Nvfp4Linear(module, t["weight"], t["weight_scale"], t["weight_scale_2"], t["input_scale"])
    if fmt == "mxfp4":
        return Mxfp4Linear(module, t["weight"].view(torch.uint8), t["scale"])
    if fmt == "fp8_block128":
        return _fp8_block_linear(module, t)
    return Bf16Linear(module, t["weight"])


def iter_linears(layer: LayerWeights | MtpWeights) -> list[tuple[str, Linear]]:
    """(module name, linear) for every linear of a layer or MTP block (expert stacks once each)."""
    out: list[tuple[str, Linear]] = []
    if isinstance(layer, MtpWeights):
        out += [(lin.module, lin) for lin in layer.projections.values()]
        if layer.experts is not None:
            out += [(lin.module, lin) for lin in (layer.experts.w1, layer.experts.w3, layer.experts.w2)]
        return out + [(lin.module, lin) for lin in layer.linears.values()]
    for lin in layer.attention.values():
        out.append((lin.module, lin))
    for mlp in (layer.experts, layer.shared_experts, layer.dense_mlp):
        if mlp is not None:
            for lin in (mlp.w1, mlp.w3, mlp.w2):
                out.append((lin.module, lin))
    return out


def fp8_act_scale_fmt(w: object) -> str:
    """The FP8 activation block-scale format that goes with an FP8 weight: power-of-two (E8M0) when
    its block scales are powers of two (DeepSeek-V4's `.scale`; E8M0 byte 0 is the float32 subnormal
    2^-127, one mantissa bit), float32 otherwise (V3)."""
    scales = getattr(w, "block_dec_f32", None)
    if scales is None:
        return "ue8m0"
    bits = scales.view(torch.int32)
    mant, subnormal = bits & 0x7FFFFF, (bits & 0x7F800000) == 0
    pow2 = (mant == 0) | (subnormal & ((mant & (mant - 1)) == 0))
    return "ue8m0" if bool(pow2.all()) else "f32"
