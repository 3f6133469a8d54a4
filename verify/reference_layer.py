"""Runs the reference DeepSeek layer (references.layer) on checkpoint layers.

The loader's typed linears become the references' plain weight records here (verify/
is the only place that sees both); inputs are built from token ids (embed.weight ->
RMSNorm, realistic layer-0 activations) or loaded from a safetensors file; both
reference modes run and each stage's quantization loss (emulated vs high precision) is
measured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from references.layer import AttnSpec, AttnWeights, MoeSpec, MoeWeights, RunOptions, attention_projections, moe_block
from references.linear import Bf16Weight, Fp8Block128Weight, Nvfp4Weight, Weight, rms_norm
from references import moe
from references.moe import ExpertStack
from references.stages import DENSE_MLP, LOSS_STAGES
from verify.checkpoint import (
    Bf16Linear,
    Checkpoint,
    Fp8BlockLinear,
    GatedMlp,
    LayerWeights,
    Linear,
    ModelConfig,
    Nvfp4Linear,
)
from verify.metrics import stage_metrics

__all__ = [
    "to_reference_weight",
    "moe_spec_from",
    "attn_spec_from",
    "moe_weights_from",
    "attn_weights_from",
    "LayerInputs",
    "inputs_from_token_ids",
    "inputs_from_safetensors",
    "default_token_ids",
    "run_reference_layer",
    "quantization_loss",
    "LOSS_STAGES",
]

RMS_EPS = 1e-6


def to_reference_weight(lin: Linear) -> Weight:
    """A loader linear (bytes as stored) -> the references' weight record (the same bytes)."""
    if isinstance(lin, Nvfp4Linear):
        return Nvfp4Weight(lin.weight_u8, lin.weight_scale_e4m3.view(torch.uint8), lin.weight_scale_2_f32,
                           lin.input_scale_f32)
    if isinstance(lin, Fp8BlockLinear):
        return Fp8Block128Weight(lin.weight_e4m3.view(torch.uint8), lin.block_dec_scale_f32())
    if isinstance(lin, Bf16Linear):
        return Bf16Weight(lin.weight_bf16)
    raise TypeError(f"{lin.module}: format {lin.format!r} is not supported by the reference layer")


def moe_spec_from(cfg: ModelConfig) -> MoeSpec:
    return MoeSpec(top_k=cfg.top_k, scoring=cfg.scoring_func, routed_scaling_factor=cfg.routed_scaling_factor,
                   swiglu_limit=cfg.swiglu_limit, renormalize=None if cfg.scoring_func == "softmax" else cfg.norm_topk_prob,
                   n_group=cfg.n_group, topk_group=cfg.topk_group)


def attn_spec_from(cfg: ModelConfig) -> AttnSpec:
    if cfg.schema != "deepseek_v4":
        raise ValueError(f"attention projections: schema {cfg.schema!r} is not DeepSeek-V4 (MLA projections differ)")
    return AttnSpec(n_heads=cfg.n_heads, head_dim=cfg.head_dim, o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank,
                    eps=RMS_EPS)


def _mlp(m: GatedMlp) -> tuple[Weight, Weight, Weight]:
    return to_reference_weight(m.w1), to_reference_weight(m.w3), to_reference_weight(m.w2)


def moe_weights_from(layer: LayerWeights) -> MoeWeights:
    if layer.router is None or layer.experts is None:
        raise ValueError(f"layer {layer.index} has no MoE block (dense MLP layer)")
    r = layer.router
    return MoeWeights(r.gate_weight_bf16, r.gate_bias_f32, r.tid2eid_i64, ExpertStack(*_mlp(layer.experts)),
                      _mlp(layer.shared_experts) if layer.shared_experts is not None else None)


def attn_weights_from(layer: LayerWeights) -> AttnWeights:
    a = {role: to_reference_weight(lin) for role, lin in layer.attention.items()}
    return AttnWeights(a["wq_a"], a["wkv"], a["wq_b"], a["wo_a"], a["wo_b"], layer.norms["q_norm"],
                       layer.norms["kv_norm"])


@dataclass(frozen=True)
class LayerInputs:
    """token_ids_i64 [T] (None: unknown, then hash layers refuse to run); x_attn_bf16 / x_ffn_bf16
    [T, H]: the attn_norm / ffn_norm outputs."""

    token_ids_i64: Tensor | None
    x_attn_bf16: Tensor
    x_ffn_bf16: Tensor

    def __post_init__(self) -> None:
        t = self.x_ffn_bf16.shape[0]
        for name, x in (("x_attn_bf16", self.x_attn_bf16), ("x_ffn_bf16", self.x_ffn_bf16)):
            if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[0] != t:
                raise ValueError(f"{name}: expected bfloat16 [T={t}, H], got {x.dtype} {tuple(x.shape)}")
        ids = self.token_ids_i64
        if ids is not None and (ids.dtype != torch.int64 or ids.shape != (t,)):
            raise ValueError(f"token_ids_i64: expected int64 [T={t}], got {ids.dtype} {tuple(ids.shape)}")


def default_token_ids(vocab: int, t: int, *, seed: int = 0, device: str | torch.device = "cpu") -> Tensor:
    """t token ids, uniformly drawn from the vocabulary with a fixed seed (reproducible)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (t,), generator=g).to(device)


def inputs_from_token_ids(ckpt: Checkpoint, layer: LayerWeights, token_ids_i64: Tensor) -> LayerInputs:
    """Realistic layer inputs: h = embed.weight[token_ids] (bf16), then the layer's RMSNorms
    (emulated: the exact result rounded once to bf16). The attention core and hyper-connections
    are not emulated, so the MoE input is ffn_norm(h) of the embedding itself."""
    device = token_ids_i64.device
    # gathered on the CPU: only the T rows travel to the device, not the whole [vocab, H] table
    embed = ckpt.get_tensor("embed.weight" if ckpt.config.schema == "deepseek_v4" else "model.embed_tokens.weight")
    ids_cpu = token_ids_i64.cpu()
    if ids_cpu.numel() and (int(ids_cpu.min()) < 0 or int(ids_cpu.max()) >= embed.shape[0]):
        raise ValueError(f"token_ids_i64: values must be in [0, {embed.shape[0]})")
    h = embed[ids_cpu].to(device=device, dtype=torch.bfloat16)
    n = layer.norms
    return LayerInputs(token_ids_i64, rms_norm(h, n["attn_norm"], eps=RMS_EPS, mode="emulated"),
                       rms_norm(h, n["ffn_norm"], eps=RMS_EPS, mode="emulated"))


def inputs_from_safetensors(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LayerInputs:
    """Activations captured elsewhere: a safetensors file with `x_ffn` (required, [T, H]),
    `x_attn` (defaults to x_ffn) and `token_ids` ([T]; without it hash layers refuse to run)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    t = load_file(str(path), device=str(device))
    if "x_ffn" not in t:
        raise KeyError(f"{path}: no tensor 'x_ffn' (have {sorted(t)})")
    x_ffn = t["x_ffn"].to(torch.bfloat16)
    if x_ffn.dim() != 2:
        raise ValueError(f"{path}: x_ffn {tuple(x_ffn.shape)}: expected [T, H]")
    ids = t["token_ids"].to(torch.int64) if "token_ids" in t else None
    return LayerInputs(ids, t.get("x_attn", x_ffn).to(torch.bfloat16), x_ffn)


def run_reference_layer(ckpt: Checkpoint, layer: LayerWeights, inputs: LayerInputs, *, mode: str,
                        options: RunOptions = RunOptions()) -> dict[str, Tensor]:
    """Every stage of the layer's MoE block (or V3 dense MLP) and (V4) attention
    projections in `mode`."""
    cfg = ckpt.config
    out: dict[str, Tensor] = {}
    if cfg.schema == "deepseek_v4":
        out.update(attention_projections(inputs.x_attn_bf16, attn_weights_from(layer), attn_spec_from(cfg), mode=mode,
                                         options=options))
    if layer.dense_mlp is not None:  # V3/R1 first_k_dense_replace layers: a plain gated MLP, no clamp
        mlp = moe.shared_expert(inputs.x_ffn_bf16, *_mlp(layer.dense_mlp), mode=mode, recipe=options.recipe,
                                act_scale=options.act_scale, swiglu_limit=None, fp8_scale_fmt=options.fp8_scale_fmt)
        out.update({f"{DENSE_MLP}.{k}": v for k, v in mlp.items()})
    if layer.experts is not None:
        hashed = layer.router.tid2eid_i64 is not None
        if hashed and inputs.token_ids_i64 is None:
            raise ValueError(f"token_ids: layer {layer.index} is hash-routed (tid2eid) and the inputs carry no token ids")
        out.update(moe_block(inputs.x_ffn_bf16, moe_weights_from(layer), moe_spec_from(cfg), mode=mode,
                             options=options, token_ids_i64=inputs.token_ids_i64 if hashed else None))
    return out


def quantization_loss(emulated: dict[str, Tensor], high: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per stage present in both: stage_metrics(emulated, high) (cosine, calc_diff, SQNR dB, ...)."""
    return {s: stage_metrics(emulated[s], high[s]) for s in LOSS_STAGES if s in emulated and s in high}
