"""Preference tuning after SFT (TRL DPO / KTO) on the UI's verdicts: rows, tokens, margins, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tinydata import make_splits

from stages.finetune import finetune
from tagtune.config import FinetuneConfig, MlflowConfig, ModelConfig, PreferenceConfig
from tagtune.encoding import IGNORE_INDEX, encode_example
from tagtune.io import read_jsonl, write_jsonl
from tagtune.models import load_tokenizer
from tagtune.preference import preference_rows, render_pair, trl_trainer
from tagtune.templates import read_template

SFT = dict(max_steps=6, batch_size=4, save_steps=100, logging_steps=2, learning_rate=5e-3, precision="fp32")


def _verdict(i: int, question: str, answered: str, rating: int, correction: str | None = None) -> dict:
    """A row of the feedback stage's feedback.jsonl."""
    return {
        "id": i, "created_at": f"2026-11-25 10:0{i}", "question": question, "model_answer": answered,
        "rating": rating, "correction": correction, "answer": correction or (answered if rating == 1 else None),
        "model_name": "town", "model_version": "1",
    }  # fmt: skip


def _verdicts(splits: Path) -> list[dict]:
    """Corrections of wrong answers to 4 train questions, a 👍, a 👎, and a correction on a test question."""
    train = [ex for ex in read_jsonl(splits / "train.jsonl") if ex["kind"] == "qa"]
    test_q = next(ex["question"] for ex in read_jsonl(splits / "test.jsonl") if ex["kind"] == "qa")
    wrong = "The museum is closed on Sundays."
    rows = [_verdict(i + 1, ex["question"], wrong, -1, ex["reference"]) for i, ex in enumerate(train[:4])]
    rows += [
        _verdict(5, train[5]["question"], train[5]["reference"], 1),
        _verdict(6, train[6]["question"], wrong, -1),
        _verdict(7, test_q, wrong, -1, "a leaked reference"),
    ]
    return rows


def test_rows_from_verdicts(tmp_path, tiny_llama):
    splits = make_splits(tmp_path / "data")
    template = read_template(splits)
    verdicts = _verdicts(splits)
    # a later verdict on the same question replaces the earlier one; a "correction" equal to the
    # model's answer is no preference
    verdicts.append(_verdict(8, verdicts[1]["question"].upper() + " ", "Same.", -1, "same."))
    test_q = verdicts[6]["question"]
    rows = preference_rows(verdicts, template, exclude={test_q.lower().rstrip("?")} | {"x"})
    rows_all = preference_rows(verdicts, template)
    assert len(rows_all.dpo) == 4 and rows_all.held_out == 0  # 3 corrections + the test one
    assert rows.held_out == 1  # the test question's verdict is never trained on
    assert len(rows.dpo) == 3
    prompt, chosen = render_pair(verdicts[0]["question"], verdicts[0]["correction"], template)
    assert rows.dpo[0] == {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": render_pair(verdicts[0]["question"], verdicts[0]["model_answer"], template)[1],
    }
    assert prompt.endswith("<QUESTION>\n") and chosen.endswith("<END>")
    labels = [r["label"] for r in rows.kto]
    assert labels == [True, False] * 3 + [True, False]  # 3 corrections as two rows each, 👍, 👎


def _sft_encoding(tok, prompt: str, completion: str) -> tuple[tuple, tuple]:
    """(masked ids, trained ids) of a turn as SFT encodes it (encode_example)."""
    enc = encode_example([[prompt, False], [completion, True]], tok, 256)
    trained = tuple(t for t in enc["labels"] if t != IGNORE_INDEX)
    assert trained[-1] == tok.eos_token_id
    return tuple(enc["input_ids"][: len(enc["input_ids"]) - len(trained)]), trained


def test_trl_trains_exactly_the_tokens_sft_trains(tmp_path, tiny_llama):
    """TRL tokenises prompt + completion itself: its completion ids must be SFT's trained ids (answer,
    end tag, EOS) and its prompt ids SFT's masked ones."""
    from transformers import AutoModelForCausalLM

    splits = make_splits(tmp_path / "data")
    tok = load_tokenizer(str(tiny_llama))
    rows = preference_rows(_verdicts(splits), read_template(splits))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    args = dict(output_dir=str(tmp_path / "ckpt"), max_steps=1, report_to="none", use_cpu=True)

    dpo = trl_trainer("dpo", model, tok, rows, args, 0.1, 0.0, []).train_dataset
    got = [((tuple(e["prompt_ids"]), tuple(e["chosen_ids"])), (tuple(e["prompt_ids"]), tuple(e["rejected_ids"])))
           for e in dpo]  # fmt: skip
    want = [(_sft_encoding(tok, r["prompt"], r["chosen"]), _sft_encoding(tok, r["prompt"], r["rejected"]))
            for r in rows.dpo]  # fmt: skip
    assert got == want

    kto = trl_trainer("kto", model, tok, rows, {**args, "per_device_train_batch_size": 2}, 0.1, 0.0, [])
    got = sorted((tuple(e["prompt_ids"]), tuple(e["completion_ids"])) for e in kto.train_dataset)
    assert got == sorted(_sft_encoding(tok, r["prompt"], r["completion"]) for r in rows.kto)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_phase_raises_the_margin_of_the_corrections(tmp_path, tiny_llama, method):
    splits = make_splits(tmp_path / "data")
    write_jsonl(tmp_path / "feedback.jsonl", _verdicts(splits))
    pref = PreferenceConfig(method=method, steps=12, learning_rate=5e-3, sft_weight=0.0)
    mlflow_cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="pref")
    facts = finetune(
        splits, tmp_path / "out", FinetuneConfig(**SFT), ModelConfig(base=str(tiny_llama)),
        tmp_path / "ckpt", mlflow_cfg, None, pref, tmp_path / "feedback.jsonl",
    )  # fmt: skip
    p = facts["preference"]
    assert p["steps"] == 12 and p["pairs"] == 4 and p["held_out"] == 1
    assert p["rows"] == (4 if method == "dpo" else 10)  # KTO: both sides of each correction, 👍, 👎
    # the log-probability margin of chosen (the correction) over rejected (the model's answer) rose
    assert p["margin_after"] > p["margin_before"] + 1.0, p
    saved = json.loads((tmp_path / "out" / "training.json").read_text())["preference"]
    assert saved["margin_after"] == p["margin_after"] and "history" not in saved
    # the same MLflow run as SFT: SFT's step metrics and the preference phase's, side by side
    from mlflow import MlflowClient

    run = MlflowClient(mlflow_cfg.tracking_uri).get_run(facts["mlflow_run_id"])
    assert {"train/loss", "preference/loss", "preference/margin_after"} <= set(run.data.metrics)
    assert run.data.metrics["preference/margin_after"] == pytest.approx(p["margin_after"])


def test_no_verdicts_skip_the_phase_and_a_rerun_resumes_without_new_steps(tmp_path, tiny_llama):
    splits = make_splits(tmp_path / "data")
    sft = FinetuneConfig(**{**SFT, "save_steps": 3})
    pref = PreferenceConfig(method="dpo", steps=6, learning_rate=5e-3)
    args = (ModelConfig(base=str(tiny_llama)), tmp_path / "ckpt", None, None, pref)
    none = finetune(splits, tmp_path / "out0", sft, *args, tmp_path / "absent.jsonl")
    assert none["preference"] == {"method": "dpo", "rows": 0, "pairs": 0, "held_out": 0, "steps": 0}

    write_jsonl(tmp_path / "feedback.jsonl", _verdicts(splits))
    first = finetune(splits, tmp_path / "out", sft, *args, tmp_path / "feedback.jsonl")
    adapter = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    again = finetune(splits, tmp_path / "out", sft, *args, tmp_path / "feedback.jsonl")
    # SFT resumed at its end; the preference phase resumed from its own last checkpoint: no new step
    assert (
        again["resumed_from_step"] == 6 and again["preference"]["steps"] == first["preference"]["steps"] == 6
    )
    assert first["preference"]["resumed_from_step"] == 0 and again["preference"]["resumed_from_step"] == 6
    after = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(adapter[k], after[k]) for k in adapter)
    # other rows (KTO's): the phase's checkpoints (and the model card TRL writes there) are replaced
    kto = PreferenceConfig(method="kto", steps=4, learning_rate=5e-3)
    other = finetune(splits, tmp_path / "out", sft, *args[:-1], kto, tmp_path / "feedback.jsonl")
    assert other["preference"]["steps"] == 4 and other["preference"]["resumed_from_step"] == 0


def test_kto_with_a_single_row_trains_nothing(tmp_path, tiny_llama):
    splits = make_splits(tmp_path / "data")
    one = [_verdict(1, "Where is museum 1?", "Museum 1 opens at 2 am.", 1)]
    write_jsonl(tmp_path / "feedback.jsonl", one)
    facts = finetune(
        splits, tmp_path / "out", FinetuneConfig(**SFT), ModelConfig(base=str(tiny_llama)),
        tmp_path / "ckpt", None, None, PreferenceConfig(method="kto"), tmp_path / "feedback.jsonl",
    )  # fmt: skip
    assert facts["preference"]["rows"] == 1 and facts["preference"]["steps"] == 0  # KTO needs ≥ 2 rows


def test_grounded_preference_prompts_hold_the_fact_the_reranker_chose(tmp_path, tiny_llama):
    """The prompts of a grounded run's preference rows hold what the user was shown with the answer:
    the reranker's best fact, not BM25's."""
    from stages.finetune import _preference_rows
    from tagtune.config import RetrievalConfig
    from tagtune.models import load_model
    from tagtune.rerank import Reranker
    from tagtune.retrieval import FactIndex, facts_from_examples

    splits = make_splits(tmp_path / "data")
    template, tok = read_template(splits), load_tokenizer(str(tiny_llama))
    verdicts = [v for v in _verdicts(splits) if v["correction"]][:4]
    write_jsonl(tmp_path / "feedback.jsonl", verdicts)
    grounded = RetrievalConfig(enabled=True, k=1, rerank={"steps": 1, "candidates": 4})
    # an untrained tiny reranker orders BM25's candidates its own (random) way
    reranker = Reranker(load_model(str(tiny_llama)).eval(), tok, candidates=4)
    rows = _preference_rows(tmp_path / "feedback.jsonl", splits, template, tok, grounded, reranker)
    bm25 = _preference_rows(tmp_path / "feedback.jsonl", splits, template, tok, grounded)
    index = FactIndex(facts_from_examples(read_jsonl(splits / "train.jsonl")))
    plain = [hits[0].fact.text for hits in index.search([v["question"] for v in verdicts], 1)]
    index.reranker = reranker
    shown = [hits[0].fact.text for hits in index.search([v["question"] for v in verdicts], 1)]
    assert shown != plain  # the test means something: the reranker changed some first fact
    for v, row, fact in zip(verdicts, rows.dpo, shown, strict=True):
        assert row["prompt"] == render_pair(v["question"], v["correction"], template, tok, [fact])[0]
    assert [r["prompt"] for r in bm25.dpo] == [
        render_pair(v["question"], v["correction"], template, tok, [first])[0]
        for v, first in zip(verdicts, plain, strict=True)
    ]
    # finetune trains that reranker before the preference phase, and writes it once, beside the model
    grounded = grounded.model_copy(update={"rerank": grounded.rerank.model_copy(update={"steps": 2})})
    facts = finetune(
        splits, tmp_path / "out", FinetuneConfig(**SFT), ModelConfig(base=str(tiny_llama)), tmp_path / "ckpt",
        None, grounded, PreferenceConfig(method="dpo", steps=2), tmp_path / "feedback.jsonl",
    )  # fmt: skip
    assert facts["preference"]["pairs"] == 4 and facts["preference"]["steps"] == 2
    assert facts["reranker"]["steps"] == 2 and (tmp_path / "out" / "reranker" / "reranker.json").is_file()
