"""MLflow runs: the one module stages log through, so they run without a server (a temporary SQLite store).

One MLflow run per *pipeline version*: finetune opens it (keyed by a hash of data + params + base
model), writes its id into training.json, and evaluate/register attach to the same run. Each store
is probed once per process (`client`), and every call here turns MLflow's exceptions into a
one-line TrackingError (`mlflow_errors`), which the flow retries when `transient`. The Model Registry
side is tagtune/registry.py; the pyfunc model tagtune/pyfunc.py.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from tagtune.config import MlflowConfig, tracking_uri
from tagtune.errors import TagtuneError

T = TypeVar("T")
RUN_KEY_TAG = "tagtune.pipeline_version"
MAX_PARAM_LEN = 6000  # MLflow's param value limit is 6000 chars in MLflow 3 (500 in older servers)


TRANSIENT_CODES = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")  # MLflow error codes worth a retry
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_CLIENTS: dict[tuple[str, float], Any] = {}  # one checked client per store (and timeout) per process


class TrackingError(TagtuneError):
    """MLflow is unreachable or refused a request; `transient` = the same call may work later."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying: MLflow unreachable, connection/timeouts, I/O hiccups — never bad data/params."""
    if isinstance(exc, TrackingError):  # a TagtuneError, but the server may come back
        return exc.transient
    if exc is None or isinstance(exc, (TagtuneError, *_PERMANENT_OS_ERRORS)):
        return False
    if isinstance(exc, OSError | TimeoutError):  # ConnectionError, requests' errors, disk hiccups
        return True
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in TRANSIENT_CODES


def mlflow_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: MLflow's (and its HTTP client's) exceptions leave as TrackingError, one line each."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except TagtuneError:
            raise
        except MlflowException as e:
            msg = str(e.message).strip().splitlines()[0][:300] if str(e.message).strip() else e.error_code
            raise TrackingError(f"MLflow {e.error_code}: {msg}", e.error_code in TRANSIENT_CODES) from None
        except (OSError, TimeoutError) as e:  # requests' ConnectionError and Timeout are OSErrors
            raise TrackingError(f"MLflow unreachable ({type(e).__name__}: {str(e)[:200]})") from None

    return wrapper


def _bounded_http(cfg: MlflowConfig) -> None:
    """Make an unreachable server fail in about `timeout_s`, not after minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(cfg.timeout_s)))


def _use_fluent(uri: str) -> None:
    """Point MLflow's fluent API (log_model, log_table, register_model) at `uri`.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would then override params.yaml
    for every later call in this process (another workspace, another test): keep the user's value.
    """
    import mlflow

    user_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if user_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_env


def client(cfg: MlflowConfig):
    """The MlflowClient of the configured (or MLFLOW_TRACKING_URI) store, checked reachable once.

    Raises:
        TrackingError: the store does not answer within about `mlflow.timeout_s`.
    """
    from mlflow.tracking import MlflowClient

    _bounded_http(cfg)
    uri = tracking_uri(cfg)
    _use_fluent(uri)
    key = (uri, cfg.timeout_s)
    if key in _CLIENTS:
        return _CLIENTS[key]
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    start = time.monotonic()
    try:
        c.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot use this store"
        raise TrackingError(
            f"mlflow.tracking_uri {uri}: unreachable after {time.monotonic() - start:.0f}s "
            f"({type(e).__name__}: {str(e)[:200]}). Start the server or fix MLFLOW_TRACKING_URI; "
            "the trained model stays on disk, so re-run the stage when MLflow is back."
        ) from None
    _CLIENTS[key] = c
    return c


def _experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name)


@mlflow_errors
def open_run(cfg: MlflowConfig, run_key: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """Find the run for this pipeline version (by tag) or create it; returns its run id."""
    c = client(cfg)
    exp = _experiment_id(c, cfg.experiment)
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = c.create_run(exp, run_name=run_name, tags={RUN_KEY_TAG: run_key, **(tags or {})})
    return run.info.run_id


@mlflow_errors
def end_run(cfg: MlflowConfig, run_id: str, status: str = "FINISHED") -> None:
    client(cfg).set_terminated(run_id, status)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} → {"a.b": "1"}; values cut to MLflow's length limit."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            s = str(v)
            out[key] = s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."
    return out


@mlflow_errors
def log_params(cfg: MlflowConfig, run_id: str, params: Mapping[str, Any]) -> None:
    """Log flattened params; a param already logged with the same value is skipped (retries)."""
    from mlflow.entities import Param

    c = client(cfg)
    existing = c.get_run(run_id).data.params
    new = [Param(k, v) for k, v in flatten(params).items() if k not in existing]
    for i in range(0, len(new), 100):  # log_batch accepts at most 100 params per call
        c.log_batch(run_id, params=new[i : i + 100])


@mlflow_errors
def log_metrics(cfg: MlflowConfig, run_id: str, metrics: Iterable[tuple[str, float, int]]) -> None:
    """Log (key, value, step) triples in batches of 1000 (MLflow's log_batch limit)."""
    from mlflow.entities import Metric

    c = client(cfg)
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, int(s)) for k, v, s in metrics]
    for i in range(0, len(batch), 1000):
        c.log_batch(run_id, metrics=batch[i : i + 1000])


@mlflow_errors
def set_tags(cfg: MlflowConfig, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    c = client(cfg)
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@mlflow_errors
def log_artifacts(cfg: MlflowConfig, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
    client(cfg).log_artifacts(run_id, local_dir, artifact_path)


@mlflow_errors
def metric_steps(cfg: MlflowConfig, run_id: str, key: str) -> set[int]:
    """The steps at which `key` is already logged on the run (a resumed run does not log them twice)."""
    return {m.step for m in client(cfg).get_metric_history(run_id, key)}


TRAIN_IDS_ARTIFACT = "finetune/train_ids.json"  # each finetune run: the train split's example ids


@mlflow_errors
def log_text(cfg: MlflowConfig, run_id: str, text: str, artifact_file: str) -> None:
    client(cfg).log_text(run_id, text, artifact_file)


@contextmanager
def active_run(cfg: MlflowConfig, run_id: str):
    """Make `run_id` the fluent API's active run (for mlflow.log_table / pyfunc.log_model)."""
    import mlflow

    client(cfg)
    with mlflow.start_run(run_id=run_id) as run:
        yield run


@mlflow_errors
def log_table(cfg: MlflowConfig, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> bool:
    """Log rows as an MLflow table artifact (shown in the run's Evaluation/Artifacts views).

    `mlflow.log_table` *appends* to an existing file, so a retry would duplicate every row: put a
    content digest in `artifact_file`; a file that already exists is left alone. Returns True if logged.
    """
    import posixpath

    import mlflow
    import pandas as pd

    c = client(cfg)
    folder = posixpath.dirname(artifact_file) or None
    if any(f.path == artifact_file for f in c.list_artifacts(run_id, folder)):
        return False
    mlflow.log_table(data=pd.DataFrame(rows), artifact_file=artifact_file, run_id=run_id)
    return True
