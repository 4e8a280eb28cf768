"""Text normalisation shared by dedupe (format), split keys (split), answer scoring (evaluate) and retrieval."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

_WS = re.compile(r"\s+")
_EDGE_PUNCT = re.compile(r"^[\s\W_]+|[\s\W_]+$", re.UNICODE)
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    """Casefolded, NFKC, whitespace collapsed, leading/trailing punctuation dropped.

    "  What's on?? " and "what's on" normalise equal: the same example for dedupe and splitting.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return _EDGE_PUNCT.sub("", _WS.sub(" ", text))


def stable_hash(*parts: str) -> str:
    """Hex SHA-256 of the parts (NUL-joined): stable across runs, machines and Python versions."""
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def unit_interval(*parts: str) -> float:
    """Map parts to a deterministic float in [0, 1) — the split's bucket position."""
    return int(stable_hash(*parts)[:15], 16) / float(16**15)


def words(text: str) -> list[str]:
    """Casefolded word tokens (what F1, exact match and repetition count)."""
    return _WORD.findall(text.casefold())


def exact_match(answer: str, reference: str) -> float:
    """1.0 if the answers are equal after normalisation (case, spacing, edge punctuation)."""
    return float(normalize(answer) == normalize(reference))


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style token F1 (bag of words overlap); two empty answers score 1."""
    a, r = words(answer), words(reference)
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)
