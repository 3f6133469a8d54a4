"""config.json and the quantization config: `ModelConfig`, `QuantConfig` and their parsers.

`hf_quant_config.json` (ModelOpt) holds a `quantization` block; without it, config.json's
`quantization_config` is read. Source of the keys: shared/NVFP4_FACTS.md sections 4 and 5.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from verify.checkpoint.errors import CheckpointError, MalformedConfigError, UnsupportedSchemaError

__all__ = ["ModelConfig", "QuantConfig", "model_config_from_json", "quant_config_from_dir", "read_json_object",
           "NVFP4_BLOCK", "MXFP4_BLOCK", "FP8_BLOCK"]

NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
FP8_BLOCK = 128


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


def read_json_object(path: Path, error: type[CheckpointError]) -> dict:
    """The JSON object in `path`; `error` (naming the file) when it is not valid JSON or not an object."""
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
        raw = read_json_object(path, MalformedConfigError)
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

