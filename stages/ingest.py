"""ingest: every configured source → one normalised rows.jsonl (the pipeline's first stage).

    python -m stages.ingest [-S ingest.on_invalid=skip]

Reads each entry of `ingest.sources` (a file, a directory, a glob, or an SQL query) in one of the
formats below and writes `rows.jsonl` + `stats.json` to `paths.ingest`. Every row keeps its
provenance (`source`, `line`) and is one of three kinds:

- `chat`: `messages` = optional system, then alternating user/assistant, ending with assistant
- `text`: `text`
- `classification`: `text` + `label`

Formats (`format: auto` picks one from the extension and the columns):

- `text`: one example per non-blank line
- `qa`: question/answer columns (+ optional group) from .csv/.jsonl/.json/.parquet
- `tagged`: the seed format, `What is X? <QUESTION>` newline `X is Y. <END>`; a block with no question
  (`<QUESTION>` newline `Sorry, I only know about X. <END>`) defines the refusal answer (kind `refusal`)
- `guanaco`: `### Human: … ### Assistant: …`, one conversation per line or per `text` value
- `openorca`: system_prompt (may be empty), question, response columns
- `messages`: a `messages`/`conversations` list, OpenAI `{role, content}` or ShareGPT `{from, value}`
- `classification`: text + label columns
- `sql`: a SQLAlchemy `url` (or SQLite `path`) + `query`; result columns are read like a table

Bad input raises DataError naming `file:line`; `on_invalid: skip` skips bad records instead (counted
in stats.json), never unreadable files or sources left empty. Output is replaced atomically.

Sources are regular files (a FIFO would hang, /dev/zero never ends) inside the repository, where DVC
tracks them (`ingest.allow_outside: true` reads files elsewhere), at most `ingest.max_file_mb` per file
and `ingest.max_line_chars` per line; a NUL byte is binary data, not text. SQL sources only read.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tagtune.config import IngestConfig, Params, SourceConfig
from tagtune.errors import ConfigError, DataError
from tagtune.io import atomic_path, write_json, write_jsonl


class _Invalid(ValueError):
    """A problem with one record; the caller adds file and line (and may skip it)."""


Record = dict[str, Any] | str  # a table row, or one line / block of a text file
Records = Iterator[tuple[int, Record | _Invalid]]  # (line or 1-based record index, record)

MAX_SKIPPED_EXAMPLES = 5
KNOWLEDGE = "knowledge.jsonl"  # rows of the `train: false` sources (written only when there are some)
TABLE_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")
DB_EXTENSIONS = (".db", ".sqlite", ".sqlite3")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
GUANACO_TURN = re.compile(r"###\s*(Human|Assistant):")


# ------------------------------------------------------------------------------------- field helpers
def _text(rec: Record, column: str) -> str:
    """A required, non-empty text field, stripped."""
    if isinstance(rec, str):
        value: Any = rec
    elif column not in rec:
        raise _Invalid(f"missing field {column!r} (has: {', '.join(rec) or 'nothing'})")
    else:
        value = rec[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Invalid(f"empty {column!r}")
    if not isinstance(value, str):
        raise _Invalid(f"{column!r} must be text, got {type(value).__name__}")
    return value.strip()


def _label(rec: Record, column: str) -> str:
    """The class label as a string; integer labels (0/1) are common in public datasets."""
    value = rec.get(column) if isinstance(rec, dict) else None
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Invalid(f"missing label {column!r}")
    if not isinstance(value, str | int):
        raise _Invalid(f"label {column!r} must be text or an integer, got {type(value).__name__}")
    return str(value).strip()


def _group(rec: Record, column: str) -> str | None:
    """The optional group (several phrasings of one fact); None when absent or empty."""
    value = rec.get(column) if isinstance(rec, dict) else None
    if value is None or not str(value).strip():
        return None
    return str(value).strip()


def _chat(turns: list[tuple[str, Any]], group: str | None = None) -> dict[str, Any]:
    """A chat row from (role, content) turns, checking the shape every later stage relies on."""
    messages: list[dict[str, str]] = []
    for i, (role, content) in enumerate(turns, 1):
        if not isinstance(content, str):
            raise _Invalid(f"message {i} ({role}): content must be text, got {type(content).__name__}")
        content = content.strip()
        if role == "system":
            if messages:
                raise _Invalid(f"message {i}: a system message may only come first")
            if not content:
                continue  # an empty system prompt says nothing (OpenOrca has many)
            messages.append({"role": role, "content": content})
            continue
        if not content:
            raise _Invalid(f"message {i} ({role}): empty content")
        previous = messages[-1]["role"] if messages else "system"
        expected = "assistant" if previous == "user" else "user"
        if role != expected:
            raise _Invalid(
                f"message {i}: expected {expected} after {previous}, got {role} (turns must alternate)"
            )
        messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "assistant":
        raise _Invalid("conversation must end with an assistant message")
    return {"kind": "chat", "messages": messages, "group": group}


# --------------------------------------------------------------------- formats: record → row fields
def _text_row(rec: Record, src: SourceConfig) -> dict[str, Any]:
    return {"kind": "text", "text": _text(rec, src.text_column), "group": _group(rec, src.group_column)}


def _qa_row(rec: Record, src: SourceConfig) -> dict[str, Any]:
    turns = [("user", _text(rec, src.question_column)), ("assistant", _text(rec, src.answer_column))]
    return _chat(turns, _group(rec, src.group_column))


def _tagged_row(rec: Record, src: SourceConfig) -> dict[str, Any]:
    assert isinstance(rec, dict)  # _tagged_blocks yields {"question", "answer"}
    if not rec["answer"]:
        raise _Invalid(f"empty answer before {src.end_tag}")
    if not rec["question"]:  # seed 000: a block with no question defines the refusal answer
        return {"kind": "refusal", "text": rec["answer"], "group": None}
    return _chat([("user", rec["question"]), ("assistant", rec["answer"])])


def _guanaco_row(rec: Record, src: SourceConfig) -> dict[str, Any]:
    parts = GUANACO_TURN.split(_text(rec, src.text_column))
    # re.split with a group gives [before, speaker, content, speaker, content, ...]
    if parts[0].strip():
        raise _Invalid(f"text before the first '### Human:': {parts[0].strip()[:40]!r}")
    speakers = parts[1::2]
    if "Assistant" not in speakers:
        raise _Invalid("no '### Assistant:' turn (expected '### Human: … ### Assistant: …')")
    turns = [("user" if s == "Human" else "assistant", c) for s, c in zip(speakers, parts[2::2], strict=True)]
    return _chat(turns, _group(rec, src.group_column))


def _openorca_row(rec: Record, src: SourceConfig) -> dict[str, Any]:
    system = rec.get(src.system_column) if isinstance(rec, dict) else None
    turns = [("system", system or ""), ("user", _text(rec, src.question_column))]
    turns.append(("assistant", _text(rec, src.response_column)))
    return _chat(turns, _group(rec, src.group_column))


def _messages_row(rec: Record, src: SourceConfig) -> dict[str, Any]:
    column = src.messages_column
    value = rec.get(column) if isinstance(rec, dict) else None
    if isinstance(value, str):  # CSV cells and some Parquet exports hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _Invalid(f"{column!r} is not a JSON list: {e.msg}") from None
    if value is None:
        raise _Invalid(f"missing field {column!r}")
    if not isinstance(value, list) or not value:
        raise _Invalid(f"{column!r} must be a non-empty list of messages")
    turns = []
    for i, m in enumerate(value, 1):
        if isinstance(m, dict) and "role" in m:
            role, content = m["role"], m.get("content")
        elif isinstance(m, dict) and "from" in m:
            role, content = m["from"], m.get("value")
        else:
            raise _Invalid(f"message {i}: expected {{role, content}} or {{from, value}}, got {m!r:.60}")
        if not isinstance(role, str) or role not in ROLES:
            raise _Invalid(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        turns.append((ROLES[role], content))
    return _chat(turns, _group(rec, src.group_column))


def _classification_row(rec: Record, src: SourceConfig) -> dict[str, Any]:
    text, label = _text(rec, src.text_column), _label(rec, src.label_column)
    return {"kind": "classification", "text": text, "label": label, "group": _group(rec, src.group_column)}


FORMATS: dict[str, Callable[[Record, SourceConfig], dict[str, Any]]] = {
    "text": _text_row,
    "qa": _qa_row,
    "tagged": _tagged_row,
    "guanaco": _guanaco_row,
    "openorca": _openorca_row,
    "messages": _messages_row,
    "classification": _classification_row,
}
# The columns a table needs for each format (SourceConfig attribute names).
REQUIRED_COLUMNS = {
    "text": ("text_column",),
    "qa": ("question_column", "answer_column"),
    "guanaco": ("text_column",),
    "openorca": ("question_column", "response_column"),
    "messages": ("messages_column",),
    "classification": ("text_column", "label_column"),
}


# -------------------------------------------------------------------------------- reading files
def _read_text(path: Path, name: str, max_line: int) -> str:
    """The whole file as text; a wrong encoding, a NUL byte (binary data) or a line longer than
    `max_line` characters is a file error, not a skippable record."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(name, None, f"cannot read: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: Excel writes a BOM before CSV headers
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        problem = f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); save the file as UTF-8"
        raise DataError(name, line, problem) from None
    if (nul := text.find("\x00")) != -1:
        raise DataError(name, text.count("\n", 0, nul) + 1, "NUL byte (binary data, not text)")
    if len(text) > max_line:
        for i, line in enumerate(text.split("\n"), 1):
            if len(line) > max_line:
                raise DataError(
                    name, i, f"line of {len(line)} characters, over ingest.max_line_chars={max_line}"
                )
    return text


def _lines(text: str) -> Records:
    """Non-blank lines, numbered like an editor does (split on \\n only, unlike str.splitlines)."""
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield i, line.rstrip("\r")


def _tagged_blocks(text: str, src: SourceConfig) -> Records:
    """`question <QUESTION> answer <END>` blocks; an answer may span lines until the end tag."""
    tags = re.compile(f"{re.escape(src.question_tag)}|{re.escape(src.end_tag)}")

    def start_line(pos: int) -> int:  # the line of the first non-blank character at or after pos
        stripped = len(text) - len(text[pos:].lstrip())
        return text.count("\n", 0, stripped) + 1

    block, question, answer_at = 0, None, 0  # block: where the current block's text begins
    for m in tags.finditer(text):
        if m.group() == src.question_tag:
            if question is not None:  # the previous question never got its end tag
                yield start_line(block), _Invalid(f"question without {src.end_tag}")
                block = max(text.rfind("\n", 0, m.start()) + 1, answer_at)  # resume on this line
            question, answer_at = text[block : m.start()].strip(), m.end()
        elif question is None:
            problem = f"answer without question ({src.end_tag} with no {src.question_tag})"
            yield start_line(block), _Invalid(problem)
            block = m.end()
        else:
            yield start_line(block), {"question": question, "answer": text[answer_at : m.start()].strip()}
            block, question = m.end(), None
    if question is not None:
        yield start_line(block), _Invalid(f"question without {src.end_tag}")
    elif text[block:].strip():
        yield start_line(block), _Invalid(f"text outside a block (no {src.question_tag} or {src.end_tag})")


def _read_csv(path: Path, name: str, max_line: int) -> tuple[list[str] | None, Records]:
    text = _read_text(path, name, max_line)
    csv.field_size_limit(max(max_line, 131072))  # a field may be as long as a line
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, [])
    except csv.Error as e:
        raise DataError(name, reader.line_num, f"invalid CSV: {e}") from None
    if not any(h.strip() for h in header):
        raise DataError(name, 1, "no header row (the first line must name the columns)")
    header = [h.strip() for h in header]
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise DataError(name, 1, f"duplicate column {', '.join(map(repr, duplicates))} in the header")

    def records() -> Records:
        end = reader.line_num
        try:
            for row in reader:
                start, end = end + 1, reader.line_num  # a quoted field may span several lines
                if not row:
                    continue  # blank line
                if len(row) != len(header):
                    yield start, _Invalid(f"expected {len(header)} fields like the header, got {len(row)}")
                else:
                    yield start, dict(zip(header, row, strict=True))
        except csv.Error as e:  # e.g. an unclosed quote: the rest of the file cannot be parsed
            hint = " (an unclosed quote?)" if "end of data" in str(e) else ""
            raise DataError(name, end + 1, f"invalid CSV: {e}{hint}") from None

    return header, records()


def _as_object(obj: Any) -> dict[str, Any] | _Invalid:
    """A JSON record must be an object (one row); anything else is an invalid record."""
    return obj if isinstance(obj, dict) else _Invalid(f"expected a JSON object, got {type(obj).__name__}")


def _read_jsonl(path: Path, name: str, max_line: int) -> tuple[list[str] | None, Records]:
    def records() -> Records:
        for i, line in _lines(_read_text(path, name, max_line)):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, _Invalid(f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            yield i, _as_object(obj)

    return None, records()  # no header: each record brings its own fields


def _read_json(path: Path, name: str, max_line: int) -> tuple[list[str] | None, Records]:
    try:
        data = json.loads(_read_text(path, name, max_line))
    except json.JSONDecodeError as e:
        raise DataError(name, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(name, None, f"top level must be a list of objects, got {type(data).__name__}")
    return None, ((i, _as_object(obj)) for i, obj in enumerate(data, 1))


def _read_parquet(path: Path, name: str, max_line: int) -> tuple[list[str] | None, Records]:
    import pyarrow as pa  # imported here: most runs read no Parquet, and pyarrow is slow to import
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(name, None, f"cannot read Parquet: {e}") from None

    def records() -> Records:
        index = itertools.count(1)
        try:
            for batch in pf.iter_batches():  # in batches: public datasets can be large
                for rec in batch.to_pylist():
                    yield next(index), rec
        except (OSError, pa.ArrowException) as e:
            raise DataError(name, None, f"cannot read Parquet: {e}") from None

    return pf.schema_arrow.names, records()


TABLE_READERS: dict[str, Callable[[Path, str, int], tuple[list[str] | None, Records]]] = {
    ".csv": _read_csv,
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


# ------------------------------------------------------------------------------------------ tables
def _sniff_columns(columns: list[str], first: dict[str, Any], src: SourceConfig) -> str | None:
    """The format a table's columns suggest, or None."""
    cols = set(columns)
    if src.messages_column in cols:
        return "messages"
    if {src.system_column, src.question_column, src.response_column} <= cols:
        return "openorca"
    if {src.question_column, src.answer_column} <= cols:
        return "qa"
    if {src.text_column, src.label_column} <= cols:
        return "classification"
    if src.text_column in cols:
        value = first.get(src.text_column)
        return "guanaco" if isinstance(value, str) and GUANACO_TURN.search(value) else "text"
    return None


def _table(
    name: str,
    fmt: str,
    src: SourceConfig,
    columns: list[str] | None,
    records: Records,
    header_line: int | None,
) -> tuple[str, SourceConfig, Records]:
    """Resolve `auto` from the columns and check the required ones exist before reading rows."""
    first = None
    if columns is None or fmt == "auto":
        # Peek at the first readable record: JSON lines have no header, and guanaco is told
        # apart from plain text by content.
        buffered = []
        for line, rec in records:
            buffered.append((line, rec))
            if isinstance(rec, dict):
                first = rec
                break
        records = itertools.chain(buffered, records)
    known = columns if columns is not None else list(first or {})
    if src.messages_column not in known and "conversations" in known:
        src = src.model_copy(update={"messages_column": "conversations"})  # ShareGPT's name
    if fmt == "auto":
        if first is None and src.optional:
            # an optional source may be empty (the feedback view before any correction): no rows
            return EMPTY, src, iter(())
        if first is None:
            raise DataError(name, None, "no rows (empty source)")
        fmt = _sniff_columns(known, first, src) or ""
        if not fmt:
            raise DataError(
                name,
                header_line,
                f"cannot tell the format from the columns ({', '.join(known)}): expected "
                f"{src.messages_column!r}, {src.question_column!r}+{src.answer_column!r}, "
                f"{src.text_column!r}(+{src.label_column!r}) or {src.system_column!r}+"
                f"{src.question_column!r}+{src.response_column!r}; or set `format:` and the *_column names",
            )
    elif columns is not None:  # a header or schema: a missing column is a file error, not N bad rows
        missing = [getattr(src, a) for a in REQUIRED_COLUMNS[fmt] if getattr(src, a) not in columns]
        if missing:
            has = ", ".join(columns) or "none"
            raise DataError(
                name, header_line, f"format {fmt!r}: missing column {', '.join(missing)} (has: {has})"
            )
    return fmt, src, records


def _open_file(path: Path, name: str, src: SourceConfig, max_line: int) -> tuple[str, SourceConfig, Records]:
    """The resolved format, the effective source config and the records of one file."""
    fmt, ext = src.format, path.suffix.lower()
    if (
        fmt == "tagged"
        or (fmt in ("text", "guanaco") and ext not in TABLE_READERS)
        or (fmt == "auto" and ext == ".txt")
    ):
        text = _read_text(path, name, max_line)
        if fmt == "auto":
            fmt = "tagged" if src.end_tag in text else "guanaco" if GUANACO_TURN.search(text) else "text"
        return fmt, src, _tagged_blocks(text, src) if fmt == "tagged" else _lines(text)
    if ext in TABLE_READERS:
        columns, records = TABLE_READERS[ext](path, name, max_line)
        return _table(name, fmt, src, columns, records, 1 if ext == ".csv" else None)
    if fmt == "auto" and ext in DB_EXTENSIONS:
        raise DataError(
            name, None, "a SQLite database: set `format: sql` and a `query` (e.g. SELECT * FROM feedback)"
        )
    if fmt == "auto":
        raise DataError(
            name,
            None,
            f"cannot tell the format from the extension {ext!r}: use .txt, {', '.join(TABLE_EXTENSIONS)} "
            "or set `format:`",
        )
    raise DataError(
        name, None, f"format {fmt!r} reads {', '.join(TABLE_EXTENSIONS)} files, not {ext or 'no extension'!r}"
    )


# --------------------------------------------------------------------------------------------- sql
def _sqlite_guard(dbapi_conn: Any, _record: Any) -> None:
    """Let a SQLite connection only read: every statement but SELECT/READ/functions/CTEs/PRAGMA is
    denied (mode=ro keeps the main database unchanged, but ATTACH or VACUUM INTO would create files)."""
    import sqlite3

    allowed = {
        sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE,
        sqlite3.SQLITE_PRAGMA, sqlite3.SQLITE_TRANSACTION,
    }  # fmt: skip
    dbapi_conn.set_authorizer(
        lambda action, *_: sqlite3.SQLITE_OK if action in allowed else sqlite3.SQLITE_DENY
    )


# Session-level read-only where the driver has it; other databases: use a read-only database user.
_READ_ONLY_SQL = {
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",
    "mariadb": "SET SESSION TRANSACTION READ ONLY",
}


def _read_only_engine(url: Any) -> Any:
    """An engine whose connections cannot write (SQLite: authorizer; PostgreSQL/MySQL: read-only session)."""
    from sqlalchemy import create_engine, event

    engine = create_engine(url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_guard)
    elif backend in _READ_ONLY_SQL:

        def read_only(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute(_READ_ONLY_SQL[backend])
            cursor.close()

        event.listen(engine, "connect", read_only)
    return engine


def _open_sql(
    src: SourceConfig, base_dir: Path, cfg: IngestConfig
) -> tuple[str, str, SourceConfig, Records] | None:
    """(name, format, config, records) for an SQL source; None if it is optional and missing.

    SQLite files follow the source rules (a regular file inside the repository) and are opened
    read-only with writes, ATTACH and VACUUM INTO denied; other databases get a read-only session
    where the driver has one (PostgreSQL, MySQL), and the transaction is never committed.
    """
    from sqlalchemy import text  # imported here: only `sql` sources need it
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        url = make_url(src.url) if src.url else URL.create("sqlite", database=src.path)
    except SQLAlchemyError as e:
        raise DataError(src.url, None, f"invalid SQLAlchemy URL: {e}") from None
    shown = url.render_as_string(hide_password=True)  # never print a password
    name = Path(src.path).as_posix() if src.path else shown
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        db = base_dir / url.database
        if not db.is_file():
            if src.optional:
                return None
            raise DataError(name, None, f"SQLite database not found ({shown})")
        _check_file(db, name, cfg, base_dir)
        # read-only, so a typo'd path can't create an empty database and a query can't write
        url = url.set(database=f"file:{quote(str(db.resolve()))}").update_query_dict(
            {"mode": "ro", "uri": "true"}
        )

    def records() -> Records:
        try:
            with _read_only_engine(url).connect() as conn:
                result = conn.execute(text(src.query or ""))
                if not result.returns_rows:
                    raise DataError(name, None, f"query on {shown} returned no result set (use SELECT)")
                for i, rec in enumerate(result.mappings(), 1):
                    yield i, dict(rec)
        except SQLAlchemyError as e:
            raise DataError(name, None, f"query failed on {shown}: {getattr(e, 'orig', None) or e}") from None

    # The columns are only known once the query runs, so `_table` sniffs them from the first row.
    fmt, src, recs = _table(name, "auto", src, None, records(), None)
    return name, fmt, src, recs


# ----------------------------------------------------------------------------------------- sources
def _display(path: Path, base_dir: Path) -> str:
    """A matched path as the user would write it: relative to base_dir when it is inside it."""
    try:
        return path.relative_to(base_dir).as_posix()
    except ValueError:
        return path.as_posix()


def _check_file(path: Path, name: str, cfg: IngestConfig, base_dir: Path) -> None:
    """A source file must be a regular file (a FIFO would hang, /dev/zero never ends), inside the
    repository unless `ingest.allow_outside`, and at most `ingest.max_file_mb`.

    Raises:
        DataError: naming the file and which rule it breaks.
    """
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a file")
        raise DataError(name, None, f"not a regular file ({kind}); sources must be regular files")
    resolved, repo = path.resolve(), base_dir.resolve()
    if not cfg.allow_outside and not resolved.is_relative_to(repo):
        raise DataError(
            name,
            None,
            f"outside the repository ({resolved} is not under {repo}); DVC cannot track it — copy it into "
            "the repository, or set ingest.allow_outside: true",
        )
    if st.st_size > cfg.max_file_mb * (1 << 20):
        size = st.st_size / (1 << 20)
        raise DataError(name, None, f"{size:.1f} MB, over ingest.max_file_mb={cfg.max_file_mb:g}")


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
)  # fmt: skip


def _walk(directory: Path) -> list[Path]:
    """All files under a directory, sorted, skipping hidden files and directories."""
    files = (p for p in directory.rglob("*") if p.is_file())
    return sorted(
        p for p in files if not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _expand(src: SourceConfig, base_dir: Path) -> list[tuple[str, Path]]:
    """(name, path) of every file a source names; [] for a missing optional source."""
    assert src.path is not None  # SourceConfig requires it for every format but sql
    full = base_dir / src.path
    if any(c in src.path for c in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(str(full), recursive=True))]
        files = [f for m in matches for f in (_walk(m) if m.is_dir() else [m])]
        problem = "glob matched no files"
    elif full.is_dir():
        files, problem = _walk(full), "directory has no (non-hidden) files"
    else:
        files, problem = ([full] if full.exists() else []), "no such file or directory"
    if not files and not src.optional:
        raise DataError(src.path, None, f"{problem} (paths are relative to {base_dir.resolve()})")
    if files == [full]:
        return [(Path(src.path).as_posix(), full)]  # the path exactly as configured
    return [(_display(f, base_dir), f) for f in files]


WRITES = ("rows.jsonl", KNOWLEDGE, "stats.json")  # what ingest writes to paths.ingest (replaced as a whole)
EMPTY = "empty"  # the resolved format of an optional source that has no rows


def _source_rows(
    name: str, fmt: str, src: SourceConfig, records: Records, cfg: IngestConfig, stats: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Convert one file's records to rows, raising or skipping (and counting) invalid ones."""
    entry = {"source": name, "format": fmt, "rows": 0, "skipped": 0, "missing": False}
    stats["sources"].append(entry)
    convert = FORMATS.get(fmt) if fmt == EMPTY else FORMATS[fmt]
    for line, rec in records:
        try:
            if isinstance(rec, _Invalid):
                raise rec
            row = convert(rec, src)
        except _Invalid as e:
            error = DataError(name, line, str(e))
            if cfg.on_invalid == "error":
                raise error from None
            entry["skipped"] += 1
            stats["skipped"] += 1
            if len(stats["skipped_examples"]) < MAX_SKIPPED_EXAMPLES:
                stats["skipped_examples"].append(str(error))
            continue
        entry["rows"] += 1
        # `overrides`: format drops other sources' examples of the same question (a user's correction)
        yield {"source": name, "line": line, **row, **({"overrides": True} if src.overrides else {})}
    if not entry["rows"] and not (src.optional and not entry["skipped"]):
        skipped = f" ({entry['skipped']} invalid records skipped)" if entry["skipped"] else ""
        raise DataError(name, None, f"no rows (empty source){skipped}")


def _missing(src: SourceConfig) -> dict[str, Any]:
    """The stats entry of an optional source that does not exist (yet)."""
    return {"source": src.path or src.url, "format": src.format, "rows": 0, "skipped": 0, "missing": True}


def _rows(cfg: IngestConfig, base_dir: Path, stats: dict[str, Any], train: bool) -> Iterator[dict[str, Any]]:
    """Every row of every source with `train` as given, in order; fills `stats` as it goes."""
    for src in (s for s in cfg.sources if s.train == train):
        if src.format == "sql":
            opened = _open_sql(src, base_dir, cfg)
            if opened is None:
                stats["sources"].append(_missing(src))
            else:
                yield from _source_rows(*opened, cfg, stats)
            continue
        files = _expand(src, base_dir)
        for name, path in files:  # all of a source's files are checked before any is read
            _check_file(path, name, cfg, base_dir)
        if not files:
            stats["sources"].append(_missing(src))
        for name, path in files:
            yield from _source_rows(name, *_open_file(path, name, src, cfg.max_line_chars), cfg, stats)


def ingest(cfg: IngestConfig, out_dir: Path, base_dir: Path = Path(".")) -> dict[str, Any]:
    """Read every source in cfg.sources (paths relative to base_dir) into out_dir; return the stats.

    Training sources go to `rows.jsonl`; sources with `train: false` (facts to answer from, never
    trained on), if any, to `knowledge.jsonl`, which only the index stage reads. Stats go to `stats.json`.

    Raises:
        DataError: bad input, as `file:line: problem`; nothing is written at out_dir.
        ConfigError: no sources configured, or every source was optional and missing.
    """
    if not cfg.sources:
        raise ConfigError("ingest.sources is empty: add at least one source (see params.yaml)")
    if not any(s.train for s in cfg.sources):
        raise ConfigError(
            "ingest.sources: every source has `train: false`; at least one must train the model"
        )
    base_dir = Path(base_dir)
    stats: dict[str, Any] = {"rows": 0, "sources": [], "skipped": 0, "skipped_examples": []}
    with atomic_path(out_dir, owned=WRITES) as tmp:
        tmp.mkdir()
        # Rows stream straight to disk (public datasets can be large); atomic_path discards the
        # partial directory if any source turns out bad.
        stats["rows"] = write_jsonl(tmp / "rows.jsonl", _rows(cfg, base_dir, stats, train=True))
        if not stats["rows"]:
            raise ConfigError("ingest.sources: no rows, every source is optional and missing")
        if any(not s.train for s in cfg.sources):  # facts for the index only (stages/index.py)
            stats["knowledge_rows"] = write_jsonl(tmp / KNOWLEDGE, _rows(cfg, base_dir, stats, train=False))
        write_json(tmp / "stats.json", stats)
    return stats


def run(p: Params, root: Path) -> dict[str, Any]:
    return ingest(p.ingest, root / p.paths.ingest, base_dir=root)


if __name__ == "__main__":
    from stages import main

    raise SystemExit(main("ingest"))
