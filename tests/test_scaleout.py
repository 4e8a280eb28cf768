"""Past one machine (README "Scaling out"), with real engines on 127.0.0.1:

- `tagtune deploy --pool p` on a real `prefect server`, two real `prefect worker start --pool p`: the
  runs complete through the workers, one at a time;
- an MLflow server whose artifacts live in an S3-compatible store (moto's server): the flow registers
  there, another process pulls the version back through the server to the same logits;
- a DVC remote on the same store: `dvc push`, a fresh `git clone` + `dvc pull`, and DVC has nothing
  to reproduce.

One pipeline run on the pool feeds all three (the module's fixtures), so the whole file costs one
tiny training run plus the servers' start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from flowrepo import (
    QUESTION,
    deployment,
    env,
    free_port,
    make_workspace,
    prefect_server,
    start,
    stop,
    tagtune,
    two_runs_one_at_a_time,
    wait_for,
)

BUCKET = "tagtune"
POOL = "p"
MODEL_NAME = "tagtune-town"  # register.model_name as shipped (the workspace keeps it)
# moto accepts any credentials; DVC and MLflow's server read them from the environment, as with real S3
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def _objects(endpoint: str, prefix: str) -> dict[str, int]:
    """{key: size} of every object under `prefix` in the bucket."""
    pages = _s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run(cwd: Path, *cmd: str, **extra_env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env(cwd, **extra_env), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
    return r


# ---------------------------------------------------------------------------------------- engines
@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1 with an empty bucket; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3) -> Iterator[str]:
    """`mlflow server` with a SQLite backend and its artifacts in s3://tagtune/mlartifacts; yields its URL.

    Clients upload and download artifacts through the server (`mlflow-artifacts:/`): only the server
    holds S3 credentials.
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    port, log = free_port(), root / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", f"s3://{BUCKET}/mlartifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = start(cmd, root, env(root, MLFLOW_S3_ENDPOINT_URL=s3, **S3_CREDENTIALS), log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, 120, "mlflow server", (proc, log))
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def pool_runs(tmp_path_factory, tiny_llama, mlflow_server) -> Iterator[dict[str, Any]]:
    """A workspace deployed with `tagtune deploy --pool p` on a real Prefect server, two workers, and
    two flow runs created at once, both finished. MLflow is the server above (workers get no S3 keys)."""
    tmp = tmp_path_factory.mktemp("scaleout")
    ws = make_workspace(tmp / "ws", tiny_llama)
    with prefect_server(ws, tmp, MLFLOW_TRACKING_URI=mlflow_server) as (api, e):
        t0 = time.monotonic()
        deployed = tagtune(
            ws, "deploy", "--pool", POOL, "--cron", "0 0 1 1 *", timeout=120, PREFECT_API_URL=api
        )
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        workers = []
        try:
            for name in ("w1", "w2"):
                log = tmp / f"worker-{name}.log"
                cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", name]
                # poll every 2 s (default 10) so the second run starts soon after the first ends
                workers.append((start(cmd, ws, {**e, "PREFECT_WORKER_QUERY_SECONDS": "2"}, log), log))
            dep = deployment(api)
            first, second = two_runs_one_at_a_time(api, dep["id"], *workers)
            yield {
                "ws": ws,
                "api": api,
                "deploy": deployed,
                "deployment": dep,
                "runs": (first, second),
                "worker_logs": [log for _, log in workers],
                "seconds": time.monotonic() - t0,
            }
        finally:
            for proc, _ in workers:
                stop(proc)


# -------------------------------------------------------------------------------- work pool, workers
def test_deploy_to_a_pool_needs_a_reachable_prefect_api(tmp_path, tiny_llama):
    ws = make_workspace(tmp_path / "ws", tiny_llama)
    for url, expected in (
        (None, "set PREFECT_API_URL"),
        (f"http://127.0.0.1:{free_port()}/api", "no Prefect API answers there"),
    ):
        extra = {"PREFECT_API_URL": url} if url else {}
        r = tagtune(ws, "deploy", "--pool", POOL, timeout=120, **extra)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("tagtune deploy: error: ") and "PREFECT_API_URL" in line and expected in line


@pytest.mark.integration
def test_workers_run_the_pool_deployment_one_at_a_time(pool_runs, mlflow_server):
    """Two workers poll the pool; two runs created together never overlap (the deployment's
    concurrency limit of 1 is the server's, not a process's); the first trains, the second has nothing to do."""
    from mlflow.tracking import MlflowClient

    ws, api, dep = pool_runs["ws"], pool_runs["api"], pool_runs["deployment"]
    assert f"prefect worker start --pool {POOL}" in pool_runs["deploy"].stdout
    pool = httpx.get(f"{api}/work_pools/{POOL}").json()
    assert pool["type"] == "process"  # created by deploy
    assert dep["work_pool_name"] == POOL and dep["global_concurrency_limit"]["limit"] == 1
    assert dep["schedules"][0]["schedule"]["cron"] == "0 0 1 1 *"
    assert dep["entrypoint"] == "flows.pipeline.pipeline"
    assert dep["parameters"]["repo_dir"] == str(ws.resolve())
    step = {"prefect.deployments.steps.set_working_directory": {"directory": str(ws.resolve())}}
    assert dep["pull_steps"] == [step]
    first, second = pool_runs["runs"]
    assert first["work_pool_name"] == second["work_pool_name"] == POOL
    # the server held the later run back until the first one's slot was free
    states = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": second["id"]}).json()
    assert "AwaitingConcurrencySlot" in [s["name"] for s in states], [s["name"] for s in states]
    # the workers, not a served process, ran them: each run's process was started by one of them
    logs = "".join(log.read_text(errors="replace") for log in pool_runs["worker_logs"])
    assert all(f"Flow run '{r['name']}' submitted to infrastructure" in logs for r in (first, second))
    # DVC recorded the run: up to date but for the feedback snapshot, `always changed` by design
    status = _run(ws, "dvc", "status", "--json").stdout
    assert json.loads(status) == {"feedback": ["always changed"]}
    versions = MlflowClient(mlflow_server).search_model_versions(f"name='{MODEL_NAME}'")
    assert [v.version for v in versions] == ["1"]
    print(f"\ndeploy + 2 workers + 2 runs: {pool_runs['seconds']:.1f} s")


@pytest.mark.integration
def test_deploy_refuses_a_pool_of_another_type(pool_runs):
    ws, api = pool_runs["ws"], pool_runs["api"]
    r = httpx.post(f"{api}/work_pools/", json={"name": "k8s", "type": "kubernetes"}, timeout=10)
    assert r.status_code == 201, r.text
    r = tagtune(ws, "deploy", "--pool", "k8s", timeout=120, PREFECT_API_URL=api)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "work pool 'k8s' is of type 'kubernetes'" in r.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------ MLflow artifacts on S3
@pytest.mark.integration
def test_registered_version_lives_in_s3_and_another_process_pulls_it(pool_runs, mlflow_server, s3, tmp_path):
    import torch

    from tagtune.models import load_finetuned

    ws = pool_runs["ws"]
    adapter = (ws / "models" / "finetune" / "adapter" / "adapter_model.safetensors").read_bytes()
    stored = _objects(s3, "mlartifacts/")
    in_s3 = [k for k in stored if k.endswith("artifacts/adapter/adapter_model.safetensors")]
    assert len(in_s3) == 1 and any(k.endswith("/MLmodel") for k in stored), sorted(stored)
    body = _s3_client(s3).get_object(Bucket=BUCKET, Key=in_s3[0])["Body"].read()
    assert _sha256(body) == _sha256(adapter)  # the bytes finetune wrote, in the bucket

    # another process, another directory, only the tracking server's URL: artifacts come through it
    dest = tmp_path / "pulled"
    t0 = time.monotonic()
    r = tagtune(ws, "pull", "--dest", str(dest), "--version", "1", MLFLOW_TRACKING_URI=mlflow_server)
    pull_s = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((dest / "tagtune.json").read_text())["version"] == "1"

    logits = []
    for source in (ws / "models" / "finetune", dest):
        model, tok = load_finetuned(source)
        with torch.no_grad():
            ids = tok(f"{QUESTION} <QUESTION>\n", return_tensors="pt")["input_ids"]
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])
    size = sum(stored.values()) / 1e6
    print(
        f"\nmlflow artifacts in s3: {len(stored)} objects, {size:.2f} MB; pull in a fresh process {pull_s:.1f} s"
    )


# ------------------------------------------------------------------------------ DVC remote on S3
@pytest.mark.integration
def test_dvc_remote_on_s3_reproduces_the_pipeline_in_a_fresh_clone(pool_runs, s3, tmp_path):
    ws = pool_runs["ws"]
    _run(ws, "dvc", "remote", "add", "-d", "store", f"s3://{BUCKET}/dvcstore")
    _run(ws, "dvc", "remote", "modify", "store", "endpointurl", s3)
    # what a run leaves for git: dvc.lock, the .gitignore files DVC wrote, and register's `cache: false`
    # outputs (DVC never pushes those: without them in git the clone would see register out of date)
    _run(ws, "git", "add", "dvc.lock", ".dvc/config", "reports/register", ":(glob)**/.gitignore")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    _run(ws, *git, "commit", "-qm", "pipeline run on the pool")

    t0 = time.monotonic()
    pushed = _run(ws, "dvc", "push", **S3_CREDENTIALS).stdout
    push_s = time.monotonic() - t0
    stored = _objects(s3, "dvcstore/")
    assert re.search(r"(\d+) files? pushed", pushed) and stored, pushed
    assert (
        json.loads(_run(ws, "dvc", "status", "--cloud", "--json", **S3_CREDENTIALS).stdout) == {}
    )  # all pushed

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True, capture_output=True)
    t0 = time.monotonic()
    _run(clone, "dvc", "pull", **S3_CREDENTIALS)
    pull_s = time.monotonic() - t0
    model = Path("models/finetune/adapter/adapter_model.safetensors")
    assert _sha256((clone / model).read_bytes()) == _sha256((ws / model).read_bytes())
    # nothing to reproduce: every stage up to date but the feedback snapshot (`always changed`)
    assert json.loads(_run(clone, "dvc", "status", "--json").stdout) == {"feedback": ["always changed"]}
    repro = _run(clone, "dvc", "repro").stdout
    assert re.findall(r"Running stage '(\w+)'", repro) == ["feedback"], repro
    others = set(yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]) - {"feedback"}
    assert set(re.findall(r"Stage '(\w+)' didn't change", repro)) == others, repro
    size = sum(stored.values()) / 1e6
    print(
        f"\ndvc push {len(stored)} objects, {size:.2f} MB in {push_s:.1f} s; dvc pull in a clone {pull_s:.1f} s"
    )
