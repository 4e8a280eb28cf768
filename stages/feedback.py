"""feedback: snapshot the UI's feedback table into a deterministic, DVC-tracked file.

    python -m stages.feedback               # ui.feedback_db → paths.feedback/{feedback,examples}.jsonl

DVC cannot hash a database query, so `dvc repro` alone never saw new 👍/👎 and corrections. This
stage runs on every `dvc repro` (`always_changed: true` in dvc.yaml) and writes the table's rows sorted
by id, one canonical JSON line each: when nothing new was recorded the bytes are identical, so DVC
runs nothing downstream; a new verdict changes the file and retrains from ingest on.

- `feedback.jsonl`: every verdict with its provenance — when (`created_at`), which registered model
  version answered (`model_name`, `model_version`), what it answered (`model_answer`), the rating and
  the correction (preference tuning reads these).
- `examples.jsonl`: what SFT trains on (an ingest source in params.yaml): per question (trimmed,
  case-folded), the latest verdict, if it has a training answer (a 👍 keeps the model's answer, a
  correction replaces it, a bare 👎 removes the question), with the provenance of that verdict.
- `stats.json`: counts and the sha256 of `feedback.jsonl`.

A missing database means no feedback yet (empty files); a file that is not a tagtune feedback database
fails naming it, and nothing is written.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

from tagtune.config import Params
from tagtune.errors import DataError
from tagtune.io import atomic_path, write_json, write_jsonl
from tagtune.preference import latest_verdicts

COLUMNS = (
    "id",
    "created_at",
    "question",
    "model_answer",
    "rating",
    "correction",
    "answer",
    "model_name",
    "model_version",
)  # fmt: skip  (the `feedback` table of tagtune/app/ui.py)
FEEDBACK_FILE = "feedback.jsonl"
EXAMPLES_FILE = "examples.jsonl"
WRITES = (FEEDBACK_FILE, EXAMPLES_FILE, "stats.json")


def _read(db: Path) -> list[dict[str, Any]]:
    """Every row of the feedback table, by id; [] when the database does not exist yet."""
    if not db.is_file():
        return []
    try:  # read-only: the UI may be writing; WAL/rollback journals keep this read consistent
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            cur = con.execute(f"SELECT {', '.join(COLUMNS)} FROM feedback ORDER BY id")
            return [dict(zip(COLUMNS, row, strict=True)) for row in cur.fetchall()]
    except sqlite3.DatabaseError as e:
        raise DataError(db, None, f"not a tagtune feedback database (ui.feedback_db): {e}") from None


def _examples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest verdict per question, kept when it has a training answer (the UI's feedback_examples)."""
    keep = [r for r in latest_verdicts(rows) if r["answer"] is not None]
    provenance = ("created_at", "rating", "model_name", "model_version")
    return [
        {
            "question": r["question"],
            "answer": r["answer"],
            "feedback_id": r["id"],
            **{k: r[k] for k in provenance},
        }
        for r in keep
    ]


def snapshot_feedback(db: Path, out_dir: Path) -> dict[str, Any]:
    """Write `out_dir/{feedback,examples}.jsonl` + stats.json from the feedback table at `db`.

    Returns:
        stats: verdicts, thumbs up/down, corrections, examples, sha256 of feedback.jsonl.

    Raises:
        DataError: `db` exists but is not a tagtune feedback database.
    """
    rows = _read(Path(db))
    examples = _examples(rows)
    with atomic_path(out_dir, owned=WRITES) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / FEEDBACK_FILE, rows)
        write_jsonl(tmp / EXAMPLES_FILE, examples)
        stats = {
            "verdicts": len(rows),
            "thumbs_up": sum(r["rating"] == 1 for r in rows),
            "thumbs_down": sum(r["rating"] == -1 for r in rows),
            "corrections": sum(r["correction"] is not None for r in rows),
            "examples": len(examples),
            "sha256": hashlib.sha256((tmp / FEEDBACK_FILE).read_bytes()).hexdigest(),
        }
        write_json(tmp / "stats.json", stats)
    return stats


def run(p: Params, root: Path) -> dict[str, Any]:
    return snapshot_feedback(root / p.ui.feedback_db, root / p.paths.feedback)


if __name__ == "__main__":
    from stages import main

    raise SystemExit(main("feedback"))
