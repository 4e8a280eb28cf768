"""Peak memory of the default finetune: the real stage as DVC runs it, in a child process.

    python -m bench.memory [--steps 5] [--base embedded]

Runs `python -m stages.finetune -S finetune.max_steps=N` (everything else params.yaml's defaults,
MLflow logging to a temporary SQLite store) in a scratch workspace holding the shipped data's
splits, and reports the child's peak RSS (`ru_maxrss` from wait4: the whole process, imports,
training, evaluation, merge and save) next to the stage's own `peak_rss_mb` (taken right after
training). A psutil sampler (every 0.1 s) shows when the peak happens and what RSS training itself
holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import REPO, log, measure, parser, shipped_splits

TARGET_MB = 4096.0


def _sample(pid: int, samples: list[tuple[float, float]], stop: threading.Event) -> None:
    import psutil

    proc, t0 = psutil.Process(pid), time.perf_counter()
    while not stop.is_set():
        try:
            samples.append((time.perf_counter() - t0, proc.memory_info().rss / 2**20))
        except psutil.Error:
            return
        time.sleep(0.1)


def run(base: str = "embedded", steps: int = 5, extra: list[str] | None = None) -> dict[str, Any]:
    """Run the finetune stage for `steps` steps in a child; returns the JSON result."""
    from tagtune.io import read_json

    with tempfile.TemporaryDirectory(prefix="tagtune-bench-") as tmp:
        ws = Path(tmp)
        shipped_splits(ws / "data")  # → data/split, the default paths.split
        shutil.copy(REPO / "params.yaml", ws / "params.yaml")
        overrides = [f"finetune.max_steps={steps}", f"model.base={base}", *(extra or [])]
        cmd = [sys.executable, "-m", "stages.finetune", *(a for o in overrides for a in ("-S", o))]
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        log(f"memory: {' '.join(cmd[1:])}")
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        with open(ws / "stage.log", "w") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT)
            sampler = threading.Thread(target=_sample, args=(proc.pid, samples, stop), daemon=True)
            sampler.start()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            stop.set()
            sampler.join()
        if proc.returncode != 0:
            raise RuntimeError(
                f"finetune stage failed ({proc.returncode}):\n{(ws / 'stage.log').read_text()[-3000:]}"
            )
        facts = read_json(ws / "models" / "finetune" / "training.json")  # the default paths.finetune
    peak_mb = usage.ru_maxrss / 1024  # Linux: KiB
    t_peak, _ = max(samples, key=lambda s: s[1]) if samples else (None, None)
    return {
        "bench": "memory",
        "base": base,
        "steps": facts["steps"],
        "method": facts["method"],
        "precision": facts["precision"],
        "peak_rss_mb": round(peak_mb, 1),
        "stage_peak_rss_mb_after_training": facts["peak_rss_mb"],
        "peak_at_s": round(t_peak, 1) if t_peak is not None else None,
        "wall_s": round(wall, 1),
        "rss_timeline_mb": [(round(t, 1), round(m)) for t, m in samples[:: max(1, len(samples) // 40)]],
        "target_mb": TARGET_MB,
        "met": peak_mb <= TARGET_MB,
    }


def summary(r: dict[str, Any]) -> str:
    return (
        f"memory: default finetune ({r['method']}, {r['precision']}, {r['steps']} steps) peak RSS "
        f"{r['peak_rss_mb'] / 1024:.2f} GiB for the whole stage process (at {r['peak_at_s']} s of "
        f"{r['wall_s']} s; {r['stage_peak_rss_mb_after_training'] / 1024:.2f} GiB when training ended) "
        f"— target <= {r['target_mb'] / 1024:.0f} GiB: {'met' if r['met'] else 'MISSED'}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--base", default="embedded", help="model.base spec (default: embedded)")
    args = ap.parse_args(argv)
    return measure(run, summary, args.base, args.steps)


if __name__ == "__main__":
    raise SystemExit(main())
