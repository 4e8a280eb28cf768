"""Text normalisation shared by dedupe (format), split keys (split) and answer scoring (evaluate)."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WS = re.compile(r"\s+")
_EDGE_PUNCT = re.compile(r"^[\s\W_]+|[\s\W_]+$", re.UNICODE)


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
