"""Root conftest: loads the nvfp4-verify pytest plugin (markers, options, device gating).

Everything lives in verify/plugin.py so that `pytest` run from any directory of a
checkout, and `python -m pytest --pyargs verify`, see the same configuration.
"""

pytest_plugins = ["verify.plugin"]
