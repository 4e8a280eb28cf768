"""The pipeline as a Prefect flow: the same stage functions `dvc repro` runs, each one a task.

    tagtune run [-S finetune.max_steps=50]              # Prefect's ephemeral API; prints the champion
    PREFECT_API_URL=http://127.0.0.1:4200/api tagtune run    # the same against a real Prefect server
    tagtune run --force / --stage NAME                   # every stage / one stage (dvc repro -f / -s)

DVC stays the judge of what is up to date, so a flow run and `dvc repro` leave the same workspace:

- before each stage the flow asks DVC (`Repo.status`) whether the stage's deps, params or outs
  changed; an up-to-date stage is skipped, exactly as `dvc repro` would skip it;
- a stage that runs is its `run(params, root)` from `stages.STAGES` (the table `python -m
  stages.<name>` uses too), in-process, wrapped with `task(...)(fn)`;
  afterwards `Repo.commit(stage, force=True)` hashes its deps/params/outs into dvc.lock and the DVC
  cache — what `dvc repro` does after running `python -m stages.<name>`. After a flow run
  `dvc status` reports nothing to do and `dvc repro` skips every stage.
- Overrides (`-S key=value`) are validated with the whole params file, then written into
  params.yaml (comments kept), as `dvc exp run -S` does: dvc.lock can only record params that are
  in params.yaml, and a run whose params are not on disk could not be reproduced.
- The UI's feedback table is invisible to DVC's hashing: the `feedback` stage (`always_changed`)
  snapshots it into data/feedback on every run, flow or `dvc repro`; unchanged feedback gives the
  same bytes, so nothing downstream runs (a scheduled run with no new feedback trains 0 steps).
  Other SQL sources in `ingest.sources` make the flow re-run ingest every time, with the same effect
  (`dvc repro` alone cannot see their new rows: `dvc repro -f -s ingest && dvc repro` does).
- Before a stage with a check in `stages.CHECKS` (register: `python -m stages.register --check`) the
  check runs: it deletes register.json if the MLflow registry lost its version, so DVC sees the
  stage out of date.
- One run per workspace at a time: the flow holds the workspace lock that `python -m stages.<name>`
  (what `dvc repro` runs) takes too (tagtune/io.py `workspace_lock`), so a flow and a `dvc repro` —
  or two of either — never write the same outputs; the second one fails at once.

Retries (`flow:` in params.yaml): transient errors — MLflow unreachable, connection/I/O errors —
are retried with exponential backoff; bad data and bad params (DataError, ConfigError) fail at once.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import TableArtifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from stages import ALWAYS_RUN, CHECKS, STAGES, StageRun
from tagtune.config import FlowConfig, load_params, write_overrides
from tagtune.errors import ConfigError
from tagtune.io import WorkspaceBusyError, workspace_lock
from tagtune.tracking import is_transient

EVERY_RUN = (*ALWAYS_RUN, "ingest")  # may run with nothing new: DVC cannot hash a database (ingest: SQL)

__all__ = ["WorkspaceBusyError", "pipeline", "stage_task", "headline"]


# ---------------------------------------------------------------------------------------- retries
def _retry_if_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient failures."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - classifying the task's own exception
        return is_transient(exc)
    return False


# ------------------------------------------------------------------------------- results in the UI
def _scalars(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Flatten a stage result to (dotted key, scalar) pairs for a table artifact."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _scalars(v, f"{prefix}{k}.")
    elif isinstance(obj, list | tuple):
        if all(not isinstance(v, dict | list) for v in obj) and len(obj) <= 20:
            yield prefix[:-1], ", ".join(map(str, obj))
        else:
            yield prefix[:-1], f"[{len(obj)} items]"
    else:
        yield prefix[:-1], obj


def _publish_result(task_: Any, task_run: Any, state: Any) -> None:
    """on_completion hook: the stage's result as a table artifact on its task run."""
    result = state.result()
    if not isinstance(result, dict):
        return
    rows = [{"key": k, "value": v} for k, v in _scalars(result)][:200]
    TableArtifact(
        key=f"{task_.name}-result",
        table=rows,
        description=f"`{task_.name}` stage result (row counts, metrics, model version)",
        task_run_id=task_run.id,
        flow_run_id=task_run.flow_run_id,
    ).create()


# ------------------------------------------------------------------------------------------ stages
def stage_task(name: str, fn: StageRun, cfg: FlowConfig | None = None, **options: Any):
    """A stage's `run(params, root)` (from the STAGES/CHECKS table) as a Prefect task with the flow's retries."""
    cfg = cfg or FlowConfig()
    return task(
        name=name,
        retries=cfg.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=cfg.retry_delay_s),
        retry_jitter_factor=0.2,
        retry_condition_fn=_retry_if_transient,
        cache_policy=NO_CACHE,  # DVC decides what is up to date, not Prefect's cache
        **options,
    )(fn)


# --------------------------------------------------------------------------------------------- dvc
def _quiet_dvc():
    """DVC prints progress to stdout; keep it out of the flow's logs except warnings."""
    import logging

    logging.getLogger("dvc").setLevel(logging.WARNING)


def dvc_stages(repo: Any) -> list[str]:
    """Names of the pipeline stages in dvc.yaml, in file order."""
    return [s.name for s in repo.index.stages if getattr(s, "name", None)]


def dvc_changes(repo: Any, name: str) -> list[Any]:
    """What DVC says is out of date for one stage (deps, params, outs); [] when up to date."""
    return repo.status(targets=[name]).get(name, [])


def dvc_commit(repo: Any, name: str) -> None:
    """Record the stage's current deps/params/outs in dvc.lock and the DVC cache (as `dvc repro` does)."""
    with contextlib.redirect_stdout(io.StringIO()):  # "Updating lock file 'dvc.lock'"
        repo.commit(name, force=True)


def _describe(changes: list[Any]) -> str:
    parts = []
    for c in changes:
        if isinstance(c, dict):
            for kind, what in c.items():
                files = ", ".join(f"{k} {v}" for k, v in what.items()) if isinstance(what, dict) else what
                parts.append(f"{kind}: {files}")
        else:
            parts.append(str(c))
    return "; ".join(parts) or "changed"


# -------------------------------------------------------------------------------------------- flow
def _training_steps(result: dict[str, Any] | None) -> int:
    """Optimizer steps a finetune run actually took (a resumed run counts only the new ones)."""
    if not result:
        return 0
    return int(result.get("steps", 0)) - int(result.get("resumed_from_step", 0) or 0)


def headline(name: str, result: dict[str, Any] | None) -> str:
    """One line of the stage's result for the summary table."""
    if not result:
        return ""
    keys = {
        "feedback": ("verdicts", "examples"),
        "ingest": ("rows", "skipped"),
        "format": ("examples", "refusal_rows", "exact_duplicates"),
        "split": ("train", "val", "test"),
        "index": ("facts", "knowledge_facts"),
        "finetune": ("steps", "train_loss", "val_loss", "wall_time_s"),
        "evaluate": (),
        "register": ("version", "alias", "decision"),
    }[name]
    shown = {k: result[k] for k in keys if k in result}
    if name == "evaluate":  # flat keys such as tuned.answer_f1, base.answer_f1, delta.answer_f1
        wanted = ("answer_f1", "perplexity", "refusal")
        shown = {
            k: v for k, v in result.items() if any(w in k for w in wanted) and isinstance(v, int | float)
        }
        shown = {k: round(v, 4) for k, v in list(shown.items())[:6]}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def _run_reason(repo_root: Path, name: str, force: bool, has_sql: bool) -> str | None:
    """Why stage `name` must run now, or None when DVC says it is up to date."""
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        changes = dvc_changes(repo, name)
    if force:
        return "forced"
    if changes:
        return _describe(changes)
    if name == "ingest" and has_sql:
        return "re-reading SQL sources (DVC cannot hash a query result)"
    return None


def _finish(summary: dict[str, Any], status: dict[str, Any], only: list[str] | None) -> dict[str, Any]:
    """Add training_steps, changed, dvc_status, message and model_version to the summary."""
    finetune = summary["stages"].get("finetune", {})
    summary["training_steps"] = _training_steps(finetune.get("result"))
    ran = [n for n, s in summary["stages"].items() if s["ran"]]
    # feedback snapshots the UI's table and ingest re-reads SQL sources on every run (DVC cannot hash
    # a database): only what they feed tells whether anything changed
    summary["changed"] = any(n not in EVERY_RUN for n in ran)
    # an `always_changed` stage (feedback) is never "up to date" by design, which is not a stale state
    summary["dvc_status"] = {k: _describe(v) for k, v in status.items() if v != ["always changed"]}
    if summary["changed"] or only:
        summary["message"] = f"ran {', '.join(ran) or 'nothing'}; {summary['training_steps']} training steps"
    else:
        summary["message"] = "nothing changed since the last run: 0 training steps"
    register = summary["stages"].get("register", {}).get("result") or {}
    if register:
        summary["model_version"] = register.get("version")
    return summary


@flow(name="tagtune-pipeline", log_prints=True)
def pipeline(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    repo_dir: str = ".",
    force: bool = False,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """ingest → format → split → finetune → evaluate → register, skipping what DVC says is up to date.

    Args:
        params_path: params file, relative to `repo_dir`.
        overrides: `key=value` params overrides; written into params.yaml first (see module doc).
        repo_dir: the DVC repository (the flow works inside it, like `dvc repro`).
        force: run every stage even if up to date (`dvc repro -f`).
        only: run just these stages (`dvc repro -s`); the rest are left as they are.

    Returns:
        A summary: per stage whether it ran and why, its result; `training_steps`, `changed`,
        `message`, and `dvc_status` (empty = clean).

    Raises:
        ConfigError / DataError: bad params or data (not retried); TrackingError after retries.
    """
    from dvc.repo import Repo

    logger = get_run_logger()
    root = Path(repo_dir).resolve()
    if not (root / ".dvc").is_dir():
        raise ConfigError(f"{root}: not a DVC repository (run the flow from the project root, or `dvc init`)")
    _quiet_dvc()
    with contextlib.chdir(root), workspace_lock(root):
        if overrides and (changed := write_overrides(params_path, overrides)):
            logger.info("params.yaml updated (like `dvc exp run -S`): %s", ", ".join(changed))
        p = load_params(params_path)
        with Repo(str(root)) as repo:
            names = dvc_stages(repo)
        if unknown := [n for n in names if n not in STAGES]:
            raise ConfigError(f"dvc.yaml stages {unknown}: the flow has no task for them")
        if only and (bad := [n for n in only if n not in names]):
            raise ConfigError(f"no such stage in dvc.yaml: {', '.join(bad)} (stages: {', '.join(names)})")
        has_sql = any(s.format == "sql" for s in p.ingest.sources)
        summary: dict[str, Any] = {"stages": {}}
        for name in names:
            if only and name not in only:
                summary["stages"][name] = {"ran": False, "reason": "not selected"}
                continue
            if name in CHECKS and not force:
                # what DVC cannot see (the registry lost register.json's version?): a stale output is
                # deleted, so DVC reports the stage out of date (what `make run` does too)
                check = stage_task(f"check-{name}", CHECKS[name], p.flow)(p, root)
                logger.info("%s: %s", name, check["reason"])
            reason = _run_reason(root, name, force, has_sql)
            if reason is None:
                logger.info("%s: up to date (dvc status clean), skipped", name)
                summary["stages"][name] = {"ran": False, "reason": "up to date"}
                continue
            logger.info("%s: running (%s)", name, reason)
            run = stage_task(name, STAGES[name], p.flow, on_completion=[_publish_result], log_prints=True)
            result = run(p, root)
            with Repo(str(root)) as repo:
                dvc_commit(repo, name)
            summary["stages"][name] = {"ran": True, "reason": reason, "result": result}
        with Repo(str(root)) as repo:
            status = repo.status()
    summary = _finish(summary, status, only)
    _publish_summary(summary)
    logger.info("%s", summary["message"])
    if summary["dvc_status"]:
        logger.warning("dvc status is not clean: %s", summary["dvc_status"])
    return summary


def _publish_summary(summary: dict[str, Any]) -> None:
    """The run at a glance on the flow run's Artifacts tab."""
    rows = [
        f"| {name} | {'ran' if s['ran'] else 'skipped'} | {s['reason']} | {headline(name, s.get('result'))} |"
        for name, s in summary["stages"].items()
    ]
    md = "\n".join(
        [
            f"## {summary['message']}",
            "",
            "| stage | | why | result |",
            "|---|---|---|---|",
            *rows,
            "",
            f"`dvc status`: {'clean' if not summary['dvc_status'] else summary['dvc_status']}",
        ]
    )
    create_markdown_artifact(md, key="pipeline-summary", description="tagtune pipeline run")
