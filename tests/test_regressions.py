"""The per-question verdicts and the comparison behind register's per-example gate (tagtune/regressions.py)."""

from __future__ import annotations

from tagtune.regressions import compare, outcomes, report


def _row(q: str, f1: float, kind: str = "qa", refused: bool = False, side: str = "tuned") -> dict:
    return {"question": q, "answer": f"a {q}", "f1": f1, "kind": kind, "refused": refused, "side": side}


def test_verdicts_follow_the_confident_wrong_rule():
    got = outcomes([
        _row("Right?", 0.5), _row("Wrong?", 0.49), _row("Refused in domain?", 1.0, refused=True),
        _row("Out of domain?", 0.0, kind="refusal", refused=True), _row("Base side?", 1.0, side="base"),
        {"question": "Label?", "answer": "pos", "correct": False, "side": "tuned"},
    ])  # fmt: skip
    assert {v["question"]: v["correct"] for v in got.values()} == {
        "Right?": True, "Wrong?": False, "Refused in domain?": False, "Out of domain?": True, "Label?": False,
    }  # fmt: skip


def test_compare_counts_regressions_and_fixes_on_shared_questions_only():
    champion = outcomes([_row("A?", 1), _row("B?", 1), _row("C?", 0), _row("Gone?", 1)])
    candidate = outcomes([_row("a ?", 0), _row("B?", 1), _row("C?", 1), _row("New?", 0)])  # "a ?" == "A?"
    cmp = compare(champion, candidate)
    assert (cmp.shared, cmp.champion_correct) == (3, 2)
    assert [r["question"] for r in cmp.regressions] == ["a ?"] and [r["question"] for r in cmp.fixes] == [
        "C?"
    ]
    assert cmp.regressions[0]["champion"] == "a A?" and cmp.allowed(0.5) == 1 and cmp.allowed(0.05) == 0
    md = report(cmp, "3", "4")
    assert "| a ? | a A? | a a ? |" in md and "Regressions (champion right, v4 wrong): 1" in md


def test_forgetting_tracks_the_first_versions_questions_as_a_frozen_slice():
    from tagtune.regressions import forgetting, forgetting_report

    v1 = {"a": {"correct": True}, "b": {"correct": True}}
    v2 = {"a": {"correct": False}, "b": {"correct": True}, "c": {"correct": True}}
    v3 = {"a": {"correct": True}, "b": {"correct": True}, "c": {"correct": False}, "d": {"correct": False}}
    rows = forgetting([("1", v1), ("2", v2), ("3", v3)])
    assert [(r["old_correct"], r["new_correct"]) for r in rows] == [(1.0, None), (0.5, 1.0), (1.0, 0.0)]
    assert [(r["old_slice"], r["new_slice"]) for r in rows] == [(2, 0), (2, 1), (2, 2)]
    table = forgetting_report(rows)
    assert "| v2 | 0.500 (n=2) | 1.000 (n=1) |" in table and "| v1 | 1.000 (n=2) | – |" in table
    assert forgetting([]) == []
