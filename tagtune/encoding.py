"""Tokenising tagged examples: prompt tokens masked, answer tokens (and the stop token) trained.

Shared by finetune (training labels) and evaluate (answer perplexity), so both see the same tokens.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100  # the label value CrossEntropyLoss skips


def encode_example(
    segments: list[list[Any]], tokenizer: Any, max_length: int, append_eos: bool = True
) -> dict[str, Any] | None:
    """Tokenise `[[text, trained], ...]` segment by segment.

    Labels come from segment boundaries, never from `input_ids == pad_token_id`: with pad == eos
    (GPT-2, SmolLM2) the latter silently masks the EOS the model must learn to emit
    (transformers #23530). Segments are tokenised separately because that is how generation sees
    them (the prompt alone, then the answer tokens).

    Returns:
        {"input_ids", "labels", "truncated"} or None when truncation left no trained token.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        tok = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(tok)
        labels.extend(tok if trained else [IGNORE_INDEX] * len(tok))
    if append_eos and tokenizer.eos_token_id is not None and ids and ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if segments[-1][1] else IGNORE_INDEX)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels, "truncated": truncated}
