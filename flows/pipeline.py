"""The pipeline as a Prefect flow: the same six stage functions `dvc repro` runs, each one a task.

    tagtune run [-S finetune.max_steps=50]              # Prefect's ephemeral API; prints the champion
    PREFECT_API_URL=http://127.0.0.1:4200/api tagtune run    # the same against a real Prefect server
    python -m flows.pipeline [-S key=value] [--force]   # the flow alone, without the CLI's summary

DVC stays the judge of what is up to date, so a flow run and `dvc repro` leave the same workspace:

- before each stage the flow asks DVC (`Repo.status`) whether the stage's deps, params or outs
  changed; an up-to-date stage is skipped, exactly as `dvc repro` would skip it;
- a stage that runs is the stage function itself, in-process, wrapped with `task(...)(fn)`;
  afterwards `Repo.commit(stage, force=True)` hashes its deps/params/outs into dvc.lock and the DVC
  cache — what `dvc repro` does after running `python -m stages.<name>`. After a flow run
  `dvc status` reports nothing to do and `dvc repro` skips every stage.
- Overrides (`-S key=value`) are validated with the whole params file, then written into
  params.yaml (comments kept), as `dvc exp run -S` does: dvc.lock can only record params that are
  in params.yaml, and a run whose params are not on disk could not be reproduced.
- SQL sources (the UI's feedback table) are invisible to DVC's hashing, so when `ingest.sources`
  has one the flow always re-runs ingest; if the rows came out identical, dvc.lock is unchanged
  and every later stage is still up to date (a scheduled run with no new data trains 0 steps).
  (`dvc repro` alone cannot see new feedback rows: `dvc repro -f -s ingest && dvc repro` does.)
- Before register, `stages.register.check_registered` (`python -m stages.register --check`) deletes
  register.json if the MLflow registry lost its version, so DVC sees the stage out of date.
- One flow run per workspace at a time (a lock file in .dvc/tmp), scheduled or by hand.

Retries (`flow:` in params.yaml): transient errors — MLflow unreachable, connection/I/O errors —
are retried with exponential backoff; bad data and bad params (DataError, ConfigError) fail at once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import TableArtifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tagtune.config import FlowConfig, Params, load_params
from tagtune.errors import ConfigError, TagtuneError

STAGES = ("ingest", "format", "split", "finetune", "evaluate", "register")
LOCK_FILE = ".dvc/tmp/tagtune-flow.lock"  # one flow run per workspace (scheduled or by hand)


class WorkspaceBusyError(TagtuneError):
    """Another flow run holds this workspace."""


# ---------------------------------------------------------------------------------------- retries
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying: MLflow unreachable, connection/timeouts, I/O hiccups — never bad data/params."""
    from tagtune.tracking import TrackingError

    if isinstance(exc, TrackingError):  # a TagtuneError, but the server may come back
        return True
    if exc is None or isinstance(exc, (TagtuneError, *_PERMANENT_OS_ERRORS)):
        return False
    if isinstance(exc, OSError | TimeoutError):  # ConnectionError, requests' errors, disk hiccups
        return True
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    return isinstance(exc, MlflowException) and exc.error_code in (
        "TEMPORARILY_UNAVAILABLE",
        "REQUEST_LIMIT_EXCEEDED",
    )


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
def stage_function(name: str) -> Callable[..., dict[str, Any]]:
    """The pure stage function `stages.<name>.<name>` — the one `python -m stages.<name>` runs."""
    return getattr(importlib.import_module(f"stages.{name}"), name)


def stage_task(name: str, cfg: FlowConfig | None = None):
    """`stage_function(name)` wrapped as a Prefect task with the flow's retry policy."""
    cfg = cfg or FlowConfig()
    return task(
        name=name,
        retries=cfg.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=cfg.retry_delay_s),
        retry_jitter_factor=0.2,
        retry_condition_fn=_retry_if_transient,
        cache_policy=NO_CACHE,  # DVC decides what is up to date, not Prefect's cache
        on_completion=[_publish_result],
        log_prints=True,
    )(stage_function(name))


def _registry_check_task(cfg: FlowConfig):
    """`python -m stages.register --check` as a task (it talks to MLflow, so it gets the retries)."""
    from stages.register import check_registered

    return task(
        name="check-registry",
        retries=cfg.retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=cfg.retry_delay_s),
        retry_condition_fn=_retry_if_transient,
        cache_policy=NO_CACHE,
    )(check_registered)


def stage_args(name: str, p: Params, root: Path) -> tuple[Any, ...]:
    """The arguments each stage's `main()` passes from params.yaml (paths relative to `root`)."""
    paths = p.paths
    if name == "ingest":
        return (p.ingest, Path(paths.ingested), root)
    if name == "format":
        tokenizer = None
        if p.format.template == "chat":  # the chat template needs the base model's tokenizer
            from tagtune.models import load_tokenizer, resolve_base

            tokenizer = load_tokenizer(resolve_base(p.model.base, p.model.cache_dir, p.model.allow_pickle))
        return (Path(paths.ingested), Path(paths.tagged), p.format, root, tokenizer)
    if name == "split":
        return (Path(paths.tagged), Path(paths.splits), p.split)
    if name == "finetune":
        return (
            Path(paths.splits),
            Path(paths.finetuned),
            p.finetune,
            p.model,
            Path(paths.checkpoints),
            p.mlflow,
        )
    if name == "evaluate":
        return (Path(paths.splits), Path(paths.finetuned), Path(paths.evaluation), p.evaluate, p.mlflow)
    if name == "register":
        return (
            Path(paths.finetuned),
            Path(paths.evaluation),
            Path(paths.registered),
            p.register,
            p.mlflow,
            p.evaluate.generation,
            root,
        )
    raise ConfigError(f"dvc.yaml stage {name!r}: the flow has no task for it (known: {', '.join(STAGES)})")


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


# -------------------------------------------------------------------------------------- overrides
def write_overrides(params_path: Path, overrides: list[str]) -> list[str]:
    """Write `key=value` overrides into params.yaml, keeping its comments (what `dvc exp run -S` does).

    Values are parsed as YAML, like `load_params` does. Returns the keys whose value changed.

    Raises:
        ConfigError: a malformed override, or one that makes params.yaml invalid (nothing is written).
    """
    import yaml
    from ruamel.yaml import YAML

    load_params(params_path, overrides)  # validate everything first: nothing written on error
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)  # params.yaml's list style: untouched lines stay the same
    doc = rt.load(params_path.read_text(encoding="utf-8"))
    changed = []
    for o in overrides:
        key, value = o.split("=", 1)
        parts = key.strip().split(".")
        node = doc
        for part in parts[:-1]:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        new = yaml.safe_load(value)
        if node.get(parts[-1]) != new:
            node[parts[-1]] = new
            changed.append(key.strip())
    if changed:
        buf = io.StringIO()
        rt.dump(doc, buf)
        params_path.write_text(buf.getvalue(), encoding="utf-8")
    return changed


@contextlib.contextmanager
def _workspace_lock(root: Path) -> Iterator[None]:
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusyError(
                f"{root}: another tagtune flow run is using this workspace; try again when it ends"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
        "ingest": ("rows", "skipped"),
        "format": ("examples", "refusal_rows", "exact_duplicates"),
        "split": ("train", "val", "test"),
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
    with contextlib.chdir(root), _workspace_lock(root):
        params_file = Path(params_path)
        if overrides:
            changed = write_overrides(params_file, overrides)
            if changed:
                logger.info("params.yaml updated (like `dvc exp run -S`): %s", ", ".join(changed))
        p = load_params(params_file)
        with Repo(str(root)) as repo:
            names = dvc_stages(repo)
        unknown = [n for n in names if n not in STAGES]
        if unknown:
            raise ConfigError(f"dvc.yaml stages {unknown}: the flow has no task for them")
        if only and (bad := [n for n in only if n not in names]):
            raise ConfigError(f"no such stage in dvc.yaml: {', '.join(bad)} (stages: {', '.join(names)})")
        has_sql = any(s.format == "sql" for s in p.ingest.sources)

        summary: dict[str, Any] = {"stages": {}}
        for name in names:
            if only and name not in only:
                summary["stages"][name] = {"ran": False, "reason": "not selected"}
                continue
            if name == "register" and not force:
                # DVC cannot see the registry: if it lost register.json's version, the check deletes
                # register.json so DVC reports the stage out of date (what `make run` does too)
                check = _registry_check_task(p.flow)(Path(p.paths.registered), p.mlflow)
                logger.info("register: %s", check["reason"])
            with Repo(str(root)) as repo:
                changes = dvc_changes(repo, name)
            if force:
                reason = "forced"
            elif changes:
                reason = _describe(changes)
            elif name == "ingest" and has_sql:
                reason = "re-reading SQL sources (DVC cannot hash a query result)"
            else:
                logger.info("%s: up to date (dvc status clean), skipped", name)
                summary["stages"][name] = {"ran": False, "reason": "up to date"}
                continue
            logger.info("%s: running (%s)", name, reason)
            result = stage_task(name, p.flow)(*stage_args(name, p, root))
            with Repo(str(root)) as repo:
                dvc_commit(repo, name)
            summary["stages"][name] = {"ran": True, "reason": reason, "result": result}

        with Repo(str(root)) as repo:
            status = repo.status()
    finetune = summary["stages"].get("finetune", {})
    summary["training_steps"] = _training_steps(finetune.get("result"))
    ran = [n for n, s in summary["stages"].items() if s["ran"]]
    # ingest re-reads SQL sources every run; only what it feeds tells whether anything changed
    summary["changed"] = any(n != "ingest" for n in ran)
    summary["dvc_status"] = {k: _describe(v) for k, v in status.items()}
    if summary["changed"] or only:
        summary["message"] = f"ran {', '.join(ran) or 'nothing'}; {summary['training_steps']} training steps"
    else:
        summary["message"] = "nothing changed since the last run: 0 training steps"
    register = summary["stages"].get("register", {}).get("result") or {}
    if register:
        summary["model_version"] = register.get("version")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--force", action="store_true", help="run every stage (dvc repro -f)")
    args = ap.parse_args(argv)
    try:
        summary = pipeline(
            params_path=args.params, overrides=args.set, repo_dir=os.getcwd(), force=args.force
        )
    except TagtuneError as e:
        print(f"tagtune flow: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
