"""Adapters of other people's kernels (Humming, vLLM, FlashInfer, sgl-kernel, ...), one module each, each an
optional extra that imports its package lazily and says why it cannot run where the package or device is absent.
README "Adapters of other people's kernels" lists what each one serves."""
