"""Production NVFP4 kernels. Never imports references/.

kernels.sm90: Triton (Hopper). kernels.sm100: CuTe DSL (Blackwell). Each backend
imports its heavy dependency (triton, cutlass) lazily, inside the functions that
compile, so `import kernels` needs torch alone.
"""
