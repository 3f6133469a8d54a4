"""The reference layer on a GPU: the same bytes as on the CPU (the golden digests), and the
full-size DeepSeek-V4-Pro MoE block (384 experts x 3072, hidden 7168) for 512 tokens within 10 s."""

from __future__ import annotations

import json
import time

import pytest
import torch

from references.layer import RunOptions, moe_block
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.checkpoint.writer import make_checkpoint
from verify.golden import compare_golden, load_golden
from verify.layer_report import GOLDEN_PATH, layer_inputs, layer_report
from verify.reference_layer import moe_spec_from, moe_weights_from

pytestmark = pytest.mark.gpu


def test_emulated_layer_on_cuda_matches_the_cpu_golden_bytes():
    ckpt = Checkpoint.open(GOLDEN_DIR / "mini-v4")
    doc = layer_report(ckpt, list(range(ckpt.config.num_layers)), device="cuda")
    golden = load_golden(GOLDEN_PATH)
    diffs = [d for d in compare_golden(golden, doc) if "bytes differ" in d]
    assert not diffs, "emulated tensors on CUDA differ from the CPU golden:\n  " + "\n  ".join(diffs[:20])


@pytest.mark.slow
@pytest.mark.parametrize("act_scale", ["static", "dynamic"])
def test_v4_pro_moe_block_512_tokens_emulated_within_10_s(tmp_path_factory, run_cfg, act_scale):
    """Generates the v4-pro-layer fixture (14.6 GB, on the GPU), loads layer 3 onto the GPU and
    times the emulated MoE block (router, act_quant, l1, swiglu, requant, l2, combine, shared
    expert) for 512 tokens. Reports seconds and peak GPU memory."""
    root = tmp_path_factory.getbasetemp() / "v4-pro-layer"
    if not (root / "config.json").exists():
        make_checkpoint(root, "v4-pro-layer", device="cuda")
    ckpt = Checkpoint.open(root)
    layer = ckpt.load_layer(3, device="cuda")
    inputs = layer_inputs(ckpt, layer, tokens=512, seed=0, device="cuda")
    w, spec = moe_weights_from(layer), moe_spec_from(ckpt.config)
    options = RunOptions(act_scale=act_scale)
    moe_block(inputs.x_ffn_bf16[:8], w, spec, mode="emulated", options=options)  # warm-up: kernels loaded, not timed
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = moe_block(inputs.x_ffn_bf16, w, spec, mode="emulated", options=options)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    experts_hit = int(out["router.ids"].unique().numel())
    report = {"tokens": 512, "act_scale": act_scale, "seconds": seconds, "peak_extra_gib": peak / 2**30,
              "weights_gib": base / 2**30, "experts_hit": experts_hit, "device": torch.cuda.get_device_name(),
              "nan_in_output": int(torch.isnan(out["moe.out"].float()).sum())}
    print(json.dumps(report))
    if run_cfg.report_dir:
        run_cfg.report_dir.mkdir(parents=True, exist_ok=True)
        (run_cfg.report_dir / f"v4_pro_moe_block_{act_scale}.json").write_text(json.dumps(report, indent=1))
    assert report["nan_in_output"] == 0
    assert seconds <= 10.0, f"emulated v4-pro MoE block took {seconds:.2f} s for 512 tokens (target 10 s)"
