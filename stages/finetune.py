"""finetune: train the base model on the train split — LoRA (default), full, or freeze-first layers.

    python -m stages.finetune [-S finetune.max_steps=50]
    torchrun --nproc_per_node 2 -m stages.finetune      # DDP (gloo on CPU, nccl on GPUs)

Uses HF Trainer (checkpoints, resume, grad accumulation, DDP, schedulers) with our own collator:
labels come from the tagged segments (prompt masked, answer + EOS trained), batches are grouped by
length and padded only to the longest example in the batch. A killed run re-run with the same
command resumes from the newest *complete* checkpoint and keeps counting steps.

Writes `paths.finetune/`: `adapter/` (LoRA) and/or `model/` (merged or fully trained, safetensors
+ tokenizer), `template.json` (how to prompt it), `training.json` (steps, tokens, wall time, peak
memory, MLflow run id, the weights' sha256 that evaluate/register/serving verify), `loss.csv`,
`label_audit.md`.

After SFT, `preference.method: dpo | kto` tunes the model on the UI's verdicts with TRL (`prefer`,
tagtune/preference.py) in the same run; `finetune.init: champion` starts from the registry's champion
instead of the base and trains on the rows it has not seen plus a `finetune.replay` share of the others.

Trust nothing: before step 1 a label audit checks the encoded batches (every example trains some
tokens, its end tag and EOS); a NaN/inf loss, gradient norm or weight stops the run with nothing
written (the MLflow run ends FAILED); each checkpoint's COMPLETE marker holds a sha256 manifest, and
an unreadable newest checkpoint falls back to the previous complete one. A resumed run restores the
earlier step losses from the checkpoint, so loss.csv and MLflow keep the whole curve, each step once.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagtune.config import (
    FinetuneConfig,
    MlflowConfig,
    ModelConfig,
    Params,
    PreferenceConfig,
    RetrievalConfig,
)
from tagtune.encoding import (
    IGNORE_INDEX,
    PackCollator,
    PadCollator,
    TrainedLogitsOnly,
    build_cls_features,
    build_lm_features,
    pack_rows,
)
from tagtune.errors import ConfigError, DataError, TagtuneError
from tagtune.grounding import training_segments
from tagtune.io import atomic_path, check_replaceable, read_jsonl, write_json
from tagtune.models import block_list_name, cpu_has_bf16, emulates_half
from tagtune.retrieval import FactIndex, facts_from_examples
from tagtune.templates import read_template, write_template
from tagtune.text import normalize, stable_hash

# what finetune writes to paths.finetune (an existing directory holding anything else is not replaced)
WRITES = (
    "adapter", "model", "reranker", "training.json", "template.json", "base.json", "loss.csv", "label_audit.md"
)  # fmt: skip
COMPLETE_MARKER = "COMPLETE"  # written after Trainer finished saving a checkpoint
PREFERENCE_CKPT = "preference"  # the preference phase's checkpoints, inside SFT's (own fingerprint)
_CKPT = re.compile(r"^checkpoint-(\d+)$")


# ------------------------------------------------------------------------------------------ hardware
def resolve_precision(precision: str, method: str = "lora") -> str:
    """`auto` → bf16 where it is faster, else fp32 (fp16 only when asked).

    On CPUs with AVX512-BF16/AMX, LoRA trains ~2x faster with the frozen base held in bf16 (adapters
    stay fp32); CPU autocast for full/freeze training measured ~2x *slower* than fp32, so there `auto`
    keeps fp32. On GPUs bf16 autocast is the norm.
    """
    import torch

    if precision != "auto":
        if precision in ("bf16", "fp16") and emulates_half():
            print(
                f"tagtune finetune: warning: finetune.precision: {precision} on a CPU without native bf16 "
                "(AVX512-BF16/AMX) runs emulated, far slower than fp32 (README: Benchmarks); "
                "`auto` picks fp32 here",
                file=sys.stderr,
            )
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() and method == "lora" else "fp32"


# ------------------------------------------------------------------------------------------- model
def prepare_model(model: Any, cfg: FinetuneConfig, new_token_ids: list[int]) -> Any:
    """Apply the training method: wrap with LoRA, freeze all but the last N blocks, or train all."""
    if cfg.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lcfg = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type=TaskType.SEQ_CLS if cfg.task == "classification" else TaskType.CAUSAL_LM,
            # new tag tokens: train only their embedding rows, saved with the adapter
            trainable_token_indices=new_token_ids or None,
        )
        return get_peft_model(model, lcfg)
    if cfg.method == "freeze":
        blocks = model.get_submodule(block_list_name(model))
        if cfg.trainable_layers > len(blocks):
            raise TagtuneError(
                f"finetune.trainable_layers must be <= {len(blocks)} (the model's blocks), got {cfg.trainable_layers}"
            )
        model.requires_grad_(False)
        for block in list(blocks)[-cfg.trainable_layers :]:
            block.requires_grad_(True)
        if cfg.task == "classification":
            model.score.requires_grad_(True)
        if new_token_ids:
            model.get_input_embeddings().requires_grad_(True)
    return model


# --------------------------------------------------------------------------------------- checkpoints
def complete_checkpoints(ckpt_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint dirs, each sorted by step."""
    if not ckpt_dir.is_dir():
        return [], []
    found = sorted(
        (int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()
    )
    complete = [p for _, p in found if (p / COMPLETE_MARKER).is_file()]
    return complete, [p for _, p in found if not (p / COMPLETE_MARKER).is_file()]


def checkpoint_manifest(ckpt: Path) -> dict[str, list]:
    """{relative file: [size, sha256]} of everything in a checkpoint (written into its COMPLETE marker)."""
    from tagtune.models import sha256_file

    files = sorted(f for f in ckpt.rglob("*") if f.is_file() and f.name != COMPLETE_MARKER)
    return {f.relative_to(ckpt).as_posix(): [f.stat().st_size, sha256_file(f)] for f in files}


def _structure_problem(f: Path) -> str | None:
    """A checkpoint file that does not parse (for markers written before manifests existed)."""
    import zipfile

    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "np") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    st.get_slice(key)
        elif f.suffix == ".json":
            json.loads(f.read_text(encoding="utf-8"))
        elif f.suffix in (".pt", ".pth") and zipfile.ZipFile(f).testzip() is not None:
            return "a damaged entry"
    except Exception as e:  # noqa: BLE001 - any failure to parse means "cannot resume from it"
        return f"{type(e).__name__}: {str(e)[:120]}"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a complete-marked checkpoint cannot be resumed from (files missing, changed, unreadable)."""
    try:
        manifest = json.loads((ckpt / COMPLETE_MARKER).read_text()).get("files")
    except (ValueError, AttributeError, OSError):
        manifest = None  # a marker from before manifests: check that each file parses
    if not manifest:
        files = [f.relative_to(ckpt).as_posix() for f in ckpt.rglob("*") if f.is_file()]
        if "trainer_state.json" not in files:
            return "trainer_state.json is missing"
        problems = ((f, _structure_problem(ckpt / f)) for f in sorted(files))
        return next((f"{f}: {why}" for f, why in problems if why), None)
    current = checkpoint_manifest(ckpt)
    for rel, expected in manifest.items():
        if rel not in current:
            return f"{rel} is missing"
        if current[rel] != expected:
            return f"{rel} changed since it was saved ({current[rel][0]} bytes, was {expected[0]})"
    return None


def _peek(ckpt_dir: Path, fingerprint: str) -> Path | None:
    """`resume_point` without changing anything."""
    try:
        if json.loads((ckpt_dir / "fingerprint.json").read_text()).get("fingerprint") != fingerprint:
            return None
    except (OSError, ValueError):  # absent, or being written by rank 0 for a fresh start
        return None
    complete, _ = complete_checkpoints(ckpt_dir)
    return next((c for c in reversed(complete) if checkpoint_problem(c) is None), None)


def _readable(complete: list[Path]) -> Path | None:
    """The newest checkpoint that passes `checkpoint_problem`; unreadable newer ones are removed."""
    skipped = False
    for ckpt in reversed(complete):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if skipped:
                print(f"tagtune finetune: resuming from {ckpt} instead", file=sys.stderr)
            return ckpt
        print(
            f"tagtune finetune: warning: skipping unreadable checkpoint {ckpt} ({problem})", file=sys.stderr
        )
        shutil.rmtree(ckpt, ignore_errors=True)
        skipped = True
    if skipped:
        print("tagtune finetune: no readable checkpoint left; starting from the base model", file=sys.stderr)
    return None


def resume_point(ckpt_dir: Path, fingerprint: str, manage: bool = True) -> Path | None:
    """The checkpoint to resume from, if any; stale (other config/data), incomplete and unreadable
    ones are removed (an unreadable newest one falls back to the previous complete one).

    `manage=False` (DDP ranks other than 0) only reads: rank 0 alone removes and writes, and the
    same checks lead every rank to the same checkpoint.
    """
    if not manage:
        return _peek(ckpt_dir, fingerprint)
    fp_file = ckpt_dir / "fingerprint.json"
    if ckpt_dir.is_dir() and (
        not fp_file.is_file() or json.loads(fp_file.read_text()).get("fingerprint") != fingerprint
    ):
        # README.md: the model card TRL's trainers write into their output dir (the preference phase's)
        owned = ("checkpoint-*", "fingerprint.json", PREFERENCE_CKPT, "README.md")
        check_replaceable(ckpt_dir, owned=owned)  # ours to delete?
        print(
            f"tagtune finetune: {ckpt_dir} holds checkpoints of other data/params; starting fresh",
            file=sys.stderr,
        )
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not fp_file.is_file():  # written once: other DDP ranks read it meanwhile (_peek)
        write_json(fp_file, {"fingerprint": fingerprint})
    complete, incomplete = complete_checkpoints(ckpt_dir)
    last = complete[-1] if complete else None
    for p in incomplete:
        if last is None or int(_CKPT.match(p.name).group(1)) > int(_CKPT.match(last.name).group(1)):
            warnings.warn(
                f"skipping incomplete checkpoint {p} (the run was killed while saving it)", stacklevel=2
            )
        shutil.rmtree(p, ignore_errors=True)
    return _readable(complete)


class DivergedError(TagtuneError):
    """The loss, gradient norm or weights became NaN/inf: training stopped, nothing was written."""


def _diverged(what: str, value: Any, step: int, cfg: FinetuneConfig) -> DivergedError:
    return DivergedError(
        f"finetune: the {what} is not finite ({value}) at step {step}: training diverged and was stopped, "
        f"no model was written (lower finetune.learning_rate={cfg.learning_rate:g}, or use "
        "finetune.precision: fp32 if fp16/bf16 overflowed)"
    )


def _nonfinite_weights(model: Any) -> str | None:
    """The first trainable parameter holding NaN/inf, if any."""
    import torch

    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            return name
    return None


def _callbacks(cfg: FinetuneConfig, log_rows: list[dict], tracker: _Tracker | None):
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        """Mark a checkpoint complete (with a manifest of its files' hashes) only after Trainer has
        written all of it, and only if its weights are finite: a diverged run leaves nothing to resume."""

        def on_save(self, args, state, control, model=None, **kw):
            if model is not None and (bad := _nonfinite_weights(model)):
                raise _diverged(f"weight {bad}", "nan/inf", state.global_step, cfg)
            if state.is_world_process_zero:
                p = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if p.is_dir():
                    marker = {"step": state.global_step, "files": checkpoint_manifest(p)}
                    (p / COMPLETE_MARKER).write_text(json.dumps(marker))

    class StepMetrics(TrainerCallback):
        """loss / lr / grad-norm / tokens-per-second per logging step → loss.csv rows and MLflow;
        a non-finite loss or gradient norm stops the run."""

        def __init__(self):
            self.t, self.tokens = time.perf_counter(), None

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            for key, what in (("loss", "training loss"), ("grad_norm", "gradient norm")):
                value = logs.get(key)
                if isinstance(value, float | int) and not math.isfinite(value):
                    raise _diverged(what, value, state.global_step, cfg)
            if not state.is_world_process_zero:
                return
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            tps = (seen - self.tokens) / (now - self.t) if self.tokens is not None and now > self.t else None
            self.t, self.tokens = now, seen
            row = {
                "step": state.global_step,
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_s": tps,
            }
            log_rows.append(row)
            if tracker is not None:
                tracker.add(row)

    return [MarkComplete(), StepMetrics()]


class _Tracker:
    """Buffers step metrics and sends them to MLflow in batches; a failed send warns, never kills training.

    Steps the run already has (sent before a crash) are not sent again, so a resumed run's history
    holds every step once.
    """

    def __init__(self, cfg: MlflowConfig, run_id: str, every: int = 10):
        from tagtune import tracking

        self.cfg, self.run_id, self.every, self.buffer = cfg, run_id, every, []
        self.logged = tracking.metric_steps(cfg, run_id, "train/loss")

    def add(self, row: dict[str, Any]) -> None:
        if row["step"] in self.logged:
            return
        self.logged.add(row["step"])
        self.buffer += [
            (f"train/{k}", v, row["step"]) for k, v in row.items() if k != "step" and v is not None
        ]
        if len(self.buffer) >= self.every * 4:
            self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        from tagtune import tracking

        try:
            tracking.log_metrics(self.cfg, self.run_id, self.buffer)
            self.buffer = []
        except Exception as e:  # noqa: BLE001 - training must not die because MLflow hiccuped
            if final:
                raise
            print(f"tagtune finetune: warning: MLflow logging failed, will retry: {e}", file=sys.stderr)


# ------------------------------------------------------------------------------ preference phase
def _held_out_questions(splits: Path) -> set[str]:
    """The val and test questions (normalised): verdicts on them are not trained on."""
    return {
        normalize(ex["question"])
        for name in ("val.jsonl", "test.jsonl")
        if (splits / name).is_file()
        for ex in read_jsonl(splits / name)
        if ex.get("question")
    }


def _preference_rows(
    verdicts_file: Path, splits: Path, template: dict, tokenizer: Any, grounded: RetrievalConfig | None,
    reranker: Any = None,
):  # fmt: skip
    """DPO/KTO rows from the feedback snapshot, prompts as the model sees them (grounded: with the
    facts retrieval gives it, reranked by `reranker` when the run trains one)."""
    from tagtune.preference import preference_rows

    verdicts = read_jsonl(verdicts_file) if verdicts_file.is_file() else []
    contexts = None
    if grounded is not None and verdicts:
        index = FactIndex(facts_from_examples(read_jsonl(splits / "train.jsonl")))
        index.reranker = reranker
        questions = sorted({v["question"] for v in verdicts})
        found = index.search(questions, grounded.k)
        contexts = {q: [h.fact.text for h in hits] for q, hits in zip(questions, found, strict=True)}
    return preference_rows(verdicts, template, _held_out_questions(splits), tokenizer, contexts)


def _preference_phase(
    model: Any, tokenizer: Any, splits: Path, template: dict, cfg: FinetuneConfig, pcfg: PreferenceConfig | None,
    verdicts: Path, grounded: RetrievalConfig | None, run: tuple[str, Path, str, str],
) -> tuple[dict[str, Any] | None, tuple[Any, dict] | None]:  # fmt: skip
    """(`prefer`'s facts, the reranker of a grounded run or None) after SFT; (None, None) when the
    `preference:` section asks for none (or the task is classification).

    The reranker is trained first (on every rank: they must build the same rows), so the preference
    prompts hold the fact the user was shown with the answer: the reranker's best.
    `run`: (base model dir, checkpoints dir, SFT's fingerprint, precision).
    """
    if pcfg is None or pcfg.method == "none" or cfg.task != "causal_lm":
        return None, None
    base_dir, checkpoints, fingerprint, precision = run
    reranker = _rerank(splits, base_dir, grounded, precision)
    rows = _preference_rows(verdicts, splits, template, tokenizer, grounded, reranker and reranker[0])
    return prefer(model, tokenizer, rows, cfg, pcfg, checkpoints, fingerprint, precision), reranker


def _preference_args(cfg: FinetuneConfig, pcfg: PreferenceConfig, ckpt: Path, precision: str) -> dict:
    """SFT's TrainingArguments keywords with the `preference:` section's schedule."""
    return {
        **_training_kwargs(cfg, ckpt, precision),
        "learning_rate": pcfg.learning_rate,
        "max_steps": pcfg.steps,
        "per_device_train_batch_size": pcfg.batch_size,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "constant_with_warmup",  # few steps: no decay to zero half way
        "warmup_steps": 0.1,
        # TRL tokenises the rows itself (no length column to group by); KTO's KL term pairs each row
        # with its neighbour in a fixed order, so it needs `sequential` (rows are shuffled by seed)
        "train_sampling_strategy": "sequential" if pcfg.method == "kto" else "random",
        "include_num_input_tokens_seen": "no",
        "save_steps": min(cfg.save_steps, pcfg.steps),
    }


def prefer(
    model: Any, tokenizer: Any, rows: Any, cfg: FinetuneConfig, pcfg: PreferenceConfig,
    checkpoints: Path, fingerprint: str, precision: str,
) -> dict[str, Any]:  # fmt: skip
    """DPO or KTO (TRL) on `model` in place, after SFT; returns what it did (training.json's `preference`).

    Checkpoints go to `checkpoints/preference` under their own fingerprint (SFT's + the rows + the
    section), so a killed run resumes there, and a new verdict re-runs only this phase when SFT's
    data is unchanged (SFT resumes from its finished checkpoint).
    """
    from tagtune.preference import margins, trl_trainer

    train_rows = rows.dpo if pcfg.method == "dpo" else rows.kto
    facts: dict[str, Any] = {"method": pcfg.method, "rows": len(train_rows), "pairs": len(rows.dpo),
                             "held_out": rows.held_out, "steps": 0}  # fmt: skip
    if len(train_rows) < (2 if pcfg.method == "kto" else 1):  # KTO's KL term pairs rows in a batch
        return facts
    before = margins(model, tokenizer, rows.dpo, cfg.max_length)
    ckpt_dir = checkpoints / PREFERENCE_CKPT
    fp = stable_hash(fingerprint, pcfg.model_dump_json(), json.dumps(train_rows, sort_keys=True))[:16]
    resume, resumed_step, _ = _resumed(ckpt_dir, fp, pcfg.steps)
    log_rows: list[dict] = []  # divergence checks and checkpoint markers as in SFT (_callbacks)
    trainer = trl_trainer(
        pcfg.method, model, tokenizer, rows, _preference_args(cfg, pcfg, ckpt_dir, precision),
        pcfg.beta, pcfg.sft_weight, _callbacks(cfg, log_rows, None),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    after = margins(model, tokenizer, rows.dpo, cfg.max_length)
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    history = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    return {
        **facts,
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_step,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "loss": history[-1]["loss"] if history else None,
        "margin_before": mean(before),  # mean log P(chosen) - log P(rejected) over the pairs
        "margin_after": mean(after),
        "history": history,  # per logging step: loss, rewards/margins, ... (MLflow: preference/*)
    }


def _log_preference(mlflow_cfg: MlflowConfig, run_id: str, rows: list[dict], pref: dict | None) -> None:
    """The preference phase's step metrics (TRL's loss, rewards/margins, ...) and its margins before
    and after into the version's MLflow run, as `preference/<name>`."""
    if not pref:
        return
    last = {"step": pref["steps"], **{k: pref[k] for k in ("margin_before", "margin_after") if k in pref}}
    metrics = [
        (f"preference/{k.replace('/', '_')}", float(v), h["step"])
        for h in [*rows, last] for k, v in h.items()
        if k not in ("step", "epoch") and isinstance(v, int | float) and math.isfinite(v)
    ]  # fmt: skip
    _tracking().log_metrics(mlflow_cfg, run_id, metrics)


# ---------------------------------------------------------------------------------------- the stage
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _ListDataset:
    """A list of feature dicts that Trainer can index and group by length."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class _Data:
    """The tokenised splits (rows of examples when packed) and what tokenising them found."""

    train: list[dict]
    val: list[dict]
    labels: list[str]  # classification: label names in class-index order; [] for causal LM
    truncated: int
    dropped: int
    examples: int = 0  # train examples (a packed row holds several)


def is_grounded(retrieval: RetrievalConfig | None, cfg: FinetuneConfig, template: dict[str, Any]) -> bool:
    """Whether this run trains with retrieved facts in the prompt (Q&A templates of causal LMs only)."""
    return bool(
        retrieval and retrieval.enabled and cfg.task == "causal_lm" and template["template"] != "text"
    )


def _ground(
    train: list[dict], val: list[dict], template: dict, retrieval: RetrievalConfig, seed: int, tokenizer: Any
) -> tuple[list[dict], list[dict]]:
    """Train and val examples with retrieved facts in their prompts (tagtune/grounding.py)."""
    index = FactIndex(facts_from_examples(train))  # the train facts, as the index stage sees them
    k, absent = retrieval.k, generator_absent(retrieval)
    return (
        training_segments(train, index, template, k, absent, seed, tokenizer),
        training_segments(val, index, template, k, absent, seed, tokenizer),
    )


def generator_absent(retrieval: RetrievalConfig) -> float:
    """The share of the generator's training questions shown without their fact (→ the refusal).

    `retrieval.gold_absent` without a reranker; 0 with one. Why: with a reranker, abstaining is its job
    (its score is the confidence, and `grounding.reply` refuses before generating), so the generator
    only has to answer from the fact it is given. Taught to refuse a fact that does not fit as well, the
    135M generator refused right facts too: measured on the shipped test split with the same reranker,
    6 of its 56 right facts refused; trained on gold facts only, F1 without abstention 0.776 → 0.845,
    false refusals 0.145 → 0.116 with the val-chosen threshold (README: Results).
    """
    return 0.0 if retrieval.rerank.steps else retrieval.gold_absent


def warm_start_rows(
    train: list[dict], seen: set[str], replay: float, seed: int
) -> tuple[list[dict], dict[str, int]]:
    """A warm start's training rows: every example the champion has not seen, plus a seeded `replay`
    share of those it has (so it keeps them: continual learning's rehearsal), in split order."""
    old = [ex for ex in train if ex["id"] in seen]
    kept = {ex["id"] for ex in random.Random(seed).sample(old, round(replay * len(old)))}
    rows = [ex for ex in train if ex["id"] not in seen or ex["id"] in kept]
    return rows, {"new": len(train) - len(old), "replayed": len(kept), "seen": len(old)}


def _features(
    splits: Path, cfg: FinetuneConfig, tokenizer: Any, template: dict, retrieval: RetrievalConfig | None,
    start: dict | None = None,
) -> _Data:  # fmt: skip
    """Tokenise train and val for `cfg.task` (labels masked as encoding.py says; grounded if asked;
    a warm `start` trains on `warm_start_rows`)."""
    train = read_jsonl(splits / "train.jsonl")
    val = read_jsonl(splits / "val.jsonl")
    if not train:
        raise DataError(splits / "train.jsonl", None, "train split is empty")
    if start is not None:
        train, start["rows"] = warm_start_rows(train, set(start["train_ids"]), cfg.replay, cfg.seed)
    if is_grounded(retrieval, cfg, template):
        train, val = _ground(train, val, template, retrieval, cfg.seed, tokenizer)
    if cfg.task == "classification":
        labels = sorted({ex["label"] for ex in train})
        train_f = build_cls_features(train, tokenizer, cfg.max_length, labels)
        val_f = build_cls_features(
            [e for e in val if e["label"] in labels], tokenizer, cfg.max_length, labels
        )
        data = _Data(train_f, val_f, labels, sum(f["length"] >= cfg.max_length for f in train_f), 0)
    else:
        train_f, counts = build_lm_features(train, tokenizer, cfg.max_length)
        val_f, _ = build_lm_features(val, tokenizer, cfg.max_length)
        data = _Data(train_f, val_f, [], counts["truncated"], counts["dropped"])
        if cfg.packing and train_f:
            data.train, data.val = pack_rows(train_f, cfg.max_length), pack_rows(val_f, cfg.max_length)
    data.examples = len(train_f)
    if not data.train:
        hint = (
            " (grounded prompts carry retrieval.k facts: raise it or lower retrieval.k)" if retrieval else ""
        )
        raise DataError(
            splits / "train.jsonl",
            None,
            f"no example has a trained token within finetune.max_length={cfg.max_length}{hint}",
        )
    return data


# ------------------------------------------------------------------------------------- label audit
AUDIT_FILE = "label_audit.md"  # a few encoded examples with the trained span marked (also in MLflow)
AUDIT_SHOWN = 3
TRAIN_MARK = ("⟦", "⟧")


class LabelAuditError(TagtuneError):
    """An encoded example would not train what it must (any token, its end tag, EOS)."""


def _label_problem(
    ids: list[int], trained: list[bool], tokenizer: Any, end: str | None, cut: bool
) -> str | None:
    """What is wrong with one encoded example's labels, if anything (`cut`: truncated at max_length)."""
    if not any(trained):
        return "no trained tokens (its answer is masked or was truncated away)"
    if cut:  # the end was cut off: counted as truncated, not a labelling error
        return None
    eos = tokenizer.eos_token_id
    if eos is not None and ids[-1] == eos and not trained[-1]:
        return "EOS (the stop token) is not trained: the model would never learn to stop"
    answer = tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if t])
    if end and end not in answer:
        return f"the end tag {end!r} is not trained: the model would never learn to emit it"
    return None


def _render_trained(ids: list[int], trained: list[bool], tokenizer: Any) -> str:
    """The decoded example with each trained run of tokens inside ⟦ ⟧."""
    out = []
    for flag, run in itertools.groupby(zip(ids, trained, strict=True), key=lambda pair: pair[1]):
        text = tokenizer.decode([i for i, _ in run])
        out.append(f"{TRAIN_MARK[0]}{text}{TRAIN_MARK[1]}" if flag else text)
    return "".join(out)


def _collated_examples(collate: Any, rows: list[dict], batch_size: int):
    """(feature, input ids, trained flags) of every example, cut from the batches `collate` builds (the
    tensors the model will see); a packed row yields each of its examples."""
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start : start + batch_size]
        batch = collate(batch_rows)
        for row, ids, labels in zip(batch_rows, batch["input_ids"], batch["labels"], strict=True):
            at = 0
            for f in row.get("examples", [row]):
                span = slice(at, at + f["length"])
                yield f, ids[span].tolist(), [int(x) != IGNORE_INDEX for x in labels[span]]
                at += f["length"]


def label_audit(collate: Any, tokenizer: Any, data: _Data, template: dict, cfg: FinetuneConfig) -> str:
    """Check the encoded train batches before step 1: every example trains some tokens, and (unless
    truncated) its end tag and EOS. Returns label_audit.md: a few examples with the trained span marked.

    Raises:
        LabelAuditError: naming the first bad example (`source:line`) and what is wrong.
    """
    end, shown = template.get("end_marker"), []
    rows = [] if data.labels else data.train  # the Trainer's own collator below
    for f, ids, trained in _collated_examples(collate, rows, cfg.batch_size):
        if problem := _label_problem(ids, trained, tokenizer, end, f["truncated"]):
            raise LabelAuditError(f"{f['origin']}: {problem} (finetune's label audit, before step 1)")
        if len(shown) < AUDIT_SHOWN:
            shown.append(f"## {f['origin']}\n\n```text\n{_render_trained(ids, trained, tokenizer)}\n```\n")
    if data.labels:
        checked = "Classification: one class label per example, no token spans to check."
    else:
        tag = f", its end tag {end!r}" if end else ""
        checked = (
            f"{data.examples} train examples checked: each trains some tokens{tag} and EOS unless truncated."
        )
    legend = f"Text inside {TRAIN_MARK[0]} {TRAIN_MARK[1]} is trained (has loss); the rest is masked."
    head = f"# Label audit (finetune, before step 1)\n\n{checked}\n{legend} EOS = {tokenizer.eos_token!r}.\n"
    return "\n".join([head, *shown])


def _checked_start(start: dict | None, cfg: FinetuneConfig, model_cfg: ModelConfig) -> dict | None:
    """`start` if the champion can be continued with these params (same base, same method)."""
    if start is None:
        return None
    root, v = Path(start["root"]), start["version"]
    kind = "lora" if (root / "adapter").is_dir() else "full"
    if (cfg.method == "lora") != (kind == "lora"):
        raise ConfigError(
            f"finetune.init: champion (version {v}) is a {kind} model, finetune.method is {cfg.method!r}: "
            "a warm start continues the same method (or set finetune.init: base)"
        )
    base = json.loads((root / "base.json").read_text()).get("base") if kind == "lora" else None
    if base is not None and base != model_cfg.base:
        raise ConfigError(
            f"finetune.init: champion (version {v}) was trained on base {base!r}, model.base is "
            f"{model_cfg.base!r} (or set finetune.init: base)"
        )
    return start


def _feedback_facts(verdicts: Path | None) -> dict[str, Any]:
    """training.json's `feedback`: how many UI verdicts the data held, and the snapshot's sha256."""
    if verdicts is None or not Path(verdicts).is_file():
        return {"verdicts": 0, "sha256": None}
    from tagtune.models import sha256_file

    return {"verdicts": len(read_jsonl(verdicts)), "sha256": sha256_file(Path(verdicts))}


def _init_facts(start: dict | None) -> dict[str, Any]:
    """training.json's `init`: where the weights started (and, warm, which rows were trained)."""
    if start is None:
        return {"from": "base"}
    return {"from": "champion", **{k: start[k] for k in ("version", "run_id", "rows")}}


def _start_weights(start: dict | None, cfg: FinetuneConfig) -> Path | None:
    """What `_build_model` loads for a warm start: the champion's adapter dir or whole model dir."""
    if start is None:
        return None
    return Path(start["root"]) / ("adapter" if cfg.method == "lora" else "model")


def _build_model(
    base_dir: str, cfg: FinetuneConfig, model_cfg: ModelConfig, tokenizer: Any, new_tokens: list[str],
    labels: list[str], precision: str, weights: Path | None = None,
) -> Any:  # fmt: skip
    """The model to train: base (or a finished checkpoint's `weights`), labels, tag tokens, method applied."""
    import torch

    from tagtune.models import load_model

    # LoRA + bf16: hold the frozen base in bf16 (peft keeps the adapters in fp32) instead of autocast
    lora_bf16 = cfg.method == "lora" and precision == "bf16"
    whole = weights if weights is not None and cfg.method != "lora" else None
    model = load_model(
        str(whole or base_dir),
        cfg.task,
        num_labels=len(labels) or None,
        allow_pickle=model_cfg.allow_pickle,
        dtype=torch.bfloat16 if lora_bf16 else None,
    )
    attention = getattr(model.config, "_attn_implementation", None)
    if cfg.packing and attention != "sdpa":  # eager would add the boolean mask, flash would ignore it
        raise ConfigError(
            f"finetune.packing: true needs SDPA attention (its 4D mask keeps packed examples apart); "
            f"{base_dir} loads with {attention!r}: set finetune.packing: false"
        )
    if cfg.task == "classification":
        model.config.pad_token_id = tokenizer.pad_token_id  # GPT-style models have none
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {lab: i for i, lab in enumerate(labels)}
    new_ids = tokenizer.convert_tokens_to_ids(new_tokens) if new_tokens else []
    if new_tokens and whole is None:
        model.resize_token_embeddings(len(tokenizer))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model = prepare_model(model, cfg, new_ids)
    if weights is not None and cfg.method == "lora":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(weights / "adapter_model.safetensors")))
    if cfg.compile:  # per block: the 30 identical blocks share one compiled graph (compile time ~ 1 block)
        for block in model.get_submodule(block_list_name(model)):
            block.compile()
    return model


def _attention_kernel(cfg: FinetuneConfig) -> contextlib.AbstractContextManager:
    """The SDPA kernel training runs under (`finetune.attention_kernel`). auto = math on CPU for
    padded batches, whose rows are one short example each; PyTorch's own choice on GPUs and for
    packed rows (max_length wide: there math's [seq x seq] scores cost more than flash, measured)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = cfg.attention_kernel
    if kernel == "auto":
        kernel = "default" if torch.cuda.is_available() or cfg.packing else "math"
    return sdpa_kernel([SDPBackend.MATH]) if kernel == "math" else contextlib.nullcontext()


def _training_args(cfg: FinetuneConfig, checkpoints: Path, precision: str):
    """HF TrainingArguments from the `finetune:` section (CPU/DDP aware).

    SFT autocasts LoRA on a bf16 base as well: the fp32 adapters then run bf16 matmuls on the bf16
    activations, with peft's fp32 input casts switched off (`_sft`): 1.1x faster steps, measured.
    """
    from transformers import TrainingArguments

    return TrainingArguments(**{**_training_kwargs(cfg, checkpoints, precision), "bf16": precision == "bf16"})


def _training_kwargs(cfg: FinetuneConfig, checkpoints: Path, precision: str) -> dict[str, Any]:
    """The TrainingArguments keywords of `_training_args` (TRL's configs take the same ones)."""
    import torch

    # bf16 weights (_build_model); no autocast here (the preference phase), SFT adds it (_training_args)
    lora_bf16 = cfg.method == "lora" and precision == "bf16"
    return dict(
        output_dir=str(checkpoints),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=cfg.weight_decay,
        max_steps=cfg.max_steps or -1,
        num_train_epochs=cfg.epochs,
        optim={"adamw": "adamw_torch_fused", "adafactor": "adafactor"}[cfg.optimizer],
        bf16=precision == "bf16" and not lora_bf16,
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="group_by_length",  # similar lengths per batch → little padding
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # under torchrun/accelerate (WORLD_SIZE > 1): gloo on CPU, the default (nccl) on GPUs
        ddp_backend="gloo"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        else None,
        ddp_find_unused_parameters=cfg.method == "freeze",  # frozen blocks get no grads
    )


def _tracking():
    """tagtune.tracking, imported when a run is logged (it imports MLflow)."""
    from tagtune import tracking

    return tracking


def _open_run(
    mlflow_cfg: MlflowConfig | None,
    fingerprint: str,
    data_digest: str,
    cfg: FinetuneConfig,
    model_cfg: ModelConfig,
    data: _Data,
    precision: str,
    splits: Path,
) -> str | None:
    """The pipeline version's MLflow run with the training params (and the train split's example ids)
    logged; None without MLflow.

    Only rank 0 logs under DDP.
    """
    if mlflow_cfg is None or int(os.environ.get("RANK", "0")) != 0:
        return None
    from tagtune import tracking

    params = {
        "finetune": cfg.model_dump(),
        "model.base": model_cfg.base,
        "data.train_examples": data.examples,
        "precision": precision,
    }
    run_id = tracking.open_run(
        mlflow_cfg,
        fingerprint,
        run_name=f"tagtune-{fingerprint[:8]}",
        tags={"tagtune.base_model": params["model.base"], "tagtune.data_digest": data_digest[:16]},
    )
    tracking.log_params(mlflow_cfg, run_id, params)
    # what a later warm start (finetune.init: champion) needs to tell new examples from seen ones
    ids = [ex["id"] for ex in read_jsonl(splits / "train.jsonl")]
    tracking.log_text(mlflow_cfg, run_id, json.dumps(ids), tracking.TRAIN_IDS_ARTIFACT)
    return run_id


@contextlib.contextmanager
def _marks_failure(mlflow_cfg: MlflowConfig | None, run_id: str | None):
    """End the MLflow run as FAILED (KILLED on Ctrl-C) when the block raises, then re-raise (progress
    bars closed first, so the error is the last line the user sees)."""
    try:
        yield
    except BaseException as e:
        from tqdm.auto import tqdm

        for bar in list(
            getattr(tqdm, "_instances", ())
        ):  # Trainer's bar: closed now, not after the error line
            bar.close()
        if run_id is not None:
            from tagtune import tracking

            with contextlib.suppress(Exception):  # the original error matters more
                tracking.end_run(
                    mlflow_cfg, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
                )
        raise


def _restored_rows(resume: Path | None) -> list[dict[str, Any]]:
    """loss.csv rows of the steps before `resume` (its trainer state's log history): a resumed run
    keeps the whole loss curve, not only the steps it trained itself."""
    if resume is None:
        return []
    state = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))
    return [
        {"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate"), "grad_norm": h.get("grad_norm"),
         "tokens_per_s": None}
        for h in state.get("log_history", []) if "loss" in h and "step" in h
    ]  # fmt: skip


def _resumed(checkpoints: Path, fingerprint: str, max_steps: int) -> tuple[Path | None, int, bool]:
    """(the checkpoint to resume from, its step, whether it already is the last of `max_steps`);
    SFT's and the preference phase's."""
    resume = resume_point(checkpoints, fingerprint, manage=int(os.environ.get("RANK", "0")) == 0)
    step = int(_CKPT.match(resume.name).group(1)) if resume else 0
    return resume, step, bool(resume and max_steps and step >= max_steps)


def _tracker(mlflow_cfg: MlflowConfig | None, run_id: str | None, resume: Path | None):
    """(the run's step-metric tracker or None, loss rows so far: restored from `resume`'s trainer
    state, and sent to the tracker)."""
    tracker = _Tracker(mlflow_cfg, run_id) if run_id else None
    log_rows = _restored_rows(resume)
    for row in log_rows if tracker else []:
        tracker.add(row)
    return tracker, log_rows


def _train_or_resume(trainer: Any, resume: Path | None, finished: bool) -> float:
    """Train (from `resume` if given); returns the mean training loss.

    A `finished` checkpoint already holds the final weights (loaded by `_build_model`): Trainer would
    take one more step from it, so only its state is restored. Trainer's run summary is not in the
    checkpoint: the loss is then the mean of the logged step losses.
    """
    from transformers import TrainerState

    if not finished:
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None).training_loss
    trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return sum(losses) / len(losses) if losses else float("nan")


def _sft(
    trainer: Any, resume: Path | None, finished: bool, has_val: bool, cfg: FinetuneConfig
) -> tuple[float, float | None, float]:
    """(mean training loss, validation loss, wall seconds) of the SFT phase; non-finite losses stop it."""
    from peft.helpers import disable_input_dtype_casting

    start = time.perf_counter()  # autocast casts the adapters' inputs (_training_args): peft needn't
    with _attention_kernel(cfg), disable_input_dtype_casting(trainer.model, active=trainer.args.bf16):
        train_loss = _train_or_resume(trainer, resume, finished)
        wall = time.perf_counter() - start
        val_loss = trainer.evaluate()["eval_loss"] if has_val else None
    for what, value in (("mean training loss", train_loss), ("validation loss", val_loss)):
        if value is not None and not math.isfinite(value):
            raise _diverged(what, value, trainer.state.global_step, cfg)
    return train_loss, val_loss, wall


def _rerank(
    splits: Path, base_dir: str, grounded: RetrievalConfig | None, precision: str
) -> tuple[Any, dict] | None:
    """(the reranker trained on the train split, its training facts) of a grounded run with
    `retrieval.rerank.steps` (tagtune/rerank.py); None otherwise."""
    if grounded is None or not grounded.rerank.steps:
        return None
    import torch

    from tagtune.models import load_model, load_tokenizer
    from tagtune.rerank import train_reranker

    dtype = torch.bfloat16 if precision == "bf16" else None  # the frozen base, as LoRA SFT holds it
    base = load_model(base_dir, "causal_lm", dtype=dtype)
    train = read_jsonl(splits / "train.jsonl")
    rr, facts = train_reranker(
        train, base, load_tokenizer(base_dir), grounded.rerank, grounded.gold_absent, 0
    )
    return rr, {**facts, "dtype": "bfloat16" if dtype else None}


def _write_outputs(
    out_dir: Path, trainer: Any, tokenizer: Any, cfg: FinetuneConfig, facts: dict, template: dict,
    log_rows: list, audit: str, reranker: tuple[Any, dict] | None = None,
) -> None:  # fmt: skip
    """out_dir (atomically): the model, training.json (with the weights' sha256, which evaluate,
    register and serving verify), template.json, loss.csv, label_audit.md (and reranker/)."""
    from tagtune.models import BASE_FILE, WEIGHTS_KEY, base_dtype, base_reference, weights_sha256
    from tagtune.rerank import RERANKER_DIR, save_reranker

    with atomic_path(out_dir, owned=WRITES) as tmp:
        tmp.mkdir()
        _save(trainer.model, tokenizer, cfg, tmp)
        if reranker is not None:
            ref = base_reference(facts["base_model"], facts["base_model_dir"], None, reranker[1]["dtype"])
            save_reranker(reranker[0], tmp / RERANKER_DIR, reranker[1], ref)
        facts[WEIGHTS_KEY] = weights_sha256(tmp, ("model", "adapter", RERANKER_DIR))
        write_json(tmp / "training.json", facts)
        if cfg.method == "lora":  # what an adapter-only registered version needs to find its base again
            ref = base_reference(
                facts["base_model"], facts["base_model_dir"], facts.get("labels"), base_dtype(facts)
            )
            write_json(tmp / BASE_FILE, ref)
        (tmp / AUDIT_FILE).write_text(audit, encoding="utf-8")
        write_template(tmp, template)
        with open(tmp / "loss.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "grad_norm", "tokens_per_s"])
            w.writeheader()
            w.writerows(log_rows)


def _log_final(mlflow_cfg: MlflowConfig, run_id: str, tracker: _Tracker, facts: dict) -> None:
    """The run's last step metrics and summary; the run is ended (evaluate and register attach by id)."""
    from tagtune import tracking

    tracker.flush()
    keys = ("train_loss", "val_loss", "tokens_per_s", "wall_time_s", "peak_rss_mb")
    metrics = [(f"train/{k}", facts[k], facts["steps"]) for k in keys if facts[k] is not None]
    tracking.log_metrics(mlflow_cfg, run_id, metrics)
    tracking.end_run(mlflow_cfg, run_id)


def _facts(
    trainer: Any, data: _Data, wall: float, train_loss: float, val_loss: float | None
) -> dict[str, Any]:
    """What the run did: steps, tokens, time, losses, memory, data counts."""
    seen = trainer.state.num_input_tokens_seen
    params = list(trainer.model.parameters())
    return {
        "steps": trainer.state.global_step,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "train_examples": data.examples,
        "train_rows": len(data.train),  # = train_examples unless packed
        "tokens_seen": int(seen),
        "wall_time_s": round(wall, 2),
        "tokens_per_s": round(seen / wall, 1) if wall > 0 else None,
        "train_loss": round(train_loss, 5),
        "val_loss": round(val_loss, 5) if val_loss is not None else None,
        "val_perplexity": round(math.exp(min(val_loss, 50)), 4) if val_loss is not None else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "world_size": trainer.args.world_size,
        "truncated_examples": data.truncated,
        "dropped_examples": data.dropped,
        "labels": data.labels or None,
    }


def _fingerprint(
    splits: Path, cfg: FinetuneConfig, model_cfg: ModelConfig, grounded: RetrievalConfig | None,
    start: dict | None = None,
) -> tuple[str, str]:  # fmt: skip
    """(digest of the training data, fingerprint of data + params + base + warm start): what
    checkpoints belong to."""
    data_digest = stable_hash(
        *((splits / f).read_text(encoding="utf-8") for f in ("train.jsonl", "val.jsonl", "template.json"))
    )
    # the reranker trains after SFT from the base: its params do not make SFT's checkpoints stale
    how = cfg.model_dump_json() + (grounded.model_dump_json(exclude={"rerank"}) if grounded else "")
    how += f"champion:{start['run_id']}" if start else ""
    return data_digest, stable_hash(data_digest, how, model_cfg.base)[:16]


def _trainer(
    model: Any, tokenizer: Any, data: _Data, args: Any, cfg: FinetuneConfig, log_rows: list, tracker: _Tracker | None
) -> Any:  # fmt: skip
    """HF Trainer over the tokenised data, batched by our collator, with our callbacks."""
    from transformers import Trainer

    class _Trainer(Trainer):
        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            mask = inputs.get("attention_mask")
            if mask is not None and mask.ndim == 4:  # packed: the sum would count (query, key) pairs
                inputs = {**inputs, "attention_mask": mask.diagonal(dim1=-2, dim2=-1)}  # real tokens
            super()._track_num_input_tokens(inputs)

    return _Trainer(
        model=model,
        args=args,
        train_dataset=_ListDataset(data.train),
        eval_dataset=_ListDataset(data.val) if data.val else None,
        data_collator=_collator(model, tokenizer, cfg),
        processing_class=tokenizer,
        callbacks=_callbacks(cfg, log_rows, tracker),
    )


def _collator(model: Any, tokenizer: Any, cfg: FinetuneConfig) -> Any:
    """Padded or packed batches; for a causal LM whose forward takes `logits_to_keep` (transformers'
    own models do), the LM head and the loss run on trained positions only (`TrainedLogitsOnly`)."""
    import inspect

    if cfg.task != "causal_lm":
        return PadCollator(tokenizer.pad_token_id)
    collate = (PackCollator if cfg.packing else PadCollator)(tokenizer.pad_token_id)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (
        TrainedLogitsOnly(collate)
        if "logits_to_keep" in inspect.signature(base.forward).parameters
        else collate
    )


def _tokenizer(base_dir: str, template: dict[str, Any]) -> tuple[Any, list[str]]:
    """(the base tokenizer with the template's tag tokens added, the tokens that were new to it)."""
    from tagtune.models import load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    new_tokens = [t for t in template.get("special_tokens", []) if t not in tokenizer.get_vocab()]
    if new_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": new_tokens})
    return tokenizer, new_tokens


def _setup(splits: Path, cfg: FinetuneConfig, model_cfg: ModelConfig) -> tuple[dict, str, Any, list[str]]:
    """(template facts, base model dir, tokenizer, new tag tokens), with the task, the base model and
    its context checked (before torch loads) and seeds set."""
    from tagtune.models import model_context, resolve_base

    template = read_template(splits)
    if cfg.task != template["task"]:
        raise DataError(
            splits / "template.json",
            None,
            f"data is for task {template['task']!r} but finetune.task is {cfg.task!r}",
        )
    base_dir = resolve_base(model_cfg.base, model_cfg.cache_dir, model_cfg.allow_pickle)
    context = model_context(base_dir)
    if context is not None and cfg.max_length > context:
        raise ConfigError(
            f"finetune.max_length: {cfg.max_length} is beyond the base model's context ({context} tokens, "
            f"{Path(base_dir) / 'config.json'}); use at most {context}"
        )
    import torch
    from transformers import set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    return template, base_dir, *_tokenizer(base_dir, template)


def finetune(
    splits: Path,
    out_dir: Path,
    cfg: FinetuneConfig,
    model_cfg: ModelConfig,
    checkpoints: Path,
    mlflow_cfg: MlflowConfig | None = None,
    retrieval: RetrievalConfig | None = None,
    preference: PreferenceConfig | None = None,
    verdicts: Path | None = None,
    start: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune `model_cfg.base` on `splits/train.jsonl` (then DPO/KTO on the verdicts, if asked).

    Args:
        splits: the split stage's directory (train/val jsonl + template.json).
        out_dir: written atomically: adapter/ and/or model/, training.json, template.json, loss.csv.
        cfg: the `finetune:` section.
        model_cfg: the `model:` section (base model spec, pickle policy, cache).
        checkpoints: resumable Trainer checkpoints (kept across runs with the same fingerprint).
        mlflow_cfg: where to log params and step metrics; None disables MLflow.
        retrieval: the `retrieval:` section; enabled → train grounded (tagtune/grounding.py).
        preference: the `preference:` section; dpo/kto → a preference phase after SFT (`prefer`).
        verdicts: the feedback stage's feedback.jsonl (the UI's verdicts with the model's answers).
        start: `finetune.init: champion` — the pulled champion (tagtune.registry.champion_start).

    Returns:
        Training facts (also written to training.json).
    """
    splits, out_dir, checkpoints = Path(splits), Path(out_dir), Path(checkpoints)
    template, base_dir, tokenizer, new_tokens = _setup(splits, cfg, model_cfg)
    grounded = retrieval if is_grounded(retrieval, cfg, template) else None
    data = _features(splits, cfg, tokenizer, template, grounded, _checked_start(start, cfg, model_cfg))
    precision = resolve_precision(cfg.precision, cfg.method)

    data_digest, fingerprint = _fingerprint(splits, cfg, model_cfg, grounded, start)
    resume, resumed_step, finished = _resumed(checkpoints, fingerprint, cfg.max_steps)
    weights = resume if finished else _start_weights(start, cfg)
    model = _build_model(base_dir, cfg, model_cfg, tokenizer, new_tokens, data.labels, precision, weights)
    run_id = _open_run(mlflow_cfg, fingerprint, data_digest, cfg, model_cfg, data, precision, splits)
    with _marks_failure(mlflow_cfg, run_id):  # a crash leaves the MLflow run FAILED, not RUNNING
        tracker, log_rows = _tracker(mlflow_cfg, run_id, resume)
        trainer = _trainer(
            model, tokenizer, data, _training_args(cfg, checkpoints, precision), cfg, log_rows, tracker
        )
        audit = label_audit(trainer.data_collator, tokenizer, data, template, cfg)
        if run_id and trainer.is_world_process_zero():
            _tracking().log_text(mlflow_cfg, run_id, audit, f"finetune/{AUDIT_FILE}")
        train_loss, val_loss, wall = _sft(trainer, resume, finished, bool(data.val), cfg)
        pref, reranker = _preference_phase(
            model, tokenizer, splits, template, cfg, preference, Path(verdicts or ""), grounded,
            (base_dir, checkpoints, fingerprint, precision),
        )  # fmt: skip
        if not trainer.is_world_process_zero():
            return {}
        reranker = reranker or _rerank(splits, base_dir, grounded, precision)
        history = pref.pop("history", []) if pref else []
        facts = {
            **_facts(trainer, data, wall, train_loss, val_loss),
            "task": cfg.task,
            "method": cfg.method,
            "base_model": model_cfg.base,
            "base_model_dir": base_dir,
            "max_length": cfg.max_length,
            "grounded": grounded.model_dump() if grounded else None,  # evaluate and serving retrieve alike
            "resumed_from_step": resumed_step,
            "precision": precision,
            "fingerprint": fingerprint,
            "mlflow_run_id": run_id,
            "preference": pref,  # None: SFT only
            "init": _init_facts(start),
            "feedback": _feedback_facts(verdicts),  # register promotes a not-worse retrain on new verdicts
            "reranker": reranker and reranker[1],
        }
        _write_outputs(out_dir, trainer, tokenizer, cfg, facts, template, log_rows, audit, reranker)
        if tracker is not None:
            _log_preference(mlflow_cfg, run_id, history, pref)
            _log_final(mlflow_cfg, run_id, tracker, facts)
    return facts


def _save(model: Any, tokenizer: Any, cfg: FinetuneConfig, dest: Path) -> None:
    """adapter/ for LoRA; model/ = merged (LoRA with merge) or the trained full model."""
    if cfg.method == "lora":
        model.save_pretrained(dest / "adapter")
        tokenizer.save_pretrained(dest / "adapter")
        if not cfg.merge:
            return
        model = model.merge_and_unload()
    model.save_pretrained(dest / "model", safe_serialization=True)
    tokenizer.save_pretrained(dest / "model")


def _champion(p: Params, scratch: Path) -> dict[str, Any] | None:
    """`finetune.init: champion`: the registry's champion, pulled into `scratch` (None: no champion
    yet, so this run starts from the base)."""
    if p.finetune.init != "champion":
        return None
    from tagtune.registry import champion_start

    start = champion_start(p.register.model_name, p.mlflow, scratch / "champion")
    if start is None:
        print("tagtune finetune: finetune.init: champion, but there is no champion yet: from the base",
              file=sys.stderr)  # fmt: skip
    return start


def run(p: Params, root: Path) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tagtune-champion-") as scratch:
        return _run(p, root, _champion(p, Path(scratch)))


def _run(p: Params, root: Path, start: dict[str, Any] | None) -> dict[str, Any]:
    paths = p.paths
    return finetune(
        root / paths.split,
        root / paths.finetune,
        p.finetune,
        p.model,
        root / paths.checkpoints,
        p.mlflow.for_runs(),
        p.retrieval,
        p.preference,
        root / paths.feedback / "feedback.jsonl",  # stages/feedback.py's FEEDBACK_FILE
        start,
    )


if __name__ == "__main__":
    from stages import main

    raise SystemExit(main("finetune"))
