"""Adapters of other people's kernels (torch, Humming, vLLM, FlashInfer, sgl-kernel), one module each, each an
optional extra that imports its package lazily and says why it cannot run where the package or device is absent;
the registry imports each lazily. None imports references/ or kernels/ (verify/tests/test_import_rule.py).
README "Adapters of other people's kernels" lists what each one serves."""
