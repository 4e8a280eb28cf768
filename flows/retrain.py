"""Scheduled retraining: the pipeline flow as a Prefect deployment on `schedule.cron`.

    tagtune deploy                          # serve until Ctrl-C; runs on schedule.cron (params.yaml)
    tagtune deploy --cron "*/30 * * * *"    # another schedule, same deployment
    tagtune deploy --pool train             # register on a process work pool instead, and return;
    prefect worker start --pool train       # ... then workers (one or more machines) run it
    prefect deployment run tagtune-pipeline/retrain      # a run now, from anywhere that sees the API

Start a server first to keep runs and see them in its UI (`prefect server start`, then
PREFECT_API_URL=http://127.0.0.1:4200/api); without PREFECT_API_URL Prefect runs a temporary API that
lives only as long as the `deploy` process (`--pool` refuses that: its workers need a server to poll).

Each run is the ordinary pipeline flow (flows/pipeline.py) on this workspace: ingest re-reads every
source — new rows in the files, the SQL sources, the UI's feedback table — and DVC then decides what
changed. With nothing new, every later stage is up to date: the run ends in seconds with
"nothing changed since the last run: 0 training steps".

Never two runs at once: the deployment has a concurrency limit of 1 (`schedule.overlap: queue` keeps a
run that comes due meanwhile waiting for the slot; `skip` cancels it) — the server enforces it, however
many workers poll the pool —, a served deployment runs one flow at a time in its process, and the flow
itself holds a lock on the workspace (so a `tagtune run` by hand cannot overlap).

Scale-out path (README.md, "Scaling out": the exact commands, and what they cost): `--pool` puts the
deployment on a Prefect *process* work pool, whose `prefect worker start --pool NAME` processes run
each flow run in this workspace (a pull step sets the working directory to it, so every worker needs
the workspace at the same path: a git clone + `dvc pull`); the concurrency limit of 1 holds across all
workers. A DVC remote on S3 (`dvc push` after a run, `dvc pull` on a fresh clone) and an MLflow server
whose artifacts live in the same object store (`--artifacts-destination s3://...`,
MLFLOW_TRACKING_URI everywhere) share the data, the models and the registry between machines;
multi-GPU finetune is `torchrun --nproc_per_node N -m stages.finetune` (see stages/finetune.py).
"""

from __future__ import annotations

from pathlib import Path

from tagtune.config import Params, ScheduleConfig
from tagtune.errors import ConfigError, TagtuneError, one_line

DEPLOYMENT = "retrain"  # full name: tagtune-pipeline/retrain


def check_schedule(cfg: ScheduleConfig) -> None:
    """Validate cron and timezone with Prefect's own schedule model. Raises ConfigError naming the key."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cfg.cron, timezone=cfg.timezone)
    except ValidationError as e:
        err = e.errors()[0]
        key = "schedule." + ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"{key}: {err['msg']}, got {err.get('input')!r}") from None


def build_deployment(
    params_path: Path, cfg: ScheduleConfig, name: str = DEPLOYMENT, repo_dir: Path | None = None
):
    """The RunnerDeployment of the pipeline flow for this workspace (cron, concurrency limit 1)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.pipeline import pipeline

    check_schedule(cfg)
    repo_dir = Path(repo_dir or params_path.resolve().parent).resolve()
    strategy = {
        "queue": ConcurrencyLimitStrategy.ENQUEUE,
        "skip": ConcurrencyLimitStrategy.CANCEL_NEW,
    }[cfg.overlap]
    return pipeline.to_deployment(
        name=name,
        schedules=[Cron(cfg.cron, timezone=cfg.timezone)],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy),
        parameters={"params_path": str(params_path.resolve()), "repo_dir": str(repo_dir)},
        description=f"tagtune scheduled retraining of {repo_dir}",
        tags=["tagtune", "retrain"],
        # imported by module name, so the runner finds it whatever its working directory is
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def _schedule(params: Params, cron: str | None) -> ScheduleConfig:
    """params.yaml's `schedule:`, with `--cron` instead of its cron when given."""
    return params.schedule.model_copy(update={"cron": cron}) if cron else params.schedule


def serve_retrain(params_path: Path, params: Params, name: str = DEPLOYMENT, cron: str | None = None) -> None:
    """Register the deployment and run its scheduled (or API-triggered) flow runs until interrupted."""
    from prefect import serve

    deployment = build_deployment(params_path, _schedule(params, cron), name)
    serve(deployment, limit=1)  # this process never runs two flow runs at once either


def check_api() -> None:
    """Raise TagtuneError unless PREFECT_API_URL is set and answers: workers poll that server (without it
    Prefect would start a temporary API that dies with this process)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise TagtuneError(
            "a work pool needs a Prefect server its workers can reach: start one (`prefect server start`) "
            "and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)"
        )
    with get_client(sync_client=True) as client:
        if (problem := client.api_healthcheck()) is not None:
            raise TagtuneError(
                f"PREFECT_API_URL={url}: no Prefect API answers there ({one_line(problem)}); "
                "start it with `prefect server start` or fix PREFECT_API_URL"
            )


def ensure_process_pool(pool: str) -> None:
    """Create the Prefect work pool `pool` of type "process" if missing. Raises TagtuneError if a pool
    of that name runs another kind of infrastructure (its workers could not run this workspace)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
            return
    if existing.type != "process":
        raise TagtuneError(
            f"work pool {pool!r} is of type {existing.type!r}; tagtune deploys to a 'process' pool "
            "(its workers run the flow in this workspace): give --pool another name"
        )


def deploy_retrain(
    params_path: Path, params: Params, pool: str, name: str = DEPLOYMENT, cron: str | None = None
) -> str:
    """Register the deployment on the process work pool `pool` (created if missing); returns its full
    name. `prefect worker start --pool <pool>` processes then run its flow runs, one at a time.

    Raises:
        ConfigError: bad schedule. TagtuneError: no reachable Prefect API, or `pool` is not a process pool.
    """
    from prefect.runner.storage import LocalStorage

    deployment = build_deployment(params_path, _schedule(params, cron), name)  # bad cron: before any I/O
    check_api()
    ensure_process_pool(pool)
    # no image, nothing pushed: a worker starts each flow run in a temporary directory, and this pull
    # step (`set_working_directory`) moves it into the workspace, whose `flows.pipeline` it imports
    deployment.storage = LocalStorage(deployment.parameters["repo_dir"])
    deployment.apply(work_pool_name=pool)
    return deployment.full_name  # tagtune-pipeline/<name>
