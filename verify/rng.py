"""A counter-based integer random number generator for test data (fixtures, inputs).

Why not torch.Generator: `torch.randn` and `exp_` on the CPU go through vectorized float32
transcendental code (Box-Muller log/cos/sin, Sleef exp) whose last bit depends on the CPU
vector path (ATEN_CPU_CAPABILITY default / avx2 / avx512), on the device (CPU vs CUDA) and
on the torch version; a fixture's committed sha256 then holds on one machine only.

Here every draw is integer arithmetic on int64 tensors (products kept below 2^63, so no
overflow anywhere) followed by correctly rounded IEEE operations only (integer -> float
conversion, one multiplication, a rounding to float32). Non-linear shapes (the log-normal
gains of the fixtures) come from a table of exp() values computed once with Python's
`decimal` module, whose exp is correctly rounded. The same seed gives the same bits on any
x86-64 or ARM CPU, any vector path, CUDA, and any torch release.

Streams: each draw takes the next stream number, so the sequence of calls (not their sizes)
decides which numbers a tensor gets; element i of a draw is hash(seed, stream, i).
"""

from __future__ import annotations

import decimal
import functools

import torch
from torch import Tensor

__all__ = ["CounterRng"]

_M32 = 0xFFFFFFFF
# Two odd multipliers below 2^31: a 32-bit value times either stays below 2^63 in int64.
_MUL_A = 0x7FEB352D
_MUL_B = 0x5BD1E995
# 1 / std of a sum of four independent uniform integers on [0, 2^16): var = 4 (2^32 - 1) / 12.
_IRWIN_HALL4_INV_STD = 1.0 / ((4 * (2.0**32 - 1) / 12) ** 0.5)
_IRWIN_HALL4_MEAN = 2 * 0xFFFF
# the log-normal gains use exp(sigma * n / _EXP_STEPS) for integer n: a table, not exp()
_EXP_STEPS = 32
_EXP_N_MAX = 4 * _EXP_STEPS  # |z| <= 3.47 for an Irwin-Hall(4) normal


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finalizer (xorshift-multiply, two rounds) on int64 tensors holding [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _M32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """_mix32 on a Python int (the per-stream key)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _MUL_A) & _M32
    x ^= x >> 15
    x = (x * _MUL_B) & _M32
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=16)
def _exp_table_f64(sigma: float) -> tuple[float, ...]:
    """exp(sigma * n / _EXP_STEPS) for n in [-_EXP_N_MAX, _EXP_N_MAX], each correctly rounded to
    float64 (decimal exp at 40 digits, then one rounding)."""
    ctx = decimal.Context(prec=40)
    s = decimal.Decimal(repr(sigma))
    return tuple(float(ctx.exp(s * n / _EXP_STEPS)) for n in range(-_EXP_N_MAX, _EXP_N_MAX + 1))


class CounterRng:
    """Seeded, counter-based generator: `u32`, `uniform`, `normal`, `lognormal`, `permutation`.

    Bit-identical across devices, CPU vector paths and torch versions (see the module docstring).
    Not a statistical-quality RNG for science: test data only.
    """

    def __init__(self, seed: int, *, device: str | torch.device = "cpu"):
        self.seed = int(seed) & _M32
        self.device = torch.device(device)
        self.stream = 0

    def u32(self, shape: tuple[int, ...] | int) -> Tensor:
        """int64 tensor of the given shape, values uniform on [0, 2^32)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = 1
        for s in shape:
            n *= s
        if n >= 2**32:
            raise ValueError(f"CounterRng.u32: {n} elements in one draw; at most 2^32 - 1")
        key = _mix32_int(_mix32_int(self.seed) ^ _mix32_int(self.stream + 0x9E3779B9))
        self.stream += 1
        i = torch.arange(n, dtype=torch.int64, device=self.device)
        return _mix32(_mix32(i ^ key) ^ (key ^ 0x85EBCA6B)).reshape(shape)

    def uniform(self, shape: tuple[int, ...] | int) -> Tensor:
        """float64 uniform on [0, 1): u32 * 2^-32 (exact)."""
        return self.u32(shape).to(torch.float64) * 2.0**-32

    def _irwin_hall4(self, shape: tuple[int, ...] | int) -> Tensor:
        """int64 sum of four 16-bit uniforms, minus its mean: in [-131070, 131070]."""
        a, b = self.u32(shape), self.u32(shape)
        return (a & 0xFFFF) + (a >> 16) + (b & 0xFFFF) + (b >> 16) - _IRWIN_HALL4_MEAN

    def normal(self, shape: tuple[int, ...] | int) -> Tensor:
        """float32, approximately standard normal (Irwin-Hall of four uniforms, |z| <= 3.47):
        an exact integer, one float64 multiplication, one rounding to float32."""
        return (self._irwin_hall4(shape).to(torch.float64) * _IRWIN_HALL4_INV_STD).to(torch.float32)

    def lognormal(self, shape: tuple[int, ...] | int, *, sigma: float) -> Tensor:
        """float32 exp(sigma * z) with z the normal above quantized to 1/32: a table lookup of
        correctly rounded exp values (no exp() at run time)."""
        z = self._irwin_hall4(shape).to(torch.float64) * _IRWIN_HALL4_INV_STD
        n = torch.round(z * _EXP_STEPS).to(torch.int64).clamp_(-_EXP_N_MAX, _EXP_N_MAX)
        table = torch.tensor(_exp_table_f64(float(sigma)), dtype=torch.float64, device=self.device)
        return table[n + _EXP_N_MAX].to(torch.float32)

    def permutation(self, n: int) -> Tensor:
        """int64 random permutation of range(n) (stable argsort of u32 keys: ties by index)."""
        return torch.argsort(self.u32(n), stable=True)

    def argsort_rows(self, rows: int, cols: int) -> Tensor:
        """[rows, cols] int64: an independent random permutation of range(cols) per row."""
        return torch.argsort(self.u32((rows, cols)), dim=1, stable=True)
