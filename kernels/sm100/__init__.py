"""Blackwell (sm100) NVFP4 kernels in CuTe DSL."""
