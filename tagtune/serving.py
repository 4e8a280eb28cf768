"""Using a fine-tuned model: the MLflow pyfunc model, `pull`, and the `Chatbot` behind chat and the UI.

    python -c "from tagtune.serving import Chatbot; print(Chatbot.from_dir('models/finetuned').info)"
    mlflow models serve -m models:/tagtune-town@champion --env-manager local -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": ["When does the museum open?"]}'

A registered version is a pyfunc model (`TagtuneModel`) whose artifacts are the complete HF model
directory (`artifacts/model/`: safetensors + tokenizer) and the data template facts
(`artifacts/meta.json`), with tagtune's own code inside (`code/`), so it loads offline:

    model = mlflow.pyfunc.load_model("models:/tagtune-town@champion")
    model.predict(["When does the museum open?"])                 # -> ["The museum opens at 9 am."]
    model.predict(pd.DataFrame({"question": [...]}))              # -> DataFrame with an `answer` column
    model.predict([...], params={"max_new_tokens": 32})           # per-call generation overrides

Generation defaults are stored in the model (`model_config`, from `evaluate.generation` at register
time); `params` override them per call. Prompts are rendered with `stages.format.render_prompt`, the
same renderer training used, and answers come from `tagtune.generation.generate_answers`.
"""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from tagtune.config import GenerationConfig, MlflowConfig
from tagtune.errors import TagtuneError
from tagtune.generation import Answer, generate_answers

MODEL_ARTIFACT = "model"  # pyfunc artifact key (and folder) of the HF model directory
META_ARTIFACT = "meta"  # pyfunc artifact key of meta.json
INFO_FILE = "tagtune.json"  # written by `pull`: name, version, alias, run id of the pulled model
GEN_KEYS = tuple(GenerationConfig.model_fields)


# -------------------------------------------------------------------------------- loading from disk
def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def find_model_dir(path: str | Path) -> tuple[Path, Path]:
    """(HF model dir, meta.json) for a finetune output dir, a pulled dir, or an HF model dir.

    Raises:
        TagtuneError: no model directory or no meta.json next to it.
    """
    path = Path(path)
    candidates = [path / "model", path / "artifacts" / "model", path]
    model_dir = next((p for p in candidates if (p / "config.json").is_file()), None)
    if model_dir is None:
        raise TagtuneError(
            f"{path}: no model directory (config.json) in {', '.join(str(p) for p in candidates)}; "
            "finetune with finetune.merge: true (LoRA) or pull a registered version"
        )
    for meta in (model_dir / "meta.json", model_dir.parent / "meta.json", path / "meta.json"):
        if meta.is_file():
            return model_dir, meta
    raise TagtuneError(f"{model_dir}: no meta.json beside it (the data template facts finetune writes)")


def load_finetuned(finetuned: str | Path, task: str = "causal_lm"):
    """(model, tokenizer) from finetune's output: `model/` if present, else base + `adapter/` merged.

    Raises:
        TagtuneError: neither `model/` nor `adapter/` is there.
    """
    from tagtune.io import read_json
    from tagtune.models import load_model, load_tokenizer

    finetuned = Path(finetuned)
    if (finetuned / "model" / "config.json").is_file():
        if task == "classification":
            return _load_classifier(finetuned / "model")
        return _load_causal_lm(finetuned / "model")
    adapter = finetuned / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise TagtuneError(f"{finetuned}: neither model/ nor adapter/ found (did finetune run?)")
    from peft import PeftModel

    facts = read_json(finetuned / "training.json")
    tok = load_tokenizer(str(adapter))
    labels = facts.get("labels") or None
    base = load_model(facts["base_model_dir"], task, num_labels=len(labels) if labels else None)
    if task == "classification":
        base.config.pad_token_id = tok.pad_token_id
        base.config.id2label = dict(enumerate(labels or []))
        base.config.label2id = {lab: i for i, lab in enumerate(labels or [])}
    if base.get_input_embeddings().weight.shape[0] != len(tok):
        base.resize_token_embeddings(len(tok))  # tag tokens added as special tokens
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return model.to(default_device()).eval(), tok


def export_model_dir(finetuned: str | Path, dest: str | Path) -> Path:
    """A complete HF model dir for `finetuned`: its `model/`, or the adapter merged into `dest`."""
    finetuned = Path(finetuned)
    if (finetuned / "model" / "config.json").is_file():
        return finetuned / "model"
    from tagtune.io import read_json

    model, tok = load_finetuned(finetuned, read_json(finetuned / "training.json").get("task", "causal_lm"))
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


def _load_classifier(model_dir: Path):
    """A saved sequence classifier (its labels come from config.json's id2label)."""
    from transformers import AutoModelForSequenceClassification

    from tagtune.models import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), trust_remote_code=False, use_safetensors=True, local_files_only=True
    )
    return model.to(default_device()).eval(), tok


def _load_causal_lm(model_dir: Path):
    from tagtune.models import load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), "causal_lm", local_files_only=True)
    return model.to(default_device()).eval(), tok


# -------------------------------------------------------------------------------------- pyfunc model
def _questions(model_input: Any) -> tuple[list[str], bool]:
    """(questions, answer with a DataFrame) from a list/array/Series/str/dict or a DataFrame."""
    if isinstance(model_input, pd.DataFrame):
        # MLflow turns a plain list into a one-column frame (column 0): answer that with a list
        if "question" in model_input.columns:
            return [str(q) for q in model_input["question"].tolist()], True
        return [str(q) for q in model_input.iloc[:, 0].tolist()], False
    if isinstance(model_input, str):
        return [model_input], False
    if isinstance(model_input, dict):
        model_input = model_input.get("question", model_input.get("inputs", []))
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    return [str(q[0] if isinstance(q, (list, tuple)) else q) for q in model_input], False


class TagtuneModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: questions in, answers out (labels for a classification model)."""

    def load_context(self, context) -> None:
        self.meta = json.loads(Path(context.artifacts[META_ARTIFACT]).read_text(encoding="utf-8"))
        self.config = dict(context.model_config or {})
        self.task = self.meta.get("task", "causal_lm")
        model_dir = Path(context.artifacts[MODEL_ARTIFACT])
        if self.task == "classification":
            self.model, self.tokenizer = _load_classifier(model_dir)
        else:
            self.model, self.tokenizer = _load_causal_lm(model_dir)

    def _generation(self, params: dict[str, Any] | None) -> GenerationConfig:
        stored = {k: v for k, v in self.config.items() if k in GEN_KEYS}
        override = {k: v for k, v in (params or {}).items() if k in GEN_KEYS and v is not None}
        return GenerationConfig.model_validate({**stored, **override})

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        """Answer each question; a DataFrame input gets a DataFrame with an `answer` column back.

        MLflow hands every input over as a DataFrame (a plain list becomes column 0); the DataFrame
        hint also tells MLflow not to infer a schema from type hints (the signature is explicit).
        """
        questions, as_frame = _questions(model_input)
        if self.task == "classification":
            answers = classify(self.model, self.tokenizer, questions, int(self.config.get("batch_size", 16)))
        else:
            from stages.format import render_prompt

            prompts = [render_prompt(q, self.meta, self.tokenizer) for q in questions]
            batch = int((params or {}).get("batch_size") or self.config.get("batch_size", 16))
            answers = [
                a.text
                for a in generate_answers(
                    self.model,
                    self.tokenizer,
                    prompts,
                    self._generation(params),
                    self.meta.get("end_marker"),
                    batch,
                )
            ]
        return pd.DataFrame({"answer": answers}) if as_frame else answers


def classify(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16) -> list[str]:
    """Predicted label names for `texts` (batched, right-padded)."""
    import torch

    tokenizer.padding_side = "right"
    id2label = model.config.id2label
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            logits = model(**enc.to(model.device)).logits
        out += [str(id2label[int(j)]) for j in logits.argmax(-1).tolist()]
    return out


_ENTRY = """# MLflow models-from-code entry point (no pickled Python object): tagtune's code is in code/.
import mlflow.models

from tagtune.serving import TagtuneModel

mlflow.models.set_model(TagtuneModel())
"""


def _code_snapshot(dest: Path) -> list[str]:
    """Copy the modules a loaded model imports (tagtune/, stages/format.py) into `dest`."""
    root = Path(__file__).resolve().parents[1]
    (dest / "tagtune").mkdir(parents=True)
    (dest / "stages").mkdir()
    for f in (root / "tagtune").glob("*.py"):
        shutil.copy2(f, dest / "tagtune" / f.name)
    for name in ("__init__.py", "format.py"):
        shutil.copy2(root / "stages" / name, dest / "stages" / name)
    return [str(dest / "tagtune"), str(dest / "stages")]


def _requirements() -> list[str]:
    """Pinned requirements of the serving environment (for `--env-manager virtualenv|uv`)."""
    import importlib.metadata as md

    out = []
    for dist in (
        "mlflow",
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "pydantic",
        "pyyaml",
        "pandas",
    ):
        try:
            out.append(f"{dist}=={md.version(dist)}")
        except md.PackageNotFoundError:
            out.append(dist)
    return out


def log_pyfunc_model(
    model_dir: Path,
    meta_path: Path,
    gen: GenerationConfig,
    batch_size: int = 16,
    tags: dict[str, str] | None = None,
):
    """Log `model_dir` + `meta_path` as a TagtuneModel to the active MLflow run; returns ModelInfo.

    Call inside `tagtune.tracking.active_run`. The signature declares the generation params, so
    `predict(..., params=...)` and the REST API (`{"inputs": [...], "params": {...}}`) accept them.
    """
    import tempfile

    from mlflow.models import infer_signature

    config = {**gen.model_dump(), "batch_size": batch_size}
    signature = infer_signature(["question"], ["answer"], params=gen.model_dump())
    with tempfile.TemporaryDirectory(prefix="tagtune-code-") as tmp, warnings.catch_warnings():
        # an input example would make MLflow load the model and generate once more at log time
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        entry = Path(tmp) / "tagtune_model.py"
        entry.write_text(_ENTRY, encoding="utf-8")
        model_dir, meta_path = Path(model_dir), Path(meta_path)
        if model_dir.is_symlink() or any(p.is_symlink() for p in model_dir.rglob("*")):
            # MLflow refuses artifacts that resolve outside their folder (e.g. DVC's symlink cache)
            model_dir = Path(shutil.copytree(model_dir, Path(tmp) / "model", symlinks=False))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(entry),
            artifacts={MODEL_ARTIFACT: str(model_dir), META_ARTIFACT: str(meta_path)},
            model_config=config,
            signature=signature,
            code_paths=_code_snapshot(Path(tmp)),
            pip_requirements=_requirements(),
            tags=tags,
        )


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


def resolve_version(model_uri: str, mlflow_cfg: MlflowConfig) -> dict[str, Any]:
    """{model_name, version, alias, run_id, model_uri} of a `models:/` URI (an alias resolved now).

    Raises:
        TagtuneError: the name/alias/version does not exist; TrackingError: MLflow unreachable.
    """
    from tagtune import tracking

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


def pull(model_uri: str, dest: Path, mlflow_cfg: MlflowConfig) -> Path:
    """Download a registered version to `dest` (an MLflow model dir); returns its HF model dir.

    `dest` is written atomically and is itself loadable (`mlflow.pyfunc.load_model(dest)`,
    `mlflow models serve -m dest`, `Chatbot.from_dir(dest)`); `dest/tagtune.json` says which version.
    """
    import mlflow.artifacts

    info = resolve_version(model_uri, mlflow_cfg)
    dest = Path(dest)
    from tagtune.io import atomic_path, write_json

    with atomic_path(dest) as tmp:
        # by version, not alias: the alias may move while we download
        mlflow.artifacts.download_artifacts(artifact_uri=info["model_uri"], dst_path=str(tmp))
        write_json(tmp / INFO_FILE, info)
    model_dir, _ = find_model_dir(dest)
    return model_dir


# ------------------------------------------------------------------------------------------ chatbot
def _held_back(buf: str, marker: str | None) -> int:
    """How many trailing chars of `buf` to hold: a possible start of `marker`, or trailing spaces."""
    hold = 0
    if marker:
        for k in range(min(len(marker) - 1, len(buf)), 0, -1):
            if buf.endswith(marker[:k]):
                hold = k
                break
    rest = buf[: len(buf) - hold]
    return hold + len(rest) - len(rest.rstrip())  # "answer <E": hold " <E", the space may end it


class Chatbot:
    """A fine-tuned causal LM ready to answer: `from_dir` (local) or `from_uri` (MLflow registry)."""

    def __init__(self, model: Any, tokenizer: Any, meta: dict[str, Any], info: dict[str, Any]):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self.info = info  # model_name, version, alias, run_id (where known), source
        if meta.get("task", "causal_lm") != "causal_lm":
            raise TagtuneError(f"{info.get('source')}: a {meta['task']} model cannot chat")

    @classmethod
    def from_dir(cls, path: str | Path) -> Chatbot:
        """Load from finetune's output dir, a pulled dir, or an HF model dir with meta.json beside it."""
        model_dir, meta_path = find_model_dir(path)
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        info: dict[str, Any] = {"model_name": None, "version": None, "alias": None, "run_id": None}
        for f in (Path(path) / INFO_FILE, model_dir.parent.parent / INFO_FILE):
            if f.is_file():
                info.update(json.loads(f.read_text(encoding="utf-8")))
                break
        else:
            training = Path(path) / "training.json"
            if training.is_file():
                info["run_id"] = json.loads(training.read_text(encoding="utf-8")).get("mlflow_run_id")
        info["source"] = str(model_dir)
        model, tok = _load_causal_lm(model_dir)
        return cls(model, tok, meta, info)

    @classmethod
    def from_uri(cls, model_uri: str, mlflow_cfg: MlflowConfig, cache_dir: str | None = None) -> Chatbot:
        """Pull `models:/<name>@<alias>` (or `/<version>`) once into the local cache, then load it."""
        from tagtune.models import cache_root

        info = resolve_version(model_uri, mlflow_cfg)
        # a version's artifacts never change; the run id guards against a re-created registry
        local = (
            cache_root(cache_dir)
            / "registry"
            / info["model_name"]
            / f"{info['version']}-{info['run_id'][:12]}"
        )
        if not (local / INFO_FILE).is_file():
            pull(info["model_uri"], local, mlflow_cfg)
        bot = cls.from_dir(local)
        bot.info.update(info)
        return bot

    def prompt(self, question: str) -> str:
        from stages.format import render_prompt

        return render_prompt(question, self.meta, self.tokenizer)

    def answer(self, questions: list[str], gen: GenerationConfig, batch_size: int = 16) -> list[Answer]:
        """Answer a batch of questions (cut at the end marker; `stopped=False` = hit max_new_tokens)."""
        prompts = [self.prompt(q) for q in questions]
        return generate_answers(
            self.model, self.tokenizer, prompts, gen, self.meta.get("end_marker"), batch_size
        )

    def stream(self, question: str, gen: GenerationConfig) -> Iterator[str]:
        """Yield the answer as it is generated; stops at the end marker, which is never yielded."""
        import torch
        from transformers import TextIteratorStreamer

        from tagtune.generation import generation_kwargs

        marker = self.meta.get("end_marker")
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(self.prompt(question), return_tensors="pt", add_special_tokens=False).to(self.model.device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        failed: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        **enc,
                        **generation_kwargs(gen),
                        streamer=streamer,
                        stop_strings=[marker] if marker else None,
                        tokenizer=tok if marker else None,
                        pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id,
                    )
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
                failed.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        buf, started, exhausted = "", False, False
        try:
            for piece in streamer:
                buf += piece
                if not started:
                    buf = buf.lstrip()
                if marker and (i := buf.find(marker)) != -1:
                    buf = buf[:i].rstrip()
                    break
                keep = _held_back(buf, marker)
                if len(buf) > keep:
                    started = True
                    yield buf[: len(buf) - keep]
                    buf = buf[len(buf) - keep :]
            else:
                exhausted, buf = True, buf.rstrip()
            if buf:
                yield buf
        finally:
            if not exhausted:  # stopped early (marker, or the caller closed us): let generate() finish
                for _ in streamer:
                    pass
            thread.join()
        if failed:
            raise failed[0]
