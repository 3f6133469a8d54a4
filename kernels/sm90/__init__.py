"""Hopper (sm90) NVFP4 kernels in Triton."""
