"""Adapters of other people's kernels (torch, Humming, engine ops), one module each; the registry imports
each lazily. None imports references/ or kernels/ (verify/tests/test_import_rule.py)."""
