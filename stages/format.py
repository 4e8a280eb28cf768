"""format: normalised rows → the tagged training text (the "raw → tagged" dataset DVC tracks).

    python -m stages.format [-S format.template=chat]

Each output row keeps the prompt/answer boundary as `segments`: a list of `[text, trained]` pairs,
so finetune puts loss on the answers only (the model stops echoing questions). Templates:

- `tagged` (default, the seeds' format): `{question} <QUESTION>\\n{answer} <END>`
- `chat`: the base model's own chat template (SmolLM2 has one); system prompt configurable
- `text`: raw text, loss on everything

Out-of-domain questions from `format.refusal.questions` become rows answered with the refusal.
Exact and normalised duplicates are removed (counted in stats.json). `preview.md` shows the first
rendered examples with the trained part marked — the first thing to read when a template looks off.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tagtune.cli_util import run_stage
from tagtune.config import FormatConfig, Params
from tagtune.errors import DataError
from tagtune.io import atomic_path, read_jsonl, write_json, write_jsonl
from tagtune.text import normalize, stable_hash

Segments = list[list[Any]]  # [[text, trained: bool], ...]
TRAIN_MARK = ("⟦", "⟧")  # how preview.md marks the trained spans


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


def _render_tagged(messages: list[dict[str, str]], cfg: FormatConfig) -> Segments:
    segs: Segments = []
    for m in messages:
        if m["role"] == "system":
            segs.append([m["content"] + "\n", False])
        elif m["role"] == "user":
            segs.append([f"{m['content']} {cfg.tags.question}\n", False])
        else:
            segs.append([f"{m['content']} {cfg.tags.end}", True])
            segs.append(["\n", False])
    return segs[:-1]  # drop the separator after the last answer


def _render_text(messages: list[dict[str, str]], cfg: FormatConfig) -> Segments:
    return [["\n".join(m["content"] for m in messages), True]]


def _chat_renderer(tokenizer: Any) -> Callable[[list[dict[str, str]], FormatConfig], Segments]:
    """Render with the tokenizer's chat template, finding each answer span by prefix difference."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("format.template", None, "template 'chat' needs a base model with a chat template")

    def render(messages: list[dict[str, str]], cfg: FormatConfig) -> Segments:
        if cfg.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        segs: Segments = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (before.startswith(done) and full.startswith(before)):
                raise DataError("format.template", None, "chat template is not prefix-stable; use 'tagged'")
            segs.append([before[len(done) :], False])
            segs.append([full[len(before) :], True])
            done = full
        return segs

    return render


RENDERERS: dict[str, Callable[[list[dict[str, str]], FormatConfig], Segments]] = {
    "tagged": _render_tagged,
    "text": _render_text,
}


def _example(row: dict[str, Any], kind: str, render, cfg: FormatConfig) -> dict[str, Any]:
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


def format(
    ingested: Path, out_dir: Path, cfg: FormatConfig, base_dir: Path = Path("."), tokenizer: Any = None
) -> dict[str, Any]:
    """Render `ingested/rows.jsonl` into `out_dir/{tagged.jsonl,meta.json,preview.md,stats.json}`.

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
    rows = read_jsonl(Path(ingested) / "rows.jsonl")
    render = _chat_renderer(tokenizer) if cfg.template == "chat" else RENDERERS[cfg.template]
    examples: list[dict[str, Any]] = []
    keys: list[tuple[str, str]] = []
    for row in rows:
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
            raise DataError(Path(ingested) / "rows.jsonl", None, f"row with unknown kind {row.get('kind')!r}")
        keys.append(_content_keys(row))
    n_refusal = 0
    if cfg.refusal is not None and cfg.refusal.questions:
        qpath = base_dir / cfg.refusal.questions
        for line, q in _read_refusal_questions(qpath):
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": cfg.refusal.answer}]
            row = {"source": cfg.refusal.questions, "line": line, "messages": msgs, "kind": "chat"}
            examples.append(_example(row, "refusal", render, cfg))
            keys.append(_content_keys(row))
            n_refusal += 1

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
    if not kept:
        raise DataError(Path(ingested) / "rows.jsonl", None, "no examples to format")

    special = (
        [cfg.tags.question, cfg.tags.end] if cfg.template == "tagged" and cfg.tags.special_tokens else []
    )
    meta = {
        "template": cfg.template,
        "format": cfg.model_dump(),  # lets inference render a question exactly as training did
        "tags": cfg.tags.model_dump(),
        # generation stops at this string; finetune appends EOS after it so the model learns to stop
        "end_marker": cfg.tags.end if cfg.template == "tagged" else None,
        "special_tokens": special,
        "refusal_answer": cfg.refusal.answer if cfg.refusal else None,
        "task": "classification" if all(e["kind"] == "classification" for e in kept) else "causal_lm",
    }
    stats = {
        "rows_in": len(rows),
        "examples": len(kept),
        "refusal_rows": n_refusal,
        "exact_duplicates": n_exact,
        "normalized_duplicates": n_norm,
        "kinds": {k: sum(e["kind"] == k for e in kept) for k in sorted({e["kind"] for e in kept})},
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / "tagged.jsonl", kept)
        write_json(tmp / "meta.json", meta)
        write_json(tmp / "stats.json", stats)
        (tmp / "preview.md").write_text(_preview(kept, cfg), encoding="utf-8")
    return stats


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
        out.append("```text\n" + body + "\n```\n")
    return "\n".join(out)


SENTINEL = "\x00"  # stands in for the answer when rendering an inference prompt


def render_prompt(question: str, meta: dict[str, Any], tokenizer: Any = None) -> str:
    """The prompt a model trained on this template expects for `question` (used at inference).

    Renders [user question, assistant SENTINEL] with the same renderer training used and keeps the
    text before the sentinel, so inference can never drift from the training format.
    """
    cfg = FormatConfig.model_validate(meta["format"])
    render = _chat_renderer(tokenizer) if cfg.template == "chat" else RENDERERS[cfg.template]
    msgs = [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": SENTINEL}]
    text = "".join(s for s, _ in render(msgs, cfg))
    return text[: text.index(SENTINEL)]


def _run(p: Params) -> dict[str, Any]:
    tokenizer = None
    if p.format.template == "chat":
        from tagtune.models import load_tokenizer, resolve_base

        tokenizer = load_tokenizer(resolve_base(p.model.base, p.model.cache_dir, p.model.allow_pickle))
    return format(Path(p.paths.ingested), Path(p.paths.tagged), p.format, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    return run_stage("format", _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
