"""The `Chatbot` behind `tagtune chat`, `tagtune show` and the UI: a fine-tuned model ready to answer.

    python -c "from tagtune.app.chat import Chatbot; print(Chatbot.from_dir('models/finetune').info)"

`from_dir` loads finetune's output, a pulled registry version or an HF model dir with template.json;
`from_uri` pulls `models:/<name>@<alias>` once into the local cache, then loads it. Prompts are rendered
with the template the model was trained on; generation is tagtune/generation.py's. A grounded model
(trained with retrieved facts) answers from its fact index, abstains below its threshold, and names
the source of each answer (`Reply.sources`, `last_sources` after `stream`).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from tagtune.config import GenerationConfig, MlflowConfig
from tagtune.errors import TagtuneError
from tagtune.generation import Answer, generate_answers, stream_answer
from tagtune.grounding import NOT_ASKED, Reply, asks, finish, ground, reply
from tagtune.io import read_json
from tagtune.models import (
    answering,
    cache_root,
    find_model,
    keep_merged,
    load_found,
    verify_model_dir,
    version_config,
)
from tagtune.registry import INFO_FILE, pull, resolve_version
from tagtune.rerank import attach
from tagtune.rerank import keep_merged as keep_merged_reranker
from tagtune.retrieval import FACTS_FILE, FactIndex
from tagtune.templates import render_prompt

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def model_label(info: dict[str, Any]) -> str:
    """`tagtune-town v3 (@champion)`, or the local directory for an unregistered model."""
    if info.get("version"):
        alias = f" (@{info['alias']})" if info.get("alias") else ""
        return f"{info.get('model_name') or 'model'} v{info['version']}{alias}"
    return f"local model {info.get('source', '?')}"


def _grounding_of(root: Path) -> tuple[FactIndex | None, dict]:
    """(the fact index, {retrieval_k, abstain_threshold}) a pulled registry version ships, if any."""
    index_dir = root / "index"  # <pulled>/artifacts/index, beside the model
    if not (index_dir / FACTS_FILE).is_file():
        return None, {}
    return attach(FactIndex.load(index_dir), root), version_config(root.parent)


class Chatbot:
    """A fine-tuned causal LM ready to answer: `from_dir` (local) or `from_uri` (MLflow registry)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: dict[str, Any],
        info: dict[str, Any],
        index: FactIndex | None = None,
        grounding: dict[str, Any] | None = None,
    ):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.info = info  # model_name, version, alias, run_id (where known), source
        self.index, self.grounding = index, grounding or {}
        self.last_sources: list[str] = []  # of the last streamed answer
        if template.get("task", "causal_lm") != "causal_lm":
            raise TagtuneError(f"{info.get('source')}: a {template['task']} model cannot chat")

    @classmethod
    def from_dir(
        cls, path: str | Path, index: str | Path | None = None, threshold: float | None = None
    ) -> Chatbot:
        """Load from finetune's output dir, a pulled dir, or an HF model dir with template.json.

        A pulled grounded version brings its own index and threshold; for finetune's output of a
        grounded run pass the index stage's directory (and evaluate's `abstain.threshold`).
        """
        verify_model_dir(path)
        root, template_path = find_model(path)
        info: dict[str, Any] = {"model_name": None, "version": None, "alias": None, "run_id": None}
        for f in (Path(path) / INFO_FILE, root.parent / INFO_FILE):
            if f.is_file():
                info.update(read_json(f))
                break
        training: dict[str, Any] = {}
        if (Path(path) / "training.json").is_file():
            training = read_json(Path(path) / "training.json")
            info["run_id"] = info["run_id"] or training.get("mlflow_run_id")
        info["source"] = str(root)
        facts, grounding = _grounding_of(root)
        if facts is None and index is not None and training.get("grounded"):
            facts = attach(FactIndex.load(index), root)
            grounding = {"retrieval_k": training["grounded"]["k"], "abstain_threshold": threshold}
        model, tok = load_found(root)
        return cls(answering(model), tok, read_json(template_path), info, facts, grounding)

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
        keep_merged(local / "artifacts")  # once per version: later starts load it without peft
        keep_merged_reranker(local / "artifacts")  # and its reranker (a grounded version), likewise
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
        """Why `question` cannot be answered whole (prompt + max_new_tokens past the context), else None.

        A grounded prompt is measured with the index's `retrieval_k` longest facts in it, the longest it
        can be, known before retrieval (which facts come is known only after reranking, ~0.25 s).
        """
        context = self._longest_facts if self.index is not None else None
        prompt = render_prompt(question, self.template, self.tokenizer, context)
        n = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if self.context is not None and n + gen.max_new_tokens > self.context:
            return (
                f"question too long: {n} prompt tokens + {gen.max_new_tokens} new tokens is past the model's "
                f"context ({self.context} tokens)"
            )
        return None

    @cached_property
    def _longest_facts(self) -> list[str]:
        """The index's `retrieval_k` longest facts (by characters): the longest fact block a prompt gets."""
        return sorted((f.text for f in self.index.facts), key=len)[-self._k :]

    @property
    def _k(self) -> int:
        return int(self.grounding.get("retrieval_k", 4))

    def answer(self, questions: list[str], gen: GenerationConfig, batch_size: int = 16) -> list[Reply]:
        """Answer a batch of questions: `.text` (the answer or the refusal), `.sources`, `.answer`."""
        threshold = self.grounding.get("abstain_threshold")
        return reply(
            self.model,
            self.tokenizer,
            self.template,
            questions,
            gen,
            batch_size,
            self.index,
            self._k,
            threshold,
        )

    def stream(self, question: str, gen: GenerationConfig) -> Iterator[str]:
        """Yield the answer as it is generated; stops at the end marker, which is never yielded.

        Grounded with a reranker: its score decides before generating whether the question is
        answered (`grounding.asks`), so the answer streams and its source (`last_sources`) is set at
        the end. Grounded without one, the answer comes in one piece: its confidence is the generator's
        mean log-probability, known only once all of it is generated.
        """
        self.last_sources = []
        end = self.template.get("end_marker")
        if self.index is None:
            yield from stream_answer(self.model, self.tokenizer, self.prompt(question), gen, end)
            return
        threshold = self.grounding.get("abstain_threshold")
        (g,) = ground([question], self.index, self.template, self._k, self.tokenizer)
        if g.reranked and asks(g, threshold):
            text = ""
            for piece in stream_answer(self.model, self.tokenizer, g.prompt, gen, end):
                text += piece
                yield piece
            self.last_sources = finish(g, Answer(text.strip(), 0, True), threshold, self.template).sources
            return
        if g.reranked:  # refused before generating
            answer = NOT_ASKED
        else:
            (answer,) = generate_answers(self.model, self.tokenizer, [g.prompt], gen, end, 1)
        r = finish(g, answer, threshold, self.template)
        self.last_sources = r.sources
        yield r.text
