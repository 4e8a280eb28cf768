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
    assert _ran(first.stdout) == ["ingest", "format", "split"]
    for f in (
        "data/ingest/rows.jsonl",
        "data/format/examples.jsonl",
        "data/format/preview.md",
        "data/split/train.jsonl",
        "data/split/test.jsonl",
    ):
        assert (root / f).is_file(), f
    assert _ran(_dvc(root, "repro", "split").stdout) == []

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["split"]["seed"] = 7
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc(root, "repro", "split").stdout) == ["split"]


def test_bad_raw_data_fails_the_repro_and_leaves_no_output(tmp_path, tiny_llama):
    root = make_workspace(tmp_path / "ws", tiny_llama)
    with open(root / "data" / "raw" / "faq.csv", "a", encoding="utf-8") as f:
        f.write("broken,What is missing here?,\n")  # empty answer on the last line
    lines = (root / "data" / "raw" / "faq.csv").read_text().count("\n")
    r = subprocess.run(["dvc", "repro", "ingest"], cwd=root, env=env(root), capture_output=True, text=True)
    assert r.returncode != 0
    assert f"data/raw/faq.csv:{lines}" in r.stderr + r.stdout
    assert not (root / "data" / "ingest").exists()
