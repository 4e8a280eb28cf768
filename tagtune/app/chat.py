"""The `Chatbot` behind `tagtune chat`, `tagtune show` and the UI: a fine-tuned model ready to answer.

    python -c "from tagtune.app.chat import Chatbot; print(Chatbot.from_dir('models/finetune').info)"

`from_dir` loads finetune's output, a pulled registry version or an HF model dir with template.json;
`from_uri` pulls `models:/<name>@<alias>` once into the local cache, then loads it. Prompts are rendered
with the template the model was trained on; generation is tagtune/generation.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tagtune.config import GenerationConfig, MlflowConfig
from tagtune.errors import TagtuneError
from tagtune.generation import Answer, generate_answers, stream_answer
from tagtune.io import read_json
from tagtune.models import cache_root, find_model_dir, load_saved, verify_model_dir
from tagtune.registry import INFO_FILE, pull, resolve_version
from tagtune.templates import render_prompt

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def model_label(info: dict[str, Any]) -> str:
    """`tagtune-town v3 (@champion)`, or the local directory for an unregistered model."""
    if info.get("version"):
        alias = f" (@{info['alias']})" if info.get("alias") else ""
        return f"{info.get('model_name') or 'model'} v{info['version']}{alias}"
    return f"local model {info.get('source', '?')}"


class Chatbot:
    """A fine-tuned causal LM ready to answer: `from_dir` (local) or `from_uri` (MLflow registry)."""

    def __init__(self, model: Any, tokenizer: Any, template: dict[str, Any], info: dict[str, Any]):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.info = info  # model_name, version, alias, run_id (where known), source
        if template.get("task", "causal_lm") != "causal_lm":
            raise TagtuneError(f"{info.get('source')}: a {template['task']} model cannot chat")

    @classmethod
    def from_dir(cls, path: str | Path) -> Chatbot:
        """Load from finetune's output dir, a pulled dir, or an HF model dir with template.json.

        Weights are checked against the hashes recorded when they were written (training.json or the
        pulled MLmodel) first: tampered or damaged bytes are an error, not a model.
        """
        verify_model_dir(path)
        model_dir, template_path = find_model_dir(path)
        info: dict[str, Any] = {"model_name": None, "version": None, "alias": None, "run_id": None}
        for f in (Path(path) / INFO_FILE, model_dir.parent.parent / INFO_FILE):
            if f.is_file():
                info.update(read_json(f))
                break
        else:
            training = Path(path) / "training.json"
            if training.is_file():
                info["run_id"] = read_json(training).get("mlflow_run_id")
        info["source"] = str(model_dir)
        model, tok = load_saved(model_dir)
        return cls(model, tok, read_json(template_path), info)

    @classmethod
    def from_uri(cls, model_uri: str, mlflow_cfg: MlflowConfig, cache_dir: str | None = None) -> Chatbot:
        """Pull `models:/<name>@<alias>` (or `/<version>`) once into the local cache, then load it."""
        info = resolve_version(model_uri, mlflow_cfg)
        # a version's artifacts never change; the run id guards against a re-created registry
        local = (
            cache_root(cache_dir)
            / "registry"
            / info["model_name"]
            / f"{info['version']}-{info['run_id'][:12]}"
        )
        if not (local / INFO_FILE).is_file():
            pull(info["model_uri"], local, mlflow_cfg, force=True)  # our own cache entry
        bot = cls.from_dir(local)
        bot.info.update(info)
        return bot

    def prompt(self, question: str) -> str:
        return render_prompt(question, self.template, self.tokenizer)

    @property
    def context(self) -> int | None:
        """How many positions the model reads (prompt + answer), if its config says."""
        config = self.model.config
        return next((v for k in CONTEXT_KEYS if isinstance(v := getattr(config, k, None), int)), None)

    def too_long(self, question: str, gen: GenerationConfig) -> str | None:
        """Why `question` cannot be answered whole (prompt + max_new_tokens past the context), else None."""
        n = len(self.tokenizer(self.prompt(question), add_special_tokens=False)["input_ids"])
        if self.context is not None and n + gen.max_new_tokens > self.context:
            return (
                f"question too long: {n} prompt tokens + {gen.max_new_tokens} new tokens is past the model's "
                f"context ({self.context} tokens)"
            )
        return None

    def answer(self, questions: list[str], gen: GenerationConfig, batch_size: int = 16) -> list[Answer]:
        """Answer a batch of questions (cut at the end marker; `stopped=False` = hit max_new_tokens)."""
        prompts = [self.prompt(q) for q in questions]
        end = self.template.get("end_marker")
        return generate_answers(self.model, self.tokenizer, prompts, gen, end, batch_size)

    def stream(self, question: str, gen: GenerationConfig) -> Iterator[str]:
        """Yield the answer as it is generated; stops at the end marker, which is never yielded."""
        end = self.template.get("end_marker")
        yield from stream_answer(self.model, self.tokenizer, self.prompt(question), gen, end)
