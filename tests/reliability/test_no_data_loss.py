"""Destructive operations never delete what tagtune did not create (issue 13, items 1 and 2).

- `atomic_path` (every stage output, `tagtune pull`) replaces only a directory it owns;
- `tagtune pull --dest` refuses a non-empty foreign directory (unless --force) and never the cwd;
- output paths that overlap inputs, each other, the repository or home fail at params validation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli, one_line_error, stage_cli, write_params

from tagtune.config import parse_params
from tagtune.errors import ConfigError, TagtuneError
from tagtune.io import atomic_path, write_json

PRECIOUS = "three years of notes\n"


def _foreign_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text(PRECIOUS)
    (path / "figures").mkdir()
    (path / "figures" / "plot.png").write_bytes(b"\x89PNG")
    return path


def _intact(path: Path) -> bool:
    return (path / "thesis.tex").read_text() == PRECIOUS and (path / "figures" / "plot.png").is_file()


# ------------------------------------------------------------------------------- io.atomic_path
def test_atomic_path_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    d = _foreign_dir(tmp_path / "out")
    with pytest.raises(TagtuneError, match=r"thesis\.tex"), atomic_path(d) as tmp:
        tmp.mkdir()
        (tmp / "rows.jsonl").write_text("")
    assert _intact(d)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left behind


def test_atomic_path_replaces_its_own_output(tmp_path):
    d = tmp_path / "out"
    for n in (1, 2):
        with atomic_path(d, owned=("rows.jsonl", "stats.json")) as tmp:
            tmp.mkdir()
            write_json(tmp / "stats.json", {"run": n})
    assert json.loads((d / "stats.json").read_text()) == {"run": 2}


def test_atomic_path_never_replaces_the_working_directory_or_home(tmp_path, monkeypatch):
    cwd = _foreign_dir(tmp_path / "project")
    monkeypatch.chdir(cwd)
    with pytest.raises(TagtuneError, match="working directory"), atomic_path(cwd, force=True) as tmp:
        tmp.mkdir()
    home = _foreign_dir(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(TagtuneError, match="home"), atomic_path(home, force=True) as tmp:
        tmp.mkdir()
    assert _intact(cwd) and _intact(home)


# ------------------------------------------------------------------------------------ tagtune pull
@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_finetuned) -> Path:
    """A workspace whose SQLite MLflow store has the tiny model registered as `tiny` v1 (by the real
    `python -m stages.register`)."""
    root = tmp_path_factory.mktemp("pull")
    (root / "reports" / "evaluate").mkdir(parents=True)
    write_json(
        root / "reports" / "evaluate" / "metrics.json", {"tuned.answer_f1": 0.5, "base.answer_f1": 0.1}
    )
    write_params(
        root,
        {
            "paths": {"finetune": str(tiny_finetuned)},
            "register": {"model_name": "tiny"},
            "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        },
    )
    r = stage_cli(root, "register", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.mark.integration
def test_pull_refuses_a_foreign_directory_and_replaces_its_own(registry):
    dest = _foreign_dir(registry / "exported")
    line = one_line_error(cli(registry, "pull", "--dest", "exported"))
    assert "exported" in line and "--force" in line
    assert _intact(dest)

    fresh = registry / "fresh"
    for _ in range(2):  # a second pull replaces the first (it holds tagtune.json)
        r = cli(registry, "pull", "--dest", "fresh")
        assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((fresh / "tagtune.json").read_text())["version"] == "1"

    r = cli(registry, "pull", "--dest", "exported", "--force")  # the user said so
    assert r.returncode == 0, r.stderr[-2000:]
    assert (dest / "tagtune.json").is_file() and not (dest / "thesis.tex").exists()


@pytest.mark.integration
def test_pull_dest_dot_never_empties_the_working_directory(registry):
    before = sorted(p.name for p in registry.iterdir())
    for extra in ([], ["--force"]):
        line = one_line_error(cli(registry, "pull", "--dest", ".", *extra))
        assert "working directory" in line
    assert sorted(p.name for p in registry.iterdir()) == before
    assert (registry / "params.yaml").is_file() and (registry / "mlflow.db").is_file()


# ------------------------------------------------------------------------- overlapping output paths
@pytest.mark.parametrize(
    ("raw", "needles"),
    [
        ({"paths": {"ingest": "data/raw"}}, ["paths.ingest", "paths.raw"]),
        ({"paths": {"format": "data/ingest/formatted"}}, ["paths.format", "paths.ingest"]),
        ({"paths": {"checkpoints": "models/finetune/ckpt"}}, ["paths.checkpoints", "paths.finetune"]),
        ({"paths": {"evaluate": "."}}, ["paths.evaluate", "repository"]),
        ({"paths": {"split": "data/../.."}}, ["paths.split", "repository"]),
        ({"paths": {"register": "/"}}, ["paths.register"]),
        (
            {"ingest": {"sources": [{"path": "data/ingest/more.csv", "format": "qa"}]}},
            ["ingest.sources.0.path", "paths.ingest"],
        ),
        (
            {"ingest": {"sources": [{"path": "data", "format": "qa"}]}},
            ["ingest.sources.0.path", "paths.ingest"],
        ),
        (
            {"format": {"refusal": {"questions": "data/split/ood.txt"}}},
            ["format.refusal.questions", "paths.split"],
        ),
    ],
)
def test_overlapping_output_paths_fail_at_validation_naming_the_keys(raw, needles):
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_an_output_path_at_home_fails_at_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="paths.evaluate.*home"):
        parse_params({"paths": {"evaluate": str(tmp_path)}})


def test_ingest_writing_over_its_raw_data_fails_before_anything_runs(tmp_path):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "faq.csv").write_text("question,answer\nWhere is the quay?,East.\n")
    write_params(
        tmp_path,
        {
            "paths": {"ingest": "data/raw"},
            "ingest": {"sources": [{"path": "data/raw/faq.csv", "format": "qa"}]},
        },
    )
    line = one_line_error(stage_cli(tmp_path, "ingest"))
    assert "paths.ingest" in line and "paths.raw" in line
    assert (raw / "faq.csv").read_text().startswith("question,answer")
    assert sorted(p.name for p in raw.iterdir()) == ["faq.csv"]
