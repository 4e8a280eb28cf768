"""Orchestration overhead: the Prefect flow with MLflow logging vs the six stage functions called directly.

    python -m bench.orchestration [--steps 3] [--examples 4] [--repeats 2] [--base embedded]

Each trial gets a fresh git + DVC workspace holding the real dvc.yaml, params.yaml (a short run:
`finetune.max_steps`, `evaluate.max_examples`, `max_new_tokens` — the work both arms share is kept
small so the difference is not lost in this machine's drift), the shipped data and the stage code
DVC hashes. The arms alternate flow/direct/flow/direct, each a child process timed start to exit:

- flow: `tagtune run` — Prefect's ephemeral API (its database warmed up once, before
  the trials, as on any machine that ran Prefect before), DVC status before and commit after each
  stage, MLflow logging from finetune and evaluate, the registry check, then register;
- direct: ingest → format → split → finetune → evaluate → register called in order through
  `stages.STAGES`, with `mlflow.log_runs=false` (register's job *is* the MLflow registry, so it
  talks to the same kind of SQLite store in both arms).

overhead = median(flow) − median(direct), a fixed cost per run (server start, DVC hashing, a few
MLflow calls; step metrics go out in batches); the Prefect server's start is read off the flow's
log. The default run (params.yaml's `finetune.max_steps`) is estimated as the direct run plus the missing
steps at the measured steady-state step time (tokens per step ÷ the stage's loss.csv tokens/s);
evaluation on the full test split is *not* added, so the default run is underestimated and the
reported share is an upper bound.

Then a no-op `dvc repro` in the last flow workspace (everything is up to date): seconds (median of 3)
and how many stages it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import REPO, default_params, log, measure, median, parser, quiet
from stages import ALWAYS_RUN

TARGET_SHARE = 0.05
TARGET_NOOP_S = 2.0
_RESULT = "BENCH_DIRECT_RESULT "


def make_workspace(root: Path, overrides: list[str]) -> Path:
    """A git + DVC repo at `root`: dvc.yaml, params.yaml (+ overrides), data/raw, stages/, tagtune/."""
    from tagtune.config import write_overrides

    root.mkdir(parents=True)
    for d in ("stages", "tagtune", "data/raw"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / f, root / f)
    write_overrides(root / "params.yaml", [*overrides, f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}"])
    git = ["git", "-c", "user.email=bench@example.com", "-c", "user.name=bench"]
    for cmd in (
        ["git", "init", "-q"],
        [_dvc(), "init", "-q"],
        ["git", "add", "-A"],
        [*git, "commit", "-qm", "ws"],
    ):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True, env=_env(root))
    return root


def _dvc() -> str:
    return str(Path(sys.executable).parent / "dvc")


def _env(root: Path, prefect_home: Path | None = None) -> dict[str, str]:
    """Child environment: this checkout importable, MLflow store = params.yaml's, ephemeral Prefect."""
    e = dict(os.environ)
    e.update(
        PYTHONPATH=os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")]),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    if prefect_home is not None:
        e["PREFECT_HOME"] = str(prefect_home)
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("PREFECT_API_URL", None)
    return e


def direct_pipeline(ws: Path) -> dict[str, Any]:
    """The six stages called in order through `stages.STAGES`, no Prefect, no DVC; seconds per stage."""
    from stages import STAGES
    from tagtune.config import load_params

    os.chdir(ws)
    p = load_params("params.yaml", ["mlflow.log_runs=false"])  # register still uses the registry
    seconds = {}
    for name, run in STAGES.items():
        t = time.perf_counter()
        run(p, Path("."))
        seconds[name] = round(time.perf_counter() - t, 2)
    return seconds


def _clock(line: str) -> float | None:
    """Seconds since midnight of a Prefect log line (`HH:MM:SS.mmm | LEVEL | ...`)."""
    m = re.match(r"(\d\d):(\d\d):(\d\d\.\d+) \|", line)
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None


def prefect_server_start_s(log_text: str) -> float | None:
    """From "Starting temporary server" to "Beginning flow run" in a flow's log: the ephemeral API's start."""
    start = begin = None
    for line in log_text.splitlines():
        if start is None and "Starting temporary server" in line:
            start = _clock(line)
        elif start is not None and "Beginning flow run" in line:
            begin = _clock(line)
            break
    if start is None or begin is None:
        return None
    return round((begin - start) % 86400, 2)


def _timed(cmd: list[str], ws: Path, env: dict[str, str]) -> tuple[float, str]:
    """Run `cmd` in `ws`; (wall seconds from start to exit, its output). Raises with the output's tail on failure."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return wall, proc.stdout + proc.stderr


def _warm_prefect(root: Path, prefect_home: Path) -> None:
    """Create Prefect's local database once (a machine that ran Prefect before has it)."""
    code = "from prefect import flow\n@flow\ndef warmup():\n    return 1\nwarmup()\n"
    subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=_env(root, prefect_home), capture_output=True, check=True
    )


def _steady_step_s(ws: Path) -> float:
    """Seconds per optimizer step at the stage's steady-state rate (tokens per step ÷ loss.csv tokens/s)."""
    from bench.mfu import steady_tokens_per_s
    from tagtune.io import read_json

    facts = read_json(ws / "models" / "finetune" / "training.json")
    return (
        facts["tokens_seen"] / facts["steps"] / steady_tokens_per_s(ws / "models" / "finetune" / "loss.csv")
    )


def noop_repro(ws: Path, repeats: int = 3) -> dict[str, Any]:
    """Time `dvc repro` in an up-to-date workspace; stages it ran (should be none)."""
    walls, ran = [], []
    for _ in range(repeats):
        wall, out = _timed([_dvc(), "repro"], ws, _env(ws))
        walls.append(wall)
        # the feedback snapshot runs on every repro by design (stages.ALWAYS_RUN: DVC cannot hash the
        # UI's database); what counts is that nothing else does
        names = re.findall(r"^Running stage '(\w+)'", out, flags=re.MULTILINE)
        ran.append(len([s for s in names if s not in ALWAYS_RUN]))
    return {
        "noop_repro_s": round(median(walls), 2),
        "noop_repro_runs_s": [round(w, 2) for w in walls],
        "stages_run": max(ran),
    }


def run(
    base: str = "embedded",
    steps: int = 3,
    examples: int = 4,
    repeats: int = 2,
    max_new_tokens: int = 16,
    extra: list[str] | None = None,
    warm_prefect: bool = True,
    noop_repeats: int = 3,
) -> dict[str, Any]:
    """Alternate flow / direct `repeats` times in fresh workspaces; returns the JSON result."""
    # logging_steps=1: loss.csv then has a steady-state tokens/s for the default-run estimate
    overrides = [
        f"model.base={base}",
        f"finetune.max_steps={steps}",
        "finetune.logging_steps=1",
        f"evaluate.max_examples={examples}",
        f"evaluate.generation.max_new_tokens={max_new_tokens}",
        *(extra or []),
    ]
    flow_s, direct_s, step_s, stage_s, server_s = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="tagtune-bench-") as tmp:
        root = Path(tmp)
        prefect_home = root / "prefect"
        if warm_prefect:
            log("orchestration: warming up Prefect's database")
            _warm_prefect(root, prefect_home)
        for i in range(repeats):
            ws = make_workspace(root / f"flow-{i}", overrides)
            log(f"orchestration {i + 1}/{repeats}: Prefect flow + MLflow")
            cmd = [sys.executable, "-m", "tagtune.app.cli", "run", "--no-sample"]
            wall, out = _timed(cmd, ws, _env(ws, prefect_home))
            flow_s.append(wall)
            server_s.append(prefect_server_start_s(out))
            flow_ws = ws
            ws = make_workspace(root / f"direct-{i}", overrides)
            log(f"orchestration {i + 1}/{repeats}: stage functions called directly")
            cmd = [sys.executable, "-m", "bench.orchestration", "--direct", str(ws)]
            wall, out = _timed(cmd, ws, _env(ws))
            direct_s.append(wall)
            stage_s.append(json.loads(out.split(_RESULT, 1)[1].splitlines()[0]))
            step_s.append(_steady_step_s(ws))
        log("orchestration: no-op dvc repro")
        noop = noop_repro(flow_ws, noop_repeats)
    params = default_params()
    default_steps = params.finetune.max_steps
    overhead = median(flow_s) - median(direct_s)
    default_direct = median(direct_s) + max(default_steps - steps, 0) * median(step_s)
    share_default = overhead / (default_direct + overhead)
    return {
        "bench": "orchestration",
        "base": base,
        "steps": steps,
        "examples": examples,
        "repeats": repeats,
        "flow_s": round(median(flow_s), 2),
        "direct_s": round(median(direct_s), 2),
        "flow_runs_s": [round(x, 2) for x in flow_s],
        "direct_runs_s": [round(x, 2) for x in direct_s],
        "direct_stage_s": stage_s[len(stage_s) // 2],
        "overhead_s": round(overhead, 2),
        # the largest fixed part: Prefect's ephemeral API server coming up (from the flow's log)
        "prefect_server_start_s": median(known)
        if (known := [x for x in server_s if x is not None])
        else None,
        "overhead_share_measured": round(overhead / median(flow_s), 4),
        "steady_step_s": round(median(step_s), 3),
        "default_steps": default_steps,
        "default_direct_s_estimate": round(default_direct, 1),
        "overhead_share_default": round(share_default, 4),
        "target_share": TARGET_SHARE,
        **noop,
        "target_noop_s": TARGET_NOOP_S,
        "met_share": share_default <= TARGET_SHARE,
        "met_noop": noop["noop_repro_s"] <= TARGET_NOOP_S and noop["stages_run"] == 0,
        "met": share_default <= TARGET_SHARE
        and noop["noop_repro_s"] <= TARGET_NOOP_S
        and noop["stages_run"] == 0,
    }


def summary(r: dict[str, Any]) -> str:
    return (
        f"orchestration: flow {r['flow_s']:.1f} s vs direct {r['direct_s']:.1f} s for a {r['steps']}-step run "
        f"= {r['overhead_s']:.1f} s overhead ({r['overhead_share_measured']:.0%} of this short run); "
        f"default {r['default_steps']}-step run >= {r['default_direct_s_estimate']:.0f} s, so overhead "
        f"<= {r['overhead_share_default']:.1%} (target <= {r['target_share']:.0%}: "
        f"{'met' if r['met_share'] else 'MISSED'}). No-op dvc repro: {r['noop_repro_s']:.2f} s, "
        f"{r['stages_run']} stages run (target <= {r['target_noop_s']:.0f} s, 0: "
        f"{'met' if r['met_noop'] else 'MISSED'})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=3, help="finetune.max_steps of the short run")
    ap.add_argument("--examples", type=int, default=4, help="evaluate.max_examples of the short run")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="evaluate.generation.max_new_tokens")
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating")
    ap.add_argument("--base", default="embedded", help="model.base spec (default: embedded)")
    ap.add_argument("--direct", metavar="WORKSPACE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quiet()
    if args.direct:  # the direct arm's child process
        print(_RESULT + json.dumps(direct_pipeline(Path(args.direct))), flush=True)
        return 0
    return measure(run, summary, args.base, args.steps, args.examples, args.repeats, args.max_new_tokens)


if __name__ == "__main__":
    raise SystemExit(main())
