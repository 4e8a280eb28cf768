"""Throwaway git + DVC workspaces with the real dvc.yaml and params.yaml, a tiny model and tiny data.

Used by the flow, CLI, UI and scale-out tests: `make_workspace` copies what dvc.yaml depends on
(stages/, tagtune/), writes four tiny facts, and points params.yaml at a tiny model and a SQLite MLflow
store inside the workspace. `memorised_workspace` trains one through `tagtune run` until it answers its
training questions (so it becomes `@champion`), once per test session. `start`/`wait_for`/`stop` and
`prefect_server` run the real servers and workers of the integration tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
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


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a long-running process in its own session (so `stop` ends its children too); its output
    goes to `log`, a file: a pipe nobody reads would fill and block a chatty server or worker."""
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, *watch: tuple[subprocess.Popen, Path]
) -> Any:
    """Poll `predicate` every second until it returns something truthy (HTTP errors count as not yet);
    fail at once if a watched (process, log) exits meanwhile, showing the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in watch:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{what}: {log.name}: process exited {proc.returncode}:\n{tail}")
        try:
            if value := predicate():
                return value
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@contextlib.contextmanager
def prefect_server(ws: Path, logs: Path, **extra_env: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A real `prefect server start` on a free port (its database in the workspace's PREFECT_HOME).

    Yields (API URL, the environment for processes in `ws` that use it: deploy, workers); stopped on exit.
    """
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    e = env(
        ws,
        PREFECT_API_URL=api,
        PREFECT_UI_ENABLED="false",
        PREFECT_RUNNER_POLL_FREQUENCY="2",  # seconds: a served deployment picks up runs sooner
        # a run that waits for the deployment's concurrency slot is retried after this many seconds (30)
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="2",
        **extra_env,
    )
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = logs / "prefect-server.log"
    server = start(cmd, ws, e, log)
    try:
        wait_for(lambda: httpx.get(f"{api}/health").status_code == 200, 120, "prefect server", (server, log))
        yield api, e
    finally:
        stop(server)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process a test started in its own session, and its children (the same process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


def deployment(api: str, name: str = "tagtune-pipeline/retrain") -> dict[str, Any] | None:
    """The deployment as the API has it, or None while there is none."""
    r = httpx.get(f"{api}/deployments/name/{name}", timeout=10)
    return r.json() if r.status_code == 200 else None


def two_runs_one_at_a_time(
    api: str, deployment_id: str, *watch: tuple[subprocess.Popen, Path]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Create two flow runs of a deployment at once and wait for both; asserts both COMPLETED, one
    after the other (the concurrency limit of 1), the first training 4 steps and the second none.

    Returns the two flow runs as the API has them, in the order they started.
    """
    http = httpx.Client(base_url=api, timeout=10)

    def create_run() -> httpx.Response | None:
        # a busy server (SQLite locked under load) answers 503 "retry": retry like Prefect's client does
        r = http.post(f"/deployments/{deployment_id}/create_flow_run", json={})
        return r if r.status_code != 503 else None

    created = [wait_for(create_run, 60, "create_flow_run", *watch) for _ in range(2)]
    assert all(r.status_code == 201 for r in created), [r.text for r in created]

    def finished(run_id: str) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            r = http.get(f"/flow_runs/{run_id}").json()
            return r if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        return check

    runs = [wait_for(finished(r.json()["id"]), 300, f"flow run {r.json()['id']}", *watch) for r in created]
    assert all(r["state"]["type"] == "COMPLETED" for r in runs), [r["state"] for r in runs]
    first, second = sorted(runs, key=lambda r: r["start_time"])
    assert second["start_time"] >= first["end_time"]  # never two runs at once

    def summary(run: dict[str, Any]) -> str:
        key = {"flow_run_id": {"any_": [run["id"]]}, "key": {"any_": ["pipeline-summary"]}}
        return http.post("/artifacts/filter", json={"artifacts": key}).json()[0]["data"]

    assert "4 training steps" in summary(first)
    assert "nothing changed since the last run: 0 training steps" in summary(second)
    return first, second


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
