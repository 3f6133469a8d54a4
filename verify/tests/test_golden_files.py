"""verify.golden: exact digests, metric tolerances, the missing / mismatch / update paths (STYLE section 8)."""

from __future__ import annotations

import json

from verify.golden import check_or_update_golden, compare_golden, obtained_path, write_golden


def _doc(sqnr=20.0, digest="ab"):
    return {"environment": {"torch": "x"}, "runs": {"layer0/a": {"metrics": {"moe.l1.gate": {"sqnr_db": sqnr}},
                                                                 "digests": {"moe.l1.gate": digest}}}}


def test_identical_documents_have_no_differences():
    assert compare_golden(_doc(), _doc()) == []


def test_a_metric_inside_its_tolerance_passes_and_outside_fails():
    assert compare_golden(_doc(20.0), _doc(20.0 + 1e-12)) == []
    diffs = compare_golden(_doc(20.0), _doc(20.001))
    assert len(diffs) == 1 and "sqnr_db" in diffs[0] and "layer0/a" in diffs[0]


def test_a_changed_digest_is_reported_even_when_metrics_agree():
    diffs = compare_golden(_doc(digest="ab"), _doc(digest="cd"))
    assert len(diffs) == 1 and "bytes differ" in diffs[0]


def test_a_missing_golden_is_written_and_reported(tmp_path):
    path = tmp_path / "g.json"
    problems = check_or_update_golden(path, _doc(), update=False)
    assert problems and "created" in problems[0] and path.exists()
    assert check_or_update_golden(path, _doc(), update=False) == []


def test_a_mismatch_leaves_an_obtained_file_and_update_rewrites(tmp_path):
    path = tmp_path / "g.json"
    write_golden(path, _doc(20.0))
    problems = check_or_update_golden(path, _doc(25.0), update=False)
    assert len(problems) == 2 and obtained_path(path).exists()
    assert json.loads(obtained_path(path).read_text())["runs"]["layer0/a"]["metrics"]["moe.l1.gate"]["sqnr_db"] == 25.0
    problems = check_or_update_golden(path, _doc(25.0), update=True)
    assert "rewritten" in problems[0] and check_or_update_golden(path, _doc(25.0), update=False) == []
    assert not obtained_path(path).exists()
