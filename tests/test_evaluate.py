"""evaluate: metric functions on hand-made answers, answer loss == the model's own loss, and the stage
end to end on a tiny model trained for a few steps (causal LM with refusal rows, and classification).

`make_pipeline` (tiny data → format → split → finetune) is reused by test_register.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from stages.evaluate import (
    aggregate,
    answer_losses,
    classification_metrics,
    evaluate,
    exact_match,
    is_refusal,
    repetition_rate,
    rouge_l,
    score_answer,
    select_examples,
    token_f1,
)
from tagtune.config import (
    EvaluateConfig,
    FinetuneConfig,
    FormatConfig,
    GenerationConfig,
    MlflowConfig,
    ModelConfig,
    RefusalConfig,
    SplitConfig,
)
from tagtune.generation import Answer
from tagtune.io import read_json, read_jsonl, write_jsonl

REFUSAL = "Sorry, I can only answer questions about the town."
FACTS = {
    "museum": (
        [
            "What time does the museum open?",
            "When does the museum open?",
            "When is the museum open?",
            "At what time does the museum open?",
        ],
        "The museum opens at 9 am.",
    ),
    "harbour": (
        [
            "Where is the harbour?",
            "Where can I find the harbour?",
            "Where's the harbour?",
            "How do I get to the harbour?",
        ],
        "The harbour is east of the old bridge.",
    ),
}
OOD = ["What is the capital of France?", "Who wrote Hamlet?", "How tall is Everest?", "What is 2+2?"]
CLS = [
    ("great film, loved it", "pos"),
    ("loved it, great", "pos"),
    ("a great film", "pos"),
    ("great acting", "pos"),
    ("terrible plot and bad acting", "neg"),
    ("bad acting", "neg"),
    ("terrible film", "neg"),
    ("bad plot, terrible", "neg"),
]
TINY_GEN = GenerationConfig(max_new_tokens=16)


# ------------------------------------------------------------------------------ the tiny pipeline
def make_pipeline(
    root: Path,
    task: str = "causal_lm",
    max_steps: int = 40,
    seed: int = 0,
    base: Path | None = None,
    method: str = "full",
    merge: bool = True,
) -> tuple[Path, Path]:
    """Tiny data → format → split → finetune (full, tiny llama) under `root`; returns (splits, finetuned)."""
    from tinymodels import make_tiny_model

    from stages.finetune import finetune
    from stages.format import format_examples
    from stages.split import split

    root.mkdir(parents=True, exist_ok=True)
    if base is None:
        base = root / "base"
        if not (base / "config.json").is_file():
            make_tiny_model(base)
    rows: list[dict[str, Any]] = []
    if task == "classification":
        for text, label in CLS:
            rows.append(
                {
                    "kind": "classification",
                    "text": text,
                    "label": label,
                    "source": "r.csv",
                    "line": len(rows) + 2,
                }
            )
    else:
        for group, (questions, answer) in FACTS.items():
            for q in questions:
                msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
                rows.append(
                    {
                        "kind": "chat",
                        "messages": msgs,
                        "source": "faq.csv",
                        "line": len(rows) + 2,
                        "group": group,
                    }
                )
    (root / "ingested").mkdir(exist_ok=True)
    write_jsonl(root / "ingested" / "rows.jsonl", rows)
    (root / "ood.txt").write_text("\n".join(OOD) + "\n", encoding="utf-8")
    refusal = RefusalConfig(answer=REFUSAL, questions="ood.txt") if task != "classification" else None
    format_examples(root / "ingested", root / "tagged", FormatConfig(refusal=refusal), base_dir=root)
    strategy = "example" if task == "classification" else "phrasing"
    split(
        root / "tagged", root / "splits", SplitConfig(test_fraction=0.3, val_fraction=0.0, strategy=strategy)
    )
    cfg = FinetuneConfig(
        task=task,
        method=method,
        merge=merge,
        max_steps=max_steps,
        batch_size=8,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        logging_steps=5,
        save_steps=1000,
        seed=seed,
    )
    finetune(root / "splits", root / "finetuned", cfg, ModelConfig(base=str(base)), root / "ckpt", None)
    return root / "splits", root / "finetuned"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> tuple[Path, Path]:
    return make_pipeline(tmp_path_factory.mktemp("lm"))


# ---------------------------------------------------------------------------------- metric functions
def test_exact_match_and_f1_normalise_case_space_and_punctuation():
    assert exact_match("  the Museum opens at 9 am ", "The museum opens at 9 am.") == 1.0
    assert exact_match("The museum opens at 10 am.", "The museum opens at 9 am.") == 0.0
    assert token_f1("The museum opens at 9 am.", "the museum opens at 9 am") == 1.0
    # 3 of 4 answer words are in the 6-word reference: P=3/4, R=3/6
    assert token_f1("museum opens at noon", "the museum opens at 9 am") == pytest.approx(
        2 * 0.75 * 0.5 / 1.25
    )
    assert token_f1("", "") == 1.0
    assert token_f1("", "something") == 0.0
    assert token_f1("nothing shared", "the museum") == 0.0


def test_rouge_l_uses_longest_common_subsequence():
    assert rouge_l("The museum opens at 9 am.", "The museum opens at 9 am.") == pytest.approx(1.0)
    assert rouge_l("harbour bridge", "The museum opens at 9 am.") == 0.0
    # LCS "the museum opens" = 3 of 3 (precision) and 3 of 6 (recall)
    assert rouge_l("the museum opens", "The museum opens at 9 am.") == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_refusal_is_the_refusal_or_contains_it():
    assert is_refusal("sorry, I can only answer questions about the town", REFUSAL)
    assert is_refusal("Hmm. Sorry, I can only answer questions about the town. Ask me!", REFUSAL)
    assert not is_refusal("The museum opens at 9 am.", REFUSAL)
    assert not is_refusal("Sorry, I can only", REFUSAL)
    assert not is_refusal("anything", None)


def test_repetition_rate_catches_loops_not_clean_answers():
    loop = "Explain the concept of black holes. " * 4
    assert repetition_rate(loop) > 0.6
    assert repetition_rate("The harbour is east of the old bridge.") == 0.0
    assert repetition_rate("too short") == 0.0
    # trigrams of "a b c a b c": abc bca cab abc — 1 of 4 repeats an earlier one
    assert repetition_rate("a b c a b c") == pytest.approx(0.25)


def _row(kind: str, reference: str, answer: str, stopped: bool = True, tokens: int = 0) -> dict[str, Any]:
    scored = score_answer(Answer(answer, 5, stopped), {"reference": reference}, REFUSAL)
    return {"kind": kind, "answer": answer, "nll": tokens * 0.5, "tokens": tokens, **scored}


def test_aggregate_on_hand_made_answers():
    rows = [
        _row("qa", "The museum opens at 9 am.", "The museum opens at 9 am.", tokens=4),
        _row("qa", "The harbour is east of the old bridge.", REFUSAL, tokens=4),  # a false refusal
        _row("qa", "The harbour is east.", "harbour harbour harbour harbour harbour", stopped=False),
        _row("refusal", REFUSAL, REFUSAL),
        _row("refusal", REFUSAL, "Paris."),
    ]
    m = aggregate(rows, has_refusal=True)
    approx = lambda x: pytest.approx(x, abs=1e-6)  # noqa: E731 - metrics are rounded to 6 places
    assert m["exact_match"] == approx(1 / 3)
    assert m["refusal_rate"] == approx(0.5)
    assert m["false_refusal_rate"] == approx(1 / 3)
    assert m["truncation_rate"] == approx(1 / 5)
    assert m["repetition_rate"] == approx((2 / 3) / 5)  # "harbour"×5: 2 of 3 trigrams repeat
    assert m["eval_loss"] == approx(0.5)
    assert m["perplexity"] == approx(math.exp(0.5))
    assert m["answer_tokens"] == 5.0
    assert "refusal_rate" not in aggregate(rows, has_refusal=False)


def test_the_report_says_what_abstention_costs_and_which_param_trades_it():
    from stages.evaluate import _report

    metrics = {"n.qa": 22.0, "tuned.answer_f1": 0.25, "tuned.false_refusal_rate": 0.727273,
               "tuned.false_refusal_rate_without_abstention": 0.0, "tuned.confident_wrong_rate": 0.066667,
               "tuned.confident_wrong_rate_without_abstention": 0.333333}  # fmt: skip
    assert "Abstention" not in _report(metrics, {}, [], [])  # no threshold chosen: nothing to explain
    report = _report({**metrics, "abstain.threshold": 2.177, "abstain.val_questions": 24.0}, {}, [], [])
    assert "below 2.18 (the threshold chosen on 24 val questions" in report
    assert "confident-wrong 33.3% → 6.7%, false refusals 0.0% → 72.7%" in report
    assert "Raise `evaluate.max_confident_wrong`" in report


def test_classification_metrics_macro_average():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert m["accuracy"] == 0.75
    assert m["precision"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert m["recall"] == pytest.approx((0.5 + 1.0) / 2)


def test_select_examples_is_deterministic_and_keeps_every_kind():
    rows = [{"id": f"q{i:02d}", "kind": "qa"} for i in range(18)] + [{"id": "r1", "kind": "refusal"}]
    picked = select_examples(rows, 5)
    assert len(picked) == 5
    assert {r["kind"] for r in picked} == {"qa", "refusal"}
    assert {r["id"] for r in picked} == {
        r["id"] for r in select_examples(rows[::-1], 5)
    }  # by id, not position
    assert select_examples(rows, 0) == rows


# ------------------------------------------------------------------------------------ model passes
def test_answer_loss_equals_unpadded_model_loss(tiny_lm):
    import torch

    from tagtune.models import load_finetuned

    splits, finetuned = tiny_lm
    rows = read_jsonl(splits / "train.jsonl")[:5]
    model, tok = load_finetuned(finetuned)
    batched = answer_losses(model, tok, rows, 256, batch_size=4)  # padded batches of mixed lengths
    from tagtune.encoding import encode_example

    for row, got in zip(rows, batched, strict=True):
        enc = encode_example(row["segments"], tok, 256)
        ids = torch.tensor([enc["input_ids"]])
        with torch.inference_mode():
            ref = model(input_ids=ids, labels=torch.tensor([enc["labels"]])).loss.item()
        assert got[0] / got[1] == pytest.approx(ref, rel=1e-4)


def test_evaluate_end_to_end_with_mlflow(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the SQLite store's default artifact root is ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    splits, finetuned = tiny_lm
    mlflow_cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="evaltest")
    cfg = EvaluateConfig(generation=TINY_GEN, batch_size=4)
    out = tmp_path / "eval"
    m = evaluate(splits, finetuned, out, cfg, mlflow_cfg)

    test_rows = read_jsonl(splits / "test.jsonl")
    kinds = {r["kind"] for r in test_rows}
    assert kinds == {"qa", "refusal"}
    for side in ("tuned", "base"):
        for k in (
            "eval_loss",
            "perplexity",
            "exact_match",
            "answer_f1",
            "rougeL",
            "refusal_rate",
            "false_refusal_rate",
            "repetition_rate",
            "truncation_rate",
            "answer_words",
            "answer_tokens",
        ):
            assert f"{side}.{k}" in m, f"{side}.{k}"
    assert m["delta.answer_f1"] == pytest.approx(m["tuned.answer_f1"] - m["base.answer_f1"], abs=1e-6)
    assert m["n.qa"] + m["n.refusal"] == len(test_rows)
    # a few steps on 6 answers already beat the random-init base on its own answers
    assert m["tuned.perplexity"] < m["base.perplexity"]
    assert read_json(out / "metrics.json") == m

    table = read_jsonl(out / "answers.jsonl")
    assert len(table) == 2 * len(test_rows)
    assert {r["side"] for r in table} == {"tuned", "base"}
    for r in table:
        assert {"question", "reference", "answer", "f1", "rougeL", "refused", "stopped"} <= set(r)
        assert "<END>" not in r["answer"]
    csv_head = (out / "answers.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "tuned_f1" in csv_head and "base_f1" in csv_head
    report = (out / "report.md").read_text(encoding="utf-8")
    for fig in ("loss.png", "metrics.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
        assert f"figures/{fig}" in report
    assert "| answer_f1 |" in report

    # attached to finetune's run (opened by fingerprint, finetune ran without MLflow here)
    from tagtune import tracking

    c = tracking.client(mlflow_cfg)
    exp = c.get_experiment_by_name("evaltest")
    (run,) = c.search_runs([exp.experiment_id])
    assert run.data.metrics["eval/tuned.answer_f1"] == m["tuned.answer_f1"]
    table_file = run.data.tags["tagtune.answers_table"]
    logged = [f.path for f in c.list_artifacts(run.info.run_id, "evaluate")]
    assert table_file in logged and "evaluate/report.md" in logged
    # a retry does not append the same rows to the table again
    assert not tracking.log_table(mlflow_cfg, run.info.run_id, table, table_file)


def test_evaluate_max_examples_and_no_base(tiny_lm, tmp_path):
    splits, finetuned = tiny_lm
    cfg = EvaluateConfig(generation=TINY_GEN, max_examples=2, compare_base=False)
    m = evaluate(splits, finetuned, tmp_path / "eval", cfg, None)
    assert m["n.qa"] + m["n.refusal"] == 2 and m["n.refusal"] >= 1
    assert not any(k.startswith(("base.", "delta.")) for k in m)
    assert len(read_jsonl(tmp_path / "eval" / "answers.jsonl")) == 2


def test_evaluate_classification(tmp_path):
    splits, finetuned = make_pipeline(tmp_path, task="classification", max_steps=10)
    m = evaluate(splits, finetuned, tmp_path / "eval", EvaluateConfig(batch_size=4), None)
    for side in ("tuned", "base"):
        for k in ("accuracy", "precision", "recall", "f1"):
            assert 0.0 <= m[f"{side}.{k}"] <= 1.0
    assert (tmp_path / "eval" / "figures" / "confusion.png").stat().st_size > 1000
    table = read_jsonl(tmp_path / "eval" / "answers.jsonl")
    assert {r["answer"] for r in table} <= {"pos", "neg"}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == m


def test_evaluate_and_export_an_adapter_only_lora_run(tmp_path):
    """finetune.merge: false leaves only adapter/: evaluate merges it into the base in memory, and
    export_model_dir (what register ships) writes a complete model that answers the same."""
    from tagtune.app.chat import Chatbot
    from tagtune.models import export_model_dir

    splits, finetuned = make_pipeline(tmp_path, method="lora", merge=False, max_steps=4)
    assert not (finetuned / "model").exists() and (finetuned / "adapter").is_dir()
    m = evaluate(
        splits, finetuned, tmp_path / "eval", EvaluateConfig(generation=TINY_GEN, compare_base=False), None
    )
    assert "tuned.answer_f1" in m
    merged = export_model_dir(finetuned, tmp_path / "merged")
    (merged / "template.json").write_bytes((finetuned / "template.json").read_bytes())
    tuned = {r["question"]: r["answer"] for r in read_jsonl(tmp_path / "eval" / "answers.jsonl")}
    bot = Chatbot.from_dir(merged)
    questions = list(tuned)
    assert [a.text for a in bot.answer(questions, TINY_GEN)] == [tuned[q] for q in questions]
