"""The `tagtune` CLI through real subprocesses: run/show print the champion, chat answers from the
registry, pull writes a loadable model, and every error is one line with a non-zero exit."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from flowrepo import ANSWER, QUESTION, make_workspace, memorised_workspace, tagtune

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("run", "stage", "show", "deploy", "chat", "pull", "export", "ui", "rollback")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama) -> Path:
    """A workspace whose v1 (@champion) memorised its training answers."""
    return memorised_workspace(tmp_path_factory.getbasetemp(), tiny_llama)


@pytest.fixture(scope="module")
def empty_ws(tmp_path_factory, tiny_llama) -> Path:
    """A workspace where nothing ran yet (no registry)."""
    return make_workspace(tmp_path_factory.mktemp("cli") / "empty", tiny_llama)


def _error_line(r) -> str:
    """The CLI's error: exit 1, no traceback, the last stderr line is `tagtune <cmd>: error: ...`."""
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr.strip().splitlines()[-1]


def test_console_script_and_commands(tmp_path):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tagtune"] == "tagtune.app.cli:app"
    r = tagtune(tmp_path, "--help", timeout=60)
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)


def test_config_errors_are_one_line_before_anything_runs(empty_ws):
    r = tagtune(empty_ws, "run", "-p", "missing.yaml", timeout=60)
    assert _error_line(r) == "tagtune run: error: missing.yaml: cannot read params: No such file or directory"
    assert len(r.stderr.strip().splitlines()) == 1

    before = (empty_ws / "params.yaml").read_text()
    r = tagtune(empty_ws, "run", "-S", "finetune.lora.r=0", timeout=60)
    line = _error_line(r)
    assert line.startswith("tagtune run: error: params.yaml: invalid params; finetune.lora.r:")
    assert (empty_ws / "params.yaml").read_text() == before  # the bad override was not written

    assert "no such stage" in _error_line(tagtune(empty_ws, "stage", "train", timeout=60))
    assert "schedule.cron" in _error_line(tagtune(empty_ws, "deploy", "--cron", "61 * * * *", timeout=60))
    assert "temperature" in _error_line(
        tagtune(empty_ws, "chat", "-q", "hi", "--temperature", "0", timeout=60)
    )


@pytest.mark.integration
def test_registry_errors_are_one_line(empty_ws):
    line = _error_line(tagtune(empty_ws, "chat", "-q", QUESTION, timeout=120))
    assert line.startswith("tagtune chat: error: models:/tagtune-town@champion: not found in the registry")
    line = _error_line(tagtune(empty_ws, "pull", "--dest", "out", "--version", "7", timeout=120))
    assert line.startswith("tagtune pull: error: models:/tagtune-town/7: not found")
    assert "tagtune rollback: error:" in _error_line(tagtune(empty_ws, "rollback", timeout=120))


@pytest.mark.integration
def test_stage_data_error_is_one_line(empty_ws):
    """A DataError inside the flow: Prefect logs the failed state, the CLI ends with one line."""
    faq = empty_ws / "data" / "raw" / "faq.csv"
    good = faq.read_text()
    faq.write_text("group,question,answer\nx,,no question\n")
    try:
        line = _error_line(tagtune(empty_ws, "stage", "ingest", timeout=180))
    finally:
        faq.write_text(good)
    assert line.startswith("tagtune stage: error: data/raw/faq.csv:2:")


@pytest.mark.integration
def test_run_prints_the_champion_and_a_sample_answer(ws):
    r = tagtune(ws, "run")  # nothing changed since the fixture's run
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "nothing changed since the last run: 0 training steps" in out
    assert "champion: tagtune-town v1 (models:/tagtune-town@champion)" in out
    assert "metrics:  tuned.answer_f1=" in out
    assert "sample:   Q: " in out and "A: " in out
    r = tagtune(ws, "show")
    assert r.returncode == 0 and "champion: tagtune-town v1" in r.stdout, r.stderr[-2000:]
    assert "dvc status not clean" not in r.stderr


@pytest.mark.integration
def test_chat_answers_a_training_question_from_the_registry(ws):
    r = tagtune(ws, "chat", "-q", QUESTION)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == ANSWER  # streamed, cut at the end tag
    assert "tagtune chat: tagtune-town v1 (@champion)" in r.stderr
    # by version, questions on stdin, generation flags: 3 new tokens stop before the end tag
    r = tagtune(ws, "chat", "--version", "1", "--max-new-tokens", "3", "--greedy", input=f"{QUESTION}\n")
    assert r.returncode == 0, r.stderr[-3000:]
    q, truncated = r.stdout.splitlines()
    assert q == f"Q: {QUESTION}" and truncated and ANSWER.startswith(truncated) and truncated != ANSWER


@pytest.mark.integration
def test_pull_writes_a_model_that_answers_offline(ws, tmp_path):
    dest = tmp_path / "exported"
    r = tagtune(ws, "pull", "--dest", str(dest))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((dest / "tagtune.json").read_text())["version"] == "1"
    assert (dest / "MLmodel").is_file()
    r = tagtune(ws, "chat", "--model-dir", str(dest), "-q", QUESTION)
    assert r.returncode == 0 and r.stdout.strip() == ANSWER, r.stderr[-3000:]
