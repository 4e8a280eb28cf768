"""Preference tuning on the UI's verdicts (DPO / KTO with TRL), run by finetune after SFT.

    rows = preference_rows(verdicts, template, exclude=val_and_test_questions)
    pairs, unpaired = rows.dpo, rows.kto

What a verdict teaches (latest verdict per question, as the SFT examples take it):
- a correction → a DPO pair: chosen = the correction, rejected = what the model answered;
  for KTO, the correction is a desirable row and the model's answer an undesirable one;
- a bare 👍 → a desirable KTO row (the model's answer); a bare 👎 → an undesirable one.
  Only KTO learns from bare verdicts: a DPO pair needs both sides.

Prompts and completions are rendered by `render_turn`, as SFT renders the turn: the completion is the
trained segment (the answer and its end tag), TRL appends EOS, and only completion tokens carry loss
(TRL's completion mask), so DPO/KTO train exactly the tokens SFT trains (tests/test_preference.py
checks the ids). Questions of the val and test splits are left out: a verdict on a test question
would otherwise leak the reference answer into training.

Why TRL: its DPOTrainer/KTOTrainer are HF Trainers (checkpoints, resume, schedulers, DDP) with the
maintained losses; the reference model is a frozen copy of the SFT model (not peft's adapter-disabled
base, which is what TRL uses for a peft model without `ref_model`), and its log-probabilities are
computed once before step 1 (`precompute_ref_log_probs`).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any

from tagtune.encoding import IGNORE_INDEX, encode_example
from tagtune.templates import render_turn
from tagtune.text import normalize


@dataclass
class PreferenceRows:
    dpo: list[dict[str, str]] = field(default_factory=list)  # {prompt, chosen, rejected}
    kto: list[dict[str, Any]] = field(default_factory=list)  # {prompt, completion, label}
    held_out: int = 0  # verdicts on val/test questions, not trained on


def render_pair(
    question: str,
    answer: str,
    template: dict[str, Any],
    tokenizer: Any = None,
    context: list[str] | None = None,
) -> tuple[str, str]:
    """(prompt, completion) of one turn as SFT renders it: the text before the trained segment, and it."""
    segments = render_turn(question, answer, template, tokenizer, context)
    first = next(i for i, (_, trained) in enumerate(segments) if trained)
    prompt = "".join(text for text, _ in segments[:first])
    return prompt, segments[first][0]


def latest_verdicts(verdicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest verdict per question (by id; questions trimmed and case-folded), in id order: what
    the feedback stage trains on and what preference tuning pairs."""
    latest: dict[str, dict[str, Any]] = {}
    for v in sorted(verdicts, key=lambda v: v["id"]):
        latest[v["question"].strip().lower()] = v
    return sorted(latest.values(), key=lambda v: v["id"])


def preference_rows(
    verdicts: list[dict[str, Any]],
    template: dict[str, Any],
    exclude: set[str] = frozenset(),
    tokenizer: Any = None,
    contexts: dict[str, list[str]] | None = None,
) -> PreferenceRows:
    """DPO pairs and KTO rows from feedback verdicts (paths.feedback/feedback.jsonl rows).

    Args:
        exclude: normalised questions not to train on (the val and test splits').
        contexts: question → retrieved facts, for a grounded model (prompts as it sees them).
    """
    rows = PreferenceRows()
    for v in latest_verdicts(verdicts):
        q, answered, correction = v["question"], (v.get("model_answer") or "").strip(), v.get("correction")
        if normalize(q) in exclude:
            rows.held_out += 1
            continue
        context = (contexts or {}).get(q)

        def pair(answer: str, q=q, context=context) -> tuple[str, str]:
            return render_pair(q, answer, template, tokenizer, context)

        if correction and correction.strip() and answered and normalize(correction) != normalize(answered):
            (prompt, chosen), (_, rejected) = pair(correction.strip()), pair(answered)
            rows.dpo.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            rows.kto += [
                {"prompt": prompt, "completion": chosen, "label": True},
                {"prompt": prompt, "completion": rejected, "label": False},
            ]
        elif not correction and answered and v.get("rating") in (1, -1):
            prompt, completion = pair(answered)
            rows.kto.append({"prompt": prompt, "completion": completion, "label": v["rating"] == 1})
    return rows


def completion_logprob(model: Any, tokenizer: Any, prompt: str, completion: str, max_length: int) -> float:
    """log P(completion + EOS | prompt), summed over the tokens SFT trains (encode_example's labels)."""
    import torch

    enc = encode_example([[prompt, False], [completion, True]], tokenizer, max_length)
    ids = torch.tensor([enc["input_ids"]], device=model.device)
    labels = torch.tensor(enc["labels"][1:], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    keep = labels != IGNORE_INDEX
    return float(logp[keep].gather(1, labels[keep].unsqueeze(1)).sum())


def margins(model: Any, tokenizer: Any, pairs: list[dict[str, str]], max_length: int) -> list[float]:
    """Per pair: log P(chosen) − log P(rejected) under `model` (what DPO raises)."""
    was_training = model.training
    model.eval()
    try:
        return [
            completion_logprob(model, tokenizer, p["prompt"], p["chosen"], max_length)
            - completion_logprob(model, tokenizer, p["prompt"], p["rejected"], max_length)
            for p in pairs
        ]
    finally:
        model.train(was_training)


def frozen_copy(model: Any) -> Any:
    """The reference model: a frozen copy of the SFT model (a LoRA model merged into plain weights)."""
    ref = copy.deepcopy(model)
    if hasattr(ref, "merge_and_unload"):
        ref = ref.merge_and_unload()
    ref.requires_grad_(False)
    return ref.eval()


def trl_trainer(
    method: str,
    model: Any,
    tokenizer: Any,
    rows: PreferenceRows,
    args: dict[str, Any],
    beta: float,
    sft_weight: float,
    callbacks: list[Any],
) -> Any:
    """TRL's DPOTrainer or KTOTrainer over `rows`, with `args` (TrainingArguments keywords) + beta."""
    from datasets import Dataset

    ref = frozen_copy(model)
    common = {**args, "beta": beta, "precompute_ref_log_probs": True, "disable_dropout": True}
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        loss = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {}
        return DPOTrainer(
            model=model,
            ref_model=ref,
            args=DPOConfig(**common, **loss),
            train_dataset=Dataset.from_list(rows.dpo),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    from trl import KTOConfig, KTOTrainer

    # KTO reads rows in order (its KL term pairs neighbours): a seeded shuffle mixes verdict kinds
    shuffled = random.Random(args.get("seed", 0)).sample(rows.kto, len(rows.kto))
    return KTOTrainer(
        model=model,
        ref_model=ref,
        args=KTOConfig(**common),
        train_dataset=Dataset.from_list(shuffled),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
