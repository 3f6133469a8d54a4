"""Checkpoint loading: Hugging Face style NVFP4 checkpoints of DeepSeek-V4 and DeepSeek-V3/R1.

A checkpoint directory holds `config.json`, the quantization config
(`hf_quant_config.json`, or `quantization_config` inside config.json), and either
`model.safetensors.index.json` with its shards or one `*.safetensors` file.

`Checkpoint.open(dir)` reads only the JSON files. `Checkpoint.load_layer(i)` finds
the tensors of layer i in the index, opens only the shards that hold them, parses
those shards' safetensors headers, validates every dtype and shape against the
schema of the model (chosen from config.json), and only then reads exactly the
bytes of those tensors (counted in `Checkpoint.io`). Any defect raises one
`CheckpointError` subclass naming the file and the tensor; nothing is returned
half-loaded.

Why not `safetensors.safe_open`: the reader here parses the same 8-byte-length +
JSON header itself, so it can (1) report truncation and header/offset defects
with the file and tensor name before any byte of data is read, (2) count opened
files and bytes read exactly, and (3) read each tensor straight into its slot of
an expert stack (or through one reusable pinned buffer onto a GPU).

Byte policy: scale tensors are reinterpreted from their bytes (`.view`), never
value-cast. NVFP4 weights stay packed uint8 [..., N, K/2] (element 2i in the low
nibble), E4M3 block scales float8_e4m3fn [..., N, K/16].
Source of names, dtypes and shapes: shared/NVFP4_FACTS.md sections 4 and 5.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Union

import torch
from torch import Tensor

__all__ = [
    "CheckpointError", "NotACheckpointError", "MissingIndexError", "MalformedConfigError",
    "TruncatedShardError", "MalformedShardError", "MissingTensorError", "DtypeMismatchError",
    "ShapeMismatchError", "NanScaleError", "UnsupportedSchemaError",
    "ModelConfig", "QuantConfig", "TensorInfo", "IoStats",
    "Nvfp4Linear", "Fp8BlockLinear", "Mxfp4Linear", "Bf16Linear", "Linear",
    "GatedMlp", "Router", "LayerWeights", "Checkpoint",
    "LinearSpec", "TensorSpec", "layer_schema", "linear_format_of",
    "SAFETENSORS_DTYPES", "INDEX_FILE",
]

INDEX_FILE = "model.safetensors.index.json"
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
FP8_BLOCK = 128

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


# ============================================================================= errors


class CheckpointError(ValueError):
    """A checkpoint defect. `file` and `tensor` name where (either may be None)."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, tensor: str | None = None):
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        where = []
        if self.file:
            where.append(f"file {self.file}")
        if tensor:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{message} [{', '.join(where)}]" if where else message)


class NotACheckpointError(CheckpointError):
    """The directory is missing, or has no config.json, or no safetensors files."""


class MalformedConfigError(CheckpointError):
    """config.json / hf_quant_config.json is not valid JSON or lacks a required key."""


class MissingIndexError(CheckpointError):
    """Several shards but no model.safetensors.index.json, or the index lacks weight_map."""


class UnsupportedSchemaError(CheckpointError):
    """config.json describes a model this loader has no schema for."""


class MalformedShardError(CheckpointError):
    """A safetensors header is not valid (bad length, JSON, dtype, or inconsistent offsets)."""


class TruncatedShardError(MalformedShardError):
    """The file is shorter than its header says: a tensor's bytes run past the end."""


class MissingTensorError(CheckpointError):
    """A tensor the schema needs is not in the index, or the index names a shard that lacks it."""


class DtypeMismatchError(CheckpointError):
    """A tensor's stored dtype is not one the schema allows for it."""


class ShapeMismatchError(CheckpointError):
    """A tensor's stored shape is not the one the schema and config.json give."""


class NanScaleError(CheckpointError):
    """A scale holds NaN bytes (E4M3 0x7F/0xFF, E8M0 0xFF) or a NaN/Inf/<=0 float32 scale."""


# ============================================================================= configs


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V4 or DeepSeek-V3/R1 model, from config.json.

    schema: "deepseek_v4" or "deepseek_v3". Fields that a schema lacks are None
    (V3 has no hash layers, swiglu_limit or o_groups; V4 has no group-limited top-k).
    """

    schema: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    n_routed_experts: int
    n_shared_experts: int
    top_k: int
    moe_intermediate_size: int
    scoring_func: str
    routed_scaling_factor: float
    n_heads: int
    q_lora_rank: int
    # V4
    num_hash_layers: int = 0
    swiglu_limit: float | None = None
    head_dim: int | None = None
    o_groups: int | None = None
    o_lora_rank: int | None = None
    # V3 / R1
    first_k_dense_replace: int = 0
    intermediate_size: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = True

    def is_hash_layer(self, i: int) -> bool:
        return self.schema == "deepseek_v4" and i < self.num_hash_layers

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace


@dataclass(frozen=True)
class QuantConfig:
    """The quantization config: quant_algo (NVFP4, MIXED_PRECISION, FP8 ...), group_size,
    exclude_modules (fnmatch patterns; config.json's `ignore` is the same list), source file."""

    quant_algo: str
    group_size: int
    exclude_modules: tuple[str, ...]
    source: str

    def is_excluded(self, module: str) -> bool:
        return any(fnmatch.fnmatchcase(module, p) for p in self.exclude_modules)


def _read_json(path: Path, error: type[CheckpointError]) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"not valid JSON ({e})", file=path) from None
    if not isinstance(data, dict):
        raise error(f"expected a JSON object, got {type(data).__name__}", file=path)
    return data


def _get(raw: Mapping, path: Path, *keys: str, default: Any = ..., kind: type = int) -> Any:
    for k in keys:
        if k in raw and raw[k] is not None:
            try:
                return kind(raw[k])
            except (TypeError, ValueError):
                raise MalformedConfigError(f"key {k!r}={raw[k]!r} is not a {kind.__name__}", file=path) from None
    if default is ...:
        raise MalformedConfigError(f"missing key {keys[0]!r}", file=path)
    return default


def model_config_from_json(raw: Mapping, path: Path) -> ModelConfig:
    """ModelConfig from config.json's dict. V4 when model_type says deepseek_v4 or the
    V4-only keys (num_hash_layers, o_groups) are present; V3 for deepseek_v3 / R1."""
    model_type = str(raw.get("model_type", "")).lower()
    arch = " ".join(raw.get("architectures", []) or []).lower()
    if "v4" in model_type or "v4" in arch or "num_hash_layers" in raw or "o_groups" in raw:
        schema = "deepseek_v4"
    elif "deepseek_v3" in model_type or "deepseekv3" in arch or "deepseek_v2" in model_type:
        schema = "deepseek_v3"
    else:
        raise UnsupportedSchemaError(
            f"model_type={raw.get('model_type')!r}, architectures={raw.get('architectures')!r}: "
            "expected a DeepSeek-V4 or DeepSeek-V3/R1 config", file=path)
    g = lambda *keys, default=..., kind=int: _get(raw, path, *keys, default=default, kind=kind)  # noqa: E731
    common = dict(
        schema=schema,
        hidden_size=g("hidden_size", "dim"),
        num_layers=g("num_hidden_layers", "n_layers"),
        vocab_size=g("vocab_size"),
        n_routed_experts=g("n_routed_experts"),
        n_shared_experts=g("n_shared_experts", default=1),
        top_k=g("num_experts_per_tok", "n_activated_experts"),
        moe_intermediate_size=g("moe_intermediate_size", "moe_inter_dim"),
        routed_scaling_factor=g("routed_scaling_factor", "route_scale", default=1.0, kind=float),
        n_heads=g("num_attention_heads", "n_heads"),
        q_lora_rank=g("q_lora_rank"),
    )
    if schema == "deepseek_v4":
        return ModelConfig(
            **common,
            scoring_func=g("scoring_func", "score_func", default="sqrtsoftplus", kind=str),
            num_hash_layers=g("num_hash_layers", "n_hash_layers", default=0),
            swiglu_limit=g("swiglu_limit", default=None, kind=float),
            head_dim=g("head_dim"),
            o_groups=g("o_groups"),
            o_lora_rank=g("o_lora_rank"),
        )
    return ModelConfig(
        **common,
        scoring_func=g("scoring_func", "score_func", default="sigmoid", kind=str),
        first_k_dense_replace=g("first_k_dense_replace", "n_dense_layers", default=0),
        intermediate_size=g("intermediate_size", "inter_dim"),
        kv_lora_rank=g("kv_lora_rank"),
        qk_nope_head_dim=g("qk_nope_head_dim"),
        qk_rope_head_dim=g("qk_rope_head_dim"),
        v_head_dim=g("v_head_dim"),
        n_group=g("n_group", "n_expert_groups", default=None),
        topk_group=g("topk_group", "n_limited_groups", default=None),
        norm_topk_prob=g("norm_topk_prob", default=True, kind=bool),
    )


def quant_config_from_dir(directory: Path, config_raw: Mapping) -> QuantConfig | None:
    """hf_quant_config.json's `quantization` block, else config.json's `quantization_config`."""
    path = directory / "hf_quant_config.json"
    if path.exists():
        raw = _read_json(path, MalformedConfigError)
        q = raw.get("quantization", raw)
        source = str(path)
    elif isinstance(config_raw.get("quantization_config"), Mapping):
        q = config_raw["quantization_config"]
        source = str(directory / "config.json") + ":quantization_config"
    else:
        return None
    algo = q.get("quant_algo") or q.get("quant_method")
    if not algo:
        raise MalformedConfigError("quantization config has no quant_algo", file=source)
    exclude = q.get("exclude_modules", q.get("ignore", [])) or []
    return QuantConfig(quant_algo=str(algo).upper(), group_size=int(q.get("group_size", NVFP4_BLOCK)),
                       exclude_modules=tuple(str(p) for p in exclude), source=source)


# ============================================================================= schema


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
    """Everything layer i must hold. experts: per expert e, its w1/w3/w2 LinearSpecs."""

    prefix: str
    attention: tuple[LinearSpec, ...]
    norms: tuple[TensorSpec, ...]
    router: tuple[TensorSpec, ...]
    experts: tuple[tuple[LinearSpec, LinearSpec, LinearSpec], ...]
    shared: tuple[LinearSpec, LinearSpec, LinearSpec] | None
    dense: tuple[LinearSpec, LinearSpec, LinearSpec] | None

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
        return LayerSchema(p, attention, norms, tuple(router), experts, shared, None)

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


# ============================================================================= typed weights


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


# ============================================================================= safetensors headers


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: dtype string, shape, absolute byte range in `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class IoStats:
    """What the loader touched: files opened (in order) and bytes read (headers, tensor data)."""

    files_opened: list[str] = field(default_factory=list)
    header_bytes: int = 0
    tensor_bytes: int = 0

    def reset(self) -> None:
        self.files_opened.clear()
        self.header_bytes = 0
        self.tensor_bytes = 0


_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: Path, stats: IoStats | None = None) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header; validate offsets against the file size."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise MissingTensorError("shard named by the index does not exist", file=path) from None
    with f:
        if stats is not None:
            stats.files_opened.append(path.name)
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise TruncatedShardError(f"file is {size} bytes, shorter than the 8-byte header length", file=path)
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            raise MalformedShardError(f"header length {n} is implausible", file=path)
        if 8 + n > size:
            raise TruncatedShardError(f"header says {n} header bytes but the file has {size - 8}", file=path)
        raw = f.read(n)
        if stats is not None:
            stats.header_bytes += 8 + n
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MalformedShardError(f"header is not valid JSON ({e})", file=path) from None
    data_start, data_size = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MalformedShardError(f"bad header entry {entry!r}", file=path, tensor=name) from None
        if dtype not in SAFETENSORS_DTYPES:
            raise MalformedShardError(f"unknown dtype {dtype!r}", file=path, tensor=name)
        want = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if hi - lo != want or lo < 0:
            raise MalformedShardError(f"data_offsets [{lo}, {hi}) hold {hi - lo} bytes, {dtype}{list(shape)} "
                                      f"needs {want}", file=path, tensor=name)
        if hi > data_size:
            raise TruncatedShardError(f"tensor bytes [{lo}, {hi}) run past the end of the data "
                                      f"({data_size} bytes): the file is truncated", file=path, tensor=name)
        out[name] = TensorInfo(name, path, dtype, shape, data_start + lo, data_start + hi)
    return out


# ============================================================================= the loader


def _is_scale(name: str) -> bool:
    return name.endswith((".weight_scale", ".scale", ".weight_scale_inv", ".weight_scale_2", ".input_scale"))


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


def _linear_tensor_specs(fmt: str, module: str, n: int, k: int, infos: Mapping[str, TensorInfo]) -> list[TensorSpec]:
    """The tensors (dtype, shape) a linear of logical [n, k] must have in format `fmt`."""
    if fmt == "nvfp4":
        return [TensorSpec(f"{module}.weight", "weight", ("U8",), (n, k // 2)),
                TensorSpec(f"{module}.weight_scale", "weight_scale", ("F8_E4M3",), (n, k // NVFP4_BLOCK)),
                TensorSpec(f"{module}.weight_scale_2", "weight_scale_2", ("F32",), ()),
                TensorSpec(f"{module}.input_scale", "input_scale", ("F32",), ())]
    if fmt == "mxfp4":
        return [TensorSpec(f"{module}.weight", "weight", ("I8", "U8"), (n, k // 2)),
                TensorSpec(f"{module}.scale", "scale", ("F8_E8M0",), (n, k // MXFP4_BLOCK))]
    if fmt == "fp8_block128":
        sshape = (math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK))
        if f"{module}.weight_scale_inv" in infos:
            s = TensorSpec(f"{module}.weight_scale_inv", "scale_inv", ("F32",), sshape)
        else:
            s = TensorSpec(f"{module}.scale", "scale", ("F8_E8M0",), sshape)
        return [TensorSpec(f"{module}.weight", "weight", ("F8_E4M3",), (n, k)), s]
    return [TensorSpec(f"{module}.weight", "weight", ("BF16", "F32"), (n, k))]


def _check_k(spec: LinearSpec, fmt: str, file: Path) -> None:
    block = {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK}.get(fmt, 1)
    if spec.k % block:
        raise ShapeMismatchError(f"K={spec.k} is not a multiple of the {fmt} block {block}", file=file,
                                 tensor=f"{spec.module}.weight")


class Checkpoint:
    """An opened checkpoint directory. Cheap to open: only JSON files are read.

    Attributes: directory, config (ModelConfig), quant (QuantConfig | None),
    weight_map (tensor name -> shard file name), io (IoStats of every read since open).
    """

    def __init__(self, directory: Path, config: ModelConfig, config_raw: Mapping, quant: QuantConfig | None,
                 weight_map: Mapping[str, str], index_path: Path | None):
        self.directory = directory
        self.config = config
        self.config_raw = config_raw
        self.quant = quant
        self.weight_map = dict(weight_map)
        self.index_path = index_path
        self.io = IoStats()
        self._headers: dict[str, dict[str, TensorInfo]] = {}

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Checkpoint":
        d = Path(directory)
        if not d.is_dir():
            raise NotACheckpointError("not a directory", file=d)
        cfg_path = d / "config.json"
        if not cfg_path.exists():
            raise NotACheckpointError("no config.json: not a Hugging Face checkpoint directory", file=d)
        raw = _read_json(cfg_path, MalformedConfigError)
        config = model_config_from_json(raw, cfg_path)
        quant = quant_config_from_dir(d, raw)
        index_path = d / INDEX_FILE
        stats = IoStats()
        if index_path.exists():
            idx = _read_json(index_path, MissingIndexError)
            wm = idx.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise MissingIndexError("index has no (or an empty) weight_map", file=index_path)
            ck = cls(d, config, raw, quant, wm, index_path)
        else:
            shards = sorted(p for p in d.glob("*.safetensors"))
            if not shards:
                raise NotACheckpointError("no *.safetensors files and no index", file=d)
            if len(shards) > 1:
                raise MissingIndexError(f"{len(shards)} safetensors shards but no {INDEX_FILE}: cannot tell which "
                                        "shard holds which tensor", file=index_path)
            infos = read_safetensors_header(shards[0], stats)
            ck = cls(d, config, raw, quant, {n: shards[0].name for n in infos}, None)
            ck._headers[shards[0].name] = infos
        ck.io.files_opened.extend(stats.files_opened)
        ck.io.header_bytes += stats.header_bytes
        return ck

    # ------------------------------------------------------------------ headers

    def _where(self, name: str) -> Path:
        return self.index_path or (self.directory / next(iter(self.weight_map.values())))

    def headers_for(self, names: Iterable[str]) -> dict[str, TensorInfo]:
        """Header entries of `names`, parsing only the shards that hold them."""
        names = list(names)
        for n in names:
            if n not in self.weight_map:
                raise MissingTensorError("not in the checkpoint's weight_map", file=self._where(n), tensor=n)
        out: dict[str, TensorInfo] = {}
        for n in names:
            shard = self.weight_map[n]
            if shard not in self._headers:
                self._headers[shard] = read_safetensors_header(self.directory / shard, self.io)
            info = self._headers[shard].get(n)
            if info is None:
                raise MissingTensorError(f"the index maps it to {shard}, which does not hold it",
                                         file=self.directory / shard, tensor=n)
            out[n] = info
        return out

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    # ------------------------------------------------------------------ reading

    def _read_into(self, infos: list[TensorInfo], dst_u8: Tensor) -> None:
        """Read the bytes of `infos` (equal sizes) into rows of dst_u8 [len(infos), nbytes] on any device."""
        on_cpu = dst_u8.device.type == "cpu"
        staging = None
        if not on_cpu and infos:
            staging = torch.empty(infos[0].nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        by_file: dict[Path, list[tuple[int, TensorInfo]]] = {}
        for j, info in enumerate(infos):
            by_file.setdefault(info.file, []).append((j, info))
        for path, items in by_file.items():
            with open(path, "rb", buffering=0) as f:
                for j, info in sorted(items, key=lambda t: t[1].start):
                    buf = dst_u8[j] if on_cpu else staging
                    f.seek(info.start)
                    got = _readinto_full(f, buf)
                    if got != info.nbytes:
                        raise TruncatedShardError(f"read {got} of {info.nbytes} bytes", file=path, tensor=info.name)
                    self.io.tensor_bytes += got
                    if not on_cpu:
                        dst_u8[j].copy_(staging)

    def read_tensors(self, infos: list[TensorInfo], *, device: torch.device | str = "cpu") -> Tensor:
        """Stack tensors of one dtype and shape: [len(infos), *shape] in their stored dtype."""
        first = infos[0]
        dst = torch.empty((len(infos), first.nbytes), dtype=torch.uint8, device=device)
        self._read_into(infos, dst)
        dtype = SAFETENSORS_DTYPES[first.dtype]
        return dst.view(dtype).reshape(len(infos), *first.shape)

    def read_tensor(self, info: TensorInfo, *, device: torch.device | str = "cpu") -> Tensor:
        return self.read_tensors([info], device=device)[0]

    def get_tensor(self, name: str, *, device: torch.device | str = "cpu") -> Tensor:
        """One tensor by name, as stored."""
        return self.read_tensor(self.headers_for([name])[name], device=device)

    # ------------------------------------------------------------------ layer

    def layer_names(self, i: int) -> list[str]:
        """Every tensor name of layer i in the index (`layers.{i}.` after the schema's prefix)."""
        return self.names_with_prefix(layer_schema(self.config, i).prefix + ".")

    def plan_layer(self, i: int) -> "LayerPlan":
        """Validate layer i against the schema using headers only (no tensor data read)."""
        schema = layer_schema(self.config, i)
        present = self.layer_names(i)
        infos = self.headers_for(present)
        # A layer's linears: every LinearSpec must exist; its format comes from the stored dtypes.
        linears: dict[str, tuple[LinearSpec, str, list[TensorSpec]]] = {}
        for spec in schema.linear_specs():
            if f"{spec.module}.weight" not in infos:
                raise MissingTensorError("required by the schema, not in the weight_map", file=self._where(spec.module),
                                         tensor=f"{spec.module}.weight")
            fmt = linear_format_of(spec.module, infos)
            _check_k(spec, fmt, infos[f"{spec.module}.weight"].file)
            linears[spec.module] = (spec, fmt, _linear_tensor_specs(fmt, spec.module, spec.n, spec.k, infos))
        plain = list(schema.norms) + list(schema.router)
        for tspec in plain + [t for (_, _, ts) in linears.values() for t in ts]:
            info = infos.get(tspec.name)
            if info is None:
                raise MissingTensorError("required by the schema, not in the weight_map",
                                         file=self._where(tspec.name), tensor=tspec.name)
            _check_tensor(info, tspec)
        used = {t.name for t in plain} | {t.name for (_, _, ts) in linears.values() for t in ts}
        extras = [n for n in present if n not in used]
        return LayerPlan(i, schema, infos, linears, plain, extras)

    def load_layer(self, i: int, *, device: torch.device | str = "cpu", check_scales: bool = True) -> LayerWeights:
        """Layer i as typed objects. Opens only the shards that hold `layers.{i}.` tensors.

        check_scales: raise NanScaleError for NaN scale bytes or non-finite / non-positive
        global scales (lint passes False and reports them as findings instead).
        """
        plan = self.plan_layer(i)
        schema = plan.schema
        experts = None
        if schema.experts:
            experts = self._load_stack([t for t in schema.experts], plan, device)
        shared = self._load_stack([schema.shared], plan, device, stacked=False) if schema.shared else None
        dense = self._load_stack([schema.dense], plan, device, stacked=False) if schema.dense else None
        attention = {s.role: self._load_linear([s.module], plan, device, stacked=False) for s in schema.attention}
        norms: dict[str, Tensor] = {}
        router_t: dict[str, Tensor] = {}
        for tspec in plan.plain:
            t = self.read_tensor(plan.infos[tspec.name], device=device)
            (norms if tspec in schema.norms else router_t)[tspec.role] = t
        router = None
        if "gate_weight" in router_t:
            tid = router_t.get("tid2eid")
            router = Router(router_t["gate_weight"], router_t.get("gate_bias"),
                            tid.to(torch.int64) if tid is not None else None)
        extras = {n[len(schema.prefix) + 1:]: self.read_tensor(plan.infos[n], device=device) for n in plan.extras}
        layer = LayerWeights(i, self.config.schema, attention, norms, router, experts, shared, dense, extras)
        if check_scales:
            for module, lin in iter_linears(layer):
                bad = scale_defects(lin)
                if bad:
                    info = plan.infos.get(bad[0][0])
                    raise NanScaleError(bad[0][1], file=info.file if info else None, tensor=bad[0][0])
        return layer

    def _load_stack(self, trios: list[tuple[LinearSpec, LinearSpec, LinearSpec]], plan: "LayerPlan",
                    device, stacked: bool = True) -> GatedMlp:
        mods = [[t[j].module for t in trios] for j in range(3)]
        return GatedMlp(*(self._load_linear(m, plan, device, stacked) for m in mods))

    def _load_linear(self, modules: list[str], plan: "LayerPlan", device, stacked: bool) -> Linear:
        fmts = {plan.linears[m][1] for m in modules}
        if len(fmts) != 1:
            raise DtypeMismatchError(f"an expert stack mixes formats {sorted(fmts)}", tensor=modules[0] + ".weight")
        fmt = fmts.pop()
        role_to_t: dict[str, Tensor] = {}
        for j, tspec in enumerate(plan.linears[modules[0]][2]):
            infos = [plan.infos[plan.linears[m][2][j].name] for m in modules]
            t = self.read_tensors(infos, device=device)
            role_to_t[tspec.role] = t if stacked else t[0]
        name = modules[0] if not stacked else modules[0].replace(".experts.0.", ".experts.*.")
        return _make_linear(fmt, name, role_to_t)

    # ------------------------------------------------------------------ mtp

    def load_prefix_linears(self, prefix: str, *, device: torch.device | str = "cpu") -> dict[str, Linear]:
        """Every linear under `prefix` (e.g. "mtp.0."), format detected from dtypes, shapes as stored
        (no schema): this is how `mtp.*` MXFP4 experts are read."""
        names = self.names_with_prefix(prefix)
        infos = self.headers_for(names)
        out: dict[str, Linear] = {}
        for n in names:
            if not n.endswith(".weight"):
                continue
            module = n[: -len(".weight")]
            fmt = linear_format_of(module, infos)
            w = infos[n]
            n_rows, cols = w.shape[-2], w.shape[-1]
            k = cols * 2 if fmt in ("nvfp4", "mxfp4") else cols
            specs = _linear_tensor_specs(fmt, module, n_rows, k, infos)
            for s in specs:
                if s.name not in infos:
                    raise MissingTensorError("required for its format", file=w.file, tensor=s.name)
                _check_tensor(infos[s.name], s)
            out[module] = _make_linear(fmt, module, {s.role: self.read_tensor(infos[s.name], device=device)
                                                    for s in specs})
        return out


@dataclass(frozen=True)
class LayerPlan:
    """Layer i validated from headers: infos per tensor, per linear (spec, format, tensor specs),
    the plain tensors and the names the schema does not know (extras)."""

    index: int
    schema: LayerSchema
    infos: Mapping[str, TensorInfo]
    linears: Mapping[str, tuple[LinearSpec, str, list[TensorSpec]]]
    plain: list[TensorSpec]
    extras: list[str]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())


def _readinto_full(f, buf_u8: Tensor) -> int:
    """readinto until the buffer is full or EOF (a raw read may return fewer bytes)."""
    if buf_u8.numel() == 0:
        return 0
    view = memoryview(buf_u8.numpy())
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _check_tensor(info: TensorInfo, spec: TensorSpec) -> None:
    if info.dtype not in spec.dtypes:
        raise DtypeMismatchError(f"stored {info.dtype}, expected {' or '.join(spec.dtypes)}", file=info.file,
                                 tensor=info.name)
    if info.shape != spec.shape:
        raise ShapeMismatchError(f"stored shape {list(info.shape)}, expected {list(spec.shape)}", file=info.file,
                                 tensor=info.name)


def _make_linear(fmt: str, module: str, t: Mapping[str, Tensor]) -> Linear:
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
