"""The emulator is device-agnostic: on a CUDA device it gives the same bytes as on the CPU
(integer codecs, IEEE float32 arithmetic with correctly rounded division both sides)."""

from __future__ import annotations

import pytest
import torch

from references.codecs import f32_to_e2m1_codes, f32_to_e4m3_bytes, f32_to_ue8m0_bytes
from references.nvfp4 import global_dec_scale_from_amax, quantize_nvfp4, te_global_enc_scale
from references.recipes import RECIPES
from verify.assertions import assert_bytes_equal, describe_e2m1x2, describe_e4m3


def special_activations(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=g) * torch.exp(2 * torch.randn(64, 16, 1, generator=g)).repeat_interleave(16, -1).reshape(64, 256)
    x[0, :16] = 0.0
    x[1, :16] = 1e-30
    x[2, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2)
    x[3, 5] = float("nan")
    x[4, 7] = float("inf")
    x[5, :16] = -0.0
    return x.to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", list(RECIPES.values()), ids=lambda r: r.name)
def test_quantize_on_cuda_matches_cpu(recipe):
    x = special_activations(0)
    amax = x.float().nan_to_num(posinf=0).abs().max()
    for scale in (amax, amax * 1e3, amax * 1e-3):
        kw = ({"global_enc_scale_f32": te_global_enc_scale(scale)} if recipe.global_convention == "enc"
              else {"global_dec_scale_f32": global_dec_scale_from_amax(scale)})
        cpu = quantize_nvfp4(x, recipe=recipe, **kw)
        gpu = quantize_nvfp4(x.cuda(), recipe=recipe, **{k: v.cuda() for k, v in kw.items()})
        assert_bytes_equal(gpu.sf_u8, cpu.sf_u8, label=f"{recipe.name} scales cuda vs cpu", describe=describe_e4m3)
        assert_bytes_equal(gpu.packed_u8, cpu.packed_u8, label=f"{recipe.name} codes cuda vs cpu", describe=describe_e2m1x2)


@pytest.mark.gpu
def test_codecs_on_cuda_match_cpu_for_every_bf16_pattern():
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    for name, fn in [("e2m1", f32_to_e2m1_codes), ("e4m3 sat", lambda t: f32_to_e4m3_bytes(t, saturate=True)),
                     ("e4m3 nonsat", lambda t: f32_to_e4m3_bytes(t, saturate=False)),
                     ("ue8m0", lambda t: f32_to_ue8m0_bytes(t, rounding="rne"))]:
        assert_bytes_equal(fn(x.cuda()), fn(x), label=f"{name} cuda vs cpu")
