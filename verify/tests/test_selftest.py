"""`python -m verify selftest` on the committed fixture: every injected bug class is caught, by the
stages that use the corrupted op only; a verdict that cannot fail or a bug blamed elsewhere is reported."""

from __future__ import annotations

import pytest

from references.stages import Op
from verify.__main__ import main
from verify.backend import EmulatorBackend
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.selftest import INJECTORS, Injector, selftest

LAYERS = [0, 3]  # layer 0: NVFP4 attention + shared expert, hash routing; layer 3: score routing


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(GOLDEN_DIR / "mini-v4")


def test_selftest_cli_catches_every_injected_bug_on_the_emulator(capsys):
    assert main(["selftest", "--layers", "0,3", "--tokens", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"0 of {len(INJECTORS)} injected bugs missed or misblamed" in out, out[-3000:]
    assert all(inj.bug in out for inj in INJECTORS)


@pytest.mark.parametrize("inj", INJECTORS, ids=lambda i: i.bug)
def test_each_bug_is_caught_where_it_was_put(ckpt, inj):
    (row,) = selftest(ckpt, EmulatorBackend(), LAYERS, tokens=16, device="cpu", injectors=(inj,))
    assert row.status == "caught" and not row.misblamed, row


def test_a_verdict_that_cannot_fail_shows_up_as_missed(ckpt, monkeypatch):
    import verify.stage_verdicts as sv

    monkeypatch.setattr(sv, "assert_within_gemm_bound", lambda *a, **k: 0.0)  # the bound check neutered
    inj = next(i for i in INJECTORS if i.bug == "routing-weight-at-the-wrong-place")
    (row,) = selftest(ckpt, EmulatorBackend(), [3], tokens=16, device="cpu", injectors=(inj,))
    assert row.status == "MISSED", row


def test_a_bug_blamed_on_another_stage_is_misblamed(ckpt):
    wrong = Injector("routing-weight-at-the-wrong-place", "test", lambda s: s.op is Op.ROUTER)
    (row,) = selftest(ckpt, EmulatorBackend(), [3], tokens=16, device="cpu", injectors=(wrong,))
    assert row.status == "MISBLAMED" and any("moe.combine bound" in w for w in row.misblamed), row
