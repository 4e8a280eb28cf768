"""The pipeline's stages, and the one table that wires params.yaml to them.

    python -m stages.<name> [--params params.yaml] [-S key=value ...]   # what dvc.yaml runs
    python -m stages.register --check       # registry lost register.json's version? delete the file

Each stage module holds one pure, typed function (paths and config sections in, a result dict out)
and `run(params, root)`, the only place where params meet that function. `STAGES` lists those runs in
pipeline order; DVC (through `python -m stages.<name>`, i.e. `main` below), the Prefect flow
(flows/pipeline.py), bench/ and the tests all call a stage through it. Stages import the library
(tagtune/) only, never each other or anything above them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tagtune.config import Params, load_params
from tagtune.errors import TagtuneError, error_line
from tagtune.io import DISK_FULL, workspace_lock

StageRun = Callable[[Params, Path], dict[str, Any]]


def _entry(stage: str, function: str = "run") -> StageRun:
    """`stages.<stage>.<function>`, imported when first called.

    Importing every stage here would make `python -m stages.<name>` load <name> twice (runpy warns
    about it), and a stage's heavy imports would load with the table.
    """

    def call(params: Params, root: Path) -> dict[str, Any]:
        return getattr(importlib.import_module(f"stages.{stage}"), function)(params, root)

    call.__name__ = call.__qualname__ = f"{stage}.{function}"
    return call


STAGES: dict[str, StageRun] = {
    name: _entry(name)
    for name in ("feedback", "ingest", "format", "split", "index", "finetune", "evaluate", "register")
}
# Stages DVC runs on every repro (`always_changed` in dvc.yaml: they read what DVC cannot hash, the UI's
# feedback database); unchanged input gives the same bytes, so nothing after them runs.
ALWAYS_RUN: tuple[str, ...] = ("feedback",)
# What DVC cannot hash, checked before the stage (`--check`): a check that finds the stage's recorded
# output stale deletes it, so `dvc repro` and the flow run the stage again.
CHECKS: dict[str, StageRun] = {"register": _entry("register", "check")}


def _lock(root: Path):
    """The workspace lock (shared with the Prefect flow); under torchrun only local rank 0 takes it."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return contextlib.nullcontext()
    return workspace_lock(root)


def main(name: str, argv: list[str] | None = None) -> int:
    """`python -m stages.<name>`: read params.yaml (+ `-S` overrides), run the stage, print its result.

    The stage holds the workspace lock, so a concurrent `dvc repro` stage or `tagtune run` flow in
    the same workspace fails at once instead of writing the same outputs. A TagtuneError (bad params,
    bad data, MLflow unreachable, workspace busy) or a full disk prints one line and exits 1.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer threads fighting torch
    ap = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    if name in CHECKS:
        ap.add_argument("--check", action="store_true", help="only the pre-check of what DVC cannot see")
    args = ap.parse_args(argv)
    fn = CHECKS[name] if getattr(args, "check", False) else STAGES[name]
    try:
        params = load_params(args.params, args.set)
        with _lock(Path(".")):
            result = fn(params, Path("."))
    except TagtuneError as e:
        print(error_line(name, e), file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        print(
            error_line(name, TagtuneError(f"{e.filename or '.'}: no space left on device")), file=sys.stderr
        )
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0
