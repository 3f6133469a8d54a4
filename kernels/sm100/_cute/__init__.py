"""CuTe DSL kernel bodies of the sm100 kernels (each module imports cutlass at its top).

Never imported at package import: the public modules one level up (gemm_fp8_blockscaled,
quantize_fp8_1x128) import their body from here on first compile, so `import kernels.sm100.*`
needs torch alone.
"""
