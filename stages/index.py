"""index: the facts a grounded model answers from, searchable with BM25 (tagtune/retrieval.py).

    python -m stages.index

Indexes the distinct answers of the train split (each with the `source:line` it came from and the
questions it answers) and the facts of the sources with `train: false` (ingest's knowledge.jsonl:
facts to answer from that the model is never trained on). Writes `paths.index/`: facts.jsonl, bm25/,
stats.json — byte-identical for the same data.

Why the train split and not every row: evaluation must not find a test-only fact in the index (with
`split.strategy: group` the test facts are held out; the model should say it does not know). And why
knowledge.jsonl does not go through format/split: appending to it changes only ingest's
knowledge.jsonl, so `dvc repro` re-runs ingest, format (same output), index, evaluate and register
— never finetune: new facts are answerable in the time of an evaluation, without retraining.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tagtune.config import IndexConfig, Params
from tagtune.io import atomic_path, read_jsonl, write_json, write_jsonl
from tagtune.retrieval import BM25_DIR, FACTS_FILE, FactIndex, facts_from_examples, facts_from_knowledge

WRITES = (FACTS_FILE, BM25_DIR, "stats.json")  # what index writes to paths.index (replaced as a whole)


def index_facts(
    split: Path, knowledge: Path, out_dir: Path, cfg: IndexConfig | None = None
) -> dict[str, Any]:
    """Index the facts of `split/train.jsonl` and of the `knowledge` rows into `out_dir`.

    Args:
        split: the split stage's directory.
        knowledge: ingest's knowledge.jsonl (rows of the `train: false` sources; absent when none).
        out_dir: written atomically: facts.jsonl, bm25/, stats.json.
        cfg: the `index:` section.

    Returns:
        Counts: facts from training data, from knowledge sources, in the index.

    Raises:
        DataError: missing inputs, or no fact at all (no question/answer rows).
    """
    trained = facts_from_examples(read_jsonl(Path(split) / "train.jsonl"))
    extra = facts_from_knowledge(read_jsonl(knowledge)) if Path(knowledge).is_file() else []
    known = {f.id for f in trained}
    facts = sorted([*trained, *(f for f in extra if f.id not in known)], key=lambda f: f.id)
    stats = {"facts": len(facts), "trained_facts": len(trained), "knowledge_facts": len(facts) - len(trained)}
    with atomic_path(out_dir, owned=WRITES) as tmp:
        if facts:
            FactIndex(facts, include_questions=(cfg or IndexConfig()).include_questions).save(tmp)
        else:  # text or classification data: nothing to retrieve (a grounded finetune refuses it)
            tmp.mkdir()
            write_jsonl(tmp / FACTS_FILE, [])
        write_json(tmp / "stats.json", stats)
    return stats


def run(p: Params, root: Path) -> dict[str, Any]:
    paths = p.paths
    return index_facts(
        root / paths.split, root / paths.ingest / "knowledge.jsonl", root / paths.index, p.index
    )


if __name__ == "__main__":
    from stages import main

    raise SystemExit(main("index"))
