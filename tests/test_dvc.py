"""The real `dvc repro` on a throwaway git + DVC repo: builds, no-ops, and re-runs only what changed."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from flowrepo import env, make_workspace

pytestmark = pytest.mark.integration


def _dvc(root, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(["dvc", *args], cwd=root, env=env(root), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def _ran(out: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", out)


def test_repro_builds_then_noops_then_reruns_only_the_changed_stage(tmp_path, tiny_llama):
    root = make_workspace(tmp_path / "ws", tiny_llama)
    first = _dvc(root, "repro", "split")
    assert _ran(first.stdout) == ["feedback", "ingest", "format", "split"]
    for f in (
        "data/ingest/rows.jsonl",
        "data/format/examples.jsonl",
        "data/format/preview.md",
        "data/split/train.jsonl",
        "data/split/test.jsonl",
    ):
        assert (root / f).is_file(), f
    # the feedback snapshot always runs (DVC cannot hash the database); same bytes: nothing else runs
    assert _ran(_dvc(root, "repro", "split").stdout) == ["feedback"]

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["split"]["seed"] = 7
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc(root, "repro", "split").stdout) == ["feedback", "split"]


def test_repro_sees_new_feedback_and_only_new_feedback(tmp_path, tiny_llama):
    """`dvc repro` alone picks up a correction recorded by the UI (with its provenance), and a repro
    with no new feedback runs nothing past the snapshot."""
    from tagtune.app.ui import FeedbackStore
    from tagtune.io import read_jsonl

    root = make_workspace(tmp_path / "ws", tiny_llama)
    _dvc(root, "repro", "ingest")
    store = FeedbackStore(str(root / "feedback.db"))
    store.record(
        "When does the museum open?", "At noon.", -1, "The museum opens at 9 am.", "tagtune-town", "3"
    )
    assert _ran(_dvc(root, "repro", "ingest").stdout) == ["feedback", "ingest"]
    (row,) = read_jsonl(root / "data" / "feedback" / "examples.jsonl")
    assert (row["answer"], row["model_version"], row["rating"]) == ("The museum opens at 9 am.", "3", -1)
    fed = [r for r in read_jsonl(root / "data" / "ingest" / "rows.jsonl") if "feedback" in r["source"]]
    assert len(fed) == 1 and fed[0]["messages"][-1]["content"] == "The museum opens at 9 am."
    store.record("Is the museum free?", "Yes.", 1, None, "tagtune-town", "3")  # 👍 keeps the answer
    assert _ran(_dvc(root, "repro", "ingest").stdout) == ["feedback", "ingest"]
    assert _ran(_dvc(root, "repro", "ingest").stdout) == ["feedback"]


def test_bad_raw_data_fails_the_repro_and_leaves_no_output(tmp_path, tiny_llama):
    root = make_workspace(tmp_path / "ws", tiny_llama)
    with open(root / "data" / "raw" / "faq.csv", "a", encoding="utf-8") as f:
        f.write("broken,What is missing here?,\n")  # empty answer on the last line
    lines = (root / "data" / "raw" / "faq.csv").read_text().count("\n")
    r = subprocess.run(["dvc", "repro", "ingest"], cwd=root, env=env(root), capture_output=True, text=True)
    assert r.returncode != 0
    assert f"data/raw/faq.csv:{lines}" in r.stderr + r.stdout
    assert not (root / "data" / "ingest").exists()
