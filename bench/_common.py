"""Helpers the benchmarks share: the shipped data through the real data stages, machine facts, output."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
JSON_PREFIX = '{"bench": '  # how bench.run finds a benchmark's result line in its stdout


def quiet() -> None:
    """Offline, no tokenizer threads fighting torch for the 2 cores, no library chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")


def default_params(overrides: list[str] | None = None):
    """The repo's params.yaml (the default run), with optional `key=value` overrides."""
    from tagtune.config import load_params

    return load_params(REPO / "params.yaml", overrides)


def shipped_splits(root: Path, params=None) -> Path:
    """The shipped data through the real ingest → format → split stages into `root/{ingest,format,split}`.

    Returns the split stage's directory. Optional sources (the UI's feedback table) are left out so
    every run sees the same rows.
    """
    from stages import STAGES

    p = params or default_params()
    sources = p.ingest.model_copy(update={"sources": [s for s in p.ingest.sources if not s.optional]})
    paths = p.paths.model_copy(update={name: root / name for name in ("ingest", "format", "split")})
    p = p.model_copy(update={"ingest": sources, "paths": paths})
    for name in ("ingest", "format", "split"):
        STAGES[name](p, REPO)  # the shipped sources are relative to the repo; the outputs are absolute
    return root / "split"


def base_dir(spec: str) -> str:
    """`model.base` spec (`embedded`, a model dir) → a local model directory."""
    from tagtune.models import resolve_base

    return resolve_base(spec)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flag(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (False where there is no /proc)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in line.split() for line in text.splitlines() if line.startswith("flags"))


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (README prints it under the table)."""
    import torch
    import transformers

    from stages.finetune import cpu_has_bf16

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_has_bf16(),
        "cpu_amx": cpu_flag("amx_bf16"),  # bf16 matmuls run ~2x faster with AMX than with AVX512-BF16
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):  # load >> cores means the figures were taken under contention
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


def median(xs: list[float]) -> float:
    return statistics.median(xs)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send library prints (Trainer's log dicts) to stderr, so stdout is just the result and summary."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def emit(result: dict[str, Any], summary: str) -> None:
    """Print the benchmark's one JSON line (what bench.run collects), then a human summary."""
    line = json.dumps(result, default=str)
    assert line.startswith(JSON_PREFIX), "result dicts start with the 'bench' key"
    print(line, flush=True)
    print(summary, flush=True)


def measure(run: Callable[..., dict[str, Any]], summary: Callable[[dict[str, Any]], str], *args, **kw) -> int:
    """Every benchmark's `main` after parsing: quiet libraries, `run(*args, **kw)` with their prints on
    stderr, then the JSON line + summary on stdout; exit status 0."""
    quiet()
    with stdout_to_stderr():
        r = run(*args, **kw)
    emit(r, summary(r))
    return 0


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argparse parser whose description is the module docstring's first line."""
    first = (doc or "").strip().splitlines()[0] if doc else ""
    return argparse.ArgumentParser(description=first)


def log(msg: str) -> None:
    """Progress to stderr (stdout is the JSON line and the summary)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
