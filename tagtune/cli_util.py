"""The thin `main()` every stage shares: read params.yaml, call the stage function, report errors."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from tagtune.config import Params, load_params
from tagtune.errors import TagtuneError


def run_stage(name: str, fn: Callable[[Params], Any], argv: list[str] | None = None) -> int:
    """Parse `--params/-S key=value`, run `fn(params)`, print its result as JSON.

    A TagtuneError (bad params, bad data) prints one clear line and exits 1, no traceback.
    """
    ap = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. -S finetune.max_steps=50",
    )
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params, args.set)
        result = fn(params)
    except TagtuneError as e:
        print(f"tagtune {name}: error: {e}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0
