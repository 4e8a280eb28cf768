"""register: log the fine-tuned model to MLflow, register it once, and promote it only if it is better.

    python -m stages.register                 # register + gate; writes paths.register/register.json
    python -m stages.register --check         # registry lacks register.json's version? delete the file
                                              # so the next `dvc repro` runs this stage again

The model becomes a version of `register.model_name` (a pyfunc: `mlflow.pyfunc.load_model(
"models:/<name>@champion")`), tagged with git commit, DVC data/params hashes, base model and metrics.
It gets `@champion` only if `tuned.<register.metric>` beats the champion and the base model by more
than `register.min_delta` and it breaks at most `register.max_regressions` of the test questions the
champion answered correctly (paths.register/regressions.md lists every regression and fix, side by
side); otherwise `@challenger`. A retry of the same run reuses its version.
Rollback: `python -m tagtune.registry rollback [--to VERSION]`. See tagtune/registry.py.

MLflow unreachable: fails within `mlflow.timeout_s` with a clear message; the trained model stays
in `paths.finetune`, so re-running this stage is all it takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tagtune.config import GenerationConfig, MlflowConfig, Params, RegisterConfig
from tagtune.io import atomic_path, read_json, read_jsonl, write_json
from tagtune.regressions import Comparison, forgetting, forgetting_report, plot_forgetting, report
from tagtune.regressions import outcomes as per_question

RESULT_FILE = "register.json"
REPORT_FILE = "regressions.md"  # every regression and fix vs the champion, side by side; forgetting
FIGURE_FILE = "forgetting.png"  # old vs new test slice, correct share per registered version


def register(
    finetuned: Path,
    evaluation: Path,
    out_dir: Path,
    cfg: RegisterConfig,
    mlflow_cfg: MlflowConfig,
    gen: GenerationConfig | None = None,
    repo_root: Path = Path("."),
    index: Path | None = None,
) -> dict[str, Any]:
    """Register finetune's model with evaluate's metrics; writes `out_dir/register.json`.

    Args:
        finetuned: finetune's output dir.
        evaluation: evaluate's output dir (metrics.json).
        out_dir: where register.json goes (name, version, alias, decision + reason, previous champion).
        cfg: the `register:` section.
        mlflow_cfg: the `mlflow:` section (MLFLOW_TRACKING_URI overrides its URI).
        gen: generation defaults stored in the model; default GenerationConfig().
        repo_root: where git and dvc.lock are read for the version's lineage tags.
        index: the index stage's output, shipped with a model trained grounded.

    Returns:
        The register.json content.

    Raises:
        tracking.TrackingError: MLflow unreachable; registry.RegistryError: bad metric/registry state.
    """
    from tagtune.models import verify_model_dir
    from tagtune.registry import outcome_history, register_model

    verify_model_dir(finetuned)  # the bytes finetune wrote, or nothing is registered
    metrics = read_json(Path(evaluation) / "metrics.json")
    answers = Path(evaluation) / "answers.jsonl"
    outcomes = per_question(read_jsonl(answers)) if answers.is_file() else None
    result = register_model(Path(finetuned), metrics, cfg, mlflow_cfg, gen, Path(repo_root), index, outcomes)
    history = forgetting(outcome_history(cfg.model_name, mlflow_cfg)) if outcomes is not None else []
    with atomic_path(Path(out_dir) / FIGURE_FILE) as tmp:
        plot_forgetting(history, tmp)  # (an empty figure when there is nothing to draw)
    with atomic_path(Path(out_dir) / REPORT_FILE) as tmp:
        tmp.write_text(
            _report(result) + ("\n" + forgetting_report(history) if history else ""), encoding="utf-8"
        )
    with atomic_path(Path(out_dir) / RESULT_FILE) as tmp:
        write_json(tmp, result)
    return result


def _report(result: dict[str, Any]) -> str:
    """regressions.md: the decision, then every regression and fix beside the champion's answer."""
    head = f"# {result['model_name']} v{result['version']}: {result['decision']}\n\n{result['reason']}\n"
    if result.get("compared_with") is None:
        return head + "\nNo question-by-question comparison (no champion, or it kept no outcomes).\n"
    keys = ("shared", "champion_correct", "regressions", "fixes")
    comparison = Comparison(**{k: result[k] for k in keys})
    return head + "\n" + report(comparison, result["compared_with"], result["version"])


def check_registered(out_dir: Path, mlflow_cfg: MlflowConfig) -> dict[str, Any]:
    """Delete `out_dir/register.json` if the registry no longer has its version.

    DVC skips a stage whose deps and outs are unchanged, so it cannot notice that the MLflow
    registry lost a version (a new tracking URI, a wiped database). The flow and `make` call this
    before `dvc repro`: a missing register.json makes DVC run the stage again (for real — the
    uncached output keeps DVC's run-cache from restoring it).

    Returns:
        {"registered": bool, "reason": str}.

    Raises:
        tracking.TrackingError: MLflow unreachable (nothing is deleted then).
    """
    from tagtune.registry import is_registered

    path = Path(out_dir) / RESULT_FILE
    if not path.is_file():
        return {"registered": False, "reason": f"{path} does not exist; register will run"}
    rec = read_json(path)
    if is_registered(rec["model_name"], rec["version"], rec.get("run_id"), mlflow_cfg):
        return {"registered": True, "reason": f"{rec['model_name']} v{rec['version']} is in the registry"}
    path.unlink()
    return {
        "registered": False,
        "reason": f"{rec['model_name']} v{rec['version']} (run {rec.get('run_id')}) is not in the registry; "
        f"removed {path} so `dvc repro` runs register again",
    }


def run(p: Params, root: Path) -> dict[str, Any]:
    paths = p.paths
    return register(
        root / paths.finetune,
        root / paths.evaluate,
        root / paths.register,
        p.register,
        p.mlflow,
        p.evaluate.generation,
        root,
        root / paths.index,
    )


def check(p: Params, root: Path) -> dict[str, Any]:
    return check_registered(root / p.paths.register, p.mlflow)


if __name__ == "__main__":
    from stages import main

    raise SystemExit(main("register"))
