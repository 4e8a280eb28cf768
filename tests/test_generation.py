"""generation: the batched decoding loop gives `generate()`'s answers, one question at a time.

`generate_answers` decodes its own loop (rows leave the batch as they end) instead of calling
`model.generate`; on a tiny model trained for a few steps (answers that end at `<END>` after different
numbers of tokens, and some that run to `max_new_tokens`) every answer, token count, stop flag and
confidence must equal a plain `generate()` call per question, and the chat stream must join to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_evaluate import make_pipeline

from tagtune.config import GenerationConfig
from tagtune.generation import Answer, cut_answer, generate_answers, generation_kwargs, stream_answer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Any]:
    from tagtune.io import read_jsonl
    from tagtune.models import load_finetuned
    from tagtune.templates import read_template

    splits, finetuned = make_pipeline(tmp_path_factory.mktemp("gen"))
    model, tok = load_finetuned(finetuned)
    rows = read_jsonl(Path(splits) / "test.jsonl") + read_jsonl(Path(splits) / "train.jsonl")
    prompts = [r["prompt"] for r in rows if r.get("prompt")]
    return {"model": model, "tok": tok, "prompts": prompts, "end": read_template(finetuned)["end_marker"]}


def _one_generate_call(model: Any, tok: Any, prompt: str, gen: GenerationConfig, end: str) -> Answer:
    """The reference: `model.generate` on this prompt alone (no padding), stopped at `end` or EOS."""
    import torch

    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            **generation_kwargs(gen),
            stop_strings=[end],
            tokenizer=tok,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        logp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0]
    ids = out.sequences[0, enc["input_ids"].shape[1] :].tolist()
    text, found = cut_answer(tok.decode(ids), end, tok.eos_token)
    return Answer(text, len(ids), found, float(logp.mean()))


@pytest.mark.parametrize(
    "gen",
    [
        GenerationConfig(max_new_tokens=16),  # most rows end at <END>, at different steps
        GenerationConfig(max_new_tokens=12),  # rows cut by the length limit beside rows that ended
        GenerationConfig(max_new_tokens=16, repetition_penalty=1.3),  # processors see each row's own tokens
    ],
    ids=["greedy", "truncating", "repetition_penalty"],
)
def test_batched_answers_equal_one_generate_call_per_question(tiny, gen):
    model, tok, prompts, end = tiny["model"], tiny["tok"], tiny["prompts"], tiny["end"]
    ref = [_one_generate_call(model, tok, p, gen, end) for p in prompts]
    assert len({a.new_tokens for a in ref}) > 1, "rows must end at different steps to test dropping them"
    for batch_size in (1, 5, len(prompts)):
        got = generate_answers(model, tok, prompts, gen, end, batch_size)
        assert [a.text for a in got] == [a.text for a in ref], batch_size
        assert [(a.new_tokens, a.stopped) for a in got] == [(a.new_tokens, a.stopped) for a in ref]
        # the same log-probabilities, summed in another order (generate's log_softmax runs over steps)
        assert [a.logprob for a in got] == pytest.approx([a.logprob for a in ref], rel=1e-5)


def test_weights_held_transposed_answer_as_stored(tiny):
    """`answering` changes only where fp32 weights lie in memory: same values, same answers."""
    import torch

    from tagtune.models import answering

    model, tok, prompts, end = tiny["model"], tiny["tok"], tiny["prompts"], tiny["end"]

    def copy(dtype):
        fresh = type(model)(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        return fresh.to(dtype)

    held = answering(copy(torch.float32))
    linears = [m.weight for m in held.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(w.t().is_contiguous() and not w.is_contiguous() for w in linears)
    stored = dict(model.named_parameters())
    assert all(torch.equal(p, stored[n]) for n, p in held.named_parameters())
    gen = GenerationConfig(max_new_tokens=16)
    for batch_size in (1, len(prompts)):
        ref = generate_answers(model, tok, prompts, gen, end, batch_size)
        got = generate_answers(held, tok, prompts, gen, end, batch_size)
        assert [(a.text, a.new_tokens, a.stopped) for a in got] == [
            (a.text, a.new_tokens, a.stopped) for a in ref
        ]
        assert [a.logprob for a in got] == pytest.approx([a.logprob for a in ref], rel=1e-5)
    half = answering(copy(torch.bfloat16))  # other dtypes were not measured: they stay as stored
    assert all(m.weight.is_contiguous() for m in half.modules() if isinstance(m, torch.nn.Linear))


def test_sampling_draws_like_generate(tiny):
    import torch

    model, tok, end = tiny["model"], tiny["tok"], tiny["end"]
    gen = GenerationConfig(do_sample=True, temperature=1.5, top_k=20, top_p=0.9, max_new_tokens=16)
    for seed in range(3):  # one row: the same random draws as generate's, step for step
        torch.manual_seed(seed)
        ref = _one_generate_call(model, tok, tiny["prompts"][0], gen, end)
        torch.manual_seed(seed)
        (got,) = generate_answers(model, tok, tiny["prompts"][:1], gen, end)
        assert (got.text, got.new_tokens) == (ref.text, ref.new_tokens)


def test_stream_joins_to_the_answer_and_stops_when_closed(tiny):
    model, tok, end = tiny["model"], tiny["tok"], tiny["end"]
    for n in (1, 3, 16):
        gen = GenerationConfig(max_new_tokens=n)
        for prompt in tiny["prompts"][::3]:
            (answer,) = generate_answers(model, tok, [prompt], gen, end)
            pieces = list(stream_answer(model, tok, prompt, gen, end))
            assert "".join(pieces) == answer.text and not any(end in p for p in pieces)
            assert all(pieces) and not (pieces and pieces[0][:1].isspace())
    stream = stream_answer(model, tok, tiny["prompts"][0], GenerationConfig(max_new_tokens=16), end)
    assert next(stream)
    stream.close()  # no thread left generating: the loop simply stops


def test_no_prompts_no_answers(tiny):
    assert generate_answers(tiny["model"], tiny["tok"], [], GenerationConfig(), tiny["end"]) == []


# ------------------------------------------------------------------------------------ the benchmark
def test_bench_generation_reports_each_precision_and_the_first_token(tiny_llama):
    from bench import generation as bench_generation
    from bench import run as bench_run
    from bench._common import machine_info
    from stages.finetune import cpu_has_bf16

    r = bench_generation.run(str(tiny_llama), questions=3, repeats=1, max_new_tokens=3, profile=True)
    arms = [r, r["bf16"]] if cpu_has_bf16() else [r]
    assert ("bf16" in r) == cpu_has_bf16()
    for a in arms:
        assert a["ratio"] > 0 and 0 <= a["same_answers"] <= 1 and isinstance(a["met"], bool)
        assert a["first_token_s"] > 0 and a["first_token_floor_s"] > 0
        assert isinstance(a["met_first_token"], bool)
        assert sum(a["profile_top_ops"].values()) <= 1.0
    assert r["same_answers"] == 1.0  # fp32: batching changes no answer
    assert r["held_transposed_same_answers"] == 1.0  # nor holding the weights transposed
    md = bench_run.table({"generation": r}, machine_info())
    assert md.count("| Evaluation generation") == md.count("| Chat first token") == len(arms)
    assert md.count("| Batched generation, fp32, weights held transposed") == 1


def test_waiting_rows_join_the_batch_as_rows_end(tiny):
    """Continuous batching: with 3 slots, waiting rows start while others are mid-answer, never more
    than 3 at once, and every row is answered (their answers are the reference's: the test above)."""
    from tagtune.generation import _decode, _pad_left

    model, tok, prompts, end = tiny["model"], tiny["tok"], tiny["prompts"], tiny["end"]
    _pad_left(tok)
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    started: dict[int, int] = {}
    sizes, mixed = [], False
    for n, step in enumerate(_decode(model, tok, rows, GenerationConfig(max_new_tokens=16), end, slots=3)):
        live = [r for r, _, _ in step]
        sizes.append(len(live))
        for r in live:
            started.setdefault(r, n)
        mixed |= len({started[r] for r in live}) > 1  # rows that started at different steps, together
    assert len(prompts) > 3 and sorted(started) == list(range(len(prompts)))
    assert max(sizes) == 3 and mixed
