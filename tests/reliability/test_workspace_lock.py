"""One workspace lock for `dvc repro` stages and the Prefect flow (item 3).

A stage run (`python -m stages.<name>`, what `dvc repro` runs) and a flow run (`tagtune run/stage`)
take the same lock; a second one in the same workspace fails at once with a clear message, and a
killed holder leaves no stale lock behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import cli, one_line_error, run_env, stage_cli
from flowrepo import make_workspace
from tinydata import make_splits

BUSY = "another tagtune run is using this workspace"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.integration
def test_a_second_run_in_the_same_workspace_fails_at_once(tmp_path, tiny_llama):
    ws = make_workspace(tmp_path / "ws", tiny_llama)
    make_splits(ws / "held")
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["paths"]["split"] = "held/splits"
    p["finetune"].update(max_steps=100_000, save_steps=100_000, logging_steps=1000, threads=1)
    p["mlflow"]["log_runs"] = False
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))

    holder = subprocess.Popen(  # a long training, as `dvc repro` would run it
        [sys.executable, "-m", "stages.finetune"], cwd=ws, env=run_env(ws), stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(ws / "models" / "checkpoints" / "fingerprint.json", holder)  # it is training now

        start = time.monotonic()
        assert BUSY in one_line_error(stage_cli(ws, "ingest"))  # python -m stages.<name>
        assert time.monotonic() - start < 30  # at once: no waiting for the lock
        repro = subprocess.run(
            ["dvc", "repro", "ingest"], cwd=ws, env=run_env(ws), capture_output=True, text=True, timeout=120
        )
        assert repro.returncode != 0 and BUSY in repro.stdout + repro.stderr
        assert BUSY in one_line_error(cli(ws, "stage", "ingest", timeout=300))  # the Prefect flow
        assert not (ws / "data" / "ingest").exists()
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)  # a crashed holder: the kernel drops its lock
        holder.wait(timeout=30)
    r = stage_cli(ws, "ingest")
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_lock_is_reentrant_in_one_process(tmp_path, monkeypatch):
    """The flow holds the lock and runs stages in-process: no deadlock, no false "busy"."""
    import stages
    from tagtune.io import workspace_lock

    (tmp_path / "faq.csv").write_text("question,answer\nWhere?,Here.\n")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"ingest": {"sources": [{"path": "faq.csv", "format": "qa"}]}})
    )
    monkeypatch.chdir(tmp_path)
    with workspace_lock(tmp_path), workspace_lock(tmp_path):
        assert stages.main("ingest", []) == 0
    assert (tmp_path / "data" / "ingest" / "rows.jsonl").is_file()
