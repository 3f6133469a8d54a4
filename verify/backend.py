"""The one interface through which verify/ sees both references/ and kernels/.

A backend computes the production ops; the emulator backend computes them with the
bit-accurate references. Each backend declares its recipe and its accumulator's unit
roundoff (used in the GEMM bound), and says itself which ops it cannot run where
(`unsupported_reason`), so tests never restate a backend's limits.
"""

from __future__ import annotations

import enum
from typing import Protocol

import torch
from torch import Tensor

from references import layouts as ref_layouts
from references.gemm import U_FP32
from references.nvfp4 import decode_nvfp4_block_scaled, quantize_nvfp4
from references.recipes import Recipe, recipe_by_name

__all__ = ["Op", "Backend", "EmulatorBackend", "KernelBackend", "get_backend", "registered_backend_names"]


class Op(enum.Enum):
    QUANTIZE = "quantize"
    DENSE_GEMM = "dense_gemm"
    GROUPED_GEMM = "grouped_gemm"
    SWIGLU_REQUANT = "swiglu_requant"
    ROUTER = "router"
    COMBINE = "combine"


class Backend(Protocol):
    name: str
    recipe: Recipe
    u_acc: float  # accumulator unit roundoff declared for the GEMM bound

    def unsupported_reason(self, op: Op, device: torch.device) -> str | None: ...

    def quantize_nvfp4(self, x_bf16: Tensor, global_enc_scale_f32: Tensor) -> tuple[Tensor, Tensor]:
        """bf16 [M, K] -> (packed_u8 [M, K/2], sf_u8 swizzled 128x4 [Mp, Kp/16])."""
        ...

    def gemm_nvfp4(self, a_packed_u8: Tensor, a_sf_swizzled_u8: Tensor, b_packed_u8: Tensor,
                   b_sf_swizzled_u8: Tensor, alpha_f32: Tensor) -> Tensor:
        """NVFP4 A [M, K] x NVFP4 B [N, K] (swizzled scales) x alpha -> bf16 [M, N]."""
        ...


class EmulatorBackend:
    """The references, served through the backend interface (any device, fp32 accumulation)."""

    name = "emulator"
    u_acc = U_FP32

    def __init__(self, recipe: Recipe | str = "te") -> None:
        self.recipe = recipe_by_name(recipe) if isinstance(recipe, str) else recipe

    def unsupported_reason(self, op: Op, device: torch.device) -> str | None:
        if op in (Op.QUANTIZE, Op.DENSE_GEMM):
            return None
        return f"emulator backend: {op.value} is served by the layer reference (references.moe), not this interface yet"

    def quantize_nvfp4(self, x_bf16: Tensor, global_enc_scale_f32: Tensor) -> tuple[Tensor, Tensor]:
        q = quantize_nvfp4(x_bf16, recipe=self.recipe, global_enc_scale_f32=global_enc_scale_f32)
        return q.packed_u8, ref_layouts.sf_linear_to_swizzled_128x4(q.sf_u8)

    def gemm_nvfp4(self, a_packed_u8: Tensor, a_sf_swizzled_u8: Tensor, b_packed_u8: Tensor,
                   b_sf_swizzled_u8: Tensor, alpha_f32: Tensor) -> Tensor:
        k = a_packed_u8.shape[-1] * 2
        a_sf = ref_layouts.sf_swizzled_128x4_to_linear(a_sf_swizzled_u8, rows=a_packed_u8.shape[0], cols=k // 16)
        b_sf = ref_layouts.sf_swizzled_128x4_to_linear(b_sf_swizzled_u8, rows=b_packed_u8.shape[0], cols=k // 16)
        a = decode_nvfp4_block_scaled(a_packed_u8, a_sf)
        b = decode_nvfp4_block_scaled(b_packed_u8, b_sf)
        return ((a @ b.T) * alpha_f32).to(torch.bfloat16)


class KernelBackend:
    """Adapts a kernels/ backend object (plain class: `name`, `recipe_name`, `u_acc`,
    `unsupported_reason(op: str, device)`, ops) to the Backend protocol. The recipe name
    becomes the references' Recipe the harness checks its bytes against; unknown
    attributes (grouped GEMM, router, ...) pass through to the kernel object."""

    def __init__(self, impl: object) -> None:
        self._impl = impl
        self.name: str = impl.name
        self.recipe: Recipe = recipe_by_name(impl.recipe_name)
        self.u_acc: float = float(impl.u_acc)

    # the harness's op -> the kernels/ backend method that serves it
    KERNEL_OP_NAMES = {Op.QUANTIZE: "quantize_nvfp4", Op.DENSE_GEMM: "gemm_nvfp4",
                       Op.GROUPED_GEMM: "grouped_gemm_nvfp4", Op.SWIGLU_REQUANT: "grouped_gemm_swiglu",
                       Op.ROUTER: "router", Op.COMBINE: "combine"}

    def unsupported_reason(self, op: Op, device: torch.device) -> str | None:
        return self._impl.unsupported_reason(self.KERNEL_OP_NAMES[op], device)

    def quantize_nvfp4(self, x_bf16: Tensor, global_enc_scale_f32: Tensor) -> tuple[Tensor, Tensor]:
        return self._impl.quantize_nvfp4(x_bf16, global_enc_scale_f32)

    def gemm_nvfp4(self, a_packed_u8: Tensor, a_sf_swizzled_u8: Tensor, b_packed_u8: Tensor,
                   b_sf_swizzled_u8: Tensor, alpha_f32: Tensor) -> Tensor:
        return self._impl.gemm_nvfp4(a_packed_u8, a_sf_swizzled_u8, b_packed_u8, b_sf_swizzled_u8, alpha_f32)

    def __getattr__(self, attr: str):
        return getattr(self._impl, attr)


def registered_backend_names() -> tuple[str, ...]:
    return ("emulator", "sm90", "sm100")


def get_backend(name: str, device: torch.device | None = None) -> Backend:
    """The named backend; "auto" picks sm100 on a Blackwell GPU, sm90 on Hopper, else the emulator.
    Production backends import their kernels (and triton / cutlass) only here, lazily."""
    if name == "auto":
        if torch.cuda.is_available():
            major, _ = torch.cuda.get_device_capability(device)
            name = {10: "sm100", 9: "sm90"}.get(major, "emulator")
        else:
            name = "emulator"
    if name == "emulator":
        return EmulatorBackend()
    if name == "sm90":
        from kernels.sm90.backend import Sm90Backend  # noqa: PLC0415 (lazy: needs triton)

        return KernelBackend(Sm90Backend())
    if name == "sm100":
        from kernels.sm100.backend import Sm100Backend  # noqa: PLC0415 (lazy: needs cutlass)

        return KernelBackend(Sm100Backend())
    raise ValueError(f"backend={name!r}: expected 'auto' or one of {registered_backend_names()}")
