"""Evaluation generation: tagtune's batched `generate_answers` vs one `model.generate` call per question.

    python -m bench.generation [--questions 32] [--repeats 2] [--base embedded]

Same model (the base model, loaded as evaluate loads it), same questions (N prompts spread over the
test split, rendered as training rendered them), same `evaluate.generation` settings (greedy,
max_new_tokens), same stop rule (the end marker or EOS). The one-by-one arm is the usual loop: a
`generate` call per question with the KV cache on. Both count generated tokens including the stop
token. The arms alternate per batch of questions (batched, then the same questions one by one),
`repeats` passes; the ratio is of the medians over passes.
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

TARGET_RATIO = 5.0


def one_by_one(model: Any, tokenizer: Any, prompts: list[str], gen, end_marker: str | None) -> int:
    """One `generate` call per prompt (no batching); returns the tokens generated in total."""
    import torch

    from tagtune.generation import generation_kwargs

    total = 0
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
        total += seq.shape[1] - enc["input_ids"].shape[1]
    return total


def run(
    base: str = "embedded", questions: int = 32, repeats: int = 2, max_new_tokens: int | None = None
) -> dict[str, Any]:
    """Alternate batched / one-by-one generation `repeats` times; returns the JSON result."""
    from tagtune.generation import generate_answers
    from tagtune.io import read_jsonl
    from tagtune.models import load_model, load_tokenizer
    from tagtune.templates import read_template

    params = default_params()
    gen = params.evaluate.generation
    if max_new_tokens:
        gen = gen.model_copy(update={"max_new_tokens": max_new_tokens})
    with tempfile.TemporaryDirectory(prefix="tagtune-bench-") as tmp:
        splits = shipped_splits(Path(tmp), params)
        rows = [r for r in read_jsonl(splits / "test.jsonl") if r.get("prompt")]
        rows = rows[:: max(1, len(rows) // questions)][:questions]  # spread: in-domain and refusal rows
        end_marker = read_template(splits).get("end_marker")
    model_dir = base_dir(base)
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    prompts = [r["prompt"] for r in rows]
    bs = params.evaluate.batch_size
    chunks = [prompts[i : i + bs] for i in range(0, len(prompts), bs)]
    batched, single = [], []
    for i in range(repeats):
        # alternate per batch of questions (not per whole pass): this machine's speed drifts within
        # seconds, and each arm should see the same drift
        b_tok = b_wall = s_tok = s_wall = slots = 0.0
        for j, chunk in enumerate(chunks):
            log(f"generation {i + 1}/{repeats}, batch {j + 1}/{len(chunks)}: batched, then one by one")
            t = time.perf_counter()
            answers = generate_answers(model, tokenizer, chunk, gen, end_marker, bs)
            b_wall += time.perf_counter() - t
            b_tok += sum(a.new_tokens for a in answers)
            # a batch decodes until its longest answer ends: rows that stopped earlier idle in it
            slots += len(chunk) * max(a.new_tokens for a in answers)
            t = time.perf_counter()
            s_tok += one_by_one(model, tokenizer, chunk, gen, end_marker)
            s_wall += time.perf_counter() - t
        batched.append(
            {
                "tokens": int(b_tok),
                "wall_s": round(b_wall, 3),
                "tokens_per_s": round(b_tok / b_wall, 2),
                "batch_slot_use": round(b_tok / slots, 3),
            }
        )
        single.append(
            {"tokens": int(s_tok), "wall_s": round(s_wall, 3), "tokens_per_s": round(s_tok / s_wall, 2)}
        )
    b_tps = median([r["tokens_per_s"] for r in batched])
    s_tps = median([r["tokens_per_s"] for r in single])
    ratio = b_tps / s_tps
    return {
        "bench": "generation",
        "base": base,
        "questions": len(prompts),
        "batch_size": params.evaluate.batch_size,
        "max_new_tokens": gen.max_new_tokens,
        "repeats": repeats,
        "batched_tokens_per_s": round(b_tps, 2),
        "one_by_one_tokens_per_s": round(s_tps, 2),
        "ratio": round(ratio, 2),
        "pair_ratios": [
            round(b["tokens_per_s"] / s["tokens_per_s"], 2) for b, s in zip(batched, single, strict=True)
        ],
        "batch_slot_use": batched[0]["batch_slot_use"],  # generated tokens / (rows x decode steps)
        "target_ratio": TARGET_RATIO,
        "met": ratio >= TARGET_RATIO,
        "batched_runs": batched,
        "one_by_one_runs": single,
    }


def summary(r: dict[str, Any]) -> str:
    return (
        f"evaluation generation ({r['questions']} questions, max_new_tokens {r['max_new_tokens']}, greedy): "
        f"batched {r['batched_tokens_per_s']:.0f} tokens/s vs one call per question "
        f"{r['one_by_one_tokens_per_s']:.0f} = {r['ratio']:.1f}x (pairs {r['pair_ratios']}; "
        f"target >= {r['target_ratio']:.0f}x: {'met' if r['met'] else 'MISSED'})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--questions", type=int, default=32, help="N test prompts (multiples of 16 fill batches)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating")
    ap.add_argument("--base", default="embedded", help="model.base spec (default: embedded)")
    args = ap.parse_args(argv)
    return measure(run, summary, args.base, args.questions, args.repeats)


if __name__ == "__main__":
    raise SystemExit(main())
