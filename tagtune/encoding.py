"""Tokenising tagged examples: prompt tokens masked, answer tokens (and the stop token) trained.

Shared by finetune (training labels and batches) and evaluate (answer perplexity), so both see the
same tokens. Batches are padded (`PadCollator`) or packed (`pack_rows` + `PackCollator`: several
examples per row, kept apart by the attention mask, with the same per-example loss).
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


def pack_rows(feats: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Pack tokenised examples into rows of at most `max_length` tokens (best fit, longest first).

    A row concatenates its examples' input_ids and labels, with each example's first label set to
    IGNORE_INDEX: the loss shift would otherwise train the previous example's last token to predict
    it, which an unpacked example never does. A row's `examples` keep what each one was (origin,
    truncated, length): `PackCollator` builds the mask that keeps them apart from their lengths.
    """
    import bisect

    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row index), sorted: best fit = first that fits
    for i in sorted(range(len(feats)), key=lambda i: -feats[i]["length"]):
        n = feats[i]["length"]
        j = bisect.bisect_left(free, (n, -1))
        space, row = free.pop(j) if j < len(free) else (max_length, len(rows))
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        if space > n:
            bisect.insort(free, (space - n, row))
    return [_packed_row([feats[i] for i in row]) for row in rows]


def _packed_row(members: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of `pack_rows`: the members' tokens end to end, each first label masked."""
    ids = [t for f in members for t in f["input_ids"]]
    labels = [lab for f in members for lab in [IGNORE_INDEX, *f["labels"][1:]]]
    examples = [{k: f[k] for k in ("origin", "truncated", "length") if k in f} for f in members]
    return {"input_ids": ids, "labels": labels, "length": len(ids), "examples": examples}


def _padded(batch: list[dict[str, Any]], pad_token_id: int) -> tuple[Any, Any]:
    """(input_ids, token labels) right-padded to the batch's longest row (labels with IGNORE_INDEX)."""
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
        labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
    return ids, labels


class PadCollator:
    """Right-pad a batch to its longest example; labels padded with -100 (never trained)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not isinstance(batch[0]["labels"], list):  # classification: one class index per example
            ids, _ = _padded([{"input_ids": b["input_ids"], "labels": []} for b in batch], self.pad_token_id)
            labels = torch.tensor([b["labels"] for b in batch], dtype=torch.long)
        else:
            ids, labels = _padded(batch, self.pad_token_id)
        lengths = torch.tensor([len(b["input_ids"]) for b in batch])
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PackCollator:
    """Batch `pack_rows` rows for a causal LM: position_ids restart at 0 for every example, and a
    4D boolean attention mask [batch, 1, q, k] (True = attend) is causal *within* each example only.

    transformers (5.x) hands a 4D mask to SDPA as it is; position_ids alone do not separate packed
    examples there. A pad (a row's tail) attends to nothing and nothing attends to it, so the mask's
    diagonal marks exactly the real tokens (what the token count reads).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids, labels = _padded(batch, self.pad_token_id)
        seg = torch.full(ids.shape, -1, dtype=torch.long)  # example index within its row; -1 = pad
        pos = torch.zeros(ids.shape, dtype=torch.long)
        for i, row in enumerate(batch):
            start = 0
            for j, ex in enumerate(row["examples"]):
                seg[i, start : start + ex["length"]] = j
                pos[i, start : start + ex["length"]] = torch.arange(ex["length"])
                start += ex["length"]
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & causal
        return {"input_ids": ids, "attention_mask": mask[:, None], "position_ids": pos, "labels": labels}


class TrainedLogitsOnly:
    """Wrap a causal-LM collator so the LM head and the loss run only where a label is trained.

    Adds transformers' `logits_to_keep` (a boolean [batch, seq] mask: positions whose *next* label is
    trained) and the matching flattened `shift_labels`: the loss is the same, but the vocabulary
    projection and its log-softmax (the largest tensors of a small model's step) skip the prompt,
    padding and each example's last position. Trainer counts `num_items_in_batch` on `shift_labels`.
    """

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        out = self.collate(batch)
        shifted = torch.nn.functional.pad(out["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        keep = shifted != IGNORE_INDEX
        return {**out, "logits_to_keep": keep, "shift_labels": shifted[keep]}
