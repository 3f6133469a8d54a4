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


def test_one_run_is_checked_and_updated_without_touching_the_others(tmp_path):
    from verify.golden import check_or_update_golden_run, load_golden

    path = tmp_path / "g.json"
    doc = _doc(20.0)
    doc["runs"]["layer1/a"] = _doc(30.0)["runs"]["layer0/a"]
    write_golden(path, doc)
    assert check_or_update_golden_run(path, "layer1/a", doc["runs"]["layer1/a"], update=False) == []
    changed = _doc(21.0)["runs"]["layer0/a"]
    problems = check_or_update_golden_run(path, "layer0/a", changed, update=False)
    assert problems and "layer0/a" in problems[0] and obtained_path(path).exists()
    check_or_update_golden_run(path, "layer0/a", changed, update=True)
    after = load_golden(path)["runs"]
    assert after["layer0/a"]["metrics"]["moe.l1.gate"]["sqnr_db"] == 21.0
    assert after["layer1/a"]["metrics"]["moe.l1.gate"]["sqnr_db"] == 30.0
    problems = check_or_update_golden_run(path, "layer2/a", changed, update=False)
    assert "created" in problems[0] and "layer2/a" in load_golden(path)["runs"]


def test_golden_diff_lists_the_largest_relative_change_first():
    from verify.golden import compare_golden

    golden = {"runs": {"r": {"metrics": {"a": {"sqnr_db": 20.0}, "b": {"sqnr_db": 30.0}, "c": {"cosine": 0.99}},
                             "digests": {"x": "00"}}}}
    got = {"runs": {"r": {"metrics": {"a": {"sqnr_db": 20.001}, "b": {"sqnr_db": 15.0}, "c": {"cosine": 0.98}},
                          "digests": {"x": "11"}}}}
    diffs = compare_golden(golden, got)
    assert diffs[0].startswith("r b sqnr_db: golden 30.0, got 15.0 (relative change 0.5"), diffs
    assert any(d.startswith("r a sqnr_db") for d in diffs[1:]), diffs  # the 8th-digit drift comes later
    assert diffs[-1].startswith("r x: bytes differ"), diffs
