"""`python -m verify selftest`: the suite catches each bug class that has shipped elsewhere, on YOUR backend.

Each injector wraps the chosen backend (any backend: it only transforms what crosses the protocol,
the checkpoint tensors going into `prepare_*` or the boundary tensors coming out of an op) with one
bug from NVFP4_FACTS.md sections 5b and 6 or issue 26's GPU-kernel classes, runs every stage's verdicts
on the checkpoint's layers (the same judge_layer as `verify layer`), and checks two things:
  caught   at least one verdict fails;
  blamed   every failing verdict belongs to a stage that uses the corrupted op (the stage table's
           ops), so the report points at the right place.
A bug whose stages the backend does not serve on this device is "not applicable" (reported).
Prints a table (bug -> stage/check that caught it -> first line of the message); exit 1 when an
injected bug passes or is blamed on another stage.

Modules, by concern: injectors (the table of bugs), bugged (the wrapping backend), weights / activations /
fp8 (the corruptions and the data some bugs need), runner (selftest() and its scoring), cli (`python -m
verify selftest`: it calls this package's `selftest` and INJECTORS, so a test may wrap them here).
"""

from verify.selftest.activations import with_tie_rows
from verify.selftest.bugged import Bugged
from verify.selftest.injectors import INJECTORS, Injector
from verify.selftest.runner import SelftestRow, score, selftest

__all__ = ["INJECTORS", "Injector", "Bugged", "SelftestRow", "selftest", "score", "with_tie_rows"]
