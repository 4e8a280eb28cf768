"""A full disk is one line naming what could not be written, and nothing half-written is left (item 8)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_env, write_params


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=16k tmpfs $d && umount $d"
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe],
        capture_output=True,
        timeout=30,
    )
    return r.returncode == 0


@pytest.mark.skipif(
    not _can_mount_tmpfs(), reason="needs unshare + tmpfs in a user namespace (a real full disk)"
)
def test_disk_full_during_a_stage_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "raw").mkdir()
    rows = ["question,answer"] + [
        f"What is fact number {i}?,Fact {i} is that the quay is old." for i in range(3000)
    ]
    (tmp_path / "raw" / "faq.csv").write_text("\n".join(rows) + "\n")
    write_params(
        tmp_path,
        {"paths": {"raw": "raw"}, "ingest": {"sources": [{"path": "raw/faq.csv", "format": "qa"}]}},
    )
    (tmp_path / "data").mkdir()
    # data/ is a 64 KiB filesystem of its own (in a private mount namespace): rows.jsonl cannot fit
    script = (
        "mount -t tmpfs -o size=64k tmpfs data && "
        f"{sys.executable} -m stages.ingest; echo rc=$?; echo left: $(ls -A data)"
    )
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        cwd=tmp_path,
        env={**run_env(tmp_path), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "rc=1" in r.stdout, (r.stdout, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("tagtune ingest: error:") and "no space left on device" in line, line
    assert "data/ingest" in line
    assert r.stdout.strip().endswith("left:"), r.stdout  # no partial output, no temp dir
