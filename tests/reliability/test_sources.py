"""Sources are regular files inside the repository, read with bounds; SQL sources never write (items 6, 12)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import one_line_error, run_env, stage_cli, write_params

from stages.ingest import ingest
from tagtune.config import IngestConfig, SourceConfig
from tagtune.errors import DataError

QA = "question,answer\nWhere is the quay?,East of the bridge.\n"


def _ingest(tmp_path: Path, *sources: dict, **cfg) -> dict:
    return ingest(
        IngestConfig(sources=[SourceConfig(**s) for s in sources], **cfg), tmp_path / "out", tmp_path
    )


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp") or p.name == "out")


def test_a_file_outside_the_repository_is_refused_unless_allowed(tmp_path):
    outside = tmp_path / "elsewhere" / "faq.csv"
    outside.parent.mkdir()
    outside.write_text(QA)
    repo = tmp_path / "repo"
    repo.mkdir()
    cfg = IngestConfig(sources=[SourceConfig(path=str(outside), format="qa")])
    with pytest.raises(DataError, match="outside the repository.*ingest.allow_outside"):
        ingest(cfg, repo / "out", repo)
    with pytest.raises(DataError, match="outside the repository"):  # a symlink does not get around it
        (repo / "link.csv").symlink_to(outside)
        ingest(IngestConfig(sources=[SourceConfig(path="link.csv", format="qa")]), repo / "out", repo)
    assert not (repo / "out").exists()
    allowed = IngestConfig(sources=cfg.sources, allow_outside=True)
    assert ingest(allowed, repo / "out", repo)["rows"] == 1


def test_etc_passwd_is_not_a_source(tmp_path):
    write_params(tmp_path, {"ingest": {"sources": [{"path": "/etc/passwd", "format": "text"}]}})
    line = one_line_error(stage_cli(tmp_path, "ingest"))
    assert "/etc/passwd" in line and "outside the repository" in line
    assert not (tmp_path / "data").exists()


@pytest.mark.timeout(60)
def test_a_fifo_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "feed.txt")
    start = time.monotonic()
    with pytest.raises(DataError, match="feed.txt: not a regular file"):
        _ingest(tmp_path, {"path": "feed.txt", "format": "text"})
    assert time.monotonic() - start < 10
    assert _leftovers(tmp_path) == []


def test_a_device_is_refused_and_nothing_is_left_behind(tmp_path):
    write_params(
        tmp_path, {"ingest": {"allow_outside": True, "sources": [{"path": "/dev/zero", "format": "text"}]}}
    )
    r = subprocess.run(
        [sys.executable, "-m", "stages.ingest"],
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = one_line_error(r)
    assert "/dev/zero: not a regular file" in line
    assert not (tmp_path / "data").exists()


def test_a_glob_that_matches_a_fifo_is_refused(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.txt").write_text("one line\n")
    os.mkfifo(tmp_path / "raw" / "b.txt")
    with pytest.raises(DataError, match="b.txt: not a regular file"):
        _ingest(tmp_path, {"path": "raw/*.txt", "format": "text"})


def test_file_and_line_sizes_are_bounded(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 3_000_000 + "\n")
    with pytest.raises(DataError, match=r"big.txt: 2.9 MB, over ingest.max_file_mb=1"):
        _ingest(tmp_path, {"path": "big.txt", "format": "text"}, max_file_mb=1)
    (tmp_path / "long.csv").write_text("question,answer\nshort?,fine\nlong?," + "y" * 5000 + "\n")
    with pytest.raises(
        DataError, match=r"long.csv:3: line of 5\d{3} characters, over ingest.max_line_chars=1000"
    ):
        _ingest(tmp_path, {"path": "long.csv", "format": "qa"}, max_line_chars=1000)
    assert _leftovers(tmp_path) == []


def test_a_temp_dir_of_a_killed_ingest_is_cleaned_up(tmp_path):
    """A SIGKILLed stage cannot clean up: the next run removes temp dirs whose process is gone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.{dead.pid}.x1y2.tmp"
    (stale / "out").mkdir(parents=True)
    (stale / "out" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "faq.csv").write_text(QA)
    _ingest(tmp_path, {"path": "faq.csv", "format": "qa"})
    assert _leftovers(tmp_path) == ["out"]


def test_a_nul_byte_in_csv_names_file_and_line(tmp_path):
    (tmp_path / "faq.csv").write_bytes(b"question,answer\nWhere?,Here.\nWhen?,No\x00w.\n")
    with pytest.raises(DataError, match=r"faq.csv:3: NUL byte"):
        _ingest(tmp_path, {"path": "faq.csv", "format": "qa"})


def _feedback_db(path: Path) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE fb (question TEXT, answer TEXT)")
        conn.execute("INSERT INTO fb VALUES ('Where?', 'Here.')")
    conn.close()
    return path


@pytest.mark.parametrize(
    "query",
    [
        "ATTACH 'file:{new}?mode=rwc' AS x",
        "ATTACH '{new}' AS x",
        "VACUUM INTO '{new}'",
        "SELECT question, answer FROM fb; ATTACH '{new}' AS x",
    ],
)
def test_the_sqlite_source_never_creates_a_file(tmp_path, query):
    _feedback_db(tmp_path / "fb.db")
    new = tmp_path / "created.db"
    with pytest.raises(DataError, match="fb.db"):
        _ingest(tmp_path, {"format": "sql", "path": "fb.db", "query": query.format(new=new)})
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fb.db"]


@pytest.mark.parametrize("query", ["DELETE FROM fb", "DROP TABLE fb", "INSERT INTO fb VALUES ('a', 'b')"])
def test_the_sqlite_source_never_writes(tmp_path, query):
    db = _feedback_db(tmp_path / "fb.db")
    with pytest.raises(DataError, match="fb.db"):
        _ingest(tmp_path, {"format": "sql", "path": "fb.db", "query": query})
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM fb").fetchone() == (1,)
    conn.close()


def test_a_sqlite_url_is_read_only_too(tmp_path):
    _feedback_db(tmp_path / "fb.db")
    new = tmp_path / "created.db"
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    with pytest.raises(DataError):
        _ingest(tmp_path, {"format": "sql", "url": url, "query": f"ATTACH '{new}' AS x"})
    assert not new.exists()
    stats = _ingest(tmp_path, {"format": "sql", "url": url, "query": "SELECT question, answer FROM fb"})
    assert stats["rows"] == 1
