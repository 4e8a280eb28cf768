"""ingest: one happy path per format, sniffing, sources, provenance, skipping, and bad inputs
that must fail with `file:line: problem` through both the function and the real CLI."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from tinydata import run_stage_cli

from stages.ingest import ingest
from tagtune.config import IngestConfig, SourceConfig, load_params
from tagtune.errors import ConfigError, DataError
from tagtune.io import read_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"
REPO = Path(__file__).resolve().parents[1]

FileContent = str | bytes | Callable[[Path], None]


def _sqlite(rows: list[tuple[str, str, str | None]]) -> Callable[[Path], None]:
    """A builder for a SQLite file with a feedback(question, answer, "group") table."""

    def build(path: Path) -> None:
        with sqlite3.connect(path) as db:
            db.execute('CREATE TABLE feedback (question TEXT, answer TEXT, "group" TEXT)')
            db.executemany("INSERT INTO feedback VALUES (?, ?, ?)", rows)
        db.close()

    return build


def _parquet(rows: list[dict[str, Any]]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)

    return build


def _write_files(root: Path, files: dict[str, FileContent]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def _run(sources: list[dict[str, Any]], out: Path, base: Path = FIXTURES, on_invalid: str = "error"):
    """Ingest `sources` from `base` into `out`; returns (stats, rows)."""
    cfg = IngestConfig(sources=[SourceConfig(**s) for s in sources], on_invalid=on_invalid)
    stats = ingest(cfg, out, base)
    return stats, read_jsonl(out / "rows.jsonl")


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_stage_cli(cwd, "ingest", *args)


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[..., Path]:
    """Write tmp_path/params.yaml with the given ingest sources; output goes to data/ingest."""

    def write(*sources: dict[str, Any], on_invalid: str = "error") -> Path:
        params = {
            "paths": {"ingest": "data/ingest"},
            "ingest": {"on_invalid": on_invalid, "sources": list(sources)},
        }
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        return path

    return write


def _chat(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    """user/assistant messages from alternating turns."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# ------------------------------------------------------------------------------------------ formats
HAPPY = [
    pytest.param(
        {"path": "text.txt", "format": "text"},
        3,
        {"source": "text.txt", "line": 3, "kind": "text", "text": "Ferries leave every hour.", "group": None},
        id="text",
    ),
    pytest.param(
        {"path": "qa.csv", "format": "qa"},
        3,
        {
            "source": "qa.csv",
            "line": 3,
            "kind": "chat",
            "messages": _chat(
                "What time does the library open?", "It opens at 9am,\nevery day except Sunday."
            ),
            "group": "hours",
        },
        id="qa-csv",
    ),
    pytest.param(
        {"path": "qa.jsonl", "format": "qa"},
        2,
        {
            "source": "qa.jsonl",
            "line": 3,
            "kind": "chat",
            "messages": _chat("Who is the mayor?", "Ada Brindle."),
            "group": "mayor",
        },
        id="qa-jsonl",
    ),
    pytest.param(
        {"path": "qa.json", "format": "qa"},
        2,
        {
            "source": "qa.json",
            "line": 2,
            "kind": "chat",
            "messages": _chat("Who is the mayor?", "Ada Brindle."),
            "group": "mayor",
        },
        id="qa-json",
    ),
    pytest.param(
        {"path": "seed.txt", "format": "tagged"},
        3,
        {
            "source": "seed.txt",
            "line": 4,
            "kind": "chat",
            "messages": _chat("Where is the lighthouse?", "On the northern cliff,\npast the old mill."),
            "group": None,
        },
        id="tagged",
    ),
    pytest.param(
        {"path": "guanaco.txt", "format": "guanaco"},
        2,
        {
            "source": "guanaco.txt",
            "line": 2,
            "kind": "chat",
            "messages": _chat("Hi", "Hello!", "Where is the ferry?", "At pier 2."),
            "group": None,
        },
        id="guanaco-txt",
    ),
    pytest.param(
        {"path": "guanaco.jsonl", "format": "guanaco"},
        2,
        {
            "source": "guanaco.jsonl",
            "line": 2,
            "kind": "chat",
            "messages": _chat(
                "Write a haiku about the harbour.",
                "Grey gulls on the quay,\nnets drying in the salt wind,\nthe ferry is late.",
            ),
            "group": None,
        },
        id="guanaco-jsonl",
    ),
    pytest.param(
        {"path": "openorca.jsonl", "format": "openorca"},
        2,
        {
            "source": "openorca.jsonl",
            "line": 2,
            "kind": "chat",
            "messages": _chat(
                "Name the town's river.", "The Brindle.", system="You are a helpful assistant."
            ),
            "group": None,
        },
        id="openorca",
    ),
    pytest.param(
        {"path": "messages.jsonl", "format": "messages"},
        2,
        {
            "source": "messages.jsonl",
            "line": 2,
            "kind": "chat",
            "messages": _chat("Ferry?", "Hourly.", "Price?", "Two coins."),
            "group": None,
        },
        id="messages-openai",
    ),
    pytest.param(
        {"path": "sharegpt.json", "format": "messages"},
        2,
        {
            "source": "sharegpt.json",
            "line": 2,
            "kind": "chat",
            "messages": _chat("Best view?", "The lighthouse.", system="You are a guide."),
            "group": None,
        },
        id="messages-sharegpt",
    ),
    pytest.param(
        {"path": "classification.csv", "format": "classification"},
        2,
        {
            "source": "classification.csv",
            "line": 3,
            "kind": "classification",
            "text": "Lovely harbour festival!",
            "label": "praise",
            "group": None,
        },
        id="classification",
    ),
]


@pytest.mark.parametrize(("source", "n_rows", "second_row"), HAPPY)
def test_each_format_reads_its_fixture(tmp_path, source, n_rows, second_row):
    stats, rows = _run([source], tmp_path / "out")
    assert len(rows) == n_rows == stats["rows"]
    assert rows[1] == second_row  # the whole row: schema, provenance and content
    assert sorted(os.listdir(tmp_path / "out")) == ["rows.jsonl", "stats.json"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    assert stats["sources"] == [
        {"source": source["path"], "format": source["format"], "rows": n_rows, "skipped": 0, "missing": False}
    ]


def test_openorca_empty_system_prompt_gives_no_system_message(tmp_path):
    _, rows = _run([{"path": "openorca.jsonl", "format": "openorca"}], tmp_path / "out")
    assert rows[0]["messages"] == _chat("What is 2+2?", "4")


def test_parquet_classification_with_integer_labels(tmp_path):
    _write_files(
        tmp_path, {"reviews.parquet": _parquet([{"text": "Great", "label": 1}, {"text": "Bad", "label": 0}])}
    )
    stats, rows = _run([{"path": "reviews.parquet"}], tmp_path / "out", base=tmp_path)
    assert stats["sources"][0]["format"] == "classification"
    assert rows == [
        {
            "source": "reviews.parquet",
            "line": 1,
            "kind": "classification",
            "text": "Great",
            "label": "1",
            "group": None,
        },
        {
            "source": "reviews.parquet",
            "line": 2,
            "kind": "classification",
            "text": "Bad",
            "label": "0",
            "group": None,
        },
    ]


def test_parquet_qa(tmp_path):
    qa = [
        {"question": "Q1?", "answer": "A1.", "group": "g"},
        {"question": "Q2?", "answer": "A2.", "group": None},
    ]
    _write_files(tmp_path, {"qa.parquet": _parquet(qa)})
    _, rows = _run([{"path": "qa.parquet", "format": "qa"}], tmp_path / "out", base=tmp_path)
    assert [(r["line"], r["messages"], r["group"]) for r in rows] == [
        (1, _chat("Q1?", "A1."), "g"),
        (2, _chat("Q2?", "A2."), None),
    ]


@pytest.mark.parametrize("by", ["path", "url"])
def test_sql_sqlite_reads_query_as_table(tmp_path, by):
    _write_files(tmp_path, {"fb.db": _sqlite([("Q1?", "A1.", "g1"), ("Q2?", "A2.", None)])})
    db = tmp_path / "fb.db"
    before = db.read_bytes()
    location = {"path": "fb.db"} if by == "path" else {"url": "sqlite:///fb.db"}
    src = {
        **location,
        "format": "sql",
        "query": 'SELECT question, answer, "group" FROM feedback ORDER BY rowid',
    }
    stats, rows = _run([src], tmp_path / "out", base=tmp_path)
    name = "fb.db" if by == "path" else "sqlite:///fb.db"
    assert stats["sources"] == [{"source": name, "format": "qa", "rows": 2, "skipped": 0, "missing": False}]
    assert rows[0] == {
        "source": name,
        "line": 1,
        "kind": "chat",
        "messages": _chat("Q1?", "A1."),
        "group": "g1",
    }
    assert db.read_bytes() == before  # opened read-only


# -------------------------------------------------------------------------------------- auto sniffing
@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        ("text.txt", "text"),
        ("seed.txt", "tagged"),
        ("guanaco.txt", "guanaco"),
        ("guanaco.jsonl", "guanaco"),
        ("qa.csv", "qa"),
        ("qa.jsonl", "qa"),
        ("qa.json", "qa"),
        ("openorca.jsonl", "openorca"),
        ("messages.jsonl", "messages"),
        ("sharegpt.json", "messages"),
        ("classification.csv", "classification"),
    ],
)
def test_auto_sniffs_format(tmp_path, path, fmt):
    auto_stats, auto_rows = _run([{"path": path}], tmp_path / "auto")
    explicit_stats, explicit_rows = _run([{"path": path, "format": fmt}], tmp_path / "explicit")
    assert auto_stats["sources"][0]["format"] == fmt
    assert auto_rows == explicit_rows


def test_custom_column_names(tmp_path):
    _write_files(tmp_path, {"faq.csv": "topic,prompt,reply\nferry,When?,Hourly.\n"})
    src = {"path": "faq.csv", "question_column": "prompt", "answer_column": "reply", "group_column": "topic"}
    stats, rows = _run([src], tmp_path / "out", base=tmp_path)
    assert stats["sources"][0]["format"] == "qa"
    assert rows[0]["messages"] == _chat("When?", "Hourly.") and rows[0]["group"] == "ferry"


def test_custom_tags(tmp_path):
    _write_files(tmp_path, {"seed.txt": "Q one [Q]\nA one [E]\nQ two [Q] A two [E]\n"})
    src = {"path": "seed.txt", "question_tag": "[Q]", "end_tag": "[E]"}
    stats, rows = _run([src], tmp_path / "out", base=tmp_path)
    assert stats["sources"][0]["format"] == "tagged"
    assert [(r["line"], r["messages"]) for r in rows] == [
        (1, _chat("Q one", "A one")),
        (3, _chat("Q two", "A two")),
    ]


# -------------------------------------------------------------------------------- directories, globs
@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    _write_files(
        tmp_path,
        {
            "raw/b.jsonl": '{"question": "Qb?", "answer": "Ab."}\n',
            "raw/a/notes.txt": "first note\nsecond note\n",
            "raw/c.jsonl": '{"text": "plain"}\n',
            "raw/.hidden.txt": "ignored\n",
            "raw/.cache/x.txt": "ignored\n",
        },
    )
    return tmp_path


def test_directory_source_reads_all_files_sorted_skipping_hidden(tmp_path, raw_dir):
    stats, rows = _run([{"path": "raw"}], tmp_path / "out", base=raw_dir)
    assert [(s["source"], s["format"], s["rows"]) for s in stats["sources"]] == [
        ("raw/a/notes.txt", "text", 2),
        ("raw/b.jsonl", "qa", 1),
        ("raw/c.jsonl", "text", 1),
    ]
    assert [(r["source"], r["line"]) for r in rows] == [
        ("raw/a/notes.txt", 1),
        ("raw/a/notes.txt", 2),
        ("raw/b.jsonl", 1),
        ("raw/c.jsonl", 1),
    ]


def test_glob_source_sorted(tmp_path, raw_dir):
    stats, rows = _run([{"path": "raw/*.jsonl"}], tmp_path / "out", base=raw_dir)
    assert [s["source"] for s in stats["sources"]] == ["raw/b.jsonl", "raw/c.jsonl"]
    assert [r["source"] for r in rows] == ["raw/b.jsonl", "raw/c.jsonl"]


def test_recursive_glob(tmp_path, raw_dir):
    stats, _ = _run([{"path": "raw/**/*.txt", "format": "text"}], tmp_path / "out", base=raw_dir)
    assert [s["source"] for s in stats["sources"]] == ["raw/a/notes.txt"]


def test_several_sources_keep_provenance(tmp_path):
    stats, rows = _run([{"path": "seed.txt"}, {"path": "qa.csv"}, {"path": "qa.json"}], tmp_path / "out")
    assert stats["rows"] == 3 + 3 + 2
    assert [(r["source"], r["line"]) for r in rows] == [
        ("seed.txt", 1),
        ("seed.txt", 4),
        ("seed.txt", 7),
        ("qa.csv", 2),
        ("qa.csv", 3),  # a quoted answer spanning lines 3-4
        ("qa.csv", 5),
        ("qa.json", 1),  # JSON arrays: the 1-based record index
        ("qa.json", 2),
    ]


# -------------------------------------------------------------------------------------- optional
def test_missing_optional_sources_are_skipped_and_recorded(tmp_path):
    sources = [
        {"path": "qa.csv"},
        {"path": "nope/feedback.jsonl", "optional": True},
        {"path": "nope.db", "format": "sql", "query": "SELECT * FROM feedback", "optional": True},
    ]
    stats, rows = _run(sources, tmp_path / "out")
    assert len(rows) == 3
    assert stats["sources"][1:] == [
        {"source": "nope/feedback.jsonl", "format": "auto", "rows": 0, "skipped": 0, "missing": True},
        {"source": "nope.db", "format": "sql", "rows": 0, "skipped": 0, "missing": True},
    ]


def test_only_missing_optional_sources_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="every source is optional and missing"):
        _run([{"path": "nope.csv", "optional": True}], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_sources_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="ingest.sources is empty"):
        ingest(IngestConfig(), tmp_path / "out")


# -------------------------------------------------------------------------------------- on_invalid
MIXED_JSONL = (
    '{"question": "Q1?", "answer": "A1."}\n'
    '{"question": "Q2?",\n'
    '{"question": "Q3?", "answer": ""}\n'
    '{"question": "Q4?", "answer": "A4."}\n'
)


def test_skip_counts_invalid_records(tmp_path):
    _write_files(tmp_path, {"mixed.jsonl": MIXED_JSONL})
    stats, rows = _run(
        [{"path": "mixed.jsonl", "format": "qa"}], tmp_path / "out", tmp_path, on_invalid="skip"
    )
    assert [r["line"] for r in rows] == [1, 4]
    assert stats["rows"] == 2 and stats["skipped"] == 2
    assert stats["sources"][0] == {
        "source": "mixed.jsonl",
        "format": "qa",
        "rows": 2,
        "skipped": 2,
        "missing": False,
    }
    assert stats["skipped_examples"][0].startswith("mixed.jsonl:2: invalid JSON")
    assert stats["skipped_examples"][1] == "mixed.jsonl:3: empty 'answer'"


def test_skip_still_fails_when_a_source_ends_up_empty(tmp_path):
    _write_files(tmp_path, {"bad.jsonl": '{"question": "Q?"}\n[1]\n'})
    with pytest.raises(
        DataError, match=r"bad\.jsonl: no rows \(empty source\) \(2 invalid records skipped\)"
    ):
        _run([{"path": "bad.jsonl", "format": "qa"}], tmp_path / "out", tmp_path, on_invalid="skip")


def test_skip_does_not_skip_unreadable_files(tmp_path):
    _write_files(tmp_path, {"latin1.txt": b"ok\ncaf\xe9\n"})
    with pytest.raises(DataError, match=r"latin1\.txt:2: not valid UTF-8"):
        _run([{"path": "latin1.txt"}], tmp_path / "out", tmp_path, on_invalid="skip")


def test_tagged_recovers_after_a_bad_block_when_skipping(tmp_path):
    text = "Q1? <QUESTION>\nA1 <END>\nQ2? <QUESTION>\nno end\nQ3? <QUESTION>\nA3 <END>\nstray <END>\n"
    _write_files(tmp_path, {"seed.txt": text})
    stats, rows = _run([{"path": "seed.txt"}], tmp_path / "out", tmp_path, on_invalid="skip")
    assert [(r["line"], r["messages"]) for r in rows] == [(1, _chat("Q1?", "A1")), (5, _chat("Q3?", "A3"))]
    assert stats["skipped_examples"] == [
        "seed.txt:3: question without <END>",
        "seed.txt:7: answer without question (<END> with no <QUESTION>)",
    ]


# --------------------------------------------------------------------------------------- atomicity
def test_success_replaces_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rows.jsonl").write_text("old")  # a previous output (a foreign file would not be replaced)
    _run([{"path": "qa.csv"}], out)
    assert sorted(os.listdir(out)) == ["rows.jsonl", "stats.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left beside it


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_writes_output_and_accepts_overrides(tmp_path, write_params):
    _write_files(tmp_path, {"data/raw/mixed.jsonl": MIXED_JSONL})
    write_params({"path": "data/raw/mixed.jsonl", "format": "qa"})
    failed = _cli(tmp_path)
    assert failed.returncode == 1 and "data/raw/mixed.jsonl:2: invalid JSON" in failed.stderr
    result = _cli(tmp_path, "-S", "ingest.on_invalid=skip")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["skipped"] == 2
    assert len(read_jsonl(tmp_path / "data" / "ingest" / "rows.jsonl")) == 2


# ---------------------------------------------------------------------------------------- bad input
def _messages_line(*roles: str) -> str:
    return json.dumps({"messages": [{"role": r, "content": f"{r} says hi"} for r in roles]}) + "\n"


GOOD_QA_LINE = '{"question": "Q?", "answer": "A."}\n'
BAD_INPUTS = [
    pytest.param(
        {"bad.jsonl": GOOD_QA_LINE + '{"question": "Q2?",\n'},
        {"path": "data/bad.jsonl"},
        "data/bad.jsonl:2: invalid JSON",
        id="invalid-json-line",
    ),
    pytest.param(
        {"bad.txt": b"one\ntwo\nthr\xe9e\n"},
        {"path": "data/bad.txt", "format": "text"},
        "data/bad.txt:3: not valid UTF-8 (byte 0xe9 at column 4)",
        id="non-utf8",
    ),
    pytest.param(
        {"bad.csv": "question,reply\nQ?,A.\n"},
        {"path": "data/bad.csv", "format": "qa"},
        "data/bad.csv:1: format 'qa': missing column answer (has: question, reply)",
        id="missing-column",
    ),
    pytest.param(
        {"bad.jsonl": GOOD_QA_LINE + '{"question": "Q2?"}\n'},
        {"path": "data/bad.jsonl", "format": "qa"},
        "data/bad.jsonl:2: missing field 'answer'",
        id="missing-field",
    ),
    pytest.param(
        {"bad.csv": "question,answer\nQ?,A.\nQ2?,  \n"},
        {"path": "data/bad.csv"},
        "data/bad.csv:3: empty 'answer'",
        id="empty-field",
    ),
    pytest.param(
        {"bad.txt": "Q1? <QUESTION>\nA1. <END>\n\nQ2? <QUESTION>\nA2 goes on\nand on\n"},
        {"path": "data/bad.txt", "format": "tagged"},
        "data/bad.txt:4: question without <END>",
        id="tagged-without-end",
    ),
    pytest.param(
        {"bad.txt": "Q1? <QUESTION>\nA1. <END>\nstray answer <END>\n"},
        {"path": "data/bad.txt"},
        "data/bad.txt:3: answer without question",
        id="answer-without-question",
    ),
    pytest.param(
        {"bad.parquet": "this is not parquet"},
        {"path": "data/bad.parquet"},
        "data/bad.parquet: cannot read Parquet",
        id="unreadable-file",
    ),
    pytest.param(
        {"bad.csv": "question,answer\n"},
        {"path": "data/bad.csv", "format": "qa"},
        "data/bad.csv: no rows (empty source)",
        id="empty-source",
    ),
    pytest.param(
        {"bad.txt": "\n  \n"},
        {"path": "data/bad.txt"},
        "data/bad.txt: no rows (empty source)",
        id="empty-text-file",
    ),
    pytest.param(
        {"bad.json": '{"question": "Q?", "answer": "A."}'},
        {"path": "data/bad.json"},
        "data/bad.json: top level must be a list of objects, got dict",
        id="json-not-a-list",
    ),
    pytest.param(
        {"bad.json": '[\n  {"question": "Q?", "answer": "A."},\n  {oops}\n]\n'},
        {"path": "data/bad.json"},
        "data/bad.json:3: invalid JSON",
        id="invalid-json-file",
    ),
    pytest.param(
        {"bad.json": '[{"question": "Q?", "answer": "A."}, "Q2?"]'},
        {"path": "data/bad.json", "format": "qa"},
        "data/bad.json:2: expected a JSON object, got str",
        id="json-record-not-object",
    ),
    pytest.param(
        {"bad.jsonl": _messages_line("user", "assistant") + _messages_line("user", "bot")},
        {"path": "data/bad.jsonl"},
        "data/bad.jsonl:2: message 2: unknown role 'bot'",
        id="unknown-role",
    ),
    pytest.param(
        {"bad.jsonl": _messages_line("system", "user")},
        {"path": "data/bad.jsonl", "format": "messages"},
        "data/bad.jsonl:1: conversation must end with an assistant message",
        id="not-ending-with-assistant",
    ),
    pytest.param(
        {"bad.jsonl": _messages_line("user", "assistant") * 2 + _messages_line("user", "user", "assistant")},
        {"path": "data/bad.jsonl"},
        "data/bad.jsonl:3: message 2: expected assistant after user, got user",
        id="not-alternating",
    ),
    pytest.param(
        {"bad.jsonl": _messages_line("user", "system", "assistant")},
        {"path": "data/bad.jsonl"},
        "data/bad.jsonl:1: message 2: a system message may only come first",
        id="system-in-the-middle",
    ),
    pytest.param(
        {"bad.txt": "### Human: Hi### Assistant: Hello.\n\n### Human: Only a question\n"},
        {"path": "data/bad.txt"},
        "data/bad.txt:3: no '### Assistant:' turn",
        id="guanaco-without-assistant",
    ),
    pytest.param(
        {"bad.csv": "question,answer\nQ?,A.\nQ2?,A2.,extra\n"},
        {"path": "data/bad.csv"},
        "data/bad.csv:3: expected 2 fields like the header, got 3",
        id="csv-wrong-field-count",
    ),
    pytest.param(
        {"bad.csv": 'question,answer\nQ?,A.\n"Q2?,A2.\nQ3?,A3.\n'},
        {"path": "data/bad.csv"},
        "data/bad.csv:3: invalid CSV",
        id="csv-unclosed-quote",
    ),
    pytest.param(
        {"bad.jsonl": '{"text": "Great", "label": "pos"}\n{"text": "Meh", "label": null}\n'},
        {"path": "data/bad.jsonl"},
        "data/bad.jsonl:2: missing label 'label'",
        id="label-missing",
    ),
    pytest.param(
        {"fb.db": _sqlite([("Q?", "A.", None)])},
        {"path": "data/fb.db", "format": "sql", "query": "SELECT * FROM nope"},
        "data/fb.db: query failed on sqlite:///data/fb.db: no such table: nope",
        id="sql-query-error",
    ),
    pytest.param(
        {"fb.db": _sqlite([("Q?", "A.", None)])},
        {"path": "data/fb.db"},
        "data/fb.db: a SQLite database: set `format: sql` and a `query`",
        id="sqlite-without-sql-format",
    ),
    pytest.param(
        {"bad.xml": "<faq/>"},
        {"path": "data/bad.xml"},
        "data/bad.xml: cannot tell the format from the extension '.xml'",
        id="unknown-extension",
    ),
    pytest.param(
        {"bad.csv": "foo,bar\n1,2\n"},
        {"path": "data/bad.csv"},
        "data/bad.csv:1: cannot tell the format from the columns (foo, bar)",
        id="unknown-columns",
    ),
    pytest.param(
        {"notes.txt": "hello\n"},
        {"path": "data/*.csv"},
        "data/*.csv: glob matched no files",
        id="glob-matches-nothing",
    ),
    pytest.param(
        {"notes.txt": "hello\n"},
        {"path": "data/faq.csv"},
        "data/faq.csv: no such file or directory",
        id="missing-file",
    ),
]


@pytest.mark.parametrize(("files", "source", "expected"), BAD_INPUTS)
def test_bad_input_fails_naming_file_and_line(tmp_path, write_params, files, source, expected):
    data = tmp_path / "data"
    _write_files(data, files)
    out = data / "ingested"
    cfg = load_params(write_params(source)).ingest

    with pytest.raises(DataError) as err:
        ingest(cfg, out, tmp_path)
    assert expected in str(err.value)
    assert not out.exists()

    # The real CLI, with a previous output in place that must survive.
    out.mkdir()
    (out / "rows.jsonl").write_text("previous\n")
    result = _cli(tmp_path)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(out) == ["rows.jsonl"] and (out / "rows.jsonl").read_text() == "previous\n"
    assert not [p.name for p in data.iterdir() if p.name.startswith(".")]  # no temp dir left behind


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("\ufeffquestion,answer\nQ?,A.\n", _chat("Q?", "A."), id="excel-bom"),
        pytest.param(
            'messages\n"[{""role"": ""user"", ""content"": ""Q?""}, {""role"": ""assistant"", ""content"": ""A.""}]"\n',
            _chat("Q?", "A."),
            id="messages-as-json-text",
        ),
    ],
)
def test_csv_variants(tmp_path, content, expected):
    _write_files(tmp_path, {"t.csv": content})
    _, rows = _run([{"path": "t.csv"}], tmp_path / "out", base=tmp_path)
    assert rows[0]["messages"] == expected and rows[0]["line"] == 2
