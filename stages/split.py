"""split: deterministic, append-stable train/val/test split of the formatted examples.

    python -m stages.split [-S split.seed=7]

Each unique example (its normalised question/text) is placed by a hash of `seed` and that key, not
by shuffling positions, so the same data + seed give byte-identical files and appending rows never
moves an existing row to another split. Identical texts share a key, so no example text can appear in
two splits.

Strategies (`split.strategy`) for the Q&A knowledge case, where a `group` ties phrasings of one fact:

- `phrasing` (default): the first phrasing of each group (in file order) always stays in train; the
  other phrasings are hashed. Test questions are then *unseen phrasings of facts taught in train* —
  the question a knowledge chatbot must answer. Appending rows keeps every group's first phrasing.
- `group`: the whole group is hashed as one unit: test facts were never seen (measures
  generalisation, not recall).
- `example`: every unique example hashed alone, ignoring groups.

Rows of the sources in `split.train_only` (the users' corrections) always go to train, unless their
text is already in val/test: a correction held out for evaluation would never be learnt.

Classification rows are hashed the same way; hashing is independent of the label, so each label's
split shares match the fractions in expectation (stratified without moving rows on append), and a
label that appears only outside train is an error.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from tagtune.config import Params, SplitConfig
from tagtune.errors import DataError
from tagtune.io import atomic_path, read_jsonl, write_json, write_jsonl
from tagtune.templates import TEMPLATE_FILE
from tagtune.text import normalize, unit_interval

SPLITS = ("train", "val", "test")
WRITES = (*(f"{s}.jsonl" for s in SPLITS), "stats.json", "template.json")  # paths.split


def example_key(ex: dict[str, Any]) -> str:
    """What makes two examples "the same text": the normalised prompt (or text)."""
    if ex["kind"] in ("classification", "text"):
        return normalize(ex.get("text") or ex.get("reference", ""))
    return normalize(ex["prompt"])


def _bucket(u: float, cfg: SplitConfig) -> str:
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def assign(examples: list[dict[str, Any]], cfg: SplitConfig) -> list[str]:
    """The split name of each example (same order); pure and deterministic."""
    seed = str(cfg.seed)
    train_only = {os.path.normpath(x) for x in cfg.train_only}
    anchors: dict[str, str] = {}  # group -> key of its first phrasing (phrasing strategy)
    by_key: dict[str, str] = {}
    out = []
    for ex in examples:
        key = example_key(ex)
        group = ex.get("group")
        if key in by_key:  # same text → same split, whatever its group
            out.append(by_key[key])
            continue
        if os.path.normpath(ex.get("source") or "-") in train_only:
            name = "train"
        elif cfg.strategy == "group" and group:
            name = _bucket(unit_interval(seed, "group", group), cfg)
        elif cfg.strategy == "phrasing" and group and anchors.setdefault(group, key) == key:
            name = "train"
        else:
            name = _bucket(unit_interval(seed, "key", key), cfg)
        by_key[key] = name
        out.append(name)
    return out


def split(formatted: Path, out_dir: Path, cfg: SplitConfig) -> dict[str, Any]:
    """Split `formatted/examples.jsonl` into `out_dir/{train,val,test}.jsonl` (+ stats.json, template.json).

    Returns:
        Row counts per split (and per label for classification).

    Raises:
        DataError: the input is missing/invalid, train would be empty, or a classification label
            has no train rows.
    """
    source = Path(formatted) / "examples.jsonl"
    examples = read_jsonl(source)
    if not examples:
        raise DataError(source, None, "no examples to split")
    names = assign(examples, cfg)
    parts: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for ex, name in zip(examples, names, strict=True):
        parts[name].append(ex)
    if not parts["train"]:
        raise DataError(source, None, f"train split is empty ({len(examples)} examples)")
    stats: dict[str, Any] = {s: len(parts[s]) for s in SPLITS}
    stats["kinds"] = {s: dict(Counter(e["kind"] for e in parts[s])) for s in SPLITS}
    if any(e["kind"] == "classification" for e in examples):
        labels = {s: Counter(e["label"] for e in parts[s]) for s in SPLITS}
        stats["labels"] = {s: dict(sorted(c.items())) for s, c in labels.items()}
        missing = (set(labels["val"]) | set(labels["test"])) - set(labels["train"])
        if missing:
            raise DataError(
                source,
                None,
                f"labels {sorted(missing)} have no train rows; add data or change split.seed",
            )
    with atomic_path(out_dir, owned=WRITES) as tmp:
        tmp.mkdir()
        for s in SPLITS:
            write_jsonl(tmp / f"{s}.jsonl", parts[s])
        write_json(tmp / "stats.json", stats)
        # the template facts travel with the data: finetune trains on these files and saves them with the model
        (tmp / TEMPLATE_FILE).write_bytes((Path(formatted) / TEMPLATE_FILE).read_bytes())
    return stats


def run(p: Params, root: Path) -> dict[str, Any]:
    return split(root / p.paths.format, root / p.paths.split, p.split)


if __name__ == "__main__":
    from stages import main

    raise SystemExit(main("split"))
