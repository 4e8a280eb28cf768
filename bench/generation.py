"""Evaluation generation: batched `generate_answers` vs one `generate` call per question; chat's first token.

    python -m bench.generation [--questions 128] [--repeats 2] [--base embedded] [--profile]

Same model (the base model), same questions (N prompts spread over the test and val splits, rendered
as training rendered them), same `evaluate.generation` settings (greedy, max_new_tokens), same stop
rule (the end marker or EOS). The batched arm is evaluate's call: `generate_answers` over the
questions with `evaluate.batch_size` slots, waiting questions joining as answers end. The one-by-one
arm is the usual loop: a `generate` call per question with the KV cache on. Both count generated
tokens including the stop token, and `same_answers` is the share of questions whose batched answer is
the one-by-one answer. The arms alternate per chunk of twice the slots (so answers that end are
replaced, as in evaluate), `repeats` passes; the ratio is of the medians.

Each figure is taken in the precisions evaluate runs models in: bf16 on CPUs with AVX512-BF16/AMX
(the default LoRA-tuned model's frozen base trained in bf16 and is merged in bf16, and evaluate runs the
base side in the tuned side's precision), fp32 elsewhere and for full fine-tunes.

First token: `tagtune chat` streams through `stream_answer`; in this warm process, the time from a
prompt to its first yielded piece, alternated with the floor (one forward pass over the prompt, which
any first token needs); medians over `FIRST_TOKEN_QUESTIONS` questions. Grounded (the default), chat
first reranks BM25's candidates for the question: `grounded_first_token` times `Chatbot.stream` itself. `--profile` adds the top ops
(torch.profiler, self CPU time) of one batched pass: where the batched time goes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    base_dir,
    default_params,
    log,
    measure,
    median,
    parser,
    shipped_splits,
)

TARGET_RATIO = 10.0
TARGET_FIRST_TOKEN_S = 0.1  # ~0.1 s is where a response stops feeling instantaneous
FIRST_TOKEN_QUESTIONS = 8


def one_by_one(
    model: Any, tokenizer: Any, prompts: list[str], gen, end_marker: str | None
) -> tuple[int, list[str]]:
    """One `generate` call per prompt (no batching); (tokens generated in total, the answers)."""
    import torch

    from tagtune.generation import cut_answer, generation_kwargs

    total, texts = 0, []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            seq = model.generate(
                **enc,
                **generation_kwargs(gen),
                stop_strings=[end_marker] if end_marker else None,
                tokenizer=tokenizer if end_marker else None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = seq[0, enc["input_ids"].shape[1] :]
        total += len(new)
        texts.append(cut_answer(tokenizer.decode(new), end_marker, tokenizer.eos_token)[0])
    return total, texts


def compare(model: Any, tokenizer: Any, prompts: list[str], gen, end_marker, bs: int, repeats: int) -> dict:
    """Batched vs one-by-one, alternating per chunk of `2 * bs` questions, `repeats` passes."""
    from tagtune.generation import generate_answers

    chunks = [prompts[i : i + 2 * bs] for i in range(0, len(prompts), 2 * bs)]
    batched, single, same = [], [], 0
    for i in range(repeats):
        # alternate per chunk (not per whole pass): this machine's speed drifts within seconds, and
        # each arm should see the same drift
        b_tok = b_wall = s_tok = s_wall = 0.0
        for j, chunk in enumerate(chunks):
            log(f"generation {i + 1}/{repeats}, chunk {j + 1}/{len(chunks)}: batched, then one by one")
            t = time.perf_counter()
            answers = generate_answers(model, tokenizer, chunk, gen, end_marker, bs)
            b_wall += time.perf_counter() - t
            b_tok += sum(a.new_tokens for a in answers)
            t = time.perf_counter()
            tokens, texts = one_by_one(model, tokenizer, chunk, gen, end_marker)
            s_wall += time.perf_counter() - t
            s_tok += tokens
            same += sum(a.text == s for a, s in zip(answers, texts, strict=True))
        batched.append(
            {"tokens": int(b_tok), "wall_s": round(b_wall, 3), "tokens_per_s": round(b_tok / b_wall, 2)}
        )
        single.append(
            {"tokens": int(s_tok), "wall_s": round(s_wall, 3), "tokens_per_s": round(s_tok / s_wall, 2)}
        )
    b_tps = median([r["tokens_per_s"] for r in batched])
    s_tps = median([r["tokens_per_s"] for r in single])
    return {
        "batched_tokens_per_s": round(b_tps, 2),
        "one_by_one_tokens_per_s": round(s_tps, 2),
        "ratio": round(b_tps / s_tps, 2),
        "pair_ratios": [
            round(b["tokens_per_s"] / s["tokens_per_s"], 2) for b, s in zip(batched, single, strict=True)
        ],
        "same_answers": round(same / (len(prompts) * repeats), 3),
        "met": b_tps / s_tps >= TARGET_RATIO,
        "batched_runs": batched,
        "one_by_one_runs": single,
    }


def held_transposed(
    model_dir: str, tokenizer: Any, prompts: list[str], gen, end_marker, bs: int, repeats: int
) -> dict:
    """Batched answers with the fp32 weights as stored vs held transposed (`answering`), alternating."""
    from tagtune.generation import generate_answers
    from tagtune.models import answering, load_model

    stored, held = load_model(model_dir).eval(), answering(load_model(model_dir).eval())
    runs: dict[str, list[float]] = {"stored": [], "held": []}
    texts: dict[str, list[str]] = {}
    for _ in range(repeats):
        for name, model in (("stored", stored), ("held", held)):
            t = time.perf_counter()
            answers = generate_answers(model, tokenizer, prompts, gen, end_marker, bs)
            runs[name].append(sum(a.new_tokens for a in answers) / (time.perf_counter() - t))
            texts[name] = [a.text for a in answers]
    same = sum(a == b for a, b in zip(texts["stored"], texts["held"], strict=True)) / len(prompts)
    return {"held_transposed_tokens_per_s": round(median(runs["held"]), 2),
            "stored_layout_tokens_per_s": round(median(runs["stored"]), 2),
            "held_transposed_ratio": round(median(runs["held"]) / median(runs["stored"]), 2),
            "held_transposed_pair_ratios": [round(h / s, 2) for h, s in zip(runs["held"], runs["stored"], strict=True)],
            "held_transposed_same_answers": round(same, 3),
            "met_held_transposed": same == 1.0 and median(runs["held"]) > median(runs["stored"])}  # fmt: skip


def first_token(model: Any, tokenizer: Any, prompts: list[str], gen, end_marker: str | None) -> dict:
    """Chat's first streamed piece vs the floor (one forward pass over the prompt), alternating."""
    import torch

    from tagtune.generation import stream_answer

    firsts, floors = [], []
    for prompt in [prompts[0], *prompts]:  # the first round warms up (not counted)
        t = time.perf_counter()
        stream = stream_answer(model, tokenizer, prompt, gen, end_marker)
        next(stream, None)
        firsts.append(time.perf_counter() - t)
        stream.close()
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, logits_to_keep=1)
        floors.append(time.perf_counter() - t)
    first_s, floor_s = median(firsts[1:]), median(floors[1:])
    return {
        "first_token_s": round(first_s, 4),
        "first_token_floor_s": round(floor_s, 4),
        "first_token_runs_s": [round(x, 4) for x in firsts[1:]],
        "met_first_token": first_s <= TARGET_FIRST_TOKEN_S,
    }


def grounded_first_token(
    model: Any,
    scorer: Any,
    tokenizer: Any,
    template: dict,
    train: list[dict],
    questions: list[str],
    gen,
    params: Any,
) -> dict:
    """Chat's first streamed piece for a grounded model: `Chatbot.stream` (BM25, the reranker over its
    candidates, then the prompt with the fact). The reranker `scorer` is the base model, untrained (a
    trained one is the base with a merged adapter: the same cost), held as `attach` holds it: its
    weights as stored; threshold -inf, so every question streams."""
    import math

    from tagtune.app.chat import Chatbot
    from tagtune.rerank import Reranker
    from tagtune.retrieval import FactIndex, facts_from_examples

    index = FactIndex(facts_from_examples(train))
    index.reranker = Reranker(scorer, tokenizer, params.retrieval.rerank.candidates)
    grounding = {"retrieval_k": params.retrieval.k, "abstain_threshold": -math.inf}
    bot = Chatbot(model, tokenizer, template, {"source": "bench"}, index, grounding)
    firsts = []
    for q in [questions[0], *questions]:  # the first round warms up (not counted)
        t = time.perf_counter()
        stream = bot.stream(q, gen)
        next(stream, None)
        firsts.append(time.perf_counter() - t)
        stream.close()
    first_s = median(firsts[1:])
    return {"grounded_first_token_s": round(first_s, 4),
            "grounded_first_token_runs_s": [round(x, 4) for x in firsts[1:]],
            "met_grounded_first_token": first_s <= TARGET_FIRST_TOKEN_S}  # fmt: skip


def profile_batched(model: Any, tokenizer: Any, prompts: list[str], gen, end_marker, bs: int) -> dict:
    """Share of self CPU time of the top ops in one batched pass (torch.profiler; not the timed runs)."""
    from torch.profiler import ProfilerActivity, profile

    from tagtune.generation import generate_answers

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate_answers(model, tokenizer, prompts, gen, end_marker, bs)
    events = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return {"profile_top_ops": {e.key: round(e.self_cpu_time_total / total, 3) for e in top}}


def run(
    base: str = "embedded",
    questions: int = 128,
    repeats: int = 2,
    max_new_tokens: int | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    """Both figures in fp32 (top-level keys) and, where the CPU has native bf16, in bf16 (`bf16`)."""
    import torch

    from stages.finetune import cpu_has_bf16
    from tagtune.io import read_jsonl
    from tagtune.models import answering, load_model, load_tokenizer
    from tagtune.templates import read_template

    params = default_params()
    gen = params.evaluate.generation
    if max_new_tokens:
        gen = gen.model_copy(update={"max_new_tokens": max_new_tokens})
    with tempfile.TemporaryDirectory(prefix="tagtune-bench-") as tmp:
        splits = shipped_splits(Path(tmp), params)
        rows = [r for f in ("test.jsonl", "val.jsonl") for r in read_jsonl(splits / f) if r.get("prompt")]
        rows = rows[:: max(1, len(rows) // questions)][:questions]  # spread: in-domain and refusal rows
        template = read_template(splits)
        end_marker = template.get("end_marker")
        train = read_jsonl(splits / "train.jsonl")
    model_dir = base_dir(base)
    tokenizer = load_tokenizer(model_dir)
    prompts, bs = [r["prompt"] for r in rows], params.evaluate.batch_size
    arms: dict[str, dict[str, Any]] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and not cpu_has_bf16():
            continue
        # a fresh copy per precision, held as evaluate, chat and serving hold it (`answering`)
        model = answering(load_model(model_dir).to(dtype).eval())
        arm = compare(model, tokenizer, prompts, gen, end_marker, bs, repeats)
        arm.update(first_token(model, tokenizer, prompts[:FIRST_TOKEN_QUESTIONS], gen, end_marker))
        asked = [r["question"] for r in rows[:FIRST_TOKEN_QUESTIONS]]
        scorer = load_model(model_dir).to(dtype).eval()
        arm.update(grounded_first_token(model, scorer, tokenizer, template, train, asked, gen, params))
        del scorer
        if name == "fp32":
            arm.update(held_transposed(model_dir, tokenizer, prompts, gen, end_marker, bs, repeats))
        if profile:
            arm.update(profile_batched(model, tokenizer, prompts, gen, end_marker, bs))
        arms[name] = arm
    return {
        "bench": "generation",
        "base": base,
        "questions": len(prompts),
        "batch_size": bs,
        "max_new_tokens": gen.max_new_tokens,
        "repeats": repeats,
        "target_ratio": TARGET_RATIO,
        "target_first_token_s": TARGET_FIRST_TOKEN_S,
        **arms["fp32"],
        **({"bf16": arms["bf16"]} if "bf16" in arms else {}),
    }


def summary(r: dict[str, Any]) -> str:
    lines = []
    for name, a in (("fp32", r), ("bf16", r.get("bf16"))):
        if a is None:
            continue
        lines.append(
            f"evaluation generation, {name} ({r['questions']} questions, max_new_tokens {r['max_new_tokens']}, "
            f"greedy): batched {a['batched_tokens_per_s']:.0f} tokens/s vs one call per question "
            f"{a['one_by_one_tokens_per_s']:.0f} = {a['ratio']:.1f}x (pairs {a['pair_ratios']}; same answers "
            f"{a['same_answers']:.0%}; target >= {r['target_ratio']:.0f}x: {'met' if a['met'] else 'MISSED'}); "
            f"chat first token {a['first_token_s'] * 1000:.0f} ms (floor {a['first_token_floor_s'] * 1000:.0f} ms; "
            f"grounded, reranked: {a['grounded_first_token_s'] * 1000:.0f} ms)"
        )
        if "held_transposed_ratio" in a:
            lines.append(
                f"  batched, fp32 weights held transposed ({a['held_transposed_tokens_per_s']:.0f} tokens/s) vs as "
                f"stored ({a['stored_layout_tokens_per_s']:.0f}): {a['held_transposed_ratio']:.2f}x (pairs "
                f"{a['held_transposed_pair_ratios']}; same answers {a['held_transposed_same_answers']:.0%})"
            )
        if "profile_top_ops" in a:
            lines.append("  batched pass (torch.profiler): " + ", ".join(
                f"{k} {v:.0%}" for k, v in a["profile_top_ops"].items()
            ))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument(
        "--questions", type=int, default=128, help="N test and val prompts (evaluate answers ~136)"
    )
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating")
    ap.add_argument("--base", default="embedded", help="model.base spec (default: embedded)")
    ap.add_argument("--profile", action="store_true", help="also profile one batched pass per precision")
    args = ap.parse_args(argv)
    return measure(run, summary, args.base, args.questions, args.repeats, profile=args.profile)


if __name__ == "__main__":
    raise SystemExit(main())
