"""format: normalised rows → training examples rendered with a template (the dataset DVC tracks).

    python -m stages.format [-S format.template=chat]

Each example keeps the prompt/answer boundary as `segments`: a list of `[text, trained]` pairs, so
finetune puts loss on the answers only (the model stops echoing questions). The templates (`tagged`,
`chat`, `text`) live in tagtune/templates.py; their facts are written as `template.json`.

Out-of-domain questions from `format.refusal.questions` become rows answered with the refusal (not for
classification data: skipped with a note; a refusal question that is also an in-domain question is an
error). Exact and normalised duplicates are removed (counted in stats.json). `preview.md` shows the
first rendered examples with the trained part marked (long lines clipped) — the first thing to read
when a template looks off.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tagtune.config import FormatConfig, Params
from tagtune.errors import DataError
from tagtune.io import atomic_path, read_jsonl, write_json, write_jsonl
from tagtune.templates import Renderer, refusal_answer, renderer, template_facts, write_template
from tagtune.text import normalize, stable_hash

TRAIN_MARK = ("⟦", "⟧")  # how preview.md marks the trained spans
WRITES = ("examples.jsonl", "template.json", "stats.json", "preview.md")  # paths.format


def _read_refusal_questions(path: Path) -> list[tuple[int, str]]:
    """(line, question) pairs from a one-question-per-line UTF-8 file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(path, None, f"cannot read refusal questions: {e.strerror}") from None
    out = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        try:
            q = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(path, i, "not valid UTF-8") from None
        if q:
            out.append((i, q))
    if not out:
        raise DataError(path, None, "no refusal questions (file is empty)")
    return out


def _example(row: dict[str, Any], kind: str, render: Renderer, cfg: FormatConfig) -> dict[str, Any]:
    """One tagged example (causal-LM rows) from a normalised `chat` or `text` row."""
    base = {"source": row["source"], "line": row["line"], "group": row.get("group"), "kind": kind}
    if row["kind"] == "text":
        return {
            **base,
            "segments": [[row["text"], True]],
            "question": "",
            "reference": row["text"],
            "prompt": "",
        }
    msgs = row["messages"]
    segs = render(msgs, cfg)
    # evaluation generates the last answer from everything before it
    last = max(i for i, s in enumerate(segs) if s[1])
    return {
        **base,
        "segments": segs,
        "prompt": "".join(s[0] for s in segs[:last]),
        "question": next(m["content"] for m in reversed(msgs) if m["role"] == "user"),
        "reference": msgs[-1]["content"],
    }


def _content_keys(row: dict[str, Any]) -> tuple[str, str]:
    """(exact, normalised) keys of a row's content: each message/text normalised on its own."""
    if row["kind"] == "chat":
        fields = [f"{m['role']}:{m['content']}" for m in row["messages"]]
        norm = [f"{m['role']}:{normalize(m['content'])}" for m in row["messages"]]
    else:
        fields = [row["text"], str(row.get("label", ""))]
        norm = [normalize(row["text"]), str(row.get("label", ""))]
    return "\0".join(fields), "\0".join(norm)


def _rendered(
    rows: list[dict[str, Any]], source: Path, render: Renderer, cfg: FormatConfig, base_dir: Path
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(examples, their (exact, normalised) content keys): the ingested rows, then the refusal rows."""
    examples: list[dict[str, Any]] = []
    keys: list[tuple[str, str]] = []
    for row in rows:
        if row.get("kind") == "refusal":  # defines the refusal answer (see `_refusal`), not an example
            continue
        if row.get("kind") == "classification":
            examples.append(
                {
                    "source": row["source"],
                    "line": row["line"],
                    "group": row.get("group"),
                    "kind": "classification",
                    "text": row["text"],
                    "label": str(row["label"]),
                }
            )
        elif row.get("kind") in ("chat", "text"):
            n_turns = sum(m["role"] == "assistant" for m in row.get("messages", []))
            kind = "text" if row["kind"] == "text" else ("qa" if n_turns == 1 else "chat")
            examples.append(_example(row, kind, render, cfg))
        else:
            raise DataError(source, None, f"row with unknown kind {row.get('kind')!r}")
        keys.append(_content_keys(row))
    if cfg.refusal is not None and cfg.refusal.questions:
        answer = refusal_answer({"refusal_answer": _refusal(rows, cfg)})
        asked = {
            normalize(e["question"]): f"{e['source']}:{e['line']}" for e in examples if e.get("question")
        }
        for line, q in _read_refusal_questions(base_dir / cfg.refusal.questions):
            if (origin := asked.get(normalize(q))) is not None:
                raise DataError(
                    cfg.refusal.questions,
                    line,
                    f"{q!r} is also an in-domain question ({origin}): a question cannot be both answered "
                    "and refused; remove it from format.refusal.questions",
                )
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
            row = {"source": cfg.refusal.questions, "line": line, "messages": msgs, "kind": "chat"}
            examples.append(_example(row, "refusal", render, cfg))
            keys.append(_content_keys(row))
    return examples, keys


def _refusal(rows: list[dict[str, Any]], cfg: FormatConfig) -> str | None:
    """The refusal answer: `format.refusal.answer`, else the one the data defines, else None (default)."""
    if cfg.refusal is not None and cfg.refusal.answer:
        return cfg.refusal.answer
    return next((r["text"] for r in rows if r.get("kind") == "refusal"), None)


def _refusal_fits(rows: list[dict[str, Any]], source: Path, cfg: FormatConfig) -> str | None:
    """Why `format.refusal` does not apply to these rows (classification data), else None.

    Raises:
        DataError: classification rows mixed with chat/text rows (no single task fits them).
    """
    kinds = {r.get("kind") for r in rows}
    if "classification" not in kinds:
        return None
    if kinds != {"classification"}:
        raise DataError(
            source, None, f"classification rows mixed with {sorted(kinds - {'classification'})} rows"
        )
    if cfg.refusal is None:
        return None
    return "format.refusal does not apply to classification data (refusals are answers, not labels)"


def _overridden(
    rows: list[dict[str, Any]], examples: list[dict[str, Any]], keys: list[tuple[str, str]]
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], int]:
    """(examples, keys) without the Q&A examples whose question an `overrides` source answers
    (ingest.sources.N.overrides), and how many were dropped."""
    corrected = {
        (r["source"], r["line"]): normalize(next(m["content"] for m in r["messages"] if m["role"] == "user"))
        for r in rows
        if r.get("overrides") and r.get("kind") == "chat" and any(m["role"] == "user" for m in r["messages"])
    }
    questions = set(corrected.values())
    keep = [
        not (ex["kind"] == "qa" and (ex["source"], ex["line"]) not in corrected and normalize(ex["question"]) in questions)
        for ex in examples
    ]  # fmt: skip
    dropped = keep.count(False)
    return (
        [e for e, k in zip(examples, keep, strict=True) if k],
        [x for x, k in zip(keys, keep, strict=True) if k],
        dropped,
    )


def _dedupe(
    examples: list[dict[str, Any]], keys: list[tuple[str, str]]
) -> tuple[list[dict[str, Any]], int, int]:
    """(first example of each content, exact duplicates dropped, normalised duplicates dropped).

    Each kept example gets its id: a hash of its normalised content, stable across runs.
    """
    seen_exact: set[str] = set()
    seen_norm: set[str] = set()
    kept, n_exact, n_norm = [], 0, 0
    for ex, (exact, norm) in zip(examples, keys, strict=True):
        if exact in seen_exact:
            n_exact += 1
            continue
        if norm in seen_norm:
            n_norm += 1
            continue
        seen_exact.add(exact)
        seen_norm.add(norm)
        ex["id"] = stable_hash(norm)[:16]
        kept.append(ex)
    return kept, n_exact, n_norm


def format_examples(
    ingested: Path, out_dir: Path, cfg: FormatConfig, base_dir: Path = Path("."), tokenizer: Any = None
) -> dict[str, Any]:
    """Render `ingested/rows.jsonl` into `out_dir/{examples.jsonl,template.json,preview.md,stats.json}`.

    Args:
        ingested: the ingest stage's output directory.
        out_dir: written atomically (nothing is left behind on error).
        cfg: the `format:` section.
        base_dir: what relative paths in cfg (refusal questions) are relative to.
        tokenizer: the base model's tokenizer; required only for `template: chat`.

    Returns:
        Counts: rows in, examples out, duplicates removed (exact / normalised), refusal rows.

    Raises:
        DataError: unreadable input, a bad refusal file, or a template the data cannot use.
    """
    source = Path(ingested) / "rows.jsonl"
    rows = read_jsonl(source)
    if skipped := _refusal_fits(rows, source, cfg):
        print(f"tagtune format: note: {skipped}; its rows were skipped", file=sys.stderr)
        cfg = cfg.model_copy(update={"refusal": None})
    examples, keys = _rendered(rows, source, renderer(cfg, tokenizer), cfg, Path(base_dir))
    examples, keys, n_over = _overridden(rows, examples, keys)
    kept, n_exact, n_norm = _dedupe(examples, keys)
    if not kept:
        raise DataError(source, None, "no examples to format")
    task = "classification" if all(e["kind"] == "classification" for e in kept) else "causal_lm"
    stats = {
        "rows_in": len(rows),
        "examples": len(kept),
        "refusal_rows": sum(e["kind"] == "refusal" for e in examples),
        **({"refusal_skipped": skipped} if skipped else {}),
        "exact_duplicates": n_exact,
        "normalized_duplicates": n_norm,
        "overridden": n_over,  # answers replaced by an `overrides` source's (a user's correction)
        "kinds": {k: sum(e["kind"] == k for e in kept) for k in sorted({e["kind"] for e in kept})},
    }
    with atomic_path(out_dir, owned=WRITES) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / "examples.jsonl", kept)
        write_template(tmp, template_facts(cfg, task, _refusal(rows, cfg)))
        write_json(tmp / "stats.json", stats)
        (tmp / "preview.md").write_text(_preview(kept, cfg), encoding="utf-8")
    return stats


PREVIEW_LINE_CHARS, PREVIEW_LINES = 300, 40  # per line / per example shown: a 10 MB line stays a preview


def _clip(body: str) -> str:
    """`body` with long lines cut and at most PREVIEW_LINES lines, saying how much was left out."""
    lines = body.split("\n")
    out = [
        ln
        if len(ln) <= PREVIEW_LINE_CHARS
        else f"{ln[:PREVIEW_LINE_CHARS]} … ({len(ln) - PREVIEW_LINE_CHARS} more characters)"
        for ln in lines[:PREVIEW_LINES]
    ]
    if len(lines) > PREVIEW_LINES:
        out.append(f"… ({len(lines) - PREVIEW_LINES} more lines)")
    return "\n".join(out)


def _preview(examples: list[dict[str, Any]], cfg: FormatConfig) -> str:
    o, c = TRAIN_MARK
    out = [
        f"# Tagged preview (template `{cfg.template}`)\n",
        f"Text inside {o} {c} is trained (has loss); the rest is prompt (masked).\n",
    ]
    for ex in examples[: cfg.preview_rows]:
        out.append(f"## {ex['kind']} — {ex['source']}:{ex['line']}\n")
        if ex["kind"] == "classification":
            body = f"{ex['text']}\n→ label: {o}{ex['label']}{c}"
        else:
            body = "".join(f"{o}{s}{c}" if t else s for s, t in ex["segments"])
        out.append("```text\n" + _clip(body) + "\n```\n")
    return "\n".join(out)


def run(p: Params, root: Path) -> dict[str, Any]:
    tokenizer = None
    if p.format.template == "chat":  # the chat template is the base model's own
        from tagtune.models import load_base_tokenizer

        tokenizer = load_base_tokenizer(p.model)
    return format_examples(root / p.paths.ingest, root / p.paths.format, p.format, root, tokenizer)


if __name__ == "__main__":
    from stages import main

    raise SystemExit(main("format"))
