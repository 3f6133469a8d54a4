"""What a layer must hold: `LinearSpec`, `TensorSpec`, `LayerSchema` and `layer_schema`, and the
per-format tensor specs of a linear, checked against safetensors header entries (no data read).

Names, dtypes and shapes: shared/NVFP4_FACTS.md sections 4 and 5. Shapes are logical
(unpacked) [n, k]; a packed 4-bit weight stores [n, k/2].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from verify.checkpoint.config import FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK, ModelConfig
from verify.checkpoint.errors import DtypeMismatchError, MissingTensorError, ShapeMismatchError
from verify.checkpoint.safetensors import TensorInfo

__all__ = ["OPTIONAL_N_AS_STORED", "INDEXER_WQ_B", "LinearSpec", "TensorSpec", "LayerSchema", "layer_schema",
           "linear_format_of", "linear_tensor_specs",
           "check_linear_k", "check_tensor", "fp8_scale_encoding"]


OPTIONAL_N_AS_STORED = -1
# V4's indexer query projection: q_lora_rank -> index heads x index head dim (N as stored)
INDEXER_WQ_B = "indexer.wq_b"


@dataclass(frozen=True)
class LinearSpec:
    """A linear module the schema expects: logical weight [n, k] (unpacked), role name."""

    module: str  # full name without ".weight", e.g. "layers.3.attn.wq_a"
    role: str  # "wq_a", "w1", ... (V3 gate/up/down are mapped to w1/w3/w2)
    n: int
    k: int


@dataclass(frozen=True)
class TensorSpec:
    """A plain tensor the schema expects: allowed safetensors dtypes and shape."""

    name: str
    role: str
    dtypes: tuple[str, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LayerSchema:
    """Everything layer i must hold. experts: per expert e, its w1/w3/w2 LinearSpecs. optional:
    attention linears a layer may hold (V4's indexer wq_b): loaded where stored (with_present);
    n = OPTIONAL_N_AS_STORED takes N from the stored weight (the config does not give it)."""

    prefix: str
    attention: tuple[LinearSpec, ...]
    norms: tuple[TensorSpec, ...]
    router: tuple[TensorSpec, ...]
    experts: tuple[tuple[LinearSpec, LinearSpec, LinearSpec], ...]
    shared: tuple[LinearSpec, LinearSpec, LinearSpec] | None
    dense: tuple[LinearSpec, LinearSpec, LinearSpec] | None
    optional: tuple[LinearSpec, ...] = ()

    def with_present(self, infos: Mapping[str, TensorInfo]) -> "LayerSchema":
        """This schema with the optional linears whose `.weight` is in `infos` moved into attention
        (N resolved from the stored weight's rows), the others dropped."""
        found = []
        for spec in self.optional:
            w = infos.get(f"{spec.module}.weight")
            if w is None:
                continue
            n = w.shape[0] if spec.n == OPTIONAL_N_AS_STORED and w.shape else spec.n
            found.append(LinearSpec(spec.module, spec.role, n, spec.k))
        return replace(self, attention=self.attention + tuple(found), optional=())

    def linear_specs(self) -> list[LinearSpec]:
        out = list(self.attention)
        for trio in self.experts:
            out.extend(trio)
        for trio in (self.shared, self.dense):
            if trio:
                out.extend(trio)
        return out


def _mlp(prefix: str, hidden: int, inter: int, names: tuple[str, str, str]) -> tuple[LinearSpec, LinearSpec, LinearSpec]:
    g, u, d = names
    return (LinearSpec(f"{prefix}.{g}", "w1", inter, hidden), LinearSpec(f"{prefix}.{u}", "w3", inter, hidden),
            LinearSpec(f"{prefix}.{d}", "w2", hidden, inter))


def layer_schema(cfg: ModelConfig, i: int) -> LayerSchema:
    """The tensors layer i must hold, with logical shapes from config.json."""
    if not 0 <= i < cfg.num_layers:
        raise IndexError(f"layer {i} out of range: the model has {cfg.num_layers} layers")
    h, e_n, inter = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    if cfg.schema == "deepseek_v4":
        p = f"layers.{i}"
        hd, nh, g, r = cfg.head_dim, cfg.n_heads, cfg.o_groups, cfg.o_lora_rank
        attention = (
            LinearSpec(f"{p}.attn.wq_a", "wq_a", cfg.q_lora_rank, h),
            LinearSpec(f"{p}.attn.wq_b", "wq_b", nh * hd, cfg.q_lora_rank),
            LinearSpec(f"{p}.attn.wkv", "wkv", hd, h),
            LinearSpec(f"{p}.attn.wo_a", "wo_a", g * r, nh * hd // g),
            LinearSpec(f"{p}.attn.wo_b", "wo_b", h, g * r),
        )
        norms = (
            TensorSpec(f"{p}.attn_norm.weight", "attn_norm", ("BF16",), (h,)),
            TensorSpec(f"{p}.ffn_norm.weight", "ffn_norm", ("BF16",), (h,)),
            TensorSpec(f"{p}.attn.q_norm.weight", "q_norm", ("BF16",), (cfg.q_lora_rank,)),
            TensorSpec(f"{p}.attn.kv_norm.weight", "kv_norm", ("BF16",), (hd,)),
            TensorSpec(f"{p}.attn.attn_sink", "attn_sink", ("F32",), (nh,)),
        )
        router = [TensorSpec(f"{p}.ffn.gate.weight", "gate_weight", ("BF16",), (e_n, h))]
        if cfg.is_hash_layer(i):
            router.append(TensorSpec(f"{p}.ffn.gate.tid2eid", "tid2eid", ("I64", "I32"), (cfg.vocab_size, cfg.top_k)))
        else:
            router.append(TensorSpec(f"{p}.ffn.gate.bias", "gate_bias", ("F32",), (e_n,)))
        experts = tuple(_mlp(f"{p}.ffn.experts.{e}", h, inter, ("w1", "w3", "w2")) for e in range(e_n))
        shared = _mlp(f"{p}.ffn.shared_experts", h, inter * cfg.n_shared_experts, ("w1", "w3", "w2"))
        optional = (LinearSpec(f"{p}.attn.indexer.wq_b", INDEXER_WQ_B, OPTIONAL_N_AS_STORED, cfg.q_lora_rank),)
        return LayerSchema(p, attention, norms, tuple(router), experts, shared, None, optional)

    p = f"model.layers.{i}"
    nh, nope, rope, v = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    attention = (
        LinearSpec(f"{p}.self_attn.q_a_proj", "q_a_proj", cfg.q_lora_rank, h),
        LinearSpec(f"{p}.self_attn.q_b_proj", "q_b_proj", nh * (nope + rope), cfg.q_lora_rank),
        LinearSpec(f"{p}.self_attn.kv_a_proj_with_mqa", "kv_a_proj_with_mqa", cfg.kv_lora_rank + rope, h),
        LinearSpec(f"{p}.self_attn.kv_b_proj", "kv_b_proj", nh * (nope + v), cfg.kv_lora_rank),
        LinearSpec(f"{p}.self_attn.o_proj", "o_proj", h, nh * v),
    )
    norms = (
        TensorSpec(f"{p}.input_layernorm.weight", "attn_norm", ("BF16",), (h,)),
        TensorSpec(f"{p}.post_attention_layernorm.weight", "ffn_norm", ("BF16",), (h,)),
        TensorSpec(f"{p}.self_attn.q_a_layernorm.weight", "q_norm", ("BF16",), (cfg.q_lora_rank,)),
        TensorSpec(f"{p}.self_attn.kv_a_layernorm.weight", "kv_norm", ("BF16",), (cfg.kv_lora_rank,)),
    )
    names = ("gate_proj", "up_proj", "down_proj")
    if not cfg.is_moe_layer(i):
        dense = _mlp(f"{p}.mlp", h, cfg.intermediate_size, names)
        return LayerSchema(p, attention, norms, (), (), None, dense)
    router = (TensorSpec(f"{p}.mlp.gate.weight", "gate_weight", ("BF16", "F32"), (e_n, h)),
              TensorSpec(f"{p}.mlp.gate.e_score_correction_bias", "gate_bias", ("F32", "BF16"), (e_n,)))
    experts = tuple(_mlp(f"{p}.mlp.experts.{e}", h, inter, names) for e in range(e_n))
    shared = _mlp(f"{p}.mlp.shared_experts", h, inter * cfg.n_shared_experts, names)
    return LayerSchema(p, attention, norms, router, experts, shared, None)


def linear_format_of(module: str, infos: Mapping[str, TensorInfo]) -> str:
    """Which format a linear is stored in, from the dtypes of `module.*` in the headers:
    nvfp4 (U8 + F8_E4M3 weight_scale), mxfp4 (I8/U8 + F8_E8M0 scale, block 32),
    fp8_block128 (F8_E4M3 + F8_E8M0 scale or F32 weight_scale_inv), bf16 (BF16/F32 weight)."""
    w = infos.get(f"{module}.weight")
    if w is None:
        raise MissingTensorError("linear has no weight", tensor=f"{module}.weight")
    if w.dtype in ("U8", "I8"):
        if f"{module}.weight_scale" in infos:
            return "nvfp4"
        s = infos.get(f"{module}.scale")
        if s is not None and s.dtype == "F8_E8M0":
            return "mxfp4"
        raise MissingTensorError(f"packed 4-bit weight ({w.dtype}) has neither an NVFP4 weight_scale nor an "
                                 "MXFP4 E8M0 scale", file=w.file, tensor=f"{module}.weight_scale")
    if w.dtype == "F8_E4M3":
        return "fp8_block128"
    if w.dtype in ("BF16", "F32", "F16"):
        return "bf16"
    raise DtypeMismatchError(f"weight dtype {w.dtype} is not U8/I8 (NVFP4/MXFP4), F8_E4M3 (FP8) or BF16",
                             file=w.file, tensor=f"{module}.weight")


def linear_tensor_specs(fmt: str, module: str, n: int, k: int, infos: Mapping[str, TensorInfo]) -> list[TensorSpec]:
    """The tensors (dtype, shape) a linear of logical [n, k] must have in format `fmt` (`infos` decides
    only FP8's scale encoding: fp8_scale_encoding; shapes are ceil-div grids)."""
    if fmt == "nvfp4":
        return [TensorSpec(f"{module}.weight", "weight", ("U8",), (n, k // 2)),
                TensorSpec(f"{module}.weight_scale", "weight_scale", ("F8_E4M3",), (n, k // NVFP4_BLOCK)),
                TensorSpec(f"{module}.weight_scale_2", "weight_scale_2", ("F32",), ()),
                TensorSpec(f"{module}.input_scale", "input_scale", ("F32",), ())]
    if fmt == "mxfp4":
        return [TensorSpec(f"{module}.weight", "weight", ("I8", "U8"), (n, k // 2)),
                TensorSpec(f"{module}.scale", "scale", ("F8_E8M0",), (n, k // MXFP4_BLOCK))]
    if fmt == "fp8_block128":
        return [TensorSpec(f"{module}.weight", "weight", ("F8_E4M3",), (n, k)),
                *_fp8_scale_specs(fp8_scale_encoding(module, infos), module, n, k, infos)]
    return [TensorSpec(f"{module}.weight", "weight", ("BF16", "F32"), (n, k))]


def fp8_scale_encoding(module: str, infos: Mapping[str, TensorInfo]) -> str:
    """Which FP8 scale encoding (references.fp8_weight.FP8_WEIGHT_ENCODINGS) an F8_E4M3 weight's
    scale tensors are in, from their names and ranks: `.scale` -> v4_e8m0_scale, `.weight_scale_inv` ->
    v3_weight_scale_inv, `.weight_scale` 2-D -> ct_fp8_block, 4-D -> modelopt_fp8_pb_wo, 0-d or [1] ->
    per_tensor. MissingTensorError when there is none; ShapeMismatchError for a `.weight_scale` of
    another rank; DtypeMismatchError for a `.scale` that is not F8_E8M0 (a float copy of the bytes)."""
    w = infos[f"{module}.weight"]
    found = [s for s in ("scale", "weight_scale_inv", "weight_scale") if f"{module}.{s}" in infos]
    if not found:
        raise MissingTensorError("F8_E4M3 weight has no block scale (V4 .scale, V3 .weight_scale_inv or "
                                 ".weight_scale)", file=w.file, tensor=f"{module}.scale")
    if len(found) > 1:
        raise MissingTensorError(f"F8_E4M3 weight has {len(found)} scale tensors ({', '.join(found)}): "
                                 "which one decodes it is ambiguous", file=w.file, tensor=f"{module}.{found[1]}")
    info = infos[f"{module}.{found[0]}"]
    if found[0] == "scale":
        if info.dtype != "F8_E8M0":
            raise DtypeMismatchError(f"stored {info.dtype}, expected F8_E8M0 (a V4 block scale stored as numbers "
                                     "reads each E8M0 byte b as b, not 2^(b-127))", file=info.file, tensor=info.name)
        return "v4_e8m0_scale"
    if found[0] == "weight_scale_inv":
        return "v3_weight_scale_inv"
    rank = len(info.shape)
    if rank == 2:
        return "ct_fp8_block"
    if rank == 4:
        return "modelopt_fp8_pb_wo"
    if info.shape in ((), (1,)):
        return "per_tensor"
    raise ShapeMismatchError(f"stored shape {list(info.shape)}: an FP8 weight_scale is [] or [1] (per-tensor), "
                             "[ceil(N/128), ceil(K/128)] (compressed-tensors FP8_BLOCK) or [out_blk, 1, in_blk, 1] "
                             "(ModelOpt FP8_PB_WO)", file=info.file, tensor=info.name)


def _fp8_scale_specs(encoding: str, module: str, n: int, k: int,
                     infos: Mapping[str, TensorInfo]) -> list[TensorSpec]:
    ob, ib = math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK)
    if encoding == "v4_e8m0_scale":
        return [TensorSpec(f"{module}.scale", "scale", ("F8_E8M0",), (ob, ib))]
    if encoding == "v3_weight_scale_inv":
        return [TensorSpec(f"{module}.weight_scale_inv", "scale_inv", ("F32",), (ob, ib))]
    if encoding == "ct_fp8_block":
        return [TensorSpec(f"{module}.weight_scale", "ct_scale", ("BF16", "F32"), (ob, ib))]
    if encoding == "modelopt_fp8_pb_wo":
        return [TensorSpec(f"{module}.weight_scale", "pb_wo_scale", ("F32",), (ob, 1, ib, 1))]
    one = infos[f"{module}.weight_scale"].shape
    out = [TensorSpec(f"{module}.weight_scale", "tensor_scale", ("F32",), one)]
    if f"{module}.input_scale" in infos:
        shape = infos[f"{module}.input_scale"].shape
        out.append(TensorSpec(f"{module}.input_scale", "input_scale", ("F32",), shape if shape in ((), (1,)) else ()))
    return out


def _shape_hint(stored: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """Why a block-scale shape differs, where it is a known mistake: the grid transposed, or a 4-D
    ModelOpt grid not laid out [out_blk, 1, in_blk, 1]."""
    if len(expected) == 2 and len(stored) == 2 and stored == expected[::-1] and stored != expected:
        return " (transposed: [ceil(K/128), ceil(N/128)])"
    if len(expected) == 4:
        return " (ModelOpt FP8_PB_WO is [out_blk, 1, in_blk, 1])"
    return ""


def check_linear_k(spec: LinearSpec, fmt: str, file: Path) -> None:
    """ShapeMismatchError (naming `file` and the weight) unless the linear's K is a multiple of
    its format's block (16 for NVFP4, 32 for MXFP4, 1 otherwise)."""
    block = {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK}.get(fmt, 1)
    if spec.k % block:
        raise ShapeMismatchError(f"K={spec.k} is not a multiple of the {fmt} block {block}", file=file,
                                 tensor=f"{spec.module}.weight")


def check_tensor(info: TensorInfo, spec: TensorSpec) -> None:
    """DtypeMismatchError or ShapeMismatchError (naming the file and tensor) when a header entry's
    dtype is not one `spec` allows or its shape is not `spec.shape`."""
    if info.dtype not in spec.dtypes:
        raise DtypeMismatchError(f"stored {info.dtype}, expected {' or '.join(spec.dtypes)}", file=info.file,
                                 tensor=info.name)
    if info.shape != spec.shape:
        raise ShapeMismatchError(f"stored shape {list(info.shape)}, expected {list(spec.shape)}"
                                 f"{_shape_hint(info.shape, spec.shape)}", file=info.file, tensor=info.name)
