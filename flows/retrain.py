"""Scheduled retraining: the pipeline flow served as a Prefect deployment on `schedule.cron`.

    tagtune deploy                          # serve until Ctrl-C; runs on schedule.cron (params.yaml)
    tagtune deploy --cron "*/30 * * * *"    # another schedule, same deployment
    prefect deployment run tagtune-pipeline/retrain      # a run now, from anywhere that sees the API

Start a server first to keep runs and see them in its UI (`prefect server start`, then
PREFECT_API_URL=http://127.0.0.1:4200/api); without PREFECT_API_URL Prefect runs a temporary API that
lives only as long as the `deploy` process.

Each run is the ordinary pipeline flow (flows/pipeline.py) on this workspace: ingest re-reads every
source — new rows in the files, the SQL sources, the UI's feedback table — and DVC then decides what
changed. With nothing new, every later stage is up to date: the run ends in seconds with
"nothing changed since the last run: 0 training steps".

Never two runs at once: the deployment has a concurrency limit of 1 (`schedule.overlap: queue` keeps a
run that comes due meanwhile waiting for the slot; `skip` cancels it), this process runs one flow at a
time, and the flow itself holds a lock on the workspace (so a `tagtune run` by hand cannot overlap).

Scale-out path (not needed on one machine): a Prefect work pool + `prefect worker start` on the
training machines (`flow.deploy(work_pool_name=...)` instead of `serve`), MLflow server with a
database backend and object-store artifacts (`mlflow server --backend-store-uri postgresql://...
--artifacts-destination s3://...`, MLFLOW_TRACKING_URI everywhere), a DVC remote (`dvc remote add`;
`dvc push` after a run, `dvc pull` on a fresh worker), and multi-GPU finetune with
`torchrun --nproc_per_node N -m stages.finetune` (see stages/finetune.py).
"""

from __future__ import annotations

from pathlib import Path

from tagtune.config import Params, ScheduleConfig
from tagtune.errors import ConfigError

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


def serve_retrain(params_path: Path, params: Params, name: str = DEPLOYMENT, cron: str | None = None) -> None:
    """Register the deployment and run its scheduled (or API-triggered) flow runs until interrupted."""
    from prefect import serve

    cfg = params.schedule.model_copy(update={"cron": cron}) if cron else params.schedule
    deployment = build_deployment(params_path, cfg, name)
    serve(deployment, limit=1)  # this process never runs two flow runs at once either
