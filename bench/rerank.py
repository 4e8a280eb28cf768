"""The reranker's scoring: two rows of the LM head (tagtune/rerank.py) vs the whole head, same process.

    python -m bench.rerank [--questions 32] [--repeats 2] [--base embedded]

Same model (the base model with an untrained adapter, loaded and merged as `attach` loads a trained one:
the same cost, and frozen weights, on which the baseline's slow path depends), same
pairs (N test questions × BM25's top `retrieval.rerank.candidates` facts of the shipped train split),
same batches. `Reranker.scores` as shipped reads the last hidden state through the " Yes" and " No"
rows of the LM head; the baseline runs the whole head on the last position (`logits_to_keep=1`), as the
code did before: with the weights frozen (requires_grad False, as a loaded and merged adapter leaves
them, and as LoRA training holds the base), torch's matmul of the strided [B, 1, H] slice copies the
49,152 × 576 weight once per sequence; on the same weights requiring grad it does not. The arms alternate, `repeats` passes; `max_score_diff` checks they score alike. Taken in the
precision the reranker runs in (bf16 on CPUs with native bf16, else fp32).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import base_dir, default_params, log, measure, median, parser, shipped_splits

SAME_SCORE = 0.05  # bf16 rounding of a logit difference of a few units


def whole_head(reranker: Any, pairs: list[tuple[str, str]]):
    """The baseline: the score read from the whole LM head's logits at the last position."""
    from tagtune.rerank import PROMPT

    tok = reranker.tokenizer
    texts = [PROMPT.format(fact=f, question=q) for q, f in pairs]
    enc = tok(texts, return_tensors="pt", padding=True).to(reranker.model.device)
    last = reranker.model(**enc, logits_to_keep=1).logits[:, -1].float()
    return last[:, reranker.yes] - last[:, reranker.no]


def run(base: str = "embedded", questions: int = 32, repeats: int = 2) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from stages.finetune import cpu_has_bf16
    from tagtune.io import read_jsonl
    from tagtune.models import load_model, load_tokenizer
    from tagtune.rerank import Reranker
    from tagtune.retrieval import FactIndex, facts_from_examples

    params = default_params()
    with tempfile.TemporaryDirectory(prefix="tagtune-bench-") as tmp:
        splits = shipped_splits(Path(tmp), params)
        train, test = read_jsonl(splits / "train.jsonl"), read_jsonl(splits / "test.jsonl")
    asked = [r["question"] for r in test if r.get("kind") in ("qa", "refusal")][:questions]
    index = FactIndex(facts_from_examples(train))
    cands = params.retrieval.rerank.candidates
    pairs = [
        (q, h.fact.text) for q, hits in zip(asked, index.search(asked, cands), strict=True) for h in hits
    ]
    dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    model_dir = base_dir(base)
    with tempfile.TemporaryDirectory(prefix="tagtune-bench-") as adapter:  # loaded as `attach` loads one
        lora = LoraConfig(r=params.retrieval.rerank.lora_r, target_modules="all-linear")
        get_peft_model(load_model(model_dir, dtype=dtype), lora).save_pretrained(adapter)
        reranker = Reranker.load(
            adapter, load_model(model_dir, dtype=dtype), load_tokenizer(model_dir), cands
        )

    def timed(score) -> tuple[float, list[float]]:
        out: list[float] = []
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(pairs), reranker.batch_size):
                out += score(pairs[i : i + reranker.batch_size]).tolist()
        return time.perf_counter() - t, out

    timed(reranker._logits)  # warm-up (not counted)
    shipped, baseline, diff = [], [], 0.0
    for i in range(repeats):
        log(f"rerank {i + 1}/{repeats}: two head rows, then the whole head")
        (s, a), (b, w) = timed(reranker._logits), timed(lambda p: whole_head(reranker, p))
        shipped.append(s)
        baseline.append(b)
        diff = max(diff, max(abs(x - y) for x, y in zip(a, w, strict=True)))
    s, b = median(shipped), median(baseline)
    return {
        "bench": "rerank",
        "base": base,
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "pairs": len(pairs),
        "repeats": repeats,
        "pairs_per_s": round(len(pairs) / s, 2),
        "whole_head_pairs_per_s": round(len(pairs) / b, 2),
        "ratio": round(b / s, 2),
        "max_score_diff": round(diff, 4),
        "met": b > s and diff <= SAME_SCORE,  # the same scores, sooner
        "runs_s": [round(x, 3) for x in shipped],
        "whole_head_runs_s": [round(x, 3) for x in baseline],
    }


def summary(r: dict[str, Any]) -> str:
    return (
        f"reranker scoring, {r['precision']} ({r['pairs']} question-fact pairs): {r['pairs_per_s']:.1f} pairs/s vs "
        f"{r['whole_head_pairs_per_s']:.1f} with the whole LM head = {r['ratio']:.2f}x "
        f"(scores differ by at most {r['max_score_diff']})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument(
        "--questions", type=int, default=32, help="N test questions (× the reranker's candidates)"
    )
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating")
    ap.add_argument("--base", default="embedded", help="model.base spec (default: embedded)")
    args = ap.parse_args(argv)
    return measure(run, summary, args.base, args.questions, args.repeats)


if __name__ == "__main__":
    raise SystemExit(main())
