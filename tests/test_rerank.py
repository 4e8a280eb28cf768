"""The trained reranker (tagtune/rerank.py): its training lists, training on a tiny model, the round
trip through finetune's output, and "none of these fits" turning into the refusal."""

from __future__ import annotations

import json

import pytest
from tinydata import make_splits, qa_rows

from stages.finetune import finetune
from tagtune.config import FinetuneConfig, ModelConfig, RerankConfig, RetrievalConfig
from tagtune.grounding import NOT_ASKED, ground, reply
from tagtune.io import read_jsonl
from tagtune.models import ModelIntegrityError, load_finetuned, load_model, load_tokenizer
from tagtune.rerank import attach, keep_merged, train_reranker, training_lists
from tagtune.retrieval import FactIndex, facts_from_examples
from tagtune.templates import read_template, refusal_answer

SFT = dict(max_steps=4, batch_size=4, save_steps=100, logging_steps=2, learning_rate=5e-3, precision="fp32")


def test_training_lists_hold_the_gold_or_point_at_none(tmp_path):
    train = read_jsonl(make_splits(tmp_path / "d", rows=qa_rows(n_facts=8)) / "train.jsonl")
    index = FactIndex(facts_from_examples(train))
    lists = training_lists(train, index, negatives=3, gold_absent=0.25, seed=0)
    by_q = {ex["question"]: ex for ex in train}
    kinds = {"gold": 0, "absent": 0, "ood": 0}
    for question, facts, target in lists:
        ex = by_q[question]
        assert len(facts) <= 4 and len(set(facts)) == len(facts)
        if ex["kind"] == "refusal":
            assert target == 0 and ex["reference"] not in facts
            kinds["ood"] += 1
        elif target:
            assert facts[target - 1] == ex["reference"]
            kinds["gold"] += 1
        else:
            assert ex["reference"] not in facts  # trained without its fact: "none of these"
            kinds["absent"] += 1
    assert all(kinds.values()), kinds
    assert training_lists(train, index, 3, 0.25, 0) == lists  # seeded


def test_a_trained_reranker_learns_its_lists_and_travels_with_the_model(tmp_path, tiny_llama):
    splits = make_splits(tmp_path / "d", rows=qa_rows(n_facts=6))
    train = read_jsonl(splits / "train.jsonl")
    # the tiny model's first block of two; every list in every step (full batch): a random-init model
    # learns these lists slowly, and the loss of sampled batches of 4 is too noisy to show it
    cfg = RerankConfig(steps=40, candidates=4, negatives=3, layers=1, batch_questions=64, learning_rate=3e-3)
    base, tok = load_model(str(tiny_llama)), load_tokenizer(str(tiny_llama))
    reranker, facts = train_reranker(train, base, tok, cfg, gold_absent=0.2, seed=0)
    assert facts["loss_last"] < facts["loss_first"], facts
    assert reranker.model.config.num_hidden_layers == 1 and facts["layers"] == 1

    # grounded finetune writes it beside the model (hashed with the weights) and every consumer attaches it
    grounded = RetrievalConfig(enabled=True, k=2, rerank=cfg)
    out = tmp_path / "out"
    training = finetune(splits, out, FinetuneConfig(**SFT, max_length=160), ModelConfig(base=str(tiny_llama)),
                        tmp_path / "ckpt", None, grounded)  # fmt: skip
    assert training["reranker"]["steps"] == 40 and (out / "reranker" / "reranker.json").is_file()
    assert any(k.startswith("reranker/") for k in training["weights_sha256"])
    index = attach(FactIndex(facts_from_examples(train)), out)
    assert index.reranker is not None and index.reranker.candidates == 4
    # loaded cut to the block it was trained with: it scores as the trained one did
    assert index.reranker.model.config.num_hidden_layers == 1
    pairs = [(ex["question"], ex["reference"]) for ex in train[:6]]
    assert index.reranker.scores(pairs) == pytest.approx(reranker.scores(pairs), abs=1e-3)
    questions = [ex["question"] for ex in train if ex["kind"] == "qa"]
    hits = index.search(questions, 2)
    assert all(len(h) == 2 and h[0].score >= h[1].score for h in hits)  # reranked: its scores, best first
    meta = json.loads((out / "reranker" / "reranker.json").read_text())
    assert meta["base"]["weights_sha256"] and meta["candidates"] == 4
    _kept_merged_scores_as_attached(out, train, index.reranker.scores(pairs), pairs)

    # no fact scored above the null option: the answer is the refusal, whatever the model generates
    template = read_template(out)
    model, mtok = load_finetuned(out)
    found = ground(questions, index, template, 2, mtok)
    replies = reply(model, mtok, template, questions, _greedy(), 8, index, 2)
    assert all(g.reranked for g in found)
    for g, r in zip(found, replies, strict=True):
        if g.hits[0].score < 0:  # no threshold given: the reranker's own "none of these" (0)
            assert r.text == refusal_answer(template) and r.sources == []
    # evaluate's threshold (chosen on val) replaces that 0, below or above it
    refuse_all = reply(model, mtok, template, questions, _greedy(), 8, index, 2, threshold=1e9)
    assert {r.text for r in refuse_all} == {refusal_answer(template)}
    assert all(r.answer is NOT_ASKED for r in refuse_all)  # refused before generating: nothing generated
    answer_all = reply(model, mtok, template, questions, _greedy(), 8, index, 2, threshold=-1e9)
    assert [r.text for r in answer_all] == [r.answer.text for r in answer_all]
    _chat_streams_what_reply_answers(model, mtok, template, index, questions[:3], answer_all[:3])
    assert attach(FactIndex(facts_from_examples(train)), tmp_path).reranker is None  # none there: BM25


def test_a_reranker_adapting_its_last_blocks_only_trains_them_and_loads_as_trained(tmp_path, tiny_llama):
    """`adapt_layers: 1`: adapters on the last of the two blocks; nothing below it gets a gradient
    (backpropagation stops there), and attach scores with the adapter as trained."""
    splits = make_splits(tmp_path / "d", rows=qa_rows(n_facts=6))
    train = read_jsonl(splits / "train.jsonl")
    cfg = RerankConfig(steps=3, candidates=4, negatives=3, adapt_layers=1, batch_questions=8)
    base, tok = load_model(str(tiny_llama)), load_tokenizer(str(tiny_llama))
    reranker, facts = train_reranker(train, base, tok, cfg, gold_absent=0.2, seed=0)
    adapted = {n for n, p in reranker.model.named_parameters() if p.requires_grad}
    assert adapted and all(".layers.1." in n for n in adapted) and facts["adapt_layers"] == 1
    # what enters the last block carries no graph: a score's backward stops there
    needs_grad = []
    last = reranker.model.get_decoder().layers[1]
    hook = last.register_forward_pre_hook(
        lambda m, args, kwargs: needs_grad.append((args or [kwargs.get("hidden_states")])[0].requires_grad),
        with_kwargs=True,
    )
    score = reranker._logits([(ex["question"], ex["reference"]) for ex in train[:2]])
    hook.remove()
    assert needs_grad == [False] and score.requires_grad

    out = tmp_path / "out"
    grounded = RetrievalConfig(enabled=True, k=2, rerank=cfg)
    finetune(splits, out, FinetuneConfig(**SFT, max_length=160), ModelConfig(base=str(tiny_llama)),
             tmp_path / "ckpt", None, grounded)  # fmt: skip
    index = attach(FactIndex(facts_from_examples(train)), out)
    pairs = [(ex["question"], ex["reference"]) for ex in train[:6]]  # finetune trained the same one
    assert index.reranker.scores(pairs) == pytest.approx(reranker.scores(pairs), abs=1e-3)


def _kept_merged_scores_as_attached(out, train, scores, pairs):
    """`keep_merged` (a chat cache entry's reranker) writes the merged model once; `attach` then loads
    it alone (the adapter's weights unread), cut as trained, to the same scores, and checks its bytes."""
    keep_merged(out)
    merged = out / "reranker" / "merged"
    record = merged / "merged.json"
    written = record.stat().st_mtime_ns
    keep_merged(out)
    assert record.stat().st_mtime_ns == written  # once per version
    adapter = out / "reranker" / "adapter_model.safetensors"
    adapter.rename(adapter.with_suffix(".away"))
    try:
        kept = attach(FactIndex(facts_from_examples(train)), out)
        assert kept.reranker.model.config.num_hidden_layers == 1 and kept.reranker.candidates == 4
        assert kept.reranker.scores(pairs) == scores
    finally:
        adapter.with_suffix(".away").rename(adapter)
    weights = merged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="delete .*merged"):
        attach(FactIndex(facts_from_examples(train)), out)


def _chat_streams_what_reply_answers(model, tok, template, index, questions, replies):
    """Chat streams a reranked answer (refused or not before generating) with reply's text and sources;
    its length check counts the facts the prompt may hold."""
    from tagtune.app.chat import Chatbot

    bot = Chatbot(model, tok, template, {}, index, {"retrieval_k": 2, "abstain_threshold": -1e9})
    for q, r in zip(questions, replies, strict=True):
        pieces = list(bot.stream(q, _greedy()))
        assert "".join(pieces).strip() == r.text and bot.last_sources == r.sources
    bot.grounding["abstain_threshold"] = 1e9
    assert list(bot.stream(questions[0], _greedy())) == [refusal_answer(template)] and bot.last_sources == []
    plain = Chatbot(model, tok, template, {})
    n = len(tok(plain.prompt(questions[0]), add_special_tokens=False)["input_ids"])
    fits = _greedy().model_copy(update={"max_new_tokens": bot.context - n})
    assert plain.too_long(questions[0], fits) is None and "past the model's context" in bot.too_long(
        questions[0], fits
    )


def _greedy():
    from tagtune.config import GenerationConfig

    return GenerationConfig(max_new_tokens=8)
