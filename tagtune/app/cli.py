"""`tagtune`: run the pipeline through Prefect, schedule it, and use what it registered.

    tagtune run [-S finetune.max_steps=50]       # the whole pipeline as a Prefect flow; prints the champion
    tagtune stage finetune                       # one stage, recorded in dvc.lock like `dvc repro -s`
    tagtune show                                 # the champion version and one sample answer
    tagtune deploy [--cron "0 3 * * *"]          # scheduled retraining (serves until Ctrl-C)
    tagtune deploy --pool train                  # ... on a process work pool: `prefect worker start --pool train`
    tagtune chat [-q "When does the museum open?"] [--version 3] [--temperature 0.7 --sample]
    tagtune pull --dest exported/ [--alias champion]
    tagtune export --format gguf --out town.gguf [--quant q8_0] [--model models/finetune | --version 3]
    tagtune ui [--port 7860]                     # Gradio chat page with 👍/👎 + corrections
    tagtune rollback [--to 2]                    # @champion back to the previous champion

Params come from params.yaml (`--params` for another file). Without PREFECT_API_URL, `run` uses
Prefect's ephemeral API (nothing to start); with it, runs show up on that server. Every error is one
line on stderr and a non-zero exit (TAGTUNE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from tagtune.config import GenerationConfig, Params, load_params, write_overrides
from tagtune.errors import TagtuneError, error_line, one_line
from tagtune.io import read_json

app = typer.Typer(
    name="tagtune",
    help="Fine-tune small causal LMs on your own data: DVC + Prefect + MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (default: params.yaml)")]
VersionOpt = Annotated[str | None, typer.Option("--version", help="registered version number")]
AliasOpt = Annotated[str | None, typer.Option("--alias", help="registry alias (default: champion)")]


def _offline_defaults() -> None:
    """No telemetry from the local Prefect server or Gradio (tagtune runs offline); time for the
    ephemeral Prefect API to start on a slow or busy machine."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's default 20 s ran out on a loaded 2-core machine (`tagtune run` failed with "Timed out
    # while attempting to connect to ephemeral Prefect API server"); a healthy start takes ~10 s there
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure: `tagtune <command>: error: <one line>` on stderr, exit 1 (130 on Ctrl-C)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _offline_defaults()
        name = fn.__name__.rstrip("_")
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            print(f"tagtune {name}: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the CLI's contract: one line, non-zero exit
            if os.environ.get("TAGTUNE_DEBUG"):
                raise
            print(error_line(name, e), file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


class _NoExpectedTracebacks(logging.Filter):
    """Drop Prefect's console traceback of a TagtuneError (the CLI prints it as one line instead),
    and the shutdown chatter that would otherwise come after that line: the ephemeral server's exit
    message, and the events worker's "still processing" notice on a loaded machine."""

    AFTER_EXIT = ("Stopping temporary server", "Still processing items")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TagtuneError):
            return False
        return not any(x in str(record.msg) for x in self.AFTER_EXIT)


def _prefect_console() -> None:
    """Prefect's console logging, minus tracebacks of expected errors (bad data, bad params)."""
    from prefect.logging.configuration import setup_logging

    setup_logging()
    loggers = [logging.getLogger()] + [
        logging.getLogger(name)
        for name in list(logging.Logger.manager.loggerDict)
        if name.startswith("prefect")
    ]  # prefect's own loggers have their own handlers (propagate: false)
    for handler in {h for lg in loggers for h in lg.handlers}:
        handler.addFilter(_NoExpectedTracebacks())


def _model_uri(p: Params, version: str | None, alias: str | None) -> str:
    if version and alias:
        raise TagtuneError("give --version or --alias, not both")
    name = p.register.model_name
    return f"models:/{name}/{version}" if version else f"models:/{name}@{alias or 'champion'}"


def _chatbot(p: Params, version: str | None, alias: str | None, model_dir: Path | None):
    from tagtune.app.chat import Chatbot

    if model_dir is not None:
        # a grounded finetune output answers from the workspace's index, abstaining as evaluate chose
        metrics = p.paths.evaluate / "metrics.json"
        threshold = read_json(metrics).get("abstain.threshold") if metrics.is_file() else None
        return Chatbot.from_dir(model_dir, p.paths.index, threshold)
    return Chatbot.from_uri(_model_uri(p, version, alias), p.mlflow, p.model.cache_dir)


# --------------------------------------------------------------------------------------- pipeline
def _print_summary(summary: dict[str, Any]) -> None:
    from flows.pipeline import headline

    for name, s in summary["stages"].items():
        state = "ran" if s["ran"] else "skipped"
        detail = headline(name, s.get("result")) if s["ran"] else s["reason"]
        print(f"  {name:<9} {state:<8} {detail}")
    print(summary["message"])
    registered = summary["stages"].get("register", {}).get("result") or {}
    if registered.get("reason"):
        print(f"register: v{registered.get('version')} is @{registered.get('alias')}: {registered['reason']}")
    if summary["dvc_status"]:
        print(f"warning: dvc status not clean: {summary['dvc_status']}", file=sys.stderr)


def _sample_question(p: Params) -> str | None:
    """The first test question (an unseen phrasing), else the first train question."""
    from tagtune.io import read_jsonl

    for split in ("test", "train"):
        path = p.paths.split / f"{split}.jsonl"
        if path.is_file():
            for row in read_jsonl(path):
                if row.get("question"):
                    return row["question"]
    return None


def _version_metrics(p: Params, version: str) -> str:
    """`tuned.answer_f1=0.61 (base 0.12), ...` from the version's `metric.*` tags (register writes them)."""
    from tagtune.registry import version_metrics

    metrics = version_metrics(p.register.model_name, version, p.mlflow)
    shown = []
    for name in dict.fromkeys((p.register.metric, "perplexity", "refusal_rate")):
        tuned, base = metrics.get(f"tuned.{name}"), metrics.get(f"base.{name}")
        if tuned is not None:
            shown.append(f"tuned.{name}={tuned}" + (f" (base {base})" if base is not None else ""))
    return ", ".join(shown)


def _print_champion(p: Params) -> None:
    """`champion: <name> vN` and one answer from it, straight from the registry."""
    from tagtune.app.chat import Chatbot
    from tagtune.tracking import TrackingError

    uri = f"models:/{p.register.model_name}@champion"
    try:
        bot = Chatbot.from_uri(uri, p.mlflow, p.model.cache_dir)
    except TrackingError:
        raise
    except TagtuneError as e:  # no @champion (yet): every version so far lost the gate
        print(f"champion: none yet ({one_line(e)})")
        return
    print(f"champion: {p.register.model_name} v{bot.info['version']} ({uri})")
    if metrics := _version_metrics(p, bot.info["version"]):
        print(f"metrics:  {metrics}")
    question = _sample_question(p)
    if question:
        answer = bot.answer([question], p.evaluate.generation)[0]
        print(f"sample:   Q: {question}\n          A: {answer.text}")
        if answer.sources:
            print(f"          source: {', '.join(answer.sources)}")


@app.command()
@_errors
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-S",
            metavar="KEY=VALUE",
            help="override a param (written to params.yaml, like `dvc exp run -S`)",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="run every stage (dvc repro -f)")] = False,
    stage: Annotated[
        list[str] | None,
        typer.Option("--stage", "-s", metavar="NAME", help="run only this stage (repeatable)"),
    ] = None,
    sample: Annotated[bool, typer.Option(help="print the champion's answer to a test question")] = True,
) -> None:
    """Run the pipeline as a Prefect flow (skips what DVC says is up to date)."""
    from flows.pipeline import pipeline
    from stages import STAGES

    # bad params or overrides: one line, before Prefect starts; overrides land in params.yaml
    # (like `dvc exp run -S`), so the flow reads them from there
    if changed := write_overrides(params, set_ or []):
        print(f"params.yaml updated (like `dvc exp run -S`): {', '.join(changed)}")
    p = load_params(params)
    if bad := [s for s in stage or [] if s not in STAGES]:
        raise TagtuneError(f"--stage {', '.join(bad)}: no such stage (stages: {', '.join(STAGES)})")
    _prefect_console()
    summary = pipeline(params_path=str(params), repo_dir=os.getcwd(), force=force, only=stage or None)
    _print_summary(summary)
    if sample and "register" in summary["stages"]:
        _print_champion(p)


@app.command()
@_errors
def stage(
    name: Annotated[str, typer.Argument(help="a stage of the pipeline: ingest, format, ... register")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run one stage now (even if up to date) and record it in dvc.lock."""
    from flows.pipeline import pipeline
    from stages import STAGES

    load_params(params)
    if name not in STAGES:
        raise TagtuneError(f"{name}: no such stage (stages: {', '.join(STAGES)})")
    _prefect_console()
    _print_summary(pipeline(params_path=str(params), repo_dir=os.getcwd(), force=True, only=[name]))


@app.command()
@_errors
def show(params: ParamsOpt = Path("params.yaml")) -> None:
    """Print the registry's champion and its answer to one test question."""
    _print_champion(load_params(params))


@app.command()
@_errors
def deploy(
    params: ParamsOpt = Path("params.yaml"),
    cron: Annotated[str | None, typer.Option(help="override schedule.cron")] = None,
    name: Annotated[str, typer.Option(help="deployment name")] = "retrain",
    pool: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="register on this Prefect process work pool (created if missing) for "
            "`prefect worker start --pool NAME`, and return instead of serving (needs PREFECT_API_URL)",
        ),
    ] = None,
) -> None:
    """Serve scheduled retraining (schedule.cron, one run at a time) until Ctrl-C, or with --pool
    register it on a work pool whose workers run it."""
    from flows.retrain import deploy_retrain, serve_retrain

    p = load_params(params)
    if pool is None:
        serve_retrain(params, p, name, cron)
        return
    full_name = deploy_retrain(params, p, pool, name, cron)
    print(f"deployed {full_name} to work pool {pool!r} (cron {cron or p.schedule.cron!r}, one run at a time)")
    print("start workers where this workspace is (same path, same PREFECT_API_URL):")
    print(f"  prefect worker start --pool {pool}")


# ------------------------------------------------------------------------------------ consumption
@app.command()
@_errors
def chat(
    question: Annotated[
        list[str] | None,
        typer.Option("--question", "-q", metavar="TEXT", help="ask this and exit (repeatable)"),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    version: VersionOpt = None,
    alias: AliasOpt = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="a local model (finetune output or pulled dir) instead")
    ] = None,
    sample: Annotated[bool | None, typer.Option("--sample/--greedy", help="sampling or greedy")] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    repetition_penalty: Annotated[float | None, typer.Option()] = None,
    max_new_tokens: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Ask the registered model (default models:/<register.model_name>@champion); answers stream."""
    p = load_params(params)
    given = {
        "do_sample": sample,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "max_new_tokens": max_new_tokens,
    }
    try:
        gen = GenerationConfig.model_validate(
            {**p.evaluate.generation.model_dump(), **{k: v for k, v in given.items() if v is not None}}
        )
    except ValueError as e:
        raise TagtuneError(f"generation flags: {one_line(e)}") from None
    bot = _chatbot(p, version, alias, model_dir)
    from tagtune.app.chat import model_label

    print(f"tagtune chat: {model_label(bot.info)}", file=sys.stderr)
    questions = question or None
    interactive = questions is None and sys.stdin.isatty()
    if interactive:
        print("Ask a question (empty line or Ctrl-D to quit).", file=sys.stderr)

    show_question = len(questions or []) > 1 or (questions is None and not interactive)  # piped stdin

    def ask(q: str) -> None:
        if problem := bot.too_long(q, gen):
            raise TagtuneError(problem)
        if show_question:
            print(f"Q: {q}")
        for piece in bot.stream(q, gen):
            print(piece, end="", flush=True)
        print()
        if bot.last_sources:
            print(f"  source: {', '.join(bot.last_sources)}")

    if questions is not None:
        for q in questions:
            ask(q)
        return
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            if interactive:
                break
            continue
        ask(line.strip())


@app.command()
@_errors
def pull(
    dest: Annotated[
        Path, typer.Option(help="directory to write (replaced atomically if empty or a previous pull)")
    ],
    params: ParamsOpt = Path("params.yaml"),
    version: VersionOpt = None,
    alias: AliasOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace --dest even if it holds other files (never . or ~)")
    ] = False,
) -> None:
    """Write a registered version to a local directory (an MLflow model dir: `mlflow models serve -m`,
    `tagtune chat --model-dir`; `tagtune export` turns it into a merged HF model, GGUF or Ollama)."""
    from tagtune.registry import pull as pull_model

    p = load_params(params)
    uri = _model_uri(p, version, alias)
    model_dir = pull_model(uri, dest, p.mlflow, force)
    print(f"pulled {uri} to {dest} (model files: {model_dir})")


@app.command()
@_errors
def export(
    format_: Annotated[str, typer.Option("--format", metavar="merged|gguf|ollama", help="what to write")],
    out: Annotated[Path, typer.Option(help="a .gguf file (gguf) or a directory (merged, ollama)")],
    quant: Annotated[
        str | None, typer.Option(metavar="f16|q8_0|f32", help="GGUF weights (default f16; q8_0 about half)")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="a local model (finetune output, pulled dir) instead of the registry")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    version: VersionOpt = None,
    alias: AliasOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace --out even if it holds other files (never . or ~)")
    ] = False,
) -> None:
    """Export a model for llama.cpp/LM Studio (gguf), Ollama (ollama) or transformers (merged)."""
    import tempfile

    from tagtune.export import check_request, is_grounded, model_source
    from tagtune.export import export as export_model

    check_request(format_, out, quant, force)  # before anything is pulled or loaded
    if model is not None and (version or alias):
        raise TagtuneError("give --model or --version/--alias, not both")
    p = load_params(params)
    with tempfile.TemporaryDirectory(prefix="tagtune-export-") as work:
        source, label = model, str(model)
        if source is None:
            from tagtune.registry import pull as pull_model

            label = _model_uri(p, version, alias)
            source = Path(work) / "pulled"
            pull_model(label, source, p.mlflow)
        model_dir, template = model_source(source, Path(work))
        written = export_model(format_, model_dir, template, out, quant, p.evaluate.generation, force)
        grounded = is_grounded(source)
    size = sum(f.stat().st_size for f in [written, *written.rglob("*")] if f.is_file()) / 1e6  # MB
    kind = format_ if format_ == "merged" else f"{format_} {quant or 'f16'}"
    print(f"exported {label} to {written} ({kind}, {size:.1f} MB)")
    if format_ == "ollama":
        print(f"next: cd {written} && ollama create NAME -f Modelfile && ollama run NAME")
    if grounded:
        print(
            "warning: this model was trained to answer from retrieved facts; the export answers without "
            "them (retrieval and abstention run only in tagtune chat/ui and the registered model)",
            file=sys.stderr,
        )


@app.command()
@_errors
def ui(
    params: ParamsOpt = Path("params.yaml"),
    version: VersionOpt = None,
    alias: AliasOpt = None,
    model_dir: Annotated[Path | None, typer.Option(help="a local model instead of the registry")] = None,
    host: Annotated[str | None, typer.Option(help="default: ui.host (127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="default: ui.port")] = None,
) -> None:
    """Serve the Gradio chat page with feedback (Ctrl-C to stop)."""
    from tagtune.app.ui import serve

    p = load_params(params)
    serve(p, _chatbot(p, version, alias, model_dir), host, port)


@app.command()
@_errors
def rollback(
    to: Annotated[str | None, typer.Option("--to", help="version to make champion")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Point @champion back at the previous champion (or at --to VERSION)."""
    from tagtune.registry import rollback as rollback_model

    p = load_params(params)
    r = rollback_model(p.register.model_name, p.mlflow, to)
    print(f"{r['model_name']}@champion: v{r['from_version']} -> v{r['to_version']}")


if __name__ == "__main__":
    app(prog_name="tagtune")
