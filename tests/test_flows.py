"""The Prefect flows: same workspace state as `dvc repro`, 0 training steps when nothing changed,
retries only for transient errors, and a scheduled deployment on a real `prefect server`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flowrepo import (
    ANSWER,
    QUESTION,
    deployment,
    env,
    make_workspace,
    prefect_server,
    start,
    stop,
    two_runs_one_at_a_time,
    wait_for,
)

from tagtune.errors import ConfigError, DataError
from tagtune.tracking import TrackingError


def _dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=ws, env=env(ws), capture_output=True, text=True, check=True)


@pytest.fixture(scope="module")
def prefect_api():
    """Flows called in-process report to a temporary Prefect API (its own SQLite DB)."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="module")
def flow_ws(tmp_path_factory, tiny_llama, prefect_api):
    """A workspace after one full flow run, and that run's summary."""
    from flows.pipeline import pipeline

    ws = make_workspace(tmp_path_factory.mktemp("flow") / "ws", tiny_llama)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAGTUNE_CACHE", str(ws / ".cache"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = pipeline(repo_dir=str(ws))
    return ws, summary


# ------------------------------------------------------------------------------- flow = dvc repro
@pytest.mark.integration
def test_flow_run_leaves_the_state_dvc_repro_would(flow_ws):
    ws, summary = flow_ws
    stages = ["feedback", "ingest", "format", "split", "index", "finetune", "evaluate", "register"]
    assert list(summary["stages"]) == stages
    assert all(s["ran"] for s in summary["stages"].values())
    assert summary["training_steps"] == 4 and summary["model_version"] == "1"
    assert summary["dvc_status"] == {}
    # DVC agrees: nothing to do but the feedback snapshot (always_changed), and `dvc repro` runs only it
    assert json.loads(_dvc(ws, "status", "--json").stdout) == {"feedback": ["always changed"]}
    repro = _dvc(ws, "repro").stdout
    assert re.findall(r"Running stage '(\w+)'", repro) == ["feedback"]
    assert all(f"'{s}' didn't change" in repro for s in stages[1:])
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(stages)
    assert lock["stages"]["finetune"]["params"]["params.yaml"]["finetune"]["max_steps"] == 4
    # dvc.lock records what the flow produced (hashes of the files on disk)
    data = json.loads(_dvc(ws, "data", "status", "--granular", "--json").stdout)
    assert (
        not data.get("uncommitted")
        and "models/finetune/model/model.safetensors" in data["committed"]["added"]
    )


@pytest.mark.integration
def test_unchanged_data_retrains_zero_steps(flow_ws):
    from flows.pipeline import pipeline

    ws, _ = flow_ws
    summary = pipeline(repo_dir=str(ws))
    ran = [n for n, s in summary["stages"].items() if s["ran"]]
    assert ran == ["feedback"]  # snapshots the feedback table; the same bytes: nothing else runs
    assert summary["training_steps"] == 0 and not summary["changed"]
    assert summary["message"] == "nothing changed since the last run: 0 training steps"
    assert summary["dvc_status"] == {}


@pytest.mark.integration
def test_new_feedback_row_retrains_and_registers(flow_ws):
    """A correction in the feedback table changes the ingested rows: the pipeline trains again."""
    from flows.pipeline import pipeline
    from tagtune.app.ui import FeedbackStore

    ws, _ = flow_ws
    # a correction of a trained answer: same question text, so it joins that question in train
    FeedbackStore(ws / "feedback.db").record(QUESTION, ANSWER, -1, "The museum opens at 10 am.")
    summary = pipeline(repo_dir=str(ws))
    assert [n for n, s in summary["stages"].items() if s["ran"]] == list(summary["stages"])
    assert summary["stages"]["ingest"]["result"]["rows"] == 13  # 12 faq rows + 1 correction
    assert summary["training_steps"] == 4 and summary["model_version"] == "2"
    assert summary["dvc_status"] == {}


# ----------------------------------------------------------------------------------------- retries
@pytest.mark.integration
def test_transient_errors_are_retried_and_data_errors_are_not(flow_ws, monkeypatch):
    import stages.split
    from flows.pipeline import pipeline

    ws, _ = flow_ws
    real, calls = stages.split.split, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TrackingError("mlflow unreachable")  # transient: retried (flow.retries = 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stages.split, "split", flaky)
    summary = pipeline(repo_dir=str(ws), only=["split"], force=True)
    assert len(calls) == 2 and summary["stages"]["split"]["ran"] and summary["dvc_status"] == {}

    def bad(*args, **kwargs):
        calls.append(1)
        raise DataError("data/format/examples.jsonl", 3, "invalid JSON")

    calls.clear()
    monkeypatch.setattr(stages.split, "split", bad)
    with pytest.raises(DataError, match="examples.jsonl:3"):
        pipeline(repo_dir=str(ws), only=["split"], force=True)
    assert len(calls) == 1  # validation errors fail at once


def test_is_transient_classification():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    from tagtune.tracking import is_transient

    assert is_transient(TrackingError("down")) and is_transient(ConnectionRefusedError())
    assert is_transient(TimeoutError()) and is_transient(OSError(5, "I/O error"))
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    for exc in (
        DataError("f", 1, "bad"),
        ConfigError("finetune.lora.r must be > 0"),
        FileNotFoundError("x"),
        PermissionError("x"),
        ValueError("x"),
        MlflowException("bad", error_code=INVALID_PARAMETER_VALUE),
    ):
        assert not is_transient(exc), exc


# --------------------------------------------------------------------------------------- overrides
def test_overrides_are_written_into_params_yaml_with_comments_kept(tmp_path):
    from tagtune.config import write_overrides

    src = Path(__file__).resolve().parents[1] / "params.yaml"
    params = tmp_path / "params.yaml"
    params.write_text(src.read_text())
    changed = write_overrides(params, ["finetune.max_steps=40", "split.seed=7", "finetune.lora.r=8"])
    assert changed == ["finetune.max_steps", "split.seed", "finetune.lora.r"]
    text = params.read_text()
    changed_lines = [
        (a, b) for a, b in zip(src.read_text().splitlines(), text.splitlines(), strict=True) if a != b
    ]
    expected = ("seed: 7", "lora: {r: 8,", "max_steps: 40")  # only the overridden lines change
    assert len(changed_lines) == 3, changed_lines
    assert all(b.strip().startswith(e) for (_, b), e in zip(changed_lines, expected, strict=True))
    assert "# tagtune pipeline parameters" in text and "# SmolLM2-135M-Instruct" in text
    p = yaml.safe_load(text)
    assert p["finetune"]["max_steps"] == 40 and p["split"]["seed"] == 7 and p["finetune"]["lora"]["r"] == 8
    assert write_overrides(params, ["split.seed=7"]) == []  # already so: file untouched


def test_invalid_override_changes_nothing(tmp_path):
    from tagtune.config import write_overrides

    params = tmp_path / "params.yaml"
    params.write_text("finetune:\n  max_steps: 3  # tiny\n")
    before = params.read_text()
    with pytest.raises(ConfigError, match="finetune.lora.r"):
        write_overrides(params, ["finetune.max_steps=9", "finetune.lora.r=0"])
    with pytest.raises(ConfigError, match="finetune.max_step"):
        write_overrides(params, ["finetune.max_step=9"])
    assert params.read_text() == before


def test_bad_schedule_is_a_config_error():
    from flows.retrain import check_schedule
    from tagtune.config import ScheduleConfig

    check_schedule(ScheduleConfig())
    with pytest.raises(ConfigError, match="schedule.cron"):
        check_schedule(ScheduleConfig(cron="61 * * * *"))
    with pytest.raises(ConfigError, match="schedule.timezone"):
        check_schedule(ScheduleConfig(timezone="Mars/Olympus"))


# ------------------------------------------------------------------- deployment on a real server
@pytest.mark.integration
def test_scheduled_deployment_on_a_real_prefect_server(tmp_path, tiny_llama):
    """`tagtune deploy` against `prefect server start`: runs triggered through the API complete,
    one at a time, and the second (nothing changed) reports 0 training steps."""
    ws = make_workspace(tmp_path / "ws", tiny_llama)
    with prefect_server(ws, tmp_path) as (api, e):
        cmd = [sys.executable, "-m", "tagtune.app.cli", "deploy", "--cron", "0 0 1 1 *"]
        served = (start(cmd, ws, e, tmp_path / "deploy.log"), tmp_path / "deploy.log")
        try:
            dep = wait_for(lambda: deployment(api), 120, "the retrain deployment", served)
            assert dep["global_concurrency_limit"]["limit"] == 1
            assert dep["schedules"][0]["schedule"]["cron"] == "0 0 1 1 *"
            assert dep["parameters"]["repo_dir"] == str(ws.resolve())
            two_runs_one_at_a_time(api, dep["id"], served)
        finally:
            stop(served[0])
    # up to date but for the feedback snapshot, which is `always changed` by design
    assert json.loads(_dvc(ws, "status", "--json").stdout) == {"feedback": ["always changed"]}


def test_the_prefect_scheduler_can_insert_scheduled_runs(tmp_path, monkeypatch):
    """The server's scheduler service inserts a deployment's upcoming runs in bulk; with SQLAlchemy 2.1
    that insert raises ("Can't evaluate bulk DML statement") and cron schedules never fire, silently
    (pyproject pins sqlalchemy<2.1). Calls the function the scheduler calls, on a fresh database."""
    import asyncio
    import datetime
    import uuid

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/prefect.db")
    from prefect.server import models, schemas
    from prefect.server.database import provide_database_interface

    async def insert() -> list:
        db = provide_database_interface()
        await db.create_db()
        now = datetime.datetime.now(datetime.UTC)
        async with db.session_context(begin_transaction=True) as session:
            flow = await models.flows.create_flow(session=session, flow=schemas.core.Flow(name="f"))
            dep = await models.deployments.create_deployment(
                session=session, deployment=schemas.core.Deployment(name="d", flow_id=flow.id)
            )
            run = {
                "id": uuid.uuid4(),
                "flow_id": flow.id,
                "deployment_id": dep.id,
                "name": "scheduled",
                "idempotency_key": "scheduled-1",
                "parameters": {},
                "tags": [],
                "empirical_policy": {},
                "created": now,
                "updated": now,
                "state": {"type": "SCHEDULED", "name": "Scheduled", "timestamp": now},
            }  # fmt: skip  (a row as models.deployments._generate_scheduled_flow_runs makes it)
            return await models.deployments._insert_scheduled_flow_runs(session=session, runs=[run])

    assert len(asyncio.run(insert())) == 1


def test_feedback_store_semantics(tmp_path):
    """Latest verdict per question wins; 👎 without a correction trains nothing."""
    from tagtune.app.ui import FeedbackStore

    store = FeedbackStore(tmp_path / "fb.db")
    assert store.examples() == [] and not (tmp_path / "fb.db").exists()  # no file until a verdict
    store.record(QUESTION, ANSWER, 1)
    store.record("Where is the harbour?", "west", -1)
    assert store.examples() == [{"question": QUESTION, "answer": ANSWER}]
    store.record(" what time does the museum open? ", "9", -1, "It opens at 10 am.")
    store.record("When is the market?", "Saturday.", 1)
    store.record("When is the market?", "Saturday.", -1)  # withdraws the 👍
    assert store.examples() == [
        {"question": "what time does the museum open?", "answer": "It opens at 10 am."}
    ]
    assert [r["rating"] for r in store.rows()] == [1, -1, -1, 1, -1]
    with pytest.raises(Exception, match="rating"):
        store.record(QUESTION, ANSWER, 0)


def test_feedback_without_training_rows_does_not_break_ingest(tmp_path):
    """Only a 👎 without a correction so far: the feedback view is empty, the retrain must go on."""
    from stages.ingest import ingest
    from tagtune.app.ui import EXAMPLES_QUERY, FeedbackStore
    from tagtune.config import IngestConfig

    (tmp_path / "faq.csv").write_text(f"question,answer\n{QUESTION},{ANSWER}\n")
    FeedbackStore(tmp_path / "feedback.db").record(QUESTION, "no idea", -1)
    cfg = IngestConfig.model_validate(
        {
            "sources": [
                {"path": "faq.csv", "format": "qa"},
                {"format": "sql", "path": "feedback.db", "query": EXAMPLES_QUERY, "optional": True},
            ]
        }
    )
    assert ingest(cfg, tmp_path / "out", base_dir=tmp_path)["rows"] == 1
