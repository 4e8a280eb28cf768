"""Retrieval over the user's own facts: lexical BM25 (bm25s, English stemmer), offline and deterministic.

    from tagtune.retrieval import FactIndex
    index = FactIndex.load("data/index")
    index.search(["When does the museum open?"], k=4)[0]      # [Hit(fact, score), ...] best first

A *fact* is one distinct answer of the data (normalised text), with where it came from (the first
`source:line` that gave it) and the questions it answers. Retrieval matches a question against the
fact's text and those questions, so a paraphrase that shares words with a sibling phrasing is found
too. Lexical on purpose: nothing here can download embedding weights (no Hugging Face Hub), and
BM25 over a few hundred short facts needs no GPU and answers in milliseconds.

On disk (`save`/`load`) an index is `facts.jsonl` (the facts, in id order) and `bm25/` (bm25s' own
arrays): the same facts give byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tagtune.errors import DataError
from tagtune.io import read_jsonl, write_jsonl
from tagtune.text import normalize, stable_hash

FACTS_FILE = "facts.jsonl"
BM25_DIR = "bm25"
LANGUAGE = "english"  # stemmer and stopword list; the shipped data and the refusal questions are English


@dataclass(frozen=True)
class Fact:
    id: str  # hash of the normalised text: stable across runs and appends
    text: str
    source: str  # where it came from: file (or SQL source) ...
    line: int | None  # ... and line / row
    questions: tuple[str, ...] = field(default=())  # questions of the training data it answers

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source


@dataclass(frozen=True)
class Hit:
    fact: Fact
    score: float  # BM25 score (higher = better match; 0 = no word in common)


def _distinct(items: list[tuple[str, str | None, str, int | None]]) -> list[Fact]:
    """(text, question, source, line) → one Fact per normalised text (first provenance, every question)."""
    by_key: dict[str, dict[str, Any]] = {}
    for text, question, source, line in items:
        if not text.strip():
            continue
        fact = by_key.setdefault(
            normalize(text), {"text": text.strip(), "source": source, "line": line, "questions": []}
        )
        if question and question not in fact["questions"]:
            fact["questions"].append(question)
    return sorted(
        (Fact(id=stable_hash(k)[:16], questions=tuple(v.pop("questions")), **v) for k, v in by_key.items()),
        key=lambda f: f.id,
    )


def facts_from_examples(examples: list[dict[str, Any]]) -> list[Fact]:
    """The distinct answers of single-turn Q&A examples (format's kind `qa`), with provenance and questions.

    Refusal rows are not facts; multi-turn chats, text and classification rows carry no single fact.
    """
    return _distinct(
        [
            (ex["reference"], ex.get("question"), ex["source"], ex["line"])
            for ex in examples
            if ex.get("kind") == "qa"
        ]
    )


def facts_from_knowledge(rows: list[dict[str, Any]]) -> list[Fact]:
    """Facts of ingested rows (the `train: false` sources): a Q&A row's answer, or a text row's line."""
    items = []
    for row in rows:
        if row.get("kind") == "text":
            items.append((row["text"], None, row["source"], row["line"]))
        elif row.get("kind") == "chat":
            msgs = row["messages"]
            question = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), None)
            items.append((msgs[-1]["content"], question, row["source"], row["line"]))
    return _distinct(items)


def _tokens(texts: list[str]) -> list[list[str]]:
    """Lower-cased words minus English stopwords, stemmed (Snowball) — the terms BM25 matches.

    Stemmed here rather than by bm25s.tokenize, whose vocabulary order follows a set's (hash-seeded)
    iteration: the saved index would then differ from run to run (see `_with_ids`).
    """
    import bm25s
    import Stemmer

    stem = Stemmer.Stemmer(LANGUAGE).stemWords
    # every word, one-character ones too ("platform 3"): bm25s' default pattern drops them
    words = bm25s.tokenize(
        texts, token_pattern=r"(?u)\b\w+\b", stopwords="en", return_ids=False, show_progress=False
    )
    return [stem(w) for w in words]


def _with_ids(docs: list[list[str]]) -> tuple[list[list[int]], dict[str, int]]:
    """(token ids per document, vocabulary) with ids in order of first appearance: deterministic."""
    vocab: dict[str, int] = {}
    return [[vocab.setdefault(t, len(vocab)) for t in doc] for doc in docs], vocab


class FactIndex:
    """BM25 over facts (text + the questions they answer); `search` returns the best `k` per question."""

    def __init__(self, facts: list[Fact], bm25: Any = None, include_questions: bool = True):
        if not facts:
            raise DataError("retrieval", None, "no facts to index (the data has no question/answer rows)")
        self.facts = facts
        self.bm25 = self._build(facts, include_questions) if bm25 is None else bm25
        # tagtune.rerank.attach sets it: `search` then reorders BM25's candidates with a trained
        # cross-encoder, whose scores say whether a fact answers the question (> 0) or not
        self.reranker: Any = None

    @staticmethod
    def _build(facts: list[Fact], include_questions: bool) -> Any:
        import bm25s

        texts = [" ".join((f.text, *f.questions)) if include_questions else f.text for f in facts]
        bm25 = bm25s.BM25()
        bm25.index(_with_ids(_tokens(texts)), show_progress=False)
        return bm25

    def search(self, questions: list[str], k: int) -> list[list[Hit]]:
        """Top-`k` facts for each question, best first (fewer when the index is smaller); with a
        reranker, the top `k` of BM25's `reranker.candidates` by the reranker's score."""
        if self.reranker is None:
            return self._bm25_search(questions, k)
        candidates = self._bm25_search(questions, max(k, self.reranker.candidates))
        return self.reranker.rerank(questions, candidates, k) if questions else []

    def _bm25_search(self, questions: list[str], k: int) -> list[list[Hit]]:
        if not questions:
            return []
        k = min(k, len(self.facts))
        ids, scores = self.bm25.retrieve(_tokens(questions), k=k, show_progress=False, n_threads=1)
        return [
            [Hit(self.facts[int(i)], float(s)) for i, s in zip(row_ids, row_scores, strict=True)]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_jsonl(directory / FACTS_FILE, [asdict(f) for f in self.facts])
        self.bm25.save(str(directory / BM25_DIR), show_progress=False)

    @classmethod
    def load(cls, directory: str | Path) -> FactIndex:
        """Raises DataError when `directory` holds no index (did the index stage run?)."""
        import bm25s

        directory = Path(directory)
        rows = read_jsonl(directory / FACTS_FILE)
        facts = [Fact(**{**r, "questions": tuple(r.get("questions", ()))}) for r in rows]
        try:
            bm25 = bm25s.BM25.load(str(directory / BM25_DIR), show_progress=False)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise DataError(directory / BM25_DIR, None, f"unreadable BM25 index: {e}") from None
        return cls(facts, bm25)
