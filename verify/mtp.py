"""One run of DeepSeek-V4's MTP block `mtp.{j}`: its inputs, the reference in both modes, the loss per stage
and (with a backend) every verdict of its stage rows (references.stages rows with unit "mtp").

The MTP block's own inputs are e = enorm(embed(token t+1)) and h = hnorm(hidden of token t). The main
model's last hidden state is not computed here (no decoder chain is emulated), so h stands in as the
embedding of token t, as the decoder layers' inputs are embeddings through their norms
(verify.reference_layer.inputs_from_token_ids); a single-layer checkpoint without embed.weight gets seeded
Gaussian rows instead. The verdicts are teacher-forced, so what the inputs are changes no verdict's
meaning, only the data it is judged on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from references.layer import RunOptions
from references.linear import rms_norm
from references.mtp import Mxfp4ExpertStack, mtp_stages
from references.mxfp4 import Mxfp4Weight
from verify.backends import Backend
from verify.checkpoint import Checkpoint, Fp8BlockLinear, MtpWeights, iter_linears, scale_defects
from verify.errors import NonFiniteTensorError
from verify.reference_layer import RMS_EPS, default_token_ids, to_reference_weight
from verify.run import LayerRun, judge_into, reference_run
from verify.verdicts import LayerCase

__all__ = ["MtpInputs", "mtp_inputs", "run_reference_mtp", "run_mtp"]


@dataclass(frozen=True)
class MtpInputs:
    """token_ids_i64 [T] (or None); x_e_bf16 = enorm(embedding of token t+1), x_h_bf16 = hnorm(hidden of
    token t), both bf16 [T, H]."""

    token_ids_i64: Tensor | None
    x_e_bf16: Tensor
    x_h_bf16: Tensor


def _norm(mtp: MtpWeights, role: str, h: int, device) -> Tensor:
    w = mtp.norms.get(role)
    return torch.ones(h, dtype=torch.bfloat16, device=device) if w is None else w


def mtp_inputs(ckpt: Checkpoint, mtp: MtpWeights, *, tokens: int, seed: int,
               device: str | torch.device) -> MtpInputs:
    """The block's inputs from seeded token ids (module docstring): embed rows through enorm / hnorm (ones
    when the checkpoint stores no such norm), each rounded once to bf16."""
    h_size = ckpt.config.hidden_size
    ids = default_token_ids(ckpt.config.vocab_size, tokens, seed=seed, device=device)
    if "embed.weight" in ckpt.weight_map:
        embed = ckpt.get_tensor("embed.weight")
        ids_cpu = ids.cpu()
        e = embed[ids_cpu.roll(-1)].to(device=device, dtype=torch.bfloat16)
        h = embed[ids_cpu].to(device=device, dtype=torch.bfloat16)
    else:
        g = torch.Generator(device="cpu").manual_seed(seed)
        e, h = (torch.randn(tokens, h_size, generator=g).to(device=device, dtype=torch.bfloat16) for _ in range(2))
    return MtpInputs(ids, rms_norm(e, _norm(mtp, "enorm", h_size, device), eps=RMS_EPS, mode="emulated"),
                     rms_norm(h, _norm(mtp, "hnorm", h_size, device), eps=RMS_EPS, mode="emulated"))


def _experts(mtp: MtpWeights) -> Mxfp4ExpertStack | None:
    ex = mtp.experts
    if ex is None:
        return None
    return Mxfp4ExpertStack(*(Mxfp4Weight(w.weight_u8, w.scale_ue8m0, w.module) for w in (ex.w1, ex.w3, ex.w2)))


def _check_finite(mtp: MtpWeights, inputs: MtpInputs) -> None:
    """Refuse, naming the tensor, what the reference would read as garbage: NaN scale bytes, NaN E4M3
    weight bytes of the projections, NaN / Inf norms or inputs."""
    for module, lin in iter_linears(mtp):
        bad = scale_defects(lin)
        if bad:
            raise bad[0].error(bad[0].message, tensor=bad[0].tensor)
        if isinstance(lin, Fp8BlockLinear):
            nan = int(((lin.weight_e4m3.view(torch.uint8) & 0x7F) == 0x7F).sum())
            if nan:
                raise NonFiniteTensorError(f"{module}.weight: {nan} NaN E4M3 bytes (0x7F/0xFF) of "
                                           f"{lin.weight_e4m3.numel()}; the reference cannot run on it")
    named = [*((f"{mtp.prefix}{k}.weight", v) for k, v in mtp.norms.items()),
             ("MTP inputs x_e (enorm output)", inputs.x_e_bf16), ("MTP inputs x_h (hnorm output)", inputs.x_h_bf16)]
    for name, t in named:
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteTensorError(f"{name}: {int((~torch.isfinite(t)).sum())} NaN/Inf values; the reference "
                                       "cannot run on it")


def run_reference_mtp(ckpt: Checkpoint, mtp: MtpWeights, inputs: MtpInputs, *, mode: str,
                      options: RunOptions = RunOptions()) -> dict[str, Tensor]:
    """Every MTP stage tensor in `mode` (references.mtp.mtp_stages)."""
    _check_finite(mtp, inputs)
    p = mtp.projections
    return mtp_stages(inputs.x_e_bf16, inputs.x_h_bf16, to_reference_weight(p["e_proj"]),
                      to_reference_weight(p["h_proj"]), mtp.norms.get("ffn_norm"), _experts(mtp), mode=mode, recipe=options.recipe,
                      swiglu_limit=ckpt.config.swiglu_limit, eps=RMS_EPS, fp8_scale_fmt=options.fp8_scale_fmt)


def run_mtp(ckpt: Checkpoint, mtp: MtpWeights, inputs: MtpInputs, *, options: RunOptions,
            backend: Backend | None = None, on_phase: Callable[[str], None] | None = None,
            controls: bool = False) -> LayerRun:
    """As verify.run.run_layer, for an MTP block: the reference in both modes, loss per stage, digests and
    (with a backend) the verdicts of the MTP rows (LayerCase unit "mtp") and, with `controls`, their negative
    controls (verify.verdicts.controls). The LayerRun's `layer` is j."""
    run = reference_run(mtp.index, lambda mode: run_reference_mtp(ckpt, mtp, inputs, mode=mode, options=options),
                        on_phase, saturated=False)
    if backend is not None:
        case = LayerCase(mtp, ckpt.config.schema, inputs.x_e_bf16, inputs.x_h_bf16, inputs.token_ids_i64,
                         run.emulated, run.high, options, None, unit="mtp")
        judge_into(run, backend, case, on_phase=on_phase, controls=controls)
    return run
