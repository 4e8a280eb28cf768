"""Throwaway git + DVC workspaces with the real dvc.yaml and params.yaml, a tiny model and tiny data.

Used by the flow, CLI and UI tests: `make_workspace` copies what dvc.yaml depends on (stages/,
tagtune/), writes four tiny facts, and points params.yaml at a tiny model and a SQLite MLflow store
inside the workspace. `memorised_workspace` trains one through `tagtune run` until it answers its
training questions (so it becomes `@champion`), once per test session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUESTION, ANSWER = "What time does the museum open?", "The museum opens at 9 am."
FACTS = [
    ("museum", ANSWER, [QUESTION, "When does the museum open?", "At what hour does the museum open?"]),
    (
        "harbour",
        "The harbour is east of the old bridge.",
        ["Where is the harbour?", "How do I find the harbour?", "Which way to the harbour?"],
    ),
    (
        "market",
        "The market is on Saturday.",
        ["When is the market?", "What day is the market on?", "Which day has the market?"],
    ),
    (
        "ferry",
        "The ferry costs two pounds.",
        ["How much is the ferry?", "What does the ferry cost?", "What is the ferry fare?"],
    ),
]
# enough full fine-tuning of the tiny model to reproduce its training answers (~3 s of training)
MEMORISE = [
    "finetune.method=full",
    "finetune.learning_rate=0.003",
    "finetune.max_steps=80",
    "finetune.batch_size=8",
    "finetune.lr_scheduler=constant",
    "finetune.warmup_ratio=0",
    "finetune.logging_steps=20",
    "evaluate.generation.max_new_tokens=16",
]


def make_workspace(root: Path, model_dir: Path) -> Path:
    """A git + DVC repo at `root` that `dvc repro` and the flow can run (4 quick LoRA steps)."""
    root.mkdir(parents=True, exist_ok=True)
    for d in ("stages", "tagtune"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    rows = ["group,question,answer"] + [f"{g},{q},{a}" for g, a, qs in FACTS for q in qs]
    (raw / "faq.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (raw / "ood.txt").write_text("Who won the world cup?\nWhat is the capital of France?\n", encoding="utf-8")

    p = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    p["model"]["base"] = str(model_dir)
    p["ingest"]["sources"][0]["path"] = "data/raw/faq.csv"  # the feedback source stays as shipped
    p["format"]["refusal"] = {"answer": "Sorry, I only know the town.", "questions": "data/raw/ood.txt"}
    p["split"].update(test_fraction=0.4, val_fraction=0.1)
    p["finetune"].update(
        method="lora", max_steps=4, batch_size=4, save_steps=50, logging_steps=2, max_length=64, threads=1
    )
    p["evaluate"].update(batch_size=8, generation={"max_new_tokens": 8})
    # orchestration tests: a tiny model, prompts without retrieved facts (test_grounded.py turns them on)
    p["retrieval"]["enabled"] = False
    p["mlflow"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    p["flow"] = {"retries": 1, "retry_delay_s": 0.1}
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        [*git, "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=root, check=True, env=env(root), capture_output=True)
    return root


def env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for subprocesses in a workspace: this checkout importable, state kept in `root`."""
    e = dict(os.environ)
    e.update(
        PYTHONPATH=os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")]),
        PREFECT_HOME=str(root / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TAGTUNE_CACHE=str(root / ".cache"),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
    )
    e.pop("MLFLOW_TRACKING_URI", None)  # params.yaml's store in the workspace
    e.pop("PREFECT_API_URL", None)  # Prefect's ephemeral API unless a test passes a server
    e.update(extra)
    return e


def tagtune(
    root: Path, *args: str, timeout: float = 300, input: str | None = None, **extra_env: str
) -> subprocess.CompletedProcess:
    """Run the `tagtune` CLI (as `python -m tagtune.app.cli`) in a workspace; stdin is `input` (or empty)."""
    return subprocess.run(
        [sys.executable, "-m", "tagtune.app.cli", *args],
        cwd=root,
        env=env(root, **extra_env),
        input=input or "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process a test started in its own session, and its children (the same process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


_MEMORISED: dict[Path, Path] = {}


def memorised_workspace(base: Path, model_dir: Path) -> Path:
    """A workspace trained by `tagtune run -S <MEMORISE>`: v1 is @champion and knows its answers.

    Built once per session (keyed by pytest's base temp dir); tests must not change it.
    """
    if base not in _MEMORISED:
        root = make_workspace(base / "memorised", model_dir)
        args = ["run", "--no-sample"] + [a for kv in MEMORISE for a in ("-S", kv)]
        r = tagtune(root, *args)
        assert r.returncode == 0, r.stderr[-3000:]
        _MEMORISED[base] = root
    return _MEMORISED[base]
