"""Shared set-up of the reliability suite: real stage CLIs in throwaway workspaces, one tiny trained model.

Every scenario here drives the real code (stage CLIs in subprocesses, real MLflow stores and servers,
real signals); the helpers only build workspaces and read results.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def write_params(root: Path, params: dict[str, Any]) -> Path:
    """params.yaml in `root` (created) from a plain mapping."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def shipped_params() -> dict[str, Any]:
    """The repository's params.yaml as a mapping (what a new user starts from)."""
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def run_env(root: Path, **extra: str) -> dict[str, str]:
    """This checkout importable, caches and stores inside `root`, offline."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TAGTUNE_CACHE": str(root / ".cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def stage_cli(
    root: Path, stage: str, *args: str, timeout: float = 180, **env: str
) -> subprocess.CompletedProcess:
    """`python -m stages.<stage> ARGS` in `root`, as `dvc repro` runs it."""
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *args],
        cwd=root,
        env=run_env(root, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli(root: Path, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """The `tagtune` command (`python -m tagtune.app.cli`) in `root`."""
    return subprocess.run(
        [sys.executable, "-m", "tagtune.app.cli", *args],
        cwd=root,
        env=run_env(root, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        input="",
    )


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """A user's mistake: exit 1, no traceback, and the last stderr line is the error."""
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def tiny_finetuned(tmp_path_factory, tiny_llama) -> Path:
    """finetune's real output (full fine-tune of the tiny Llama, 4 steps): copy it before changing it."""
    from tinydata import make_splits

    from stages.finetune import finetune
    from tagtune.config import FinetuneConfig, ModelConfig

    root = tmp_path_factory.mktemp("tiny-finetuned")
    splits = make_splits(root / "data")
    cfg = FinetuneConfig(
        method="full", max_steps=4, batch_size=4, save_steps=100, logging_steps=1, precision="fp32"
    )
    finetune(splits, root / "out", cfg, ModelConfig(base=str(tiny_llama)), root / "ckpt", None)
    return root / "out"


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
