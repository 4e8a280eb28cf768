"""Tokenising tagged examples: prompt tokens masked, answer tokens (and the stop token) trained.

Shared by finetune (training labels and batches) and evaluate (answer perplexity), so both see the
same tokens.
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


def _origin(ex: dict[str, Any]) -> str:
    """`source:line` of an example, for messages about it."""
    return f"{ex.get('source', '?')}:{ex.get('line', '?')}"


def build_lm_features(
    examples: list[dict[str, Any]], tokenizer: Any, max_length: int
) -> tuple[list[dict], dict]:
    """Tokenise causal-LM examples; returns (features, counts of truncated/dropped)."""
    feats, truncated, dropped = [], 0, 0
    for ex in examples:
        enc = encode_example(ex["segments"], tokenizer, max_length)
        if enc is None:
            dropped += 1
            continue
        truncated += enc["truncated"]
        feats.append({**enc, "length": len(enc["input_ids"]), "origin": _origin(ex)})
    return feats, {"truncated": truncated, "dropped": dropped}


def build_cls_features(
    examples: list[dict[str, Any]], tokenizer: Any, max_length: int, labels: list[str]
) -> list[dict]:
    """Tokenise classification examples; `labels` fixes each label name's class index."""
    index = {lab: i for i, lab in enumerate(labels)}
    feats = []
    for ex in examples:
        ids = tokenizer(ex["text"], add_special_tokens=True, truncation=True, max_length=max_length)[
            "input_ids"
        ]
        feats.append(
            {"input_ids": ids, "labels": index[ex["label"]], "length": len(ids), "origin": _origin(ex)}
        )
    return feats


class PadCollator:
    """Right-pad a batch to its longest example; labels padded with -100 (never trained)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        seq_labels = isinstance(batch[0]["labels"], list)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long) if seq_labels else None
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            mask[i, :n] = 1
            if seq_labels:
                labels[i, :n] = torch.tensor(b["labels"])
        if not seq_labels:
            labels = torch.tensor([b["labels"] for b in batch], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
