"""The MLflow model registry side: versions, the `@champion`/`@challenger` aliases, the gate, rollback.

    python -m tagtune.registry status                      # champion/challenger of register.model_name
    python -m tagtune.registry rollback [--to VERSION]     # champion := the previous champion (or VERSION)

`pull` and `resolve_version` turn a `models:/name@alias` URI into a local model directory.

Rules:

- One registered version per pipeline run (the MLflow run finetune opened): registering the same run
  again (a retry, a re-run) finds the version by run id instead of creating a second one; a model
  already logged to that run by an interrupted attempt is reused rather than uploaded again.
- The gate: a new version becomes `@champion` only if its `tuned.<register.metric>` beats both the
  current champion's and the base model's (`base.<metric>`) by more than `register.min_delta`
  (direction from `register.greater_is_better`); otherwise it becomes `@challenger`, and the reason is
  returned, tagged on the version and written to register.json.
- Promotion tags the new version with `tagtune.previous_champion`, so `rollback` can undo it; rolling
  back twice walks further back along that chain. The demoted version becomes `@challenger`, marked
  `rolled back to vN`, and a retry of its run does not re-promote it (only `rollback --to` does).
- Versions carry lineage tags: git commit (and whether the tree was dirty), the DVC hashes of the
  tagged dataset and splits and a hash of the params DVC ran with (from dvc.lock), the base model
  identity, the finetune fingerprint, and every evaluation metric (`metric.<key>`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tagtune import tracking
from tagtune.config import GenerationConfig, MlflowConfig, RegisterConfig
from tagtune.errors import TagtuneError, error_line
from tagtune.text import stable_hash

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_FINGERPRINT = "tagtune.fingerprint"
TAG_INDEX = "tagtune.index"  # digest of the facts a grounded model answers from ("none": not grounded)
TAG_PREVIOUS = "tagtune.previous_champion"
TAG_FEEDBACK = "tagtune.feedback"  # sha256 of the feedback snapshot the version trained on ("none")
TAG_DECISION = "tagtune.decision"
TAG_REASON = "tagtune.reason"
ROLLED_BACK = "rolled back"  # TAG_DECISION prefix of a demoted champion: register will not re-promote it
METRIC_TAG = "metric."  # version tag prefix for evaluation metrics
OUTCOMES_DIR = "tagtune-outcomes"  # run artifacts: v<N>.json, the per-question outcomes of version N
INFO_FILE = "tagtune.json"  # written by `pull`: name, version, alias, run id of the pulled model


class RegistryError(TagtuneError):
    """The registry state does not allow the operation (no champion, unknown version, bad metric)."""


# ------------------------------------------------------------------------------------------ lineage
def _git(repo_root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _dvc_lock_tags(repo_root: Path) -> dict[str, str]:
    """DVC hashes from dvc.lock: the tagged dataset, the splits, and the params DVC ran with."""
    import yaml

    lock = repo_root / "dvc.lock"
    if not lock.is_file():
        return {"dvc.lock": "absent (not run through dvc repro)"}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    tags: dict[str, str] = {}
    for stage, key in (("format", "dvc.tagged.md5"), ("split", "dvc.splits.md5")):
        outs = stages.get(stage, {}).get("outs") or []
        if outs and outs[0].get("md5"):
            tags[key] = str(outs[0]["md5"])
            tags[key.replace(".md5", ".path")] = str(outs[0].get("path"))
    # DVC records param *values* per stage, not a hash: hash the values the pipeline ran with
    params = {name: s.get("params", {}) for name, s in stages.items() if s.get("params")}
    if params:
        blob = json.dumps(params, sort_keys=True, default=str).encode("utf-8")
        tags["dvc.params.md5"] = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return tags


def lineage_tags(training: dict[str, Any], repo_root: Path = Path(".")) -> dict[str, str]:
    """Tags that make a version traceable to code, data, params and base model."""
    tags = {
        "git.commit": _git(repo_root, "rev-parse", "HEAD") or "unknown",
        "git.dirty": str(bool(_git(repo_root, "status", "--porcelain", "--untracked-files=no"))).lower(),
        "base_model": str(training.get("base_model")),
        # the resolved dir's name carries the source digest (e.g. SmolLM2-...Q4_1-<sha256[:16]>)
        "base_model_id": Path(str(training.get("base_model_dir"))).name,
        TAG_FINGERPRINT: str(training.get("fingerprint")),
        "tagtune.task": str(training.get("task")),
        "tagtune.method": str(training.get("method")),
        "tagtune.steps": str(training.get("steps")),
        # the UI verdicts it learnt from (sha256 of the feedback snapshot): see `_is_feedback_retrain`
        TAG_FEEDBACK: str((training.get("feedback") or {}).get("sha256") or "none"),
    }
    tags.update(_dvc_lock_tags(repo_root))
    return tags


# --------------------------------------------------------------------------------------------- gate
def _gain(new: float, ref: float, cfg: RegisterConfig) -> float:
    """How much better `new` is than `ref` on the gate metric (negative: worse), in its direction."""
    return (new - ref) * (1.0 if cfg.greater_is_better else -1.0)


def decide(new: float, champion: float | None, base: float | None, cfg: RegisterConfig) -> tuple[bool, str]:
    """(promote, reason): promote only if `new` beats champion and base by more than min_delta."""
    word = "higher" if cfg.greater_is_better else "lower"
    m = f"tuned.{cfg.metric}"
    for label, ref in (("the base model", base), ("the current champion", champion)):
        if ref is None:
            continue
        gain = _gain(new, ref, cfg)
        if not gain > cfg.min_delta:
            return False, (
                f"{m}={new:.4g} does not beat {label} ({ref:.4g}) by more than min_delta="
                f"{cfg.min_delta:g} ({word} is better)"
            )
    parts = [
        f"{label} {ref:.4g}" for label, ref in (("champion", champion), ("base", base)) if ref is not None
    ]
    return True, f"{m}={new:.4g} beats " + (" and ".join(parts) if parts else "nothing (first version)")


def _metrics_of(mv) -> dict[str, str]:
    """The evaluation metrics a version was registered with (its `metric.*` tags)."""
    return {k[len(METRIC_TAG) :]: v for k, v in mv.tags.items() if k.startswith(METRIC_TAG)}


def _alias_version(c, name: str, alias: str):
    try:
        return c.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST: the alias is not set
        return None


def find_version(c, name: str, run_id: str, index: str = "none"):
    """The version registered from `run_id` with the fact index `index` (None if there is none yet).

    A grounded model re-registered with new facts (the index stage re-ran, finetune did not) is a
    new version of the same run.
    """
    found = c.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    found = [v for v in found if v.tags.get(TAG_INDEX, "none") == index]
    return min(found, key=lambda v: int(v.version)) if found else None


def _logged_model_uri(c, run_id: str, fingerprint: str, index: str) -> str | None:
    """A model an interrupted attempt already logged to `run_id` (so it is not uploaded twice)."""
    try:
        exp = c.get_run(run_id).info.experiment_id
        found = c.search_logged_models(
            [exp],
            filter_string=f"source_run_id = '{run_id}' AND tags.`{TAG_FINGERPRINT}` = '{fingerprint}'"
            f" AND tags.`{TAG_INDEX}` = '{index}'",
        )
    except Exception:  # noqa: BLE001 - older servers without logged models: just log again
        return None
    ready = [m for m in found if str(getattr(m.status, "name", m.status)).upper() == "READY"]
    return f"models:/{ready[0].model_id}" if ready else None


# ----------------------------------------------------------------------------------------- register
def _gate_metric(metrics: dict[str, float], cfg: RegisterConfig) -> str:
    """`tuned.<register.metric>`, checked to be among evaluate's metrics."""
    key = f"tuned.{cfg.metric}"
    if key not in metrics:
        have = ", ".join(sorted(k[6:] for k in metrics if k.startswith("tuned."))) or "none"
        raise RegistryError(
            f"register.metric: {cfg.metric!r} is not in the evaluation metrics (have: {have})"
        )
    return key


def _grounding(
    training: dict[str, Any], metrics: dict[str, float], index_dir: Path | None
) -> tuple[str, Path | None, dict[str, Any]]:
    """(index digest or "none", the index dir to ship, the pyfunc's grounding config) of a model.

    Raises:
        RegistryError: the model was trained grounded but `index_dir` holds no index.
    """
    grounded = training.get("grounded")
    if not grounded:
        return "none", None, {}
    from tagtune.retrieval import FACTS_FILE

    facts = Path(index_dir) / FACTS_FILE if index_dir is not None else None
    if facts is None or not facts.is_file():
        raise RegistryError(
            f"the model answers from a fact index, but {facts} is missing (run the index stage)"
        )
    config = {"retrieval_k": grounded["k"], "abstain_threshold": metrics.get("abstain.threshold")}
    return stable_hash(facts.read_text(encoding="utf-8"))[:16], Path(index_dir), config


def _log_model(
    finetuned: Path,
    run_id: str,
    tags: dict[str, str],
    gen: GenerationConfig,
    cfg: MlflowConfig,
    grounding: tuple,
) -> str:
    """Log finetune's model as a pyfunc to `run_id` (LoRA: the adapter + a base reference); its URI."""
    import tempfile

    from tagtune.models import version_artifacts
    from tagtune.pyfunc import log_pyfunc_model
    from tagtune.templates import TEMPLATE_FILE

    _, index_dir, config = grounding
    identity = {k: tags[k] for k in (TAG_FINGERPRINT, TAG_INDEX)}
    with tempfile.TemporaryDirectory(prefix="tagtune-version-") as tmp, tracking.active_run(cfg, run_id):
        staged = version_artifacts(finetuned, Path(tmp) / "staged")
        info = log_pyfunc_model(
            staged, finetuned / TEMPLATE_FILE, gen, tags=identity, index_dir=index_dir, grounding=config
        )
    return info.model_uri


def _version_of_run(
    c,
    name: str,
    run_id: str,
    finetuned: Path,
    tags: dict[str, str],
    gen: GenerationConfig,
    cfg: MlflowConfig,
    grounding: tuple,
):
    """(the version registered from `run_id`, created now?) — registering it once, reusing a logged model."""
    import mlflow

    mv = find_version(c, name, run_id, tags[TAG_INDEX])
    if mv is not None:
        for k, v in tags.items():
            c.set_model_version_tag(name, mv.version, k, v)
        return mv, False
    model_uri = _logged_model_uri(c, run_id, tags[TAG_FINGERPRINT], tags[TAG_INDEX]) or _log_model(
        finetuned, run_id, tags, gen, cfg, grounding
    )
    mv = mlflow.register_model(model_uri, name, await_registration_for=int(cfg.timeout_s), tags=tags)
    return mv, True


def _is_feedback_retrain(mv, champion, new: float, champ_value: float | None, cfg: RegisterConfig) -> bool:
    """Trained on user verdicts the champion never saw, and not worse on the metric.

    A correction is a train row (split.train_only), never a test question, so a retrain that learnt
    it usually *ties* the champion on the test split, give or take noise; requiring a strict win would
    keep serving the answer the user corrected. Not worse = within `register.feedback_tolerance`; the
    per-example gate still refuses one that breaks answers.
    """
    if champion is None or champ_value is None or mv.tags.get(TAG_FEEDBACK, "none") == "none":
        return False
    new_verdicts = mv.tags.get(TAG_FEEDBACK) != champion.tags.get(TAG_FEEDBACK, "none")
    return new_verdicts and _gain(new, champ_value, cfg) >= -cfg.feedback_tolerance - 1e-12


def _is_refresh(mv, champion, new: float, champ_value: float | None, cfg: RegisterConfig) -> bool:
    """The same trained weights as the champion, answering from a new fact index, and not worse."""
    if champion is None or champ_value is None:
        return False
    same_weights = mv.tags.get(TAG_FINGERPRINT) == champion.tags.get(TAG_FINGERPRINT)
    new_facts = mv.tags.get(TAG_INDEX, "none") != champion.tags.get(TAG_INDEX, "none")
    not_worse = _gain(new, champ_value, cfg) >= 0
    return same_weights and new_facts and not_worse


def _champion_outcomes(c, champion) -> dict[str, dict[str, Any]] | None:
    """The per-question outcomes registered with `champion` (None: registered before they were kept)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tagtune-outcomes-") as tmp:
        try:
            path = c.download_artifacts(champion.run_id, _outcomes_file(champion.version), tmp)
        except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST / missing file: an older version
            return None
        return json.loads(Path(path).read_text(encoding="utf-8"))


def outcome_history(model_name: str, mlflow_cfg: MlflowConfig, limit: int = 50) -> list[tuple[str, dict]]:
    """(version, per-question outcomes) of the registered versions that kept them, oldest first (the
    first one, then the latest `limit`): what register's forgetting table is drawn from."""
    c = tracking.client(mlflow_cfg)
    versions = sorted(c.search_model_versions(f"name='{model_name}'"), key=lambda v: int(v.version))
    history = [(str(v.version), _champion_outcomes(c, v)) for v in versions[:1] + versions[1:][-limit:]]
    return [(v, out) for v, out in history if out is not None]


def _outcomes_file(version: str | int) -> str:
    return f"{OUTCOMES_DIR}/v{version}.json"


def _per_example(c, champion, outcomes: dict | None, cfg: RegisterConfig) -> tuple[bool, str, Any]:
    """(passes, reason, Comparison | None): the candidate breaks at most `register.max_regressions` of
    the test questions the champion answered correctly (tagtune/regressions.py)."""
    from tagtune.regressions import compare

    if champion is None or outcomes is None:
        return True, "", None
    old = _champion_outcomes(c, champion)
    if old is None:
        return True, f"; champion v{champion.version} has no per-question outcomes (not compared)", None
    cmp = compare(old, outcomes)
    allowed = cmp.allowed(cfg.max_regressions)
    summary = (
        f"{len(cmp.regressions)} regression(s), {len(cmp.fixes)} fix(es) vs champion v{champion.version} on "
        f"{cmp.shared} shared test questions"
    )
    if len(cmp.regressions) > allowed:
        shown = "; ".join(repr(r["question"]) for r in cmp.regressions[:3])
        return (
            False,
            (
                f"it breaks {len(cmp.regressions)} of the {cmp.champion_correct} test questions champion "
                f"v{champion.version} answered correctly (register.max_regressions={cfg.max_regressions:g} allows "
                f"{allowed}): {shown}{' …' if len(cmp.regressions) > 3 else ''} ({summary})"
            ),
            cmp,
        )
    return True, f"; {summary}", cmp


def _gate(
    c, name: str, mv, metrics: dict[str, float], key: str, cfg: RegisterConfig, outcomes: dict | None = None
) -> tuple[bool, str, str | None, Any]:
    """(promote, reason, previous champion, Comparison | None) for version `mv`; sets the aliases."""
    version = str(mv.version)
    rolled_back = mv.tags.get(TAG_DECISION, "")
    champion = _alias_version(c, name, CHAMPION)
    previous = str(champion.version) if champion is not None else None
    if previous == version:
        reason = f"version {version} is already the champion (re-run of the same run)"
        return True, reason, c.get_model_version(name, version).tags.get(TAG_PREVIOUS), None
    if rolled_back.startswith(ROLLED_BACK):  # a retry must not undo a deliberate rollback
        c.set_registered_model_alias(name, CHALLENGER, version)
        reason = f"version {version} was {rolled_back}; set @{CHAMPION} by hand to restore it"
        return False, reason, previous, None
    champ_value = None
    if champion is not None:
        raw = _metrics_of(champion).get(key)
        if raw is None:
            raise RegistryError(
                f"champion version {champion.version} of {name} has no {METRIC_TAG}{key} tag; "
                f"cannot compare — set the alias by hand or tag it"
            )
        champ_value = float(raw)
    base_value = metrics.get(f"base.{cfg.metric}")
    promote, reason = decide(float(metrics[key]), champ_value, base_value, cfg)
    if not promote and _is_refresh(mv, champion, float(metrics[key]), champ_value, cfg):
        promote, reason = (
            True,
            (
                f"same weights as champion v{champion.version} with new facts (knowledge refresh); "
                f"{key}={float(metrics[key]):.4g} is not worse than {champ_value:.4g}"
            ),
        )
    if not promote and _is_feedback_retrain(mv, champion, float(metrics[key]), champ_value, cfg):
        promote, reason = (
            True,
            f"trained on user feedback champion v{champion.version} never saw; {key}="
            f"{float(metrics[key]):.4g} is within register.feedback_tolerance={cfg.feedback_tolerance:g} of "
            f"{champ_value:.4g}",
        )
    if base_value is None:
        reason += " (no base-model metric: evaluate.compare_base is off)"
    comparison = None
    if promote:
        promote, why, comparison = _per_example(c, champion, outcomes, cfg)
        reason = why if not promote else reason + why
    if not promote:
        c.set_registered_model_alias(name, CHALLENGER, version)
        return False, reason, previous, comparison
    if previous is not None:
        c.set_model_version_tag(name, version, TAG_PREVIOUS, previous)
    c.set_registered_model_alias(name, CHAMPION, version)
    challenger = _alias_version(c, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        c.delete_registered_model_alias(name, CHALLENGER)
    return True, reason, previous, comparison


@tracking.mlflow_errors
def register_model(
    finetuned: Path,
    metrics: dict[str, float],
    cfg: RegisterConfig,
    mlflow_cfg: MlflowConfig,
    gen: GenerationConfig | None = None,
    repo_root: Path = Path("."),
    index_dir: Path | None = None,
    outcomes: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Register the model of finetune's MLflow run (once per fact index) and apply the promotion gate.

    Args:
        finetuned: finetune's output dir (`model/` or `adapter/`, template.json, training.json).
        metrics: evaluate's metrics.json (flat keys: `tuned.<m>`, `base.<m>`, ...).
        cfg: the `register:` section (model name, gate metric, direction, margin).
        mlflow_cfg: the `mlflow:` section (MLFLOW_TRACKING_URI overrides its URI).
        gen: generation defaults stored in the model (default: GenerationConfig()).
        repo_root: where git and dvc.lock are read for lineage tags.
        index_dir: the index stage's output; shipped inside the version of a model trained grounded.
        outcomes: per-question outcomes (tagtune/regressions.py), kept with the version and compared
            with the champion's (`register.max_regressions`).

    Returns:
        {model_name, version, run_id, created, alias, decision, reason, previous_champion, ...}.

    Raises:
        RegistryError: `tuned.<register.metric>` is not in metrics, or the champion has no such tag.
        tracking.TrackingError: MLflow unreachable (within mlflow.timeout_s); nothing is lost.
    """
    from tagtune.io import read_json

    finetuned = Path(finetuned)
    training = read_json(finetuned / "training.json")
    key = _gate_metric(metrics, cfg)
    c = tracking.client(mlflow_cfg)
    name = cfg.model_name
    fingerprint = str(training.get("fingerprint"))
    run_id = training.get("mlflow_run_id") or tracking.open_run(
        mlflow_cfg, fingerprint, run_name=f"tagtune-{fingerprint[:8]}"
    )
    if not c.search_registered_models(filter_string=f"name='{name}'", max_results=1):
        with contextlib.suppress(Exception):  # created concurrently: fine
            c.create_registered_model(name, description="tagtune fine-tuned models (see tags per version)")
    tags = {
        **lineage_tags(training, repo_root),
        **{f"{METRIC_TAG}{k}": f"{v:.6g}" for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    grounding = _grounding(training, metrics, index_dir)
    tags[TAG_INDEX] = grounding[0]
    gen = gen or GenerationConfig()
    mv, created = _version_of_run(c, name, run_id, finetuned, tags, gen, mlflow_cfg, grounding)
    version = str(mv.version)
    if outcomes is not None:  # kept with the version: the next candidate is compared with them
        tracking.log_text(mlflow_cfg, run_id, json.dumps(outcomes, sort_keys=True), _outcomes_file(version))
    rolled_back = mv.tags.get(TAG_DECISION, "")
    promote, reason, previous, comparison = _gate(c, name, mv, metrics, key, cfg, outcomes)
    decision = "champion" if promote else "challenger"
    # a demoted champion keeps its mark, so every retry of its run stays put
    mark = rolled_back if not promote and rolled_back.startswith(ROLLED_BACK) else decision
    c.set_model_version_tag(name, version, TAG_DECISION, mark)
    c.set_model_version_tag(name, version, TAG_REASON, reason)
    c.update_model_version(name, version, description=f"{mark}: {reason}")
    tracking.set_tags(mlflow_cfg, run_id, {"tagtune.registered": f"{name}/{version}", TAG_DECISION: mark})
    return {
        "model_name": name,
        "version": version,
        "run_id": run_id,
        "created": created,
        "alias": CHAMPION if promote else CHALLENGER,
        "decision": decision,
        "reason": reason,
        "metric": key,
        "value": float(metrics[key]),
        "previous_champion": previous,
        "model_uri": f"models:/{name}/{version}",
        "tracking_uri": c.tracking_uri,
        **_compared(comparison, previous),
    }


def _compared(comparison, champion: str | None) -> dict[str, Any]:
    """register.json's per-question part: the champion compared with, on how many shared questions
    (of which it answered how many correctly), the regressions and the fixes."""
    if comparison is None:
        return {"compared_with": None, "shared": 0, "champion_correct": 0, "regressions": [], "fixes": []}
    return {"compared_with": champion, **dataclasses.asdict(comparison)}


@tracking.mlflow_errors
def is_registered(model_name: str, version: str, run_id: str | None, mlflow_cfg: MlflowConfig) -> bool:
    """True if `model_name` version `version` exists (and came from `run_id`, when given)."""
    c = tracking.client(mlflow_cfg)
    try:
        mv = c.get_model_version(model_name, str(version))
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST
        return False
    return run_id is None or mv.run_id == run_id


# ----------------------------------------------------------------------------------------- rollback
@tracking.mlflow_errors
def rollback(model_name: str, mlflow_cfg: MlflowConfig, to_version: str | int | None = None) -> dict:
    """Point `@champion` back at the previous champion (or at `to_version`).

    The previous champion is the `tagtune.previous_champion` tag the gate wrote when the current
    champion was promoted. The demoted version keeps its tags and gets `@challenger`.

    Returns:
        {model_name, from_version, to_version, alias}.

    Raises:
        RegistryError: no champion, no recorded previous champion, or an unknown `to_version`.
    """
    c = tracking.client(mlflow_cfg)
    current = _alias_version(c, model_name, CHAMPION)
    if current is None and to_version is None:
        raise RegistryError(f"{model_name} has no @{CHAMPION}; pass a version to roll back to")
    target = str(to_version) if to_version is not None else current.tags.get(TAG_PREVIOUS)
    if target is None:
        raise RegistryError(
            f"{model_name} v{current.version} has no recorded previous champion; "
            "pass --to VERSION (python -m tagtune.registry rollback --to N)"
        )
    try:
        c.get_model_version(model_name, target)
    except Exception:  # noqa: BLE001
        raise RegistryError(f"{model_name} has no version {target}") from None
    c.set_registered_model_alias(model_name, CHAMPION, target)
    from_version = str(current.version) if current is not None else None
    c.set_model_version_tag(model_name, target, TAG_DECISION, f"champion (rollback from v{from_version})")
    if from_version and from_version != target:
        c.set_registered_model_alias(model_name, CHALLENGER, from_version)
        c.set_model_version_tag(model_name, from_version, TAG_DECISION, f"{ROLLED_BACK} to v{target}")
    return {"model_name": model_name, "from_version": from_version, "to_version": target, "alias": CHAMPION}


@tracking.mlflow_errors
def status(model_name: str, mlflow_cfg: MlflowConfig) -> dict[str, Any]:
    """{alias: {version, run_id, decision, reason, previous_champion}} for champion and challenger."""
    c = tracking.client(mlflow_cfg)
    out: dict[str, Any] = {"model_name": model_name}
    for alias in (CHAMPION, CHALLENGER):
        mv = _alias_version(c, model_name, alias)
        out[alias] = (
            None
            if mv is None
            else {
                "version": str(mv.version),
                "run_id": mv.run_id,
                "decision": mv.tags.get(TAG_DECISION),
                "reason": mv.tags.get(TAG_REASON),
                "previous_champion": mv.tags.get(TAG_PREVIOUS),
            }
        )
    return out


# --------------------------------------------------------------------------------- registry → disk
def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` → (name, None, alias); `models:/name/3` → (name, "3", None).

    Raises:
        TagtuneError: not a `models:/` URI.
    """
    if not model_uri.startswith("models:/"):
        raise TagtuneError(f"{model_uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    rest = model_uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.rpartition("/")
    if not name:
        raise TagtuneError(f"{model_uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, version, None


def _lookup_sqlite(path: str, name: str, version: str | None, alias: str | None) -> tuple[str, str] | None:
    """(version, run id) read straight from a SQLite registry (read-only), or None if not found."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        if alias:
            row = db.execute(
                "SELECT version FROM registered_model_aliases WHERE workspace = 'default' AND name = ? AND alias = ?",
                (name, alias),
            ).fetchone()
            version = str(row[0]) if row else None
        if version is None:
            return None
        row = db.execute(
            "SELECT run_id FROM model_versions "
            "WHERE workspace = 'default' AND name = ? AND version = ? AND current_stage != ?",
            (name, int(version), "Deleted_Internal"),
        ).fetchone()
    return (version, row[0]) if row else None


def _lookup_rest(uri: str, name: str, version: str | None, alias: str | None, timeout: float):
    """(version, run id) from an MLflow server's REST API (`/api/2.0/mlflow/...`), or None."""
    import urllib.parse
    import urllib.request

    if alias:
        query, path = {"name": name, "alias": alias}, "registered-models/alias"
    else:
        query, path = {"name": name, "version": version}, "model-versions/get"
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=timeout) as r:
        mv = json.loads(r.read()).get("model_version") or {}
    return (str(mv["version"]), mv.get("run_id") or "") if mv.get("version") else None


def _resolve_fast(model_uri: str, mlflow_cfg: MlflowConfig) -> dict[str, Any] | None:
    """`resolve_version` without importing MLflow (~2 s of every `tagtune chat` start): a read-only
    query of the registry tables of a `sqlite:///` store, or the REST API of an `http(s)://` server.
    None whenever that is not possible (another store, a schema MLflow changed, any error): the
    caller then asks MlflowClient, which also gives the proper error messages."""
    from tagtune.config import tracking_uri

    name, version, alias = parse_model_uri(model_uri)
    uri = tracking_uri(mlflow_cfg)
    if os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_WORKSPACE"):
        return None  # a registry elsewhere, or another workspace: only MlflowClient knows
    try:
        if uri.startswith("sqlite:///"):
            found = _lookup_sqlite(uri[len("sqlite:///") :], name, version, alias)
        elif uri.startswith(("http://", "https://")):
            found = _lookup_rest(uri, name, version, alias, float(mlflow_cfg.timeout_s))
        else:
            return None
    except Exception:  # noqa: BLE001 - only a shortcut: MlflowClient decides and words the error
        return None
    if found is None or not found[1]:
        return None
    return {
        "model_name": name, "version": found[0], "alias": alias, "run_id": found[1],
        "model_uri": f"models:/{name}/{found[0]}",
    }  # fmt: skip


def resolve_version(model_uri: str, mlflow_cfg: MlflowConfig) -> dict[str, Any]:
    """{model_name, version, alias, run_id, model_uri} of a `models:/` URI (an alias resolved now).

    Raises:
        TagtuneError: the name/alias/version does not exist; TrackingError: MLflow unreachable.
    """
    return _resolve_fast(model_uri, mlflow_cfg) or _resolve_with_client(model_uri, mlflow_cfg)


@tracking.mlflow_errors
def _resolve_with_client(model_uri: str, mlflow_cfg: MlflowConfig) -> dict[str, Any]:
    name, version, alias = parse_model_uri(model_uri)
    c = tracking.client(mlflow_cfg)
    try:
        mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except Exception as e:  # noqa: BLE001 - MlflowException: RESOURCE_DOES_NOT_EXIST and friends
        raise TagtuneError(f"{model_uri}: not found in the registry at {c.tracking_uri} ({e})") from None
    return {
        "model_name": name,
        "version": str(mv.version),
        "alias": alias,
        "run_id": mv.run_id,
        "model_uri": f"models:/{name}/{mv.version}",
    }


def _check_pull_dest(dest: Path, force: bool) -> bool:
    """Whether `dest` may be replaced: absent, empty, a previous pull (holds tagtune.json) or `force`.

    Raises:
        OutputPathError: a non-empty directory tagtune did not pull (without `force`), or the working
            directory, home or / (always).
    """
    from tagtune.io import OutputPathError, check_replaceable

    check_replaceable(dest, force=True)  # never the working directory, home or /
    replace = force or (dest / INFO_FILE).is_file()
    if not replace:
        try:
            check_replaceable(dest)
        except OutputPathError as e:
            raise OutputPathError(f"{e}; `tagtune pull --force` replaces it") from None
    return replace


@tracking.mlflow_errors
def pull(model_uri: str, dest: Path, mlflow_cfg: MlflowConfig, force: bool = False) -> Path:
    """Download a registered version to `dest` (an MLflow model dir); returns its model root
    (`dest/artifacts`: `adapter/` + `base.json`, or `model/`).

    `dest` is written atomically and is itself loadable (`mlflow.pyfunc.load_model(dest)`,
    `mlflow models serve -m dest`, `tagtune chat --model-dir dest`); `dest/tagtune.json` says which
    version. An existing `dest` is replaced only if it is empty or a previous pull, or with `force`;
    never the working directory, home or /.

    Raises:
        OutputPathError: `dest` is not tagtune's to replace (checked before anything is downloaded).
    """
    import mlflow.artifacts

    from tagtune.io import atomic_path, write_json
    from tagtune.models import find_model

    dest = Path(dest)
    replace = _check_pull_dest(dest, force)
    info = resolve_version(model_uri, mlflow_cfg)
    with atomic_path(dest, force=replace) as tmp:
        # by version, not alias: the alias may move while we download
        mlflow.artifacts.download_artifacts(artifact_uri=info["model_uri"], dst_path=str(tmp))
        write_json(tmp / INFO_FILE, info)
    root, _ = find_model(dest)
    return root


@tracking.mlflow_errors
def champion_start(model_name: str, mlflow_cfg: MlflowConfig, dest: Path) -> dict[str, Any] | None:
    """The @champion version pulled to `dest` for a warm start (`finetune.init: champion`), with the
    example ids it was trained on; None when there is no champion yet.

    Returns:
        {version, run_id, root (its model dir: adapter/ + base.json, or model/), train_ids}
    """
    import mlflow.artifacts

    c = tracking.client(mlflow_cfg)
    if _alias_version(c, model_name, CHAMPION) is None:
        return None
    info = resolve_version(f"models:/{model_name}@champion", mlflow_cfg)
    root = pull(info["model_uri"], Path(dest), mlflow_cfg, force=True)
    try:
        ids = mlflow.artifacts.load_text(f"runs:/{info['run_id']}/{tracking.TRAIN_IDS_ARTIFACT}")
    except Exception:  # noqa: BLE001 - a version trained before ids were logged: every row is new
        ids = "[]"
    return {"version": info["version"], "run_id": info["run_id"], "root": root, "train_ids": json.loads(ids)}


@tracking.mlflow_errors
def version_metrics(model_name: str, version: str, mlflow_cfg: MlflowConfig) -> dict[str, str]:
    """The evaluation metrics `version` was registered with (`tuned.answer_f1`, `base.answer_f1`, ...)."""
    return _metrics_of(tracking.client(mlflow_cfg).get_model_version(model_name, str(version)))


def main(argv: list[str] | None = None) -> int:
    from tagtune.config import load_params

    ap = argparse.ArgumentParser(prog="python -m tagtune.registry")
    ap.add_argument("command", choices=["status", "rollback"])
    ap.add_argument(
        "--to", default=None, metavar="VERSION", help="rollback: this version (default: previous)"
    )
    ap.add_argument("--name", default=None, help="registered model (default: register.model_name)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        name = args.name or params.register.model_name
        if args.command == "rollback":
            result = rollback(name, params.mlflow, args.to)
        else:
            result = status(name, params.mlflow)
    except TagtuneError as e:
        print(error_line("registry", e), file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
