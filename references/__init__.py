"""Independent, bit-accurate NVFP4 emulators. Imports torch and numpy only.

Never imports kernels/ (verify/tests/test_import_rule.py enforces it).
"""
