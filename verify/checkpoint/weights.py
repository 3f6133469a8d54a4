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

__all__ = ["Nvfp4Linear", "Fp8BlockLinear", "Mxfp4Linear", "Bf16Linear", "Linear", "GatedMlp", "Router",
           "LayerWeights", "iter_linears", "make_linear"]


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

    weight_e4m3: [..., N, K] float8_e4m3fn.
    scale_ue8m0: [..., ceil(N/128), ceil(K/128)] float8_e8m0fnu (V4 `.scale`), or None.
    scale_inv_f32: the same as float32 (V3 `.weight_scale_inv`), or None. Exactly one is set.
    """

    module: str
    weight_e4m3: Tensor
    scale_ue8m0: Tensor | None
    scale_inv_f32: Tensor | None
    format: str = field(default="fp8_block128", init=False)
    _weight_attr: ClassVar[str] = "weight_e4m3"

    def block_dec_scale_f32(self) -> Tensor:
        """The block scales as float32 (exact for both storages)."""
        if self.scale_inv_f32 is not None:
            return self.scale_inv_f32
        e = self.scale_ue8m0.view(torch.uint8).to(torch.int32)
        return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e - 127).masked_fill(e == 255, float("nan"))


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


def make_linear(fmt: str, module: str, t: Mapping[str, Tensor]) -> Linear:
    """The typed linear of format `fmt` ("nvfp4", "mxfp4", "fp8_block128", "bf16") from its tensors
    by role (weight, weight_scale, weight_scale_2, input_scale, scale, scale_inv), as read."""
    if fmt == "nvfp4":
        return Nvfp4Linear(module, t["weight"], t["weight_scale"], t["weight_scale_2"], t["input_scale"])
    if fmt == "mxfp4":
        return Mxfp4Linear(module, t["weight"].view(torch.uint8), t["scale"])
    if fmt == "fp8_block128":
        return Fp8BlockLinear(module, t["weight"], t.get("scale"), t.get("scale_inv"))
    return Bf16Linear(module, t["weight"])


def iter_linears(layer: LayerWeights) -> list[tuple[str, Linear]]:
    """(module name, linear) for every linear of a layer (expert stacks once each)."""
    out: list[tuple[str, Linear]] = []
    for lin in layer.attention.values():
        out.append((lin.module, lin))
    for mlp in (layer.experts, layer.shared_experts, layer.dense_mlp):
        if mlp is not None:
            for lin in (mlp.w1, mlp.w3, mlp.w2):
                out.append((lin.module, lin))
    return out
