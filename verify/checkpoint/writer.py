"""Fixture checkpoints in the exact DeepSeek-V4 / V3 NVFP4 file format (test data, not references).

`python -m verify fixture --out DIR --preset NAME` writes config.json,
hf_quant_config.json (V4) or config.json's quantization_config (V3), sharded
safetensors and model.safetensors.index.json. Weights are drawn from
heavy-tailed distributions with outlier input channels and quantized with the
emulator's `modelopt` recipe (references.nvfp4.quantize_nvfp4_weight_checkpoint);
FP8 block-128 and MXFP4 tensors are made here with the emulator's bit-level codecs.

Presets:
  mini-v4       4 layers (0-2 hash-routed, 3 score-routed), hidden 256, 16 experts x 128,
                top-6, shared expert; layer 0 NVFP4 attention + shared expert, layers 1-3
                FP8 block-128 ones: layers 1 and 3 in DeepSeek-V4's encoding (E8M0 `.scale`, NVIDIA's
                export), layer 2 in DeepSeek-V3's (float32 `.weight_scale_inv`, the same power-of-two
                scale values: one model, both encodings); an MTP block `mtp.0` as DeepSeek-V4 ships it:
                FP8 e_proj / h_proj (E8M0 `.scale`), enorm / hnorm / norm / ffn_norm, and MXFP4 routed
                experts (I8 + E8M0 per 32; two of them, to keep the committed fixture small).
  mini-v3       the same in DeepSeek-V3/R1 naming (layer 0 dense; FP8 via weight_scale_inv).
  v4-pro-layer  layer 3 of DeepSeek-V4-Pro at full size (hidden 7168, 384 experts x 3072), with
                the indexer's FP8 wq_b (64 x 128 index heads: V3.2's, assumed), generated on the
                GPU; never committed.
  v4-pro-layer-nvfp4  the same layer with attention, indexer and shared expert in NVFP4 (an
                all-NVFP4 export): dense NVFP4 linears at full size; GPU only, never committed.

Generation is bit-reproducible everywhere: one seeded verify.rng.CounterRng (integer hashing,
then correctly rounded float ops only; log-normal gains from a table of correctly rounded
exp values), drawn in a fixed order. The same bytes come out on any CPU vector path
(ATEN_CPU_CAPABILITY), on CUDA and with any torch release.
Data generators are named make_*; they are not emulators.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from references.codecs import f32_to_e2m1_codes, f32_to_e4m3_bytes, f32_to_ue8m0_bytes
from references.nvfp4 import global_dec_scale_from_amax, pack_e2m1x2_low_first, quantize_nvfp4_weight_checkpoint
from references.recipes import MODELOPT
from verify.rng import CounterRng

__all__ = [
    "FixturePreset", "PRESETS", "make_checkpoint", "make_heavy_tailed_weight", "make_fp8_block128_tensors",
    "make_mxfp4_tensors", "make_channel_gains", "make_nvfp4_tensors", "write_safetensors", "checkpoint_digests",
    "add_fixture_arguments", "cli_fixture",
]

_ST_DTYPE = {
    torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bfloat16: "BF16",
    torch.float32: "F32", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0",
}


@dataclass(frozen=True)
class FixturePreset:
    """What a preset writes. formats: layer -> format of attention and shared expert
    ("nvfp4", "fp8" (the schema's encoding: V4 E8M0 `.scale`, V3 float32 `.weight_scale_inv`), "fp8-v3"
    (FP8 with V3's `.weight_scale_inv` under any schema), "bf16"); layers: which decoder layers are written
    (others absent)."""

    name: str
    schema: str
    config: dict
    formats: dict[int, str]
    layers: tuple[int, ...]
    seed: int
    with_globals: bool = True
    with_mtp: bool = False
    experts_per_shard: int = 0  # 0: one shard per layer; else split routed experts over shards
    dense_format: str = "nvfp4"
    exclude_extra: tuple[str, ...] = field(default_factory=tuple)
    # the attention's indexer wq_b ([index_n_heads * index_head_dim, q_lora_rank], the layer's format), from a
    # generator of its own (seed + 1): every other tensor keeps its bytes
    with_indexer: bool = False


_V4_MINI = dict(
    architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", torch_dtype="bfloat16",
    hidden_size=256, num_hidden_layers=4, vocab_size=256, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=6, moe_intermediate_size=128, num_hash_layers=3, scoring_func="sqrtsoftplus",
    routed_scaling_factor=2.5, swiglu_limit=10.0, q_lora_rank=128, num_attention_heads=4, head_dim=64,
    o_groups=2, o_lora_rank=64, num_nextn_predict_layers=1,
)
_V4_PRO = dict(
    _V4_MINI, hidden_size=7168, num_hidden_layers=61, vocab_size=129280, n_routed_experts=384,
    moe_intermediate_size=3072, q_lora_rank=1536, num_attention_heads=128, head_dim=512, o_groups=16,
    o_lora_rank=1024,
    # the indexer's heads: DeepSeek-V3.2's values (NVFP4_FACTS.md does not give V4's; N is read from the
    # stored weight, so a checkpoint with other values loads as it is)
    index_n_heads=64, index_head_dim=128,
)
_V3_MINI = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", torch_dtype="bfloat16",
    hidden_size=256, num_hidden_layers=4, vocab_size=256, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=8, moe_intermediate_size=128, intermediate_size=256, first_k_dense_replace=1,
    scoring_func="sigmoid", routed_scaling_factor=2.5, n_group=4, topk_group=2, norm_topk_prob=True,
    topk_method="noaux_tc", q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
    v_head_dim=32, num_attention_heads=4, num_key_value_heads=4,
)

PRESETS: dict[str, FixturePreset] = {
    "mini-v4": FixturePreset("mini-v4", "deepseek_v4", _V4_MINI, {0: "nvfp4", 1: "fp8", 2: "fp8-v3", 3: "fp8"},
                             (0, 1, 2, 3), seed=20240404, with_mtp=True),
    "mini-v3": FixturePreset("mini-v3", "deepseek_v3", _V3_MINI, {0: "bf16", 1: "nvfp4", 2: "fp8", 3: "bf16"},
                             (0, 1, 2, 3), seed=20240303),
    "v4-pro-layer": FixturePreset("v4-pro-layer", "deepseek_v4", _V4_PRO, {3: "fp8"}, (3,), seed=61,
                                  with_globals=False, experts_per_shard=64, with_indexer=True),
    # the same layer with attention, indexer and shared expert in NVFP4 (an all-NVFP4 export): dense NVFP4 linears
    # at full size (K 1536 .. 16384), where a backend whose summation order depends on M shows it in the batch check
    "v4-pro-layer-nvfp4": FixturePreset("v4-pro-layer-nvfp4", "deepseek_v4", _V4_PRO, {3: "nvfp4"}, (3,), seed=61,
                                        with_globals=False, experts_per_shard=64, with_indexer=True),
}


# ============================================================================= data generators


def make_heavy_tailed_weight(n: int, k: int, *, gen: CounterRng, outlier_frac: float = 1 / 64,
                             outlier_gain: float = 12.0, row_gain: Tensor | None = None,
                             col_gain: Tensor | None = None) -> Tensor:
    """[n, k] float32 test weights: Gaussian times a log-normal scale (heavy tails), std about
    1/sqrt(k). Input channels (columns) are scaled by col_gain when given, else a few random whole
    columns are amplified by outlier_gain (outlier channels); rows are scaled by row_gain if given."""
    w = gen.normal((n, k))
    w.mul_(gen.lognormal((n, k), sigma=0.5))
    if col_gain is None:
        n_out = max(1, int(k * outlier_frac))
        cols = gen.permutation(k)[:n_out]
        w[:, cols] *= outlier_gain
    else:
        w.mul_(col_gain.reshape(1, k))
    if row_gain is not None:
        w.mul_(row_gain.reshape(n, 1))
    return w.mul_(1.0 / math.sqrt(k))


def make_channel_gains(k: int, *, gen: CounterRng, outlier_frac: float = 1 / 64,
                       outlier_gain: float = 12.0, sigma: float = 0.5) -> Tensor:
    """[k] float32 per-channel gains: log-normal(0, sigma) with a few outlier channels x outlier_gain.
    One hidden-channel vector is shared by a layer's MLPs (the residual stream's outlier features,
    read by w1/w3 columns and written by w2 rows); each expert draws its own neuron gains (w1/w3
    rows, w2 columns). This cross-tensor structure is what the nibble-order lint keys on."""
    g = gen.lognormal(k, sigma=sigma)
    n_out = max(1, int(k * outlier_frac))
    g[gen.permutation(k)[:n_out]] *= outlier_gain
    return g


def make_input_scale(gen: CounterRng) -> Tensor:
    """A plausible static activation decode scale amax_x / 2688 (amax_x in [2, 40)), 0-d float32."""
    amax = (gen.uniform(()) * 38 + 2).to(torch.float32)
    return global_dec_scale_from_amax(amax)


def make_nvfp4_tensors(w_f32: Tensor, *, amax_f32: Tensor | None = None) -> dict[str, Tensor]:
    """ModelOpt NVFP4 checkpoint tensors of w (recipe `modelopt`): weight, weight_scale, weight_scale_2."""
    return quantize_nvfp4_weight_checkpoint(w_f32, recipe=MODELOPT, amax_f32=amax_f32)


def _block_amax(w_f32: Tensor, bn: int, bk: int) -> Tensor:
    n, k = w_f32.shape
    pn, pk = math.ceil(n / bn) * bn, math.ceil(k / bk) * bk
    p = torch.zeros(pn, pk, dtype=torch.float32, device=w_f32.device)
    p[:n, :k] = w_f32.abs()
    return p.reshape(pn // bn, bn, pk // bk, bk).amax(dim=(1, 3))


def _pow2_from_ue8m0(b_u8: Tensor) -> Tensor:
    return torch.ldexp(torch.ones_like(b_u8, dtype=torch.float32), b_u8.to(torch.int32) - 127)


def make_fp8_block128_tensors(w_f32: Tensor, *, scale_storage: str = "e8m0") -> dict[str, Tensor]:
    """FP8 block-128 tensors: block scale = ceil power of two of amax/448 (zero block -> 1.0),
    weight = E4M3(w / scale) saturating. scale_storage "e8m0" (V4 `scale`) or "f32" (V3 `weight_scale_inv`)."""
    n, k = w_f32.shape
    amax = _block_amax(w_f32, 128, 128)
    s_u8 = f32_to_ue8m0_bytes(amax / 448.0, rounding="ceil")
    s_u8 = torch.where(amax == 0, torch.full_like(s_u8, 127), s_u8)
    s_f32 = _pow2_from_ue8m0(s_u8)
    full = s_f32.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    q = f32_to_e4m3_bytes(w_f32 / full, saturate=True).view(torch.float8_e4m3fn)
    if scale_storage == "f32":
        return {"weight": q, "weight_scale_inv": s_f32}
    return {"weight": q, "scale": s_u8.view(torch.float8_e8m0fnu)}


def make_mxfp4_tensors(w_f32: Tensor) -> dict[str, Tensor]:
    """MXFP4 (block 32) tensors as DeepSeek-V4 stores mtp experts: weight I8 [N, K/2] packed
    E2M1 (low nibble first), scale F8_E8M0 [N, K/32] = ceil power of two of amax/6."""
    n, k = w_f32.shape
    wb = w_f32.reshape(n, k // 32, 32)
    amax = wb.abs().amax(-1)
    s_u8 = f32_to_ue8m0_bytes(amax / 6.0, rounding="ceil")
    s_u8 = torch.where(amax == 0, torch.full_like(s_u8, 127), s_u8)
    codes = f32_to_e2m1_codes((wb / _pow2_from_ue8m0(s_u8).unsqueeze(-1)).reshape(n, k), sign_rule="lt_zero")
    return {"weight": pack_e2m1x2_low_first(codes).view(torch.int8), "scale": s_u8.view(torch.float8_e8m0fnu)}


def make_linear_tensors(fmt: str, w_f32: Tensor, gen: CounterRng, *, schema: str,
                        amax_f32: Tensor | None = None, input_scale_f32: Tensor | None = None) -> dict[str, Tensor]:
    """The checkpoint tensors (suffix -> tensor) of one linear in format fmt."""
    if fmt == "nvfp4":
        t = make_nvfp4_tensors(w_f32, amax_f32=amax_f32)
        t["input_scale"] = input_scale_f32 if input_scale_f32 is not None else make_input_scale(gen)
        return t
    if fmt == "fp8":
        return make_fp8_block128_tensors(w_f32, scale_storage="e8m0" if schema == "deepseek_v4" else "f32")
    if fmt == "fp8-v3":
        return make_fp8_block128_tensors(w_f32, scale_storage="f32")
    if fmt == "mxfp4":
        return make_mxfp4_tensors(w_f32)
    return {"weight": w_f32.to(torch.bfloat16)}


def make_gated_mlp_tensors(prefix: str, names: tuple[str, str, str], hidden: int, inter: int, fmt: str,
                           gen: CounterRng, *, schema: str, hidden_gain: Tensor | None = None) -> dict[str, Tensor]:
    """w1/w3/w2 of one (expert) MLP. NVFP4 w1 and w3 share weight_scale_2 (amax over both, as the
    official DeepSeek-V4 export does) and input_scale (same input). Neuron gains (one per
    intermediate channel) scale w1/w3 rows and w2 columns; hidden_gain (shared by the layer)
    scales w1/w3 columns and w2 rows."""
    if hidden_gain is None:
        hidden_gain = make_channel_gains(hidden, gen=gen)
    neuron_gain = make_channel_gains(inter, gen=gen, outlier_frac=0.0, sigma=0.6)
    w1 = make_heavy_tailed_weight(inter, hidden, gen=gen, row_gain=neuron_gain, col_gain=hidden_gain)
    w3 = make_heavy_tailed_weight(inter, hidden, gen=gen, row_gain=neuron_gain, col_gain=hidden_gain)
    w2 = make_heavy_tailed_weight(hidden, inter, gen=gen, row_gain=hidden_gain, col_gain=neuron_gain)
    shared_amax = torch.maximum(w1.abs().amax(), w3.abs().amax())
    x_scale = make_input_scale(gen)
    out: dict[str, Tensor] = {}
    for name, w, amax, xs in ((names[0], w1, shared_amax, x_scale), (names[1], w3, shared_amax, x_scale),
                              (names[2], w2, None, None)):
        for suffix, t in make_linear_tensors(fmt, w, gen, schema=schema, amax_f32=amax, input_scale_f32=xs).items():
            out[f"{prefix}.{name}.{suffix}"] = t
    return out


# ============================================================================= layer tensors


def _v4_layer(preset: FixturePreset, i: int, gen: CounterRng) -> Iterator[dict[str, Tensor]]:
    """Yields the tensors of V4 layer i in groups (attention+norms+router, then expert chunks)."""
    c = preset.config
    h, nh, hd, g, r, ql = (c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["o_groups"],
                           c["o_lora_rank"], c["q_lora_rank"])
    fmt = preset.formats[i]
    p = f"layers.{i}"
    t: dict[str, Tensor] = {}
    for name, n, k in (("wq_a", ql, h), ("wq_b", nh * hd, ql), ("wkv", hd, h), ("wo_a", g * r, nh * hd // g),
                       ("wo_b", h, g * r)):
        for suffix, x in make_linear_tensors(fmt, make_heavy_tailed_weight(n, k, gen=gen), gen,
                                             schema=preset.schema).items():
            t[f"{p}.attn.{name}.{suffix}"] = x
    for name, n in (("attn_norm.weight", h), ("ffn_norm.weight", h), ("attn.q_norm.weight", ql),
                    ("attn.kv_norm.weight", hd)):
        t[f"{p}.{name}"] = (1 + 0.1 * gen.normal(n)).to(torch.bfloat16)
    t[f"{p}.attn.attn_sink"] = gen.normal(nh)
    e_n, k_top = c["n_routed_experts"], c["num_experts_per_tok"]
    t[f"{p}.ffn.gate.weight"] = (gen.normal((e_n, h)) / math.sqrt(h)).to(torch.bfloat16)
    if i < c["num_hash_layers"]:
        t[f"{p}.ffn.gate.tid2eid"] = gen.argsort_rows(c["vocab_size"], e_n)[:, :k_top].contiguous()
    else:
        t[f"{p}.ffn.gate.bias"] = 0.01 * gen.normal(e_n)
    hidden_gain = make_channel_gains(h, gen=gen)
    t.update(make_gated_mlp_tensors(f"{p}.ffn.shared_experts", ("w1", "w3", "w2"), h,
                                    c["moe_intermediate_size"] * c["n_shared_experts"], fmt, gen, schema=preset.schema,
                                    hidden_gain=hidden_gain))
    if preset.with_indexer:
        own = CounterRng(preset.seed + 1, device=gen.device)
        w = make_heavy_tailed_weight(c["index_n_heads"] * c["index_head_dim"], ql, gen=own)
        for suffix, x in make_linear_tensors(fmt, w, own, schema=preset.schema).items():
            t[f"{p}.attn.indexer.wq_b.{suffix}"] = x
    yield t
    yield from _experts(preset, f"{p}.ffn.experts", ("w1", "w3", "w2"), "nvfp4", gen, hidden_gain)


def _experts(preset: FixturePreset, prefix: str, names, fmt: str, gen: CounterRng,
             hidden_gain: Tensor | None = None) -> Iterator[dict[str, Tensor]]:
    c = preset.config
    chunk = preset.experts_per_shard or c["n_routed_experts"]
    t: dict[str, Tensor] = {}
    for e in range(c["n_routed_experts"]):
        t.update(make_gated_mlp_tensors(f"{prefix}.{e}", names, c["hidden_size"], c["moe_intermediate_size"], fmt,
                                        gen, schema=preset.schema, hidden_gain=hidden_gain))
        if (e + 1) % chunk == 0:
            yield t
            t = {}
    if t:
        yield t


def _v3_layer(preset: FixturePreset, i: int, gen: CounterRng) -> Iterator[dict[str, Tensor]]:
    c = preset.config
    h, nh, ql, kl = c["hidden_size"], c["num_attention_heads"], c["q_lora_rank"], c["kv_lora_rank"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    fmt = preset.formats[i]
    p = f"model.layers.{i}"
    t: dict[str, Tensor] = {}
    for name, n, k in (("q_a_proj", ql, h), ("q_b_proj", nh * (nope + rope), ql),
                       ("kv_a_proj_with_mqa", kl + rope, h), ("kv_b_proj", nh * (nope + v), kl), ("o_proj", h, nh * v)):
        for suffix, x in make_linear_tensors(fmt, make_heavy_tailed_weight(n, k, gen=gen), gen,
                                             schema=preset.schema).items():
            t[f"{p}.self_attn.{name}.{suffix}"] = x
    for name, n in (("input_layernorm.weight", h), ("post_attention_layernorm.weight", h),
                    ("self_attn.q_a_layernorm.weight", ql), ("self_attn.kv_a_layernorm.weight", kl)):
        t[f"{p}.{name}"] = (1 + 0.1 * gen.normal(n)).to(torch.bfloat16)
    names = ("gate_proj", "up_proj", "down_proj")
    if i < c["first_k_dense_replace"]:
        t.update(make_gated_mlp_tensors(f"{p}.mlp", names, h, c["intermediate_size"], preset.dense_format, gen,
                                        schema=preset.schema))
        yield t
        return
    e_n = c["n_routed_experts"]
    t[f"{p}.mlp.gate.weight"] = (gen.normal((e_n, h)) / math.sqrt(h)).to(torch.bfloat16)
    t[f"{p}.mlp.gate.e_score_correction_bias"] = 0.01 * gen.normal(e_n)
    shared_fmt = "nvfp4" if fmt == "bf16" else fmt
    hidden_gain = make_channel_gains(h, gen=gen)
    t.update(make_gated_mlp_tensors(f"{p}.mlp.shared_experts", names, h, c["moe_intermediate_size"] *
                                    c["n_shared_experts"], shared_fmt, gen, schema=preset.schema,
                                    hidden_gain=hidden_gain))
    yield t
    yield from _experts(preset, f"{p}.mlp.experts", names, "nvfp4", gen, hidden_gain)


def _globals(preset: FixturePreset, gen: CounterRng) -> dict[str, Tensor]:
    c = preset.config
    h, v = c["hidden_size"], c["vocab_size"]
    emb = lambda: (0.02 * gen.normal((v, h))).to(torch.bfloat16)  # noqa: E731
    nrm = (1 + 0.1 * gen.normal(h)).to(torch.bfloat16)
    if preset.schema == "deepseek_v4":
        return {"embed.weight": emb(), "head.weight": emb(), "norm.weight": nrm}
    return {"model.embed_tokens.weight": emb(), "lm_head.weight": emb(), "model.norm.weight": nrm}


def _mtp(preset: FixturePreset, gen: CounterRng) -> Iterator[dict[str, Tensor]]:
    """The MTP block `mtp.0` as DeepSeek-V4 ships it (NVIDIA's NVFP4 export included): two of its routed
    experts in MXFP4 (I8 + E8M0 block 32; only two, to keep the committed fixture small), then e_proj and
    h_proj [H, H] in FP8 block-128 with E8M0 `.scale`, and its norms enorm, hnorm, norm, ffn_norm (bf16).
    The experts are drawn first, so their bytes are those of the fixture before the projections were
    added; the block's attention, shared expert and gate are not written (no stage verifies them)."""
    c = preset.config
    h = c["hidden_size"]
    t: dict[str, Tensor] = {}
    for e in range(2):
        t.update(make_gated_mlp_tensors(f"mtp.0.ffn.experts.{e}", ("w1", "w3", "w2"), h,
                                        c["moe_intermediate_size"], "mxfp4", gen, schema=preset.schema))
    for name in ("e_proj", "h_proj"):
        w = make_heavy_tailed_weight(h, h, gen=gen)
        for suffix, x in make_fp8_block128_tensors(w, scale_storage="e8m0").items():
            t[f"mtp.0.{name}.{suffix}"] = x
    for name in ("enorm", "hnorm", "norm", "ffn_norm"):
        t[f"mtp.0.{name}.weight"] = (1 + 0.1 * gen.normal(h)).to(torch.bfloat16)
    yield t


# ============================================================================= files


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file (8-byte little-endian header length, JSON header padded with spaces
    to a multiple of 8, then the tensors' bytes in header order). Streams tensor by tensor, from any
    device. Returns the file size."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            b = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
            f.write(memoryview(b.numpy()))
    return 8 + len(raw) + offset


def _quant_files(preset: FixturePreset, out: Path) -> None:
    c = preset.config
    if preset.schema == "deepseek_v4":
        excl = ["embed", "head", "mtp.*", "layers.*.ffn.gate"]
        excl += [f"layers.{i}.attn*" for i, f in sorted(preset.formats.items()) if f != "nvfp4"]
        excl += [f"layers.{i}.ffn.shared_experts*" for i, f in sorted(preset.formats.items()) if f != "nvfp4"]
        quant = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": excl}
        (out / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt", "version": "nvfp4-verify-fixture"}, "quantization": quant}, indent=2))
        cfg = dict(c, quantization_config={"quant_method": "modelopt", **quant})
    else:
        ignore = ["lm_head", "model.embed_tokens", "model.layers.*.mlp.gate"]
        ignore += [f"model.layers.{i}.self_attn*" for i, f in sorted(preset.formats.items()) if f != "nvfp4"]
        ignore += [f"model.layers.{i}.mlp.shared_experts*" for i, f in sorted(preset.formats.items()) if f == "fp8"]
        cfg = dict(c, quantization_config={"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                           "ignore": ignore})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def make_checkpoint(out: str | os.PathLike, preset: str | FixturePreset, *, device: str | torch.device = "cpu",
                    seed: int | None = None) -> dict:
    """Write the preset's checkpoint into `out` (created; existing files of the same names are
    replaced). Returns a summary: files, total bytes, seconds."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gen = CounterRng(p.seed if seed is None else seed, device=device)
    groups: list[tuple[str, Iterator[dict[str, Tensor]]]] = []
    if p.with_globals:
        groups.append(("globals", iter([_globals(p, gen)])))
    layer_fn = _v4_layer if p.schema == "deepseek_v4" else _v3_layer
    for i in p.layers:
        groups.append((f"layer{i}", layer_fn(p, i, gen)))
    if p.with_mtp:
        groups.append(("mtp", _mtp(p, gen)))
    # shard file names are only known at the end (-of-N); write under temporary names, then rename
    tmp_names: list[tuple[Path, list[str]]] = []
    total = 0
    for _, it in groups:
        for tensors in it:
            path = out / f".shard-{len(tmp_names):05d}.tmp"
            total += write_safetensors(path, tensors)
            tmp_names.append((path, list(tensors)))
    n = len(tmp_names)
    weight_map: dict[str, str] = {}
    files = []
    for j, (path, names) in enumerate(tmp_names):
        final = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        path.replace(out / final)
        files.append(final)
        weight_map.update({name: final for name in names})
    _move_layer1_attention(p, out, weight_map)
    index = {"metadata": {"total_size": sum((out / f).stat().st_size for f in files)},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _quant_files(p, out)
    if device != "cpu" and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return {"preset": p.name, "out": str(out), "files": files, "bytes": total, "seconds": time.perf_counter() - t0}


def _move_layer1_attention(p: FixturePreset, out: Path, weight_map: dict[str, str]) -> None:
    """Mini presets only: move layer 1's attention tensors into layer 2's first shard, so that
    one layer straddles two shards and one shard holds two layers (as real checkpoints do)."""
    if not p.name.startswith("mini") or 1 not in p.layers or 2 not in p.layers:
        return
    from verify.checkpoint import SAFETENSORS_DTYPES, read_safetensors_header

    attn = ".attn." if p.schema == "deepseek_v4" else ".self_attn."
    prefix = "layers.1" if p.schema == "deepseek_v4" else "model.layers.1"
    moving = sorted(n for n in weight_map if n.startswith(prefix + attn))
    l2 = "layers.2." if p.schema == "deepseek_v4" else "model.layers.2."
    src = weight_map[moving[0]]
    dst = min(weight_map[n] for n in weight_map if n.startswith(l2))

    def read_all(fname: str) -> dict[str, Tensor]:
        data = bytearray((out / fname).read_bytes())  # a private copy: the file is rewritten below
        return {k: torch.frombuffer(data, dtype=torch.uint8, offset=i.start, count=i.nbytes)
                .view(SAFETENSORS_DTYPES[i.dtype]).reshape(i.shape)
                for k, i in sorted(read_safetensors_header(out / fname).items(), key=lambda kv: kv[1].start)}

    s, d = read_all(src), read_all(dst)
    moved = {k: s.pop(k) for k in moving}
    write_safetensors(out / src, s)
    write_safetensors(out / dst, {**moved, **d})
    weight_map.update({k: dst for k in moving})


CHECKPOINT_FILES = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")


def checkpoint_digests(directory: str | os.PathLike) -> dict[str, str]:
    """sha256 of every checkpoint file of a directory (config, quant config, index, *.safetensors), by
    file name (sorted). Golden reports kept beside a fixture (golden/<fixture>/<backend>.json) are not
    part of the checkpoint."""
    d = Path(directory)
    out = {}
    for f in sorted(d.iterdir()):
        if f.is_file() and (f.name in CHECKPOINT_FILES or f.suffix == ".safetensors"):
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# ============================================================================= CLI


def add_fixture_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="Directory to write the checkpoint into.")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="Which fixture. Default: %(default)r.")
    parser.add_argument("--device", default="auto",
                        help="Where to generate: cpu, cuda, or auto (cuda for the v4-pro-layer presets, else cpu). "
                             "Default: %(default)r.")
    parser.add_argument("--seed", type=int, default=None, help="Override the preset's seed. Default: %(default)r.")
    parser.add_argument("--time-load", action="store_true", default=False,
                        help="After writing, load every written layer onto --device twice (page cache warm) "
                             "and report GB/s. Default: %(default)r.")
    parser.add_argument("--json", default=None, help="Write the summary (and timings) as JSON here. "
                                                     "Default: %(default)r.")


def _resolve_device(arg: str, preset: str) -> str:
    if arg != "auto":
        return arg
    return "cuda" if preset.startswith("v4-pro-layer") and torch.cuda.is_available() else "cpu"


def time_layer_load(directory: str | os.PathLike, layer: int, *, device: str, repeats: int = 2) -> list[dict]:
    """Load `layer` onto `device` `repeats` times; per run: bytes of tensor data, seconds, GB/s."""
    from verify.checkpoint import Checkpoint

    out = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ck = Checkpoint.open(directory)
        lw = ck.load_layer(layer, device=device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out.append({"layer": layer, "device": str(device), "bytes": ck.io.tensor_bytes, "seconds": dt,
                    "gb_per_s": ck.io.tensor_bytes / dt / 1e9, "files_opened": len(ck.io.files_opened)})
        del lw
    return out


def _check_out_directory(out: str) -> None:
    """UsageError (one line naming --out) unless `out` is, or can be created as, a writable
    directory: not a file, no file on its path, no symlink loop, permission to write. Creates it."""
    from verify.errors import UsageError

    p = Path(out)
    if p.is_symlink() and not p.exists():
        why = "symlink loop" if _stat_errno(p) == errno.ELOOP else "a dangling symlink"
        raise UsageError(f"--out {out}: invalid value ({why})", argument="--out")
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {out}: invalid value (a file; expected a directory to write the checkpoint into)",
                         argument="--out")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = {errno.EEXIST: "a file is in the way", errno.ENOTDIR: "a path component is a file, not a directory",
               errno.ELOOP: "symlink loop"}.get(e.errno, e.strerror or str(e))
        raise UsageError(f"--out {out}: invalid value (cannot create the directory: {why})",
                         argument="--out") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: invalid value (directory is not writable)", argument="--out")
    clash = [n for n in CHECKPOINT_FILES if (p / n).exists() and not (p / n).is_file()]
    if clash:
        raise UsageError(f"--out {out}: invalid value ({clash[0]} in it is a directory, not a file)", argument="--out")


def _stat_errno(p: Path) -> int:
    try:
        os.stat(p)
    except OSError as e:
        return e.errno
    return 0


def cli_fixture(args: argparse.Namespace) -> int:
    """`python -m verify fixture --out DIR --preset NAME`: write the fixture, print a summary."""
    from rich.console import Console

    console = Console()
    if args.json:
        from verify.checkpoint.lint import check_output_file_argument

        check_output_file_argument("--json", args.json)
    _check_out_directory(args.out)
    device = _resolve_device(args.device, args.preset)
    summary = make_checkpoint(args.out, args.preset, device=device, seed=args.seed)
    summary["device"] = device
    console.print(f"[bold]{summary['preset']}[/] -> {summary['out']}: {len(summary['files'])} shards, "
                  f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s "
                  f"({summary['bytes'] / summary['seconds'] / 1e9:.2f} GB/s generate+write) on {device}")
    if args.time_load:
        summary["load"] = []
        for i in PRESETS[args.preset].layers:
            for run in time_layer_load(args.out, i, device=device):
                summary["load"].append(run)
                console.print(f"load layer {i} -> {device}: {run['bytes'] / 1e9:.2f} GB in {run['seconds']:.2f} s = "
                              f"[bold]{run['gb_per_s']:.2f} GB/s[/] ({run['files_opened']} files opened)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def make_edited_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, edit=None, *,
                           edit_json: dict | None = None) -> Path:
    """Copy checkpoint `src` to `dst`, passing every tensor through edit(name, tensor) -> tensor, None or a
    dict {name: tensor} (None drops it from its shard and the index; a dict replaces it by those tensors,
    in its shard, e.g. a rename or a scale re-encoded as two tensors; edit None copies the shards as
    they are), and each
    JSON file named in edit_json through its function (file name -> fn(dict) -> dict, e.g.
    {"config.json": lambda c: dict(c, hidden_size=256.7)}). For making defective fixtures in tests."""
    import shutil

    from verify.checkpoint import SAFETENSORS_DTYPES, read_safetensors_header

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    for name, fn in (edit_json or {}).items():
        (dst / name).write_text(json.dumps(fn(json.loads((dst / name).read_text())), indent=2))
    if edit is None:
        return dst
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        data = bytearray((dst / shard).read_bytes())
        infos = sorted(read_safetensors_header(dst / shard).items(), key=lambda kv: kv[1].start)
        out: dict[str, Tensor] = {}
        for name, i in infos:
            t = torch.frombuffer(data, dtype=torch.uint8, offset=i.start, count=i.nbytes) \
                .view(SAFETENSORS_DTYPES[i.dtype]).reshape(i.shape).clone() if i.nbytes else \
                torch.empty(i.shape, dtype=SAFETENSORS_DTYPES[i.dtype])
            new = edit(name, t)
            if new is None or isinstance(new, dict):
                index["weight_map"].pop(name, None)
            if isinstance(new, dict):
                out.update(new)
                index["weight_map"].update({n: shard for n in new})
            elif new is not None:
                out[name] = new
        write_safetensors(dst / shard, out)
    index_path.write_text(json.dumps(index, indent=2))
    return dst
