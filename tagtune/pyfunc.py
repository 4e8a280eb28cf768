"""The MLflow pyfunc model a registered version is: questions in, answers (or labels) out.

    mlflow models serve -m models:/tagtune-town@champion --env-manager local -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": ["When does the museum open?"]}'

A registered version is a `TagtuneModel` whose artifacts are, for LoRA, the adapter
(`artifacts/adapter/`) and `artifacts/base.json`, the content-hashed reference to the base model it is
rebuilt on at load time (tagtune/models.py: base_reference); for full/freeze fine-tuning the complete
model in bf16 (`artifacts/model/`); then the template facts (`artifacts/template.json`) and, for a
model trained grounded, the fact index it answers from (`artifacts/index/`), with
tagtune's library code inside (`code/tagtune/`, never the stages or the app), so it loads offline:

    model = mlflow.pyfunc.load_model("models:/tagtune-town@champion")
    model.predict(["When does the museum open?"])                 # -> ["The museum opens at 9 am."]
    model.predict(pd.DataFrame({"question": [...]}))              # -> DataFrame with an `answer` column
    model.predict([...], params={"max_new_tokens": 32})           # per-call generation overrides

Generation defaults are stored in the model (`model_config`, from `evaluate.generation` at register
time); `params` override them per call. Prompts are rendered with `tagtune.templates.render_prompt`,
the same renderer training used, and answers come from `tagtune.generation.generate_answers`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from tagtune.config import GenerationConfig
from tagtune.generation import classify
from tagtune.grounding import reply
from tagtune.models import (
    ADAPTER,
    BASE_FILE,
    RERANKER_DIR,
    WEIGHTS_KEY,
    answering,
    load_found,
    verify_version_weights,
    weights_sha256,
)
from tagtune.rerank import attach
from tagtune.retrieval import FactIndex

MODEL_ARTIFACT = "model"  # pyfunc artifact key (and folder) of a full version's HF model directory
ADAPTER_ARTIFACT = ADAPTER  # ... of a LoRA version's adapter (beside it: BASE_ARTIFACT, its base model)
BASE_ARTIFACT = "base"  # pyfunc artifact key of base.json
TEMPLATE_ARTIFACT = "template"  # pyfunc artifact key of template.json
INDEX_ARTIFACT = "index"  # pyfunc artifact key (and folder) of the fact index of a grounded model
GEN_KEYS = tuple(GenerationConfig.model_fields)


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
        self.template = json.loads(Path(context.artifacts[TEMPLATE_ARTIFACT]).read_text(encoding="utf-8"))
        self.config = dict(context.model_config or {})
        self.task = self.template.get("task", "causal_lm")
        # every artifact lies in the version's artifacts/ dir: model/, or adapter/ + base.json
        root = Path(context.artifacts[TEMPLATE_ARTIFACT]).parent
        if expected := self.config.get(WEIGHTS_KEY):  # registered with its weight hashes: serve only those
            verify_version_weights(root, expected, f"the registered model's config ({WEIGHTS_KEY})")
        self.model, self.tokenizer = load_found(root, self.task)
        answering(self.model)
        index = context.artifacts.get(INDEX_ARTIFACT)
        self.index = attach(FactIndex.load(index), root) if index else None

    def _generation(self, params: dict[str, Any] | None) -> GenerationConfig:
        stored = {k: v for k, v in self.config.items() if k in GEN_KEYS}
        override = {k: v for k, v in (params or {}).items() if k in GEN_KEYS and v is not None}
        return GenerationConfig.model_validate({**stored, **override})

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        """Answer each question; a DataFrame input gets a DataFrame with an `answer` column back
        (and `sources`, the `file:line` of the fact each answer came from, for a grounded model).

        MLflow hands every input over as a DataFrame (a plain list becomes column 0); the DataFrame
        hint also tells MLflow not to infer a schema from type hints (the signature is explicit).
        """
        questions, as_frame = _questions(model_input)
        if self.task == "classification":
            answers = classify(self.model, self.tokenizer, questions, int(self.config.get("batch_size", 16)))
            return pd.DataFrame({"answer": answers}) if as_frame else answers
        batch = int((params or {}).get("batch_size") or self.config.get("batch_size", 16))
        replies = reply(
            self.model,
            self.tokenizer,
            self.template,
            questions,
            self._generation(params),
            batch,
            self.index,
            int(self.config.get("retrieval_k", 4)),
            self.config.get("abstain_threshold"),
        )
        answers = [r.text for r in replies]
        if not as_frame:
            return answers
        if self.index is None:
            return pd.DataFrame({"answer": answers})
        return pd.DataFrame({"answer": answers, "sources": [r.sources for r in replies]})


_ENTRY = """# MLflow models-from-code entry point (no pickled Python object): tagtune's code is in code/.
import mlflow.models

from tagtune.pyfunc import TagtuneModel

mlflow.models.set_model(TagtuneModel())
"""


def _code_snapshot(dest: Path) -> list[str]:
    """Copy the library (tagtune/*.py — not the app layer, which a served model never imports) into `dest`."""
    package = Path(__file__).resolve().parent
    (dest / "tagtune").mkdir(parents=True)
    for f in package.glob("*.py"):
        shutil.copy2(f, dest / "tagtune" / f.name)
    return [str(dest / "tagtune")]


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
    staged: Path,
    template_path: Path,
    gen: GenerationConfig,
    batch_size: int = 16,
    tags: dict[str, str] | None = None,
    index_dir: Path | None = None,
    grounding: dict[str, Any] | None = None,
):
    """Log the model staged by `tagtune.models.version_artifacts` + `template_path` as a TagtuneModel
    to the active MLflow run; returns ModelInfo.

    Call inside `tagtune.tracking.active_run`. A grounded model also ships `index_dir` (its facts) and
    `grounding` ({retrieval_k, abstain_threshold}) in its model_config. The signature declares the generation params, so
    `predict(..., params=...)` and the REST API (`{"inputs": [...], "params": {...}}`) accept them.
    """
    import tempfile

    from mlflow.models import infer_signature

    staged = Path(staged)
    # the weight hashes travel in the model's config: load_context serves only these bytes
    config = {
        **gen.model_dump(),
        "batch_size": batch_size,
        WEIGHTS_KEY: weights_sha256(staged, (MODEL_ARTIFACT, ADAPTER_ARTIFACT, RERANKER_DIR)),
        **(grounding or {}),
    }
    if (staged / ADAPTER_ARTIFACT).is_dir():
        model_files = {
            ADAPTER_ARTIFACT: str(staged / ADAPTER_ARTIFACT),
            BASE_ARTIFACT: str(staged / BASE_FILE),
        }
    else:
        model_files = {MODEL_ARTIFACT: str(staged / MODEL_ARTIFACT)}
    if (staged / RERANKER_DIR).is_dir():  # a grounded model's reranker (attached to its index on load)
        model_files[RERANKER_DIR] = str(staged / RERANKER_DIR)
    signature = infer_signature(["question"], ["answer"], params=gen.model_dump())
    with tempfile.TemporaryDirectory(prefix="tagtune-code-") as tmp, warnings.catch_warnings():
        # an input example would make MLflow load the model and generate once more at log time
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        entry = Path(tmp) / "tagtune_model.py"
        entry.write_text(_ENTRY, encoding="utf-8")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(entry),
            artifacts={
                **model_files,
                TEMPLATE_ARTIFACT: str(template_path),
                **({INDEX_ARTIFACT: str(index_dir)} if index_dir is not None else {}),
            },
            model_config=config,
            signature=signature,
            code_paths=_code_snapshot(Path(tmp)),
            pip_requirements=_requirements(),
            tags=tags,
        )
