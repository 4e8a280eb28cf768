"""evaluate: the fine-tuned model *and the base model* on the test split, so every report shows the gain.

    python -m stages.evaluate [-S evaluate.max_examples=20]

Writes `paths.evaluate/` (atomically):

- `metrics.json` — DVC metrics, flat keys `<side>.<metric>` with side `tuned`, `base` and
  `delta` (= tuned − base, raw: for loss/perplexity/rates of failures a negative delta is the gain),
  plus `n.<kind>` counts. Causal-LM metrics:
    - `eval_loss`, `perplexity`: mean NLL per *trained* token (the answer and end marker, exactly the
      labels finetune trains, via `encode_example`) over every test row, and exp of it;
    - on in-domain rows (kind `qa`/`chat`): `exact_match` (normalised), `answer_f1` (SQuAD-style token
      F1), `rougeL` (rouge-score F-measure), `false_refusal_rate` (answered with the refusal);
    - on `refusal` rows (out-of-domain questions): `refusal_rate` (the answer is, or contains, the
      refusal answer after normalisation);
    - on in-domain and out-of-domain rows: `confident_wrong_rate` (a wrong answer — in-domain F1 < 0.5,
      or any answer out of domain — that is not the refusal: what users feel as "invented");
    - grounded models: `retrieval_recall` (the right fact among the facts in the prompt), the same
      metrics before abstention (`*_without_abstention`), and `abstain.threshold` (chosen on val);
    - on every generated answer: `repetition_rate` (mean share of word n-grams, n =
      `evaluate.repetition_ngram`, that repeat an earlier n-gram of the same answer — 0 for a clean
      answer, →1 for a loop), `truncation_rate` (hit `max_new_tokens` without end marker/EOS),
      `answer_words`, `answer_tokens` (mean length).
  Classification: `accuracy`, `precision`, `recall`, `f1` (macro); `base` is the majority-class
  baseline of the train split (a base LM has no trained head to compare).
- `answers.jsonl` — one row per (side, example): question, reference, answer and its scores; also
  logged to the pipeline's MLflow run as a table (`evaluate/answers-<digest>.json`).
- `answers.csv` — one row per example, tuned and base side by side (the DVC plot).
- `report.md` + `figures/` — metrics table, loss curve, metrics comparison chart (and the confusion
  matrix for classification), sample answers.

Generation is batched (left-padded, KV cache, stop at the end marker) with `evaluate.generation`
(greedy unless configured); `evaluate.max_examples` takes a deterministic sample that keeps every
kind of row. Text rows (`format.template: text`) are scored by loss/perplexity; the openings of a few
held-out lines are continued by each model as report samples (not metrics).

The finetuned weights are checked against the sha256 in training.json before they are loaded, and a
NaN/inf metric (a broken model) is an error: nothing is written or logged.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Any

from tagtune.config import LOWER_IS_BETTER, EvaluateConfig, MlflowConfig, Params
from tagtune.encoding import IGNORE_INDEX, PadCollator, encode_example
from tagtune.errors import DataError, TagtuneError
from tagtune.generation import Answer
from tagtune.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl
from tagtune.rerank import attach
from tagtune.retrieval import FactIndex
from tagtune.templates import read_template, refusal_answer
from tagtune.text import exact_match, normalize, stable_hash, token_f1, words

IN_DOMAIN = ("qa", "chat")
# paths.evaluate; DVC writes the .gitignore (its outs are files inside the directory) and rewrites it
WRITES = ("metrics.json", "answers.jsonl", "answers.csv", "report.md", "figures", ".gitignore")
SIDES = ("tuned", "base")
TEXT_SAMPLES = 8  # held-out text lines whose opening each model continues (report samples, not metrics)


# ------------------------------------------------------------------------------- answer-level scores
_ROUGE = None


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure from Google's rouge-score package."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE.score(reference, answer)["rougeL"].fmeasure


def is_refusal(answer: str, refusal: str | None) -> bool:
    """The answer is the refusal answer (normalised), or contains it."""
    if not refusal:
        return False
    a, r = normalize(answer), normalize(refusal)
    return bool(r) and (a == r or r in a)


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the answer's word n-grams that repeat an earlier one (0 = no repetition)."""
    w = words(text)
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def score_answer(answer: Answer, row: dict[str, Any], refusal: str | None, ngram: int = 3) -> dict[str, Any]:
    """Per-answer scores for the answers table."""
    ref = row.get("reference", "")
    return {
        "exact_match": exact_match(answer.text, ref),
        "f1": round(token_f1(answer.text, ref), 6),
        "rougeL": round(float(rouge_l(answer.text, ref)), 6),
        "refused": is_refusal(answer.text, refusal),
        "repetition": round(repetition_rate(answer.text, ngram), 6),
        "stopped": answer.stopped,
        "new_tokens": answer.new_tokens,
        "words": len(words(answer.text)),
        "logprob": None if answer.logprob is None else round(answer.logprob, 6),
    }


def is_confident_wrong(rec: dict[str, Any]) -> bool:
    """A scored answer that is wrong (in-domain F1 < 0.5, or any answer out of domain) and not a refusal."""
    return not rec["refused"] and (rec["kind"] == "refusal" or rec["f1"] < 0.5)


def choose_threshold(scored: list[dict[str, Any]], max_wrong: float) -> float | None:
    """The lowest confidence threshold whose confident-wrong rate on `scored` is at most `max_wrong`.

    Answers below the threshold become the refusal; the lowest such threshold answers the most
    questions. None when the answers already meet the target (no abstention needed). Refusing every
    answer always meets it, so there is always a threshold.
    """
    gen = [r for r in scored if r.get("answer") is not None and r["kind"] in (*IN_DOMAIN, "refusal")]
    if not gen:
        return None
    wrong = sum(is_confident_wrong(r) for r in gen)
    if wrong <= max_wrong * len(gen):
        return None
    # raise the threshold past one answered answer at a time, least confident first
    answered = sorted(
        (r for r in gen if not r["refused"] and r.get("confidence") is not None),
        key=lambda r: r["confidence"],
    )
    for r in answered:
        wrong -= is_confident_wrong(r)
        if wrong <= max_wrong * len(gen):
            break
    return math.nextafter(r["confidence"], math.inf)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def aggregate(scored: list[dict[str, Any]], has_refusal: bool) -> dict[str, float]:
    """A side's causal-LM metrics from its answers-table rows (see the module docstring)."""
    out: dict[str, float | None] = {}
    with_loss = [r for r in scored if r.get("tokens")]
    if with_loss:
        total = sum(r["nll"] for r in with_loss)
        n_tok = sum(r["tokens"] for r in with_loss)
        out["eval_loss"] = total / n_tok
        out["perplexity"] = math.exp(min(total / n_tok, 50.0))
    gen = [r for r in scored if r.get("answer") is not None and r["kind"] != "text"]  # text: samples only
    ind = [r for r in gen if r["kind"] in IN_DOMAIN]
    ref = [r for r in gen if r["kind"] == "refusal"]
    out["exact_match"] = _mean([r["exact_match"] for r in ind])
    out["answer_f1"] = _mean([r["f1"] for r in ind])
    out["rougeL"] = _mean([r["rougeL"] for r in ind])
    if has_refusal:
        out["refusal_rate"] = _mean([float(r["refused"]) for r in ref])
        out["false_refusal_rate"] = _mean([float(r["refused"]) for r in ind])
    # wrong and said with confidence: an in-domain answer with F1 < 0.5, or any answer to an
    # out-of-domain question — and not the refusal (what users feel as "invented")
    out["confident_wrong_rate"] = _mean([float(is_confident_wrong(r)) for r in ind + ref])
    if any("retrieved" in r for r in ind):
        out["retrieval_recall"] = _mean([float(r["retrieved"]) for r in ind])
    out["repetition_rate"] = _mean([r["repetition"] for r in gen])
    out["truncation_rate"] = _mean([float(not r["stopped"]) for r in gen])
    out["answer_words"] = _mean([float(r["words"]) for r in gen])
    out["answer_tokens"] = _mean([float(r["new_tokens"]) for r in gen])
    return {k: round(v, 6) for k, v in out.items() if v is not None}


def classification_metrics(y_true: list[str], y_pred: list[str]) -> dict[str, float]:
    """accuracy and macro precision/recall/F1 (scikit-learn; 0 where a class is never predicted)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 6),
        "precision": round(float(p), 6),
        "recall": round(float(r), 6),
        "f1": round(float(f), 6),
    }


def select_examples(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """A deterministic sample of `n` rows (by id hash) keeping each kind's share (at least one each)."""
    if not n or n >= len(rows):
        return rows
    kinds = Counter(r["kind"] for r in rows)
    quota = {k: max(1, round(n * c / len(rows))) for k, c in kinds.items()}
    while sum(quota.values()) > n:
        quota[max(quota, key=lambda k: quota[k])] -= 1
    picked: set[int] = set()
    for i in sorted(range(len(rows)), key=lambda i: rows[i].get("id") or stable_hash(str(rows[i]))):
        k = rows[i]["kind"]
        if quota.get(k, 0) > 0:
            quota[k] -= 1
            picked.add(i)
    return [r for i, r in enumerate(rows) if i in picked]


# -------------------------------------------------------------------------------------- model passes
def answer_losses(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_length: int, batch_size: int
) -> list[tuple[float, int] | None]:
    """(summed NLL, trained tokens) per row, on the tokens finetune trains; None if none is left."""
    import torch
    import torch.nn.functional as F

    feats = [encode_example(r["segments"], tokenizer, max_length) for r in rows]
    out: list[tuple[float, int] | None] = [None] * len(rows)
    order = sorted((i for i, f in enumerate(feats) if f), key=lambda i: len(feats[i]["input_ids"]))
    collate = PadCollator(tokenizer.pad_token_id)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([{"input_ids": feats[i]["input_ids"], "labels": feats[i]["labels"]} for i in idx])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counts = (labels != IGNORE_INDEX).sum(1)
        for j, i in enumerate(idx):
            out[i] = (float(nll[j].sum()), int(counts[j]))
    return out


def _grounded(rows: list[dict[str, Any]], index: Any, template: dict, k: int, tokenizer: Any) -> list[dict]:
    """Rows with retrieved facts in their prompt and loss segments, as the grounded model was trained."""
    from tagtune.grounding import GROUNDED_KINDS, ground
    from tagtune.templates import render_turn

    idx = [i for i, r in enumerate(rows) if r["kind"] in GROUNDED_KINDS]
    found = ground([rows[i]["question"] for i in idx], index, template, k, tokenizer)
    out = list(rows)
    for i, g in zip(idx, found, strict=True):
        context = [h.fact.text for h in g.hits]
        segments = render_turn(rows[i]["question"], rows[i]["reference"], template, tokenizer, context)
        out[i] = {**rows[i], "prompt": g.prompt, "segments": segments, "hits": g.hits, "reranked": g.reranked}
    return out


def _opening(text: str) -> tuple[str, str] | None:
    """(the first half of a line's words, at most 12, the rest) — what a text model is asked to continue."""
    words = text.split()
    if len(words) < 2:
        return None
    k = min(12, len(words) // 2)
    return " ".join(words[:k]), " ".join(words[k:])


def _prompts(rows: list[dict[str, Any]]) -> dict[int, tuple[str, str | None]]:
    """{row index: (prompt, reference of a text sample)}: every Q&A prompt, and the openings of the
    first TEXT_SAMPLES held-out text lines (so text-mode reports show what the model writes)."""
    out: dict[int, tuple[str, str | None]] = {}
    texts = 0
    for i, r in enumerate(rows):
        if r["kind"] != "text" and r.get("prompt"):
            out[i] = (r["prompt"], None)
        elif r["kind"] == "text" and texts < TEXT_SAMPLES and (split := _opening(r.get("reference", ""))):
            out[i], texts = split, texts + 1
    return out


def _evaluate_causal(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    template: dict[str, Any],
    cfg: EvaluateConfig,
    side: str,
    max_length: int,
    threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Answers-table rows of one side: loss on the reference answer (the first `max_length` tokens,
    as finetune trained), then a generated answer — replaced by the refusal below `threshold`."""
    from dataclasses import replace

    from tagtune.generation import generate_answers
    from tagtune.grounding import abstain, cite, confidence

    losses = answer_losses(model, tokenizer, rows, max_length, cfg.batch_size)
    prompts = _prompts(rows)
    answers = generate_answers(
        model,
        tokenizer,
        [p for p, _ in prompts.values()],
        cfg.generation,
        template.get("end_marker"),
        cfg.batch_size,
    )
    by_row = dict(zip(prompts, answers, strict=True))
    refusal = refusal_answer(template)
    table = []
    for i, r in enumerate(rows):
        rec: dict[str, Any] = {
            "side": side,
            "id": r.get("id"),
            "kind": r["kind"],
            "question": r.get("question", ""),
            "reference": r.get("reference", ""),
            "answer": None,
            "nll": losses[i][0] if losses[i] else None,
            "tokens": losses[i][1] if losses[i] else 0,
            "loss": round(losses[i][0] / losses[i][1], 6) if losses[i] else None,
        }
        if "hits" in r:
            gold = normalize(r.get("reference", ""))
            rec["retrieved"] = any(normalize(h.fact.text) == gold for h in r["hits"])
        if r["kind"] == "text" and i in prompts:  # a continuation sample: the opening and the rest
            rec["question"], rec["reference"] = prompts[i][0], prompts[i][1]
        if i in by_row:
            raw = by_row[i]
            conf = confidence(raw.logprob, r.get("hits", []), r.get("reranked", False))
            final = replace(raw, text=abstain(raw.text, conf, threshold, template))
            rec["answer"] = final.text
            rec.update(score_answer(final, r, refusal, cfg.repetition_ngram))
            rec["confidence"] = conf  # unrounded: the threshold chosen from it is compared with it
            if threshold is not None:
                rec["raw"] = {"answer": raw.text, **score_answer(raw, r, refusal, cfg.repetition_ngram)}
            source = cite(final.text, r.get("hits", []))
            rec["sources"] = source.fact.where if source else None
        table.append(rec)
    return table


def _evaluate_classification(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], cfg: EvaluateConfig, side: str
) -> list[dict[str, Any]]:
    from tagtune.generation import classify

    preds = classify(model, tokenizer, [r["text"] for r in rows], cfg.batch_size)
    return [
        {
            "side": side,
            "id": r.get("id"),
            "kind": "classification",
            "question": r["text"],
            "reference": r["label"],
            "answer": p,
            "correct": p == r["label"],
        }
        for r, p in zip(rows, preds, strict=True)
    ]


# ------------------------------------------------------------------------------------------- outputs
def _wide_rows(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per example with `tuned_*` / `base_*` columns side by side (the DVC plot)."""
    per: dict[str, dict[str, Any]] = {}
    keep = ("answer", "f1", "rougeL", "exact_match", "refused", "loss", "correct", "sources")
    for r in table:
        row = per.setdefault(
            r["id"],
            {"id": r["id"], "kind": r["kind"], "question": r["question"], "reference": r["reference"]},
        )
        for k in keep:
            if k in r:
                row[f"{r['side']}_{k}"] = r[k]
    return list(per.values())


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _figures(
    dest: Path, metrics: dict[str, float], finetuned: Path, confusion: tuple[list[str], Any] | None
) -> list[str]:
    """PNG charts under `dest`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dest.mkdir(parents=True, exist_ok=True)
    made = []
    loss_csv = finetuned / "loss.csv"
    steps, losses = [], []
    if loss_csv.is_file():
        with open(loss_csv, encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r.get("loss"):
                    steps.append(int(float(r["step"])))
                    losses.append(float(r["loss"]))
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, losses, marker=".")
        ax.set(xlabel="step", ylabel="training loss", title="finetune loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(dest / "loss.png", dpi=110)
        plt.close(fig)
        made.append("loss.png")

    names = [k.split(".", 1)[1] for k in metrics if k.startswith("tuned.")]
    rates = [m for m in names if m not in ("eval_loss", "perplexity", "answer_words", "answer_tokens")]
    if rates:
        fig, axes = plt.subplots(1, 2 if "perplexity" in names else 1, figsize=(9, 3.8), squeeze=False)
        ax = axes[0][0]
        x = range(len(rates))
        for off, side in ((-0.2, "base"), (0.2, "tuned")):
            vals = [metrics.get(f"{side}.{m}", 0.0) for m in rates]
            if any(f"{side}.{m}" in metrics for m in rates):
                ax.bar([i + off for i in x], vals, width=0.4, label=side)
        ax.set_xticks(
            list(x), [m + (" ↓" if m in LOWER_IS_BETTER else "") for m in rates], rotation=30, ha="right"
        )
        ax.set_ylim(0, 1)
        ax.set_title("test metrics (↓ = lower is better)")
        ax.legend()
        if "perplexity" in names:
            ax2 = axes[0][1]
            sides = [s for s in SIDES if f"{s}.perplexity" in metrics]
            bars = ax2.bar(
                sides, [metrics[f"{s}.perplexity"] for s in sides], color=["C1", "C0"][: len(sides)]
            )
            ax2.bar_label(bars, fmt="%.3g")
            ax2.set_yscale("log")
            ax2.set_title("answer perplexity ↓")
        fig.tight_layout()
        fig.savefig(dest / "metrics.png", dpi=110)
        plt.close(fig)
        made.append("metrics.png")

    if confusion is not None:
        from sklearn.metrics import ConfusionMatrixDisplay

        labels, matrix = confusion
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ConfusionMatrixDisplay(matrix, display_labels=labels).plot(ax=ax, colorbar=False)
        ax.set_title("tuned model, test split")
        fig.tight_layout()
        fig.savefig(dest / "confusion.png", dpi=110)
        plt.close(fig)
        made.append("confusion.png")
    return made


def coverage_curve(table: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
    """(confidence threshold, coverage, accuracy) of the tuned side's answers before abstention.

    Answers are taken most confident first; coverage = share of the questions answered (not refused),
    accuracy = share of the answered that are right (in-domain F1 ≥ 0.5; any answer out of domain is
    wrong).
    """
    tuned = [{**r, **r.get("raw", {})} for r in table if r["side"] == "tuned"]
    rows = [r for r in tuned if r.get("confidence") is not None and r["kind"] in (*IN_DOMAIN, "refusal")]
    answered = sorted((r for r in rows if not r["refused"]), key=lambda r: -r["confidence"])
    curve, right = [], 0
    for n, r in enumerate(answered, 1):
        right += not is_confident_wrong(r)
        curve.append((r["confidence"], n / len(rows), right / n))
    return curve


def _coverage_figure(dest: Path, table: list[dict[str, Any]], threshold: float | None) -> list[str]:
    """coverage.png: accuracy vs coverage as the abstention threshold moves (the chosen one marked)."""
    import matplotlib.pyplot as plt

    curve = coverage_curve(table)
    if not curve:
        return []
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([c for _, c, _ in curve], [a for _, _, a in curve], marker=".", label="tuned, grounded")
    if threshold is not None:
        kept = [(c, a) for t, c, a in curve if t >= threshold]
        if kept:
            ax.scatter(*kept[-1], color="C3", zorder=3, label="threshold chosen on val")
    ax.set(
        xlabel="coverage (share of test questions answered)",
        ylabel="accuracy of the answered",
        ylim=(0, 1.02),
    )
    ax.set_title("abstention: coverage vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    dest.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest / "coverage.png", dpi=110)
    plt.close(fig)
    return ["coverage.png"]


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _report(
    metrics: dict[str, float], training: dict[str, Any], figures: list[str], table: list[dict]
) -> str:
    names = [k.split(".", 1)[1] for k in metrics if k.startswith("tuned.")]
    lines = [
        "# Evaluation report\n",
        f"Base model `{training.get('base_model')}`, {training.get('method')} fine-tuning, "
        f"{training.get('steps')} steps (fingerprint `{training.get('fingerprint')}`, "
        f"MLflow run `{training.get('mlflow_run_id') or '—'}`). "
        + ", ".join(f"{k[2:]}: {int(v)}" for k, v in metrics.items() if k.startswith("n."))
        + " test rows.\n",
        "| metric | tuned | base | delta | better |",
        "|---|---|---|---|---|",
    ]
    for m in names:
        t, b, d = metrics.get(f"tuned.{m}"), metrics.get(f"base.{m}"), metrics.get(f"delta.{m}")
        better = ""
        if d is not None and m not in ("answer_words", "answer_tokens"):
            better = "tuned" if (d < 0 if m in LOWER_IS_BETTER else d > 0) else ("=" if d == 0 else "base")
        lines.append(f"| {m} | {_fmt(t)} | {_fmt(b)} | {_fmt(d)} | {better} |")
    lines.append("")
    if "abstain.threshold" in metrics:
        lines += [_abstention_note(metrics), ""]
    for f in figures:
        lines.append(f"![{f[:-4]}](figures/{f})\n")
    lines.append("## Sample answers\n")
    lines.append("| kind | question | reference | tuned | tuned's source | base |")
    lines.append("|---|---|---|---|---|---|")
    wide = _wide_rows(table)
    shown: Counter[str] = Counter()
    for r in wide:
        if shown[r["kind"]] >= 4 or (r["kind"] == "text" and r.get("tuned_answer") is None):
            continue
        shown[r["kind"]] += 1
        cells = [
            r["kind"], r["question"], r["reference"], r.get("tuned_answer"), r.get("tuned_sources"), r.get("base_answer")
        ]  # fmt: skip
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _abstention_note(metrics: dict[str, float]) -> str:
    """What the threshold chosen on val does on this split, and the param that trades it.

    Why: on data its retriever ranks poorly, the threshold that keeps val's wrong answers at the target
    can refuse most in-domain questions (README: a second data set): the report says so and names the knob.
    """
    pct = lambda key: "—" if metrics.get(key) is None else f"{metrics[key]:.1%}"  # noqa: E731
    return (
        f"**Abstention.** Answers scoring below {metrics['abstain.threshold']:.3g} (the threshold chosen on "
        f"{int(metrics.get('abstain.val_questions', 0))} val questions to keep confident-wrong answers within "
        f"`evaluate.max_confident_wrong`) become the refusal. On this split: confident-wrong "
        f"{pct('tuned.confident_wrong_rate_without_abstention')} → {pct('tuned.confident_wrong_rate')}, "
        f"false refusals {pct('tuned.false_refusal_rate_without_abstention')} → {pct('tuned.false_refusal_rate')}. "
        "Raise `evaluate.max_confident_wrong` to answer more questions, and be wrong more often."
    )


def _cell(v: Any) -> str:
    s = "—" if v is None else str(v)
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= 120 else s[:117] + "..."


# ----------------------------------------------------------------------------------------- the stage
def _classification_sides(
    model: Any, tok: Any, rows: list[dict[str, Any]], cfg: EvaluateConfig, training: dict, splits: Path
) -> tuple[list[dict[str, Any]], dict[str, float], tuple[list[str], Any]]:
    """(answers table, metrics, confusion matrix): the tuned classifier vs the train split's majority class."""
    from sklearn.metrics import confusion_matrix

    table = _evaluate_classification(model, tok, rows, cfg, "tuned")
    y_true = [r["label"] for r in rows]
    preds = [r["answer"] for r in table]
    metrics = {f"tuned.{k}": v for k, v in classification_metrics(y_true, preds).items()}
    labels = training.get("labels") or sorted(set(y_true))
    confusion = (labels, confusion_matrix(y_true, preds, labels=labels))
    if cfg.compare_base:  # majority class of the train split
        majority = Counter(r["label"] for r in read_jsonl(splits / "train.jsonl")).most_common(1)[0][0]
        table += [
            {**r, "side": "base", "answer": majority, "correct": majority == r["reference"]} for r in table
        ]
        base_m = classification_metrics(y_true, [majority] * len(rows))
        metrics.update({f"base.{k}": v for k, v in base_m.items()})
    metrics["n.classification"] = float(len(rows))
    return table, metrics, confusion


RAW_METRICS = ("answer_f1", "confident_wrong_rate", "refusal_rate", "false_refusal_rate")


def _calibrate(
    model: Any, tok: Any, val: list[dict], template: dict, cfg: EvaluateConfig, max_length: int
) -> dict:
    """The abstention threshold, chosen on the val split's grounded answers (see `choose_threshold`)."""
    scored = _evaluate_causal(model, tok, val, template, cfg, "val", max_length)
    threshold = choose_threshold(scored, cfg.max_confident_wrong)
    out = {"abstain.val_questions": float(sum(r["answer"] is not None for r in scored))}
    return out if threshold is None else {**out, "abstain.threshold": threshold}


def _causal_sides(
    model: Any,
    tok: Any,
    rows: list[dict[str, Any]],
    template: dict,
    cfg: EvaluateConfig,
    training: dict,
    val: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """(answers table, metrics): the tuned model, then (compare_base) the base model it started from.

    `val` (grounded models): the rows the abstention threshold is chosen on; the tuned side's answers
    below it become the refusal (`tuned.*`), and the metrics without abstention are kept too.
    """
    from tagtune.grounding import threshold_for
    from tagtune.models import answering, load_saved

    has_refusal = bool(template.get("refusal_answer")) or val is not None
    max_length = training["max_length"]  # the tokens finetune trained: perplexity measures the same
    metrics: dict[str, float] = {}
    threshold = None
    if val:
        metrics.update(_calibrate(model, tok, val, template, cfg, max_length))
        reranked = any(r.get("reranked") for r in rows)  # none chosen: the reranker's own "none fits"
        threshold = threshold_for(metrics.get("abstain.threshold"), reranked)
    table = _evaluate_causal(model, tok, rows, template, cfg, "tuned", max_length, threshold)
    metrics.update({f"tuned.{k}": v for k, v in aggregate(table, has_refusal).items()})
    if val:
        raw = aggregate([{**r, **r.get("raw", {})} for r in table], has_refusal)
        metrics.update({f"tuned.{k}_without_abstention": raw[k] for k in RAW_METRICS if k in raw})
    if cfg.compare_base:
        # the base side in the tuned side's precision (bf16 where LoRA trained in it): the comparison is
        # of the training, not of the number format, and the base model's long answers (they run to
        # max_new_tokens half the time) made fp32 the slower half of evaluate (README: Benchmarks)
        dtype = next(model.parameters()).dtype
        del model
        base_model, base_tok = load_saved(training["base_model_dir"])
        base_model = answering(base_model.to(dtype))
        base = _evaluate_causal(base_model, base_tok, rows, template, cfg, "base", max_length)
        metrics.update({f"base.{k}": v for k, v in aggregate(base, has_refusal).items()})
        table += base
    for kind, n in sorted(Counter(r["kind"] for r in rows).items()):
        metrics[f"n.{kind}"] = float(n)
    return table, metrics


class EvaluationError(TagtuneError):
    """The evaluation produced numbers that mean nothing (NaN/inf): nothing is written or logged."""


def _check_finite(metrics: dict[str, float]) -> None:
    """Raise if any metric is NaN or infinite (a broken model), before anything is written.

    Raises:
        EvaluationError: naming the metrics.
    """
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in list(bad.items())[:6])
        raise EvaluationError(
            f"evaluate: metrics not finite ({shown}): the model outputs NaN/inf, so its scores mean nothing; "
            "nothing was written (re-run finetune, or check the base model's weights)"
        )


def evaluate(
    splits: Path,
    finetuned: Path,
    out_dir: Path,
    cfg: EvaluateConfig,
    mlflow_cfg: MlflowConfig | None = None,
    index: Path | None = None,
) -> dict[str, float]:
    """Evaluate finetune's model and its base model on `splits/test.jsonl`.

    Args:
        splits: the split stage's directory (test.jsonl; train.jsonl for the majority baseline).
        finetuned: finetune's output dir (model/ or adapter/, training.json, template.json, loss.csv).
        out_dir: written atomically: metrics.json, answers.jsonl/.csv, report.md, figures/.
        cfg: the `evaluate:` section.
        mlflow_cfg: log metrics, the answers table and the report to finetune's MLflow run;
            None disables MLflow.
        index: the index stage's directory; a model trained grounded answers with its facts in the
            prompt, and abstains below the threshold chosen on the val split.

    Returns:
        The metrics (also metrics.json).

    Raises:
        DataError: missing/empty test split or finetune output.
        ModelIntegrityError: the weights differ from the sha256 finetune recorded.
        EvaluationError: a metric is NaN/inf (nothing is written).
        tracking.TrackingError: MLflow unreachable (the outputs are already written).
    """
    from tagtune.models import answering, load_finetuned

    splits, finetuned, out_dir = Path(splits), Path(finetuned), Path(out_dir)
    training = read_json(finetuned / "training.json")
    template = read_template(finetuned)
    task = training.get("task", template.get("task", "causal_lm"))
    rows = select_examples(read_jsonl(splits / "test.jsonl"), cfg.max_examples)
    if not rows:
        raise DataError(splits / "test.jsonl", None, "test split is empty (raise split.test_fraction)")

    confusion = None
    model, tok = load_finetuned(finetuned, task)
    answering(model)
    if task == "classification":
        table, metrics, confusion = _classification_sides(model, tok, rows, cfg, training, splits)
    else:
        val = None
        if training.get("grounded"):
            facts, k = attach(FactIndex.load(index), finetuned), training["grounded"]["k"]
            rows = _grounded(rows, facts, template, k, tok)
            val = _grounded(read_jsonl(splits / "val.jsonl"), facts, template, k, tok)
        table, metrics = _causal_sides(model, tok, rows, template, cfg, training, val)
    for key in [k for k in metrics if k.startswith("tuned.")]:
        name = key.split(".", 1)[1]
        if f"base.{name}" in metrics:
            metrics[f"delta.{name}"] = round(metrics[key] - metrics[f"base.{name}"], 6)
    for r in table:
        r.pop("nll", None)
    _check_finite(metrics)

    with atomic_path(out_dir, owned=WRITES) as tmp:
        tmp.mkdir()
        write_json(tmp / "metrics.json", metrics)
        write_jsonl(tmp / "answers.jsonl", table)
        _write_csv(tmp / "answers.csv", _wide_rows(table))
        figures = _figures(tmp / "figures", metrics, finetuned, confusion)
        figures += _coverage_figure(tmp / "figures", table, metrics.get("abstain.threshold"))
        (tmp / "report.md").write_text(_report(metrics, training, figures, table), encoding="utf-8")

    if mlflow_cfg is not None:
        _log_to_mlflow(mlflow_cfg, training, cfg, metrics, table, out_dir)
    return metrics


def _log_to_mlflow(
    mlflow_cfg: MlflowConfig,
    training: dict[str, Any],
    cfg: EvaluateConfig,
    metrics: dict[str, float],
    table: list[dict],
    out_dir: Path,
) -> None:
    """Attach the evaluation to finetune's run: metrics, the answers table, the report files."""
    import json

    from tagtune import tracking

    run_id = training.get("mlflow_run_id") or tracking.open_run(
        mlflow_cfg, training["fingerprint"], run_name=f"tagtune-{training['fingerprint'][:8]}"
    )
    tracking.log_params(mlflow_cfg, run_id, {"evaluate": cfg.model_dump()})
    step = int(training.get("steps") or 0)
    tracking.log_metrics(mlflow_cfg, run_id, [(f"eval/{k}", v, step) for k, v in metrics.items()])
    digest = stable_hash(json.dumps(table, sort_keys=True, default=str))[:12]
    tracking.log_table(mlflow_cfg, run_id, table, f"evaluate/answers-{digest}.json")
    tracking.set_tags(mlflow_cfg, run_id, {"tagtune.answers_table": f"evaluate/answers-{digest}.json"})
    tracking.log_artifacts(mlflow_cfg, run_id, str(out_dir), "evaluate")


def run(p: Params, root: Path) -> dict[str, float]:
    paths = p.paths
    return evaluate(
        root / paths.split,
        root / paths.finetune,
        root / paths.evaluate,
        p.evaluate,
        p.mlflow.for_runs(),
        root / paths.index,
    )


if __name__ == "__main__":
    from stages import main

    raise SystemExit(main("evaluate"))
