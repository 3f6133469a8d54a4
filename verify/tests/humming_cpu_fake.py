"""A CPU stand-in for the humming-kernels package (0.1.20's entry points that verify.backends.adapters.humming
calls), for tests on a machine without a GPU: written as a package directory into a test's tmp path, with an
outside backend module `cpu_humming` whose CpuHumming is the real HummingBackend with its device gate lifted.

What it keeps of humming: the call signatures; the checkpoint-format conversion (a tensor weight_scale_2 per
expert when the shards' scales agree, else bf16 channel scales); the N padding to pad_n_to_multiple and the
shape assert humming's kernels make when they compile (`assert pad_shape_n % 8 == 0`, check_shape); outputs
cut back to the unpadded N; a GEMM that decodes e2m1 x E4M3 exactly, accumulates in float32 from bf16
activations, applies weight_scale_2 in float32 and rounds once to bf16 (dense, or grouped over expert offsets).
What it does not: the repack, the scale permutation (identity here), NVRTC, stream-K.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

__all__ = ["install_cpu_humming", "BACKEND_MODULE"]

BACKEND_MODULE = "cpu_humming"

_FILES = {
    "humming/__init__.py": '__version__ = "0.1.20"\n',
    "humming/config/__init__.py": "",
    "humming/config/enum.py": """
        import enum


        class WeightScale2Type(enum.Enum):
            NONE = "none"
            TENSOR = "tensor"
            CHANNEL = "channel"
    """,
    "humming/schema/__init__.py": "",
    "humming/schema/modelopt.py": """
        import torch

        from humming.config.enum import WeightScale2Type


        class ModeloptNvfp4WeightSchema:
            def convert_humming(self, tensors, shape_n_stacks, shape_k_stacks, param_dtype, num_experts=None,
                                device=None):
                e = num_experts or 1
                s2 = tensors["weight_scale_2"].reshape(e, -1).float()
                out = {"weight": tensors["weight"].view(torch.int32), "weight_scale": tensors["weight_scale"]}
                if bool((s2 == s2[:, :1]).all()):
                    out["weight_scale_2"] = s2[:, 0].contiguous()
                    return WeightScale2Type.TENSOR, out
                cols = [s2[:, j:j + 1].expand(e, n) for j, n in enumerate(shape_n_stacks)]
                channel = torch.cat(cols, dim=1).to(param_dtype)
                out["weight_scale_2"] = channel if num_experts else channel[0]
                return WeightScale2Type.CHANNEL, out
    """,
    "humming/transform.py": """
        from dataclasses import dataclass

        import torch

        from humming.config.enum import WeightScale2Type


        @dataclass(frozen=True)
        class LayerConfig:
            shape_n: int
            shape_k: int
            pad_shape_n: int
            num_experts: int
            weight_scale_2_type: WeightScale2Type


        def prepare_layer_config(shape_n, shape_k, weight_schema, input_schema=None, num_experts=None,
                                 pad_n_to_multiple=1, torch_dtype=None, device=None, tensors=None):
            pad = -shape_n % pad_n_to_multiple
            return LayerConfig(shape_n + pad, shape_k, pad, num_experts or 0, weight_schema)


        def prepare_fp16_e8m0_scale(config, tensors):
            return config, tensors


        def _pad_rows(t, rows, value=0):
            extra = rows - t.shape[-2]
            return torch.nn.functional.pad(t, (0, 0, 0, extra), value=value) if extra else t


        def transform_humming_tensors(config, tensors):
            out = {"weight": _pad_rows(tensors["weight"].view(torch.uint8), config.shape_n),
                   "weight_scale": _pad_rows(tensors["weight_scale"].view(torch.uint8), config.shape_n)}
            s2 = tensors["weight_scale_2"]
            if config.weight_scale_2_type == WeightScale2Type.CHANNEL:
                extra = config.shape_n - s2.shape[-1]
                s2 = torch.nn.functional.pad(s2, (0, extra), value=1.0) if extra else s2
            out["weight_scale_2"] = s2
            return out


        def transform_humming_bias(bias):
            return bias
    """,
    "humming/forward.py": """
        import torch

        from humming.config.enum import WeightScale2Type


        def _decode(weight_u8, scale_u8):
            codes = torch.stack((weight_u8 & 0xF, weight_u8 >> 4), dim=-1).reshape(*weight_u8.shape[:-1], -1)
            c = codes.to(torch.int32)
            e, m = (c >> 1) & 3, (c & 1).to(torch.float32)
            mag = torch.where(e == 0, 0.5 * m, torch.exp2((e - 1).to(torch.float32)) * (1 + 0.5 * m))
            val = torch.where((c & 8) != 0, -mag, mag)
            sf = scale_u8.view(torch.float8_e4m3fn).to(torch.float32)
            return (val.reshape(*sf.shape, 16) * sf.unsqueeze(-1)).reshape(val.shape)


        def _one(x, w, s2, kind):
            y = x.to(torch.float32) @ w.t()
            return y * (s2.to(torch.float32) if kind == WeightScale2Type.CHANNEL else s2.to(torch.float32).reshape(()))


        def humming_forward(config, inputs, weight, weight_scale, weight_scale_2=None, locks=None,
                            expert_layout=None, compute_config=None, **unused):
            assert config.shape_n > config.pad_shape_n
            assert config.pad_shape_n % 8 == 0
            w = _decode(weight, weight_scale)
            kind = config.weight_scale_2_type
            if expert_layout is None:
                y = _one(inputs, w, weight_scale_2, kind)
            else:
                y = torch.zeros(inputs.shape[0], config.shape_n, dtype=torch.float32)
                off = expert_layout.tolist()
                for e in range(len(off) - 1):
                    s2 = weight_scale_2[e] if weight_scale_2.dim() > 1 or kind == WeightScale2Type.TENSOR \\
                        else weight_scale_2
                    y[off[e]:off[e + 1]] = _one(inputs[off[e]:off[e + 1]], w[e], s2, kind)
            return y.to(torch.bfloat16)[:, :config.shape_n - config.pad_shape_n].contiguous()
    """,
    f"{BACKEND_MODULE}.py": """
        import torch

        from verify.backends.adapters import humming as hm
        from verify.backends.base import Backend

        hm._cuda_device = lambda: torch.device("cpu")  # the fake's GEMMs run where the weights are


        class CpuHumming(hm.HummingBackend):
            \"\"\"The humming adapter over the CPU fake of humming (its device gate lifted).\"\"\"

            def unsupported_reason(self, op, device):
                return Backend.unsupported_reason(self, op, device)


        class CpuHummingUnpadded(CpuHumming):
            \"\"\"The same with the adapter's N padding to a multiple of 8 switched off: humming's shape assert
            fires on the accumulator probe's 35 columns (the crash the CLI must print as one line).\"\"\"

            def __init__(self):
                super().__init__()
                hm._N_MULTIPLE = 1


        class CpuHummingGroupedCrash(CpuHumming):
            \"\"\"The same whose grouped kernels fail inside humming (as an NVRTC compile error would): the MoE stages
            must fail with one line naming the backend and op; the run goes on.\"\"\"

            def __init__(self):
                super().__init__()
                import humming.forward

                dense = humming.forward.humming_forward

                def forward(config, inputs, weight, weight_scale, expert_layout=None, **kw):
                    if expert_layout is not None:
                        raise RuntimeError("NVRTC_ERROR_COMPILATION: grouped kernel (planted)")
                    return dense(config, inputs, weight, weight_scale, **kw)

                humming.forward.humming_forward = forward
    """,
}


def install_cpu_humming(root: Path) -> Path:
    """Write the fake package and the cpu_humming backend module under root; returns root (put it on sys.path,
    or on PYTHONPATH for a subprocess)."""
    for rel, text in _FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root
