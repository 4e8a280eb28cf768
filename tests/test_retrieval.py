"""Grounding on tiny fixtures: the index, retrieval, RAFT training examples, citing, abstention."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tinydata import make_splits, qa_rows

from stages.evaluate import choose_threshold, coverage_curve
from stages.index import index_facts
from tagtune.grounding import abstain, cite, training_segments
from tagtune.io import read_jsonl, write_jsonl
from tagtune.retrieval import Fact, FactIndex, Hit, facts_from_examples, facts_from_knowledge
from tagtune.templates import read_template

REPO = Path(__file__).resolve().parents[1]
TOWN = [
    ("museum", "The Maritime Museum opens at 9 am every day.", ["When does the museum open?"]),
    (
        "ferry",
        "The Skerrow Island ferry costs £7 return and leaves Cobble Quay at 10:30.",
        ["How much is the ferry?"],
    ),
    ("cash", "There are cash machines outside the Co-op on Market Street.", ["Where can I get cash?"]),
    (
        "lighthouse",
        "Greyhen Lighthouse stands at the end of the north breakwater.",
        ["Where is the lighthouse?"],
    ),
]


def _examples() -> list[dict]:
    return [
        {"kind": "qa", "question": q, "reference": a, "source": "faq.csv", "line": i + 2, "id": f"e{i}"}
        for i, (_, a, qs) in enumerate(TOWN)
        for q in qs
    ]


def test_facts_are_distinct_answers_with_provenance_and_questions():
    rows = _examples() + [{**_examples()[0], "question": "Museum opening time?", "line": 9}]
    rows.append(
        {"kind": "refusal", "question": "Capital of France?", "reference": "Sorry.", "source": "o", "line": 1}
    )
    facts = facts_from_examples(rows)
    assert len(facts) == len(TOWN)  # the refusal is no fact; two phrasings share one
    museum = next(f for f in facts if "Museum" in f.text)
    assert museum.where == "faq.csv:2" and museum.questions == (
        "When does the museum open?",
        "Museum opening time?",
    )
    knowledge = facts_from_knowledge(
        [
            {"kind": "text", "text": "The regatta is on 14 August.", "source": "news.txt", "line": 3},
            {"kind": "chat", "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
             "source": "n.csv", "line": 2},
        ]
    )  # fmt: skip
    assert [(f.text, f.where) for f in knowledge] == [
        ("The regatta is on 14 August.", "news.txt:3"),
        ("A.", "n.csv:2"),
    ] or [(f.text, f.where) for f in reversed(knowledge)] == [
        ("The regatta is on 14 August.", "news.txt:3"),
        ("A.", "n.csv:2"),
    ]


def test_retrieval_finds_the_fact_of_a_paraphrase():
    index = FactIndex(facts_from_examples(_examples()))
    for question, word in [
        ("What time do the doors of the museum open?", "Museum"),
        ("What is the price of a return ticket to Skerrow Island?", "ferry"),
        ("Is there a cash machine in town?", "cash"),
    ]:
        (best, *_) = index.search([question], k=2)[0]
        assert word in best.fact.text, (question, best.fact.text)
    assert all(len(hits) == 2 for hits in index.search(["museum", "ferry"], k=2))
    assert len(index.search(["museum"], k=99)[0]) == len(TOWN)  # never more than it holds


INDEX_SCRIPT = """
import sys
from pathlib import Path
from stages.index import index_facts
index_facts(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
"""


def test_same_data_gives_a_byte_identical_index_in_any_process(tmp_path):
    """bm25s orders its vocabulary by a hash-seeded set: the index must not depend on the seed."""
    splits = make_splits(tmp_path / "data", qa_rows(12, 3))
    knowledge = tmp_path / "knowledge.jsonl"
    write_jsonl(
        knowledge, [{"kind": "text", "text": "The regatta is on 14 August.", "source": "n.txt", "line": 1}]
    )
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"index-{seed}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed}
        r = subprocess.run(
            [sys.executable, "-c", INDEX_SCRIPT, str(splits), str(knowledge), str(out)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files and all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files), files
    index = FactIndex.load(outs[0])
    assert index.search(["When is the regatta?"], 1)[0][0].fact.where == "n.txt:1"


def test_index_stage_counts_training_and_knowledge_facts(tmp_path):
    splits = make_splits(tmp_path / "data", qa_rows(5, 3))
    knowledge = tmp_path / "k.jsonl"
    write_jsonl(knowledge, [{"kind": "text", "text": "Museum 0 opens at 1 am.", "source": "k", "line": 1},
                            {"kind": "text", "text": "A brand new fact.", "source": "k", "line": 2}])  # fmt: skip
    stats = index_facts(splits, knowledge, tmp_path / "index")
    trained = len(facts_from_examples(read_jsonl(splits / "train.jsonl")))
    assert stats == {"facts": trained + 1, "trained_facts": trained, "knowledge_facts": 1}  # one was known


def test_raft_examples_hold_k_facts_with_the_gold_or_the_refusal(tmp_path):
    splits = make_splits(tmp_path / "data", qa_rows(10, 3))
    template = read_template(splits)
    train = read_jsonl(splits / "train.jsonl")
    index = FactIndex(facts_from_examples(train))
    out = training_segments(train, index, template, k=3, gold_absent=0.3, seed=1)
    again = training_segments(train, index, template, k=3, gold_absent=0.3, seed=1)
    assert out == again  # deterministic
    refusal = template["refusal_answer"]
    for ex, orig in zip(out, train, strict=True):
        prompt = "".join(t for t, trained in ex["segments"] if not trained)
        answer = "".join(t for t, trained in ex["segments"] if trained)
        assert prompt.startswith("Facts:\n") and prompt.count("\n- ") == 3
        assert prompt.endswith(f"{orig['question']} <QUESTION>\n")
        if ex["grounded"] == "gold":
            assert (
                orig["kind"] == "qa" and f"- {orig['reference']}\n" in prompt and orig["reference"] in answer
            )
        else:
            assert orig["reference"] not in prompt.split("<QUESTION>")[0] or orig["kind"] == "refusal"
            assert refusal in answer
    kinds = [ex["grounded"] for ex in out if ex["kind"] == "qa"]
    assert 0 < kinds.count("absent") < len(kinds) / 2  # about gold_absent of them
    assert all(ex["grounded"] == "absent" for ex in out if ex["kind"] == "refusal")


@pytest.mark.parametrize("steps", [0, 5])
def test_the_generator_is_taught_to_refuse_a_wrong_fact_only_without_a_reranker(tmp_path, steps):
    from stages.finetune import _ground
    from tagtune.config import RetrievalConfig

    splits = make_splits(tmp_path / "data", qa_rows(10, 3))
    train, val = read_jsonl(splits / "train.jsonl"), read_jsonl(splits / "val.jsonl")
    retrieval = RetrievalConfig(enabled=True, k=2, gold_absent=0.5, rerank={"steps": steps})
    out = [ex for split in _ground(train, val, read_template(splits), retrieval, 1, None) for ex in split]
    kinds = [ex["grounded"] for ex in out if ex["kind"] == "qa"]
    # with a reranker, it says "none fits" before generating: the generator always sees the gold fact
    assert ("absent" in kinds) == (steps == 0) and "gold" in kinds


def _hit(text: str, where: int) -> Hit:
    return Hit(Fact("x", text, "faq.csv", where), 1.0)


def test_an_answer_cites_the_fact_it_came_from_and_abstains_below_the_threshold():
    hits = [_hit("The museum opens at 9 am.", 3), _hit("The ferry costs £7.", 8)]
    assert cite("The museum opens at 9 am every day.", hits).fact.where == "faq.csv:3"
    assert cite("Sorry, I can only answer questions about Brindlemoor.", hits) is None
    template = {"refusal_answer": "Sorry, I don't know."}
    assert abstain("Nine.", -0.1, -0.5, template) == "Nine."
    assert abstain("Nine.", -0.9, -0.5, template) == "Sorry, I don't know."
    assert abstain("Nine.", -0.9, None, template) == "Nine."


def _scored(kind: str, f1: float, refused: bool, confidence: float) -> dict:
    return {
        "kind": kind,
        "f1": f1,
        "refused": refused,
        "confidence": confidence,
        "answer": "x",
        "side": "tuned",
    }


def test_threshold_is_the_lowest_that_meets_the_confident_wrong_target():
    rows = [
        _scored("qa", 1.0, False, -0.05),
        _scored("qa", 1.0, False, -0.10),
        _scored("qa", 0.0, False, -0.90),  # wrong, unsure
        _scored("refusal", 0.0, False, -0.70),  # answered out of domain, unsure
        _scored("refusal", 0.0, True, -0.01),
    ]
    assert choose_threshold(rows, 0.5) is None  # 2 of 5 wrong already meets 50%
    t = choose_threshold(rows, 0.2)  # drop the least confident until ≤ 1 of 5 is wrong
    assert -0.9 < t <= -0.7 + 1e-9
    assert choose_threshold(rows, 0.0) > -0.70
    assert choose_threshold([_scored("qa", 0.0, False, -0.1)], 0.0) > -0.1  # refusing it is what works
    curve = coverage_curve(rows)
    assert [round(c, 2) for _, c, _ in curve] == [0.2, 0.4, 0.6, 0.8]
    assert [round(a, 2) for _, _, a in curve] == [1.0, 1.0, 0.67, 0.5]


@pytest.mark.parametrize("k", [1, 4])
def test_grounded_prompt_renders_context_before_the_question(tmp_path, k):
    from tagtune.grounding import ground

    splits = make_splits(tmp_path / "data", qa_rows(6, 2))
    template = read_template(splits)
    index = FactIndex(facts_from_examples(read_jsonl(splits / "train.jsonl")))
    (g,) = ground(["When does museum 3 open?"], index, template, k)
    assert g.prompt.startswith("Facts:\n- Museum 3 opens at 4 am.\n")
    assert g.prompt.count("\n- ") == k and g.prompt.endswith("When does museum 3 open? <QUESTION>\n")
