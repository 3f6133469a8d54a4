"""Activation quantization bf16 -> NVFP4 (1x16 blocks, E4M3 block scales) for sm100, CuTe DSL.

Recipe `te` (TransformerEngine / FlashInfer exact math), with S the global encode
scale (2688/amax) read from a device buffer:
  v      = max |x| over the block (NaN elements ignored: fmax)
  s      = e4m3_rne_satfinite(min(v * (S * (1/6)), FLT_MAX))      -> the scale byte
  enc    = min(1 / (float(s) * (1/S)), FLT_MAX)
  code_i = e2m1_rne_satfinite(x_i * enc + 0)                        (+0 turns -0.0 into +0)
The E2M1 and E4M3 roundings are the hardware conversions (cvt.rn.satfinite.e2m1x2.f32,
cvt.rn.satfinite.e4m3x2.f32). One thread per 16-element block.

Outputs: packed_u8 [M, K/2] (element 2i in the low nibble) and the block scales
written straight into the 128x4 swizzled layout the GEMM reads,
sf_swizzled_u8 [round_up(M,128), round_up(K/16,4)], whose padding is zero (the
buffer is zero-filled on the device before the kernel runs).

Global scale: dynamic (S = 2688/amax(x) computed on the device by torch ops,
guarded as TE does) or static (S = 1/input_scale of the checkpoint). Neither
reads a device value on the host, so the launch is CUDA-graph safe.

Valid rows: an optional int32 device buffer n (rows, i.e. tokens). The kernel reads it
at run time; rows >= n are never read and their codes and scale bytes are written as
zero, and the dynamic amax covers rows < n only. A graph captured for M rows then
replays for any n <= M with the same bytes as an eager call on the first n rows.
"""

import functools
from dataclasses import dataclass

THREADS = 128
BLOCK = 16
RECIPES = ("te",)
FP4_X_FP8_MAX = 6.0 * 448.0


@dataclass(frozen=True)
class CompileKey:
    """Everything code generation reads.

    Deliberately not in the key: M, K and the global scale value (runtime), the
    stream, and dynamic vs static global scale (decided on the host before launch).
    """

    recipe: str = "te"
    arch: str = "sm_100a"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"CompileKey.recipe={self.recipe!r}: the sm100 quantizer implements {RECIPES}")


SHIPPED_KEYS = (CompileKey(recipe="te"),)


# --------------------------------------------------------------------------------------
# body
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _kernel_class():
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute

    from kernels.sm100._ptx import ptx_ops

    ops = ptx_ops()
    f32 = cutlass.Float32

    class QuantizeNvfp4_1x16:
        def __init__(self, key: CompileKey):
            self.key = key

        @cute.jit
        def __call__(
            self,
            x_ptr: cute.Pointer,
            packed_ptr: cute.Pointer,
            sf_ptr: cute.Pointer,
            global_enc_scale_ptr: cute.Pointer,
            valid_rows_ptr: cute.Pointer,
            m: cutlass.Int32,
            k: cutlass.Int32,
            stream: cuda.CUstream,
        ):
            k_blocks = k // BLOCK
            num_blocks = m * k_blocks
            sf_col_groups = (k_blocks + 3) // 4
            rows_padded = (m + 127) // 128 * 128
            x = cute.make_tensor(x_ptr, cute.make_layout((num_blocks, BLOCK), stride=(BLOCK, 1)))
            packed = cute.make_tensor(packed_ptr, cute.make_layout((num_blocks, 2), stride=(2, 1)))
            sf = cute.make_tensor(sf_ptr, cute.make_layout(rows_padded * sf_col_groups * 4))
            enc = cute.make_tensor(global_enc_scale_ptr, cute.make_layout(1))
            valid_rows = cute.make_tensor(valid_rows_ptr, cute.make_layout(1))
            grid = ((num_blocks + THREADS - 1) // THREADS, 1, 1)
            self.kernel(x, packed, sf, enc, valid_rows, k_blocks, sf_col_groups, num_blocks).launch(
                grid=grid, block=[THREADS, 1, 1], stream=stream)

        @cute.kernel
        def kernel(
            self,
            x: cute.Tensor,
            packed: cute.Tensor,
            sf: cute.Tensor,
            enc: cute.Tensor,
            valid_rows: cute.Tensor,
            k_blocks: cutlass.Int32,
            sf_col_groups: cutlass.Int32,
            num_blocks: cutlass.Int32,
        ):
            tidx, _, _ = cute.arch.thread_idx()
            bidx, _, _ = cute.arch.block_idx()
            blk = bidx * THREADS + tidx
            if blk < num_blocks:
                row = blk // k_blocks
                col = blk - row * k_blocks
                off = ((row // 128) * sf_col_groups + col // 4) * 512 + (row % 32) * 16 + ((row // 32) % 4) * 4 + col % 4
                # Rows at or past the device-side valid count (read at run time: a captured graph
                # replays with fewer tokens) are not read and come out as zero codes, scale 0.
                if row < valid_rows[0]:
                    r_x = cute.make_rmem_tensor((BLOCK,), x.element_type)
                    cute.autovec_copy(x[(blk, None)], r_x)
                    r_y = cute.make_rmem_tensor((BLOCK,), f32)
                    for i in cutlass.range_constexpr(BLOCK):
                        r_y[i] = r_x[i].to(f32)
                    sf_byte, lo, hi = ops.te_quantize_block16_f32(r_y, enc[0])
                    packed[(blk, 0)] = lo
                    packed[(blk, 1)] = hi
                    sf[off] = sf_byte.to(cutlass.Uint8)
                else:
                    packed[(blk, 0)] = cutlass.Int32(0)
                    packed[(blk, 1)] = cutlass.Int32(0)
                    sf[off] = cutlass.Uint8(0)

    return QuantizeNvfp4_1x16


# --------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------


def _compile_args():
    import cutlass

    from kernels.sm100._launch import fake_ptr, fake_stream

    return (fake_ptr("BFloat16", 16), fake_ptr("Int32", 8), fake_ptr("Uint8", 4), fake_ptr("Float32", 4),
            fake_ptr("Int32", 4), cutlass.Int32(128), cutlass.Int32(256), fake_stream())


@functools.lru_cache(maxsize=4)
def _compile(key: CompileKey):
    """The compiled quantizer for `key` (M, K and the valid row count are runtime arguments)."""
    from kernels.sm100._launch import compile_for_arch

    return compile_for_arch(_kernel_class()(key), _compile_args(), arch=key.arch)


def compile_with_ptx(key: CompileKey, dump_dir: str):
    """Compile `key` (uncached) keeping the PTX; returns (compiled, ptx_text)."""
    from kernels.sm100._launch import compile_keeping_ptx

    return compile_keeping_ptx(_kernel_class()(key), _compile_args(), arch=key.arch, dump_dir=dump_dir)


# --------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------


def te_global_enc_scale_device(amax_f32):
    """S = 2688/amax on the device, guarded as TE does (min FLT_MAX; 1.0 for amax 0 or inf). No sync."""
    import torch

    amax_f32 = amax_f32.to(torch.float32)
    # tensor / tensor: torch evaluates `python_float / t` as reciprocal(t) * python_float, which
    # rounds twice (2688/26 came out one ulp high); one correctly rounded division is TE's S.
    s = torch.clamp(torch.full_like(amax_f32, FP4_X_FP8_MAX) / amax_f32, max=torch.finfo(torch.float32).max)
    return torch.where((amax_f32 == 0) | (s == 0), torch.ones_like(s), s).reshape(1)


def amax_of_valid_rows(x_bf16, num_valid_rows_i32=None):
    """max |x| over the rows r < n of x [M, K] (n an int32 device tensor, or None: all rows).

    0-d tensor of x's dtype; 0 when no row is valid. Graph-safe: the mask is a device-side
    comparison, never a slice by n, so rows past n (stale or NaN) cannot reach the result.
    """
    import torch

    if x_bf16.numel() == 0:
        return x_bf16.new_zeros(())
    if num_valid_rows_i32 is None:
        return x_bf16.abs().amax()
    rows = torch.arange(x_bf16.shape[0], device=x_bf16.device)
    valid = rows < num_valid_rows_i32.reshape(()).to(device=x_bf16.device)
    return torch.where(valid, x_bf16.abs().amax(dim=1), x_bf16.new_zeros(())).amax()


def launch(x_bf16, *, global_enc_scale_f32=None, input_dec_scale_f32=None, recipe: str = "te",
           key: CompileKey | None = None, num_valid_rows_i32=None):
    """bf16 [M, K] -> (packed_u8 [M, K/2], sf_swizzled_u8 [Mp, Cp], global_enc_scale_f32 [1]).

    Global scale: pass global_enc_scale_f32 (S, [1] f32 on the device), or
    input_dec_scale_f32 (the checkpoint's static input_scale D; S = 1/D), or
    neither for the dynamic S = 2688/amax(x). All on the device, no host sync.
    num_valid_rows_i32: optional int32 [1] on the device, n: rows >= n are not read,
    their codes and scale bytes are zero, and the dynamic amax covers rows < n only.
    The kernel reads n at run time (a graph captured for M rows replays with any n).
    """
    import torch

    from kernels.sm100._launch import INT32_MAX, device_i32_constant, device_ptr, launch_on_current_stream
    from kernels.sm100.gemm_nvfp4_blockscaled import check_valid_rows_i32
    from kernels.sm100.host_bridge import round_up

    key = key or CompileKey(recipe=recipe)
    if key.recipe != recipe:
        raise ValueError(f"recipe={recipe!r} does not match key.recipe={key.recipe!r}")
    if not isinstance(x_bf16, torch.Tensor):
        raise TypeError(f"x_bf16: expected a torch.Tensor, got {type(x_bf16).__name__}")
    if x_bf16.dtype != torch.bfloat16:
        raise TypeError(f"x_bf16: expected bfloat16, got {x_bf16.dtype}")
    if x_bf16.dim() != 2 or x_bf16.shape[1] % BLOCK:
        raise ValueError(f"x_bf16: expected [M, K] with K a multiple of {BLOCK}, got {tuple(x_bf16.shape)}")
    if x_bf16.device.type != "cuda":
        raise ValueError(f"x_bf16: the sm100 quantizer runs on a CUDA device, got {x_bf16.device}")
    if not x_bf16.is_contiguous() or x_bf16.data_ptr() % 16:
        raise ValueError("x_bf16: must be contiguous and 16-byte aligned")
    if global_enc_scale_f32 is not None and input_dec_scale_f32 is not None:
        raise ValueError("pass at most one of global_enc_scale_f32 and input_dec_scale_f32")
    if num_valid_rows_i32 is not None:
        check_valid_rows_i32(num_valid_rows_i32, "num_valid_rows_i32", x_bf16.device)
    if global_enc_scale_f32 is None:
        if input_dec_scale_f32 is not None:
            _check_scalar(input_dec_scale_f32, "input_dec_scale_f32", x_bf16.device)
            global_enc_scale_f32 = torch.reciprocal(input_dec_scale_f32.reshape(1))
        else:
            global_enc_scale_f32 = te_global_enc_scale_device(amax_of_valid_rows(x_bf16, num_valid_rows_i32))
    _check_scalar(global_enc_scale_f32, "global_enc_scale_f32", x_bf16.device)
    global_enc_scale_f32 = global_enc_scale_f32.reshape(1).contiguous()
    m, k = x_bf16.shape
    packed_u8 = torch.empty(m, k // 2, dtype=torch.uint8, device=x_bf16.device)
    sf_u8 = torch.zeros(round_up(max(m, 1), 128), round_up(k // BLOCK, 4), dtype=torch.uint8, device=x_bf16.device)
    if num_valid_rows_i32 is None:
        num_valid_rows_i32 = device_i32_constant(INT32_MAX, str(x_bf16.device))
    if m > 0 and k > 0:
        import cutlass

        launch_on_current_stream(
            _compile(key), device_ptr(x_bf16, "BFloat16"), device_ptr(packed_u8, "Int32", 8),
            device_ptr(sf_u8, "Uint8", 4), device_ptr(global_enc_scale_f32, "Float32", 4),
            device_ptr(num_valid_rows_i32, "Int32", 4), cutlass.Int32(m), cutlass.Int32(k))
    return packed_u8, sf_u8, global_enc_scale_f32


def _check_scalar(t, name: str, device) -> None:
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"{name}: expected a 1-element float32 tensor, got {t.dtype} {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device}")
