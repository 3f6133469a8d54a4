"""Constants shared by the sm90 kernels and their launchers (no triton import here)."""

BLOCK = 16                              # NVFP4 block along K
FLT_MAX = 3.4028234663852886e38         # float32 max
ONE_SIXTH_F32 = 0.16666667163372040     # float32(1/6) = 0x3E2AAAAB, exactly representable
FP4_X_FP8_MAX = 2688.0                  # 6 * 448
E4M3_SATURATED_BYTE = 0x7E              # 448
SMEM_BLOCK_MAX = 232448                 # H100 / H200 opt-in shared memory per block (227 KB)
DECODE_UNSCALE = 16384.0                # 2^14: undoes the 2^-7 of each decoded fp16 operand (exact)
