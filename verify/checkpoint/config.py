"""config.json and the quantization config: `ModelConfig`, `QuantConfig` and their parsers.

`hf_quant_config.json` (ModelOpt) holds a `quantization` block; without it, config.json's
`quantization_config` is read (when both exist, Checkpoint checks that they agree). Source of
the keys: shared/NVFP4_FACTS.md sections 4 and 5.

Every value is checked as it is read: sizes and counts are JSON integers >= 1 (or >= 0 where
zero means "none"), routed_scaling_factor and swiglu_limit finite and > 0, scoring_func one the
reference router implements, exclude_modules a list of patterns, an NVFP4 group_size 16. A bad
value raises ConfigValueError naming the file and the key; nothing is truncated or coerced
(hidden_size 256.7 is an error, not 256).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from references.router import SCORING_FUNCS
from verify.checkpoint.errors import (
    CheckpointError, ConfigValueError, MalformedConfigError, UnsupportedSchemaError, open_checkpoint_file,
)

__all__ = ["ModelConfig", "QuantConfig", "model_config_from_json", "quant_config_from_dir", "quant_configs_from_dir",
           "read_json_object", "NVFP4_BLOCK", "MXFP4_BLOCK", "FP8_BLOCK", "SCORING_FUNCS"]

NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
FP8_BLOCK = 128


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V4 or DeepSeek-V3/R1 model, from config.json.

    schema: "deepseek_v4" or "deepseek_v3". Fields that a schema lacks are None
    (V3 has no hash layers, swiglu_limit or o_groups; V4 has no group-limited top-k).
    num_nextn_predict_layers: MTP blocks (V4 `mtp.{j}.`, V3 `model.layers.{num_layers + j}.`).
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
    num_nextn_predict_layers: int = 0
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
    exclude_modules (fnmatch patterns; config.json's `ignore` is the same list), source file
    (config.json's block is named `.../config.json:quantization_config`), `path` (the file), which
    key held the patterns and whether the block had one at all."""

    quant_algo: str
    group_size: int
    exclude_modules: tuple[str, ...]
    source: str
    path: str = ""
    exclude_key: str = "exclude_modules"
    exclude_given: bool = True  # False: the block has neither exclude_modules nor ignore

    def is_excluded(self, module: str) -> bool:
        return any(fnmatch.fnmatchcase(module, p) for p in self.exclude_modules)

    def excluded_matcher(self) -> Callable[[str], bool]:
        """is_excluded as one compiled regex (for checking many names)."""
        if not self.exclude_modules:
            return lambda name: False
        rx = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.exclude_modules))
        return lambda name: rx.match(name) is not None


def read_json_object(path: Path, error: type[CheckpointError]) -> dict:
    """The JSON object in `path`; `error` (naming the file) when it is not valid JSON or not an
    object; UnreadableFileError when the file cannot be read (permission, a directory, a loop)."""
    with open_checkpoint_file(path, path.name, missing=error) as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise error(f"not valid JSON ({e})", file=path) from None
    if not isinstance(data, dict):
        raise error(f"expected a JSON object, got {type(data).__name__}", file=path)
    return data


# ----------------------------------------------------------------------------- typed reads


class _Reader:
    """Typed, range-checked reads of one JSON object's keys (the first present alias wins)."""

    def __init__(self, raw: Mapping, path: Path | str):
        self.raw, self.path = raw, path

    def _find(self, keys: tuple[str, ...]) -> tuple[str, Any] | None:
        for k in keys:
            if k in self.raw and self.raw[k] is not None:
                return k, self.raw[k]
        return None

    def _bad(self, key: str, value: Any, problem: str) -> ConfigValueError:
        return ConfigValueError(f"{key}={value!r} {problem}", file=self.path, key=key)

    def integer(self, *keys: str, default: Any = ..., minimum: int = 1, maximum: int | None = None,
            maximum_key: str = "") -> Any:
        found = self._find(keys)
        if found is None:
            if default is ...:
                raise MalformedConfigError(f"missing key {keys[0]!r}", file=self.path, key=keys[0])
            return default
        k, v = found
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(k, v, f"is not an integer (a JSON {type(v).__name__})")
        if isinstance(v, float):
            if not v.is_integer():
                raise self._bad(k, v, "is not an integer")
            v = int(v)
        if v < minimum:
            raise self._bad(k, v, f"is below {minimum}" if minimum else "is negative")
        if maximum is not None and v > maximum:
            raise self._bad(k, v, f"is above {maximum_key}={maximum}")
        return v

    def number(self, *keys: str, default: Any = ..., positive: bool = True) -> Any:
        found = self._find(keys)
        if found is None:
            if default is ...:
                raise MalformedConfigError(f"missing key {keys[0]!r}", file=self.path, key=keys[0])
            return default
        k, v = found
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(k, v, f"is not a number (a JSON {type(v).__name__})")
        v = float(v)
        if not math.isfinite(v):
            raise self._bad(k, v, "is not finite")
        if positive and v <= 0:
            raise self._bad(k, v, "is not positive")
        return v

    def choice(self, *keys: str, choices: tuple[str, ...], default: str) -> str:
        found = self._find(keys)
        if found is None:
            return default
        k, v = found
        if not isinstance(v, str) or v not in choices:
            raise self._bad(k, v, f"is not one of {', '.join(choices)}")
        return v

    def flag(self, *keys: str, default: bool) -> bool:
        found = self._find(keys)
        if found is None:
            return default
        k, v = found
        if not isinstance(v, bool):
            raise self._bad(k, v, "is not true or false")
        return v


def model_config_from_json(raw: Mapping, path: Path) -> ModelConfig:
    """ModelConfig from config.json's dict. V4 when model_type says deepseek_v4 or the
    V4-only keys (num_hash_layers, o_groups) are present; V3 for deepseek_v3 / R1.
    ConfigValueError (naming the key) for a value of the wrong type or out of range."""
    model_type = str(raw.get("model_type", "")).lower()
    archs = raw.get("architectures", []) or []
    arch = " ".join(str(a) for a in archs).lower() if isinstance(archs, list) else str(archs).lower()
    if "v4" in model_type or "v4" in arch or "num_hash_layers" in raw or "o_groups" in raw:
        schema = "deepseek_v4"
    elif "deepseek_v3" in model_type or "deepseekv3" in arch or "deepseek_v2" in model_type:
        schema = "deepseek_v3"
    else:
        raise UnsupportedSchemaError(
            f"model_type={raw.get('model_type')!r}, architectures={raw.get('architectures')!r}: "
            "expected a DeepSeek-V4 or DeepSeek-V3/R1 config", file=path)
    r = _Reader(raw, path)
    num_layers = r.integer("num_hidden_layers", "n_layers")
    n_experts = r.integer("n_routed_experts")
    common = dict(
        schema=schema,
        hidden_size=r.integer("hidden_size", "dim"),
        num_layers=num_layers,
        vocab_size=r.integer("vocab_size"),
        n_routed_experts=n_experts,
        n_shared_experts=r.integer("n_shared_experts", default=1),
        top_k=r.integer("num_experts_per_tok", "n_activated_experts", maximum=n_experts, maximum_key="n_routed_experts"),
        moe_intermediate_size=r.integer("moe_intermediate_size", "moe_inter_dim"),
        routed_scaling_factor=r.number("routed_scaling_factor", "route_scale", default=1.0),
        n_heads=r.integer("num_attention_heads", "n_heads"),
        q_lora_rank=r.integer("q_lora_rank"),
        num_nextn_predict_layers=r.integer("num_nextn_predict_layers", "n_mtp_layers", default=0, minimum=0),
    )
    if schema == "deepseek_v4":
        cfg = ModelConfig(
            **common,
            scoring_func=r.choice("scoring_func", "score_func", choices=SCORING_FUNCS, default="sqrtsoftplus"),
            num_hash_layers=r.integer("num_hash_layers", "n_hash_layers", default=0, minimum=0, maximum=num_layers,
                                  maximum_key="num_hidden_layers"),
            swiglu_limit=r.number("swiglu_limit", default=None),
            head_dim=r.integer("head_dim"),
            o_groups=r.integer("o_groups"),
            o_lora_rank=r.integer("o_lora_rank"),
        )
        if (cfg.n_heads * cfg.head_dim) % cfg.o_groups:
            raise ConfigValueError(f"o_groups={cfg.o_groups} does not divide num_attention_heads * head_dim = "
                                   f"{cfg.n_heads * cfg.head_dim}", file=path, key="o_groups")
        return cfg
    n_group = r.integer("n_group", "n_expert_groups", default=None)
    cfg = ModelConfig(
        **common,
        scoring_func=r.choice("scoring_func", "score_func", choices=SCORING_FUNCS, default="sigmoid"),
        first_k_dense_replace=r.integer("first_k_dense_replace", "n_dense_layers", default=0, minimum=0,
                                    maximum=num_layers, maximum_key="num_hidden_layers"),
        intermediate_size=r.integer("intermediate_size", "inter_dim"),
        kv_lora_rank=r.integer("kv_lora_rank"),
        qk_nope_head_dim=r.integer("qk_nope_head_dim"),
        qk_rope_head_dim=r.integer("qk_rope_head_dim"),
        v_head_dim=r.integer("v_head_dim"),
        n_group=n_group,
        topk_group=r.integer("topk_group", "n_limited_groups", default=None,
                         maximum=n_group, maximum_key="n_group"),
        norm_topk_prob=r.flag("norm_topk_prob", default=True),
    )
    if n_group is not None and n_experts % n_group:
        raise ConfigValueError(f"n_group={n_group} does not divide n_routed_experts={n_experts}", file=path,
                               key="n_group")
    return cfg


# ----------------------------------------------------------------------------- quantization config


def _quant_from_block(q: Mapping, source: str, path: Path) -> QuantConfig:
    algo = q.get("quant_algo") or q.get("quant_method")
    if not algo:
        raise MalformedConfigError("quantization config has no quant_algo", file=source, key="quant_algo")
    if not isinstance(algo, str):
        raise ConfigValueError(f"quant_algo={algo!r} is not a string", file=source, key="quant_algo")
    algo = algo.upper()
    key = "exclude_modules" if "exclude_modules" in q else "ignore"
    exclude = q.get(key) or []
    if isinstance(exclude, str):
        raise ConfigValueError(f"{key}={exclude!r} is a string, not a list of module patterns (iterated, it "
                               "would be one pattern per character)", file=source, key=key)
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise ConfigValueError(f"{key}={exclude!r} is not a list of module patterns (strings)", file=source, key=key)
    group = _Reader(q, source).integer("group_size", default=NVFP4_BLOCK)
    if algo == "NVFP4" and group != NVFP4_BLOCK:
        raise ConfigValueError(f"group_size={group} with quant_algo NVFP4: NVFP4 block scales cover {NVFP4_BLOCK} "
                               f"elements (weight_scale [N, K/{NVFP4_BLOCK}]); a loader that trusts {group} "
                               "applies every scale to the wrong elements", file=source, key="group_size")
    return QuantConfig(quant_algo=algo, group_size=group, exclude_modules=tuple(exclude), source=source,
                       path=str(path), exclude_key=key, exclude_given=key in q)


def quant_configs_from_dir(directory: Path, config_raw: Mapping) -> tuple[QuantConfig | None, QuantConfig | None]:
    """(hf_quant_config.json's `quantization` block, config.json's `quantization_config`), each
    None when absent; both parsed and checked (ConfigValueError naming the file and the key)."""
    path = directory / "hf_quant_config.json"
    hf = None
    if path.exists() or path.is_symlink():
        raw = read_json_object(path, MalformedConfigError)
        q = raw.get("quantization", raw)
        if not isinstance(q, Mapping):
            raise ConfigValueError(f"quantization={q!r} is not an object", file=path, key="quantization")
        hf = _quant_from_block(q, str(path), path)
    cj = None
    qc = config_raw.get("quantization_config")
    if qc is not None:
        if not isinstance(qc, Mapping):
            raise ConfigValueError(f"quantization_config={qc!r} is not an object", file=directory / "config.json",
                                   key="quantization_config")
        cj = _quant_from_block(qc, str(directory / "config.json") + ":quantization_config",
                               directory / "config.json")
    return hf, cj


def quant_config_from_dir(directory: Path, config_raw: Mapping) -> QuantConfig | None:
    """hf_quant_config.json's `quantization` block, else config.json's `quantization_config`."""
    hf, cj = quant_configs_from_dir(directory, config_raw)
    return hf or cj
