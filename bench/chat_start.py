"""Chat cold start: `tagtune chat -q` in a fresh process, against a registered LoRA version of the real base.

    python -m bench.chat_start [--repeats 3] [--steps 3]

A LoRA fine-tune of the embedded base (a few steps on the shipped data: the weights' values do not
change load times) is evaluated on a few questions and registered through `stages.register` in a
fresh SQLite registry, as `make run` does. Then, each in a new `python -m tagtune.app.cli chat -q`
process (the real command path, cwd = that workspace):

- first start: the version is not in the local cache: resolve `@champion`, pull the adapter version,
  rebuild base + adapter, keep the merged model in the cache, answer;
- cached start: the same command again (the target: <= 3 s);
- floor: a bare process that only imports torch + transformers, loads the cached merged model and
  generates the same answer: what any Python chat over this model costs on this machine.

The arms alternate per repeat (the machine's speed drifts); medians are reported. The version's
registry size (what MLflow stores) is measured too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    REPO,
    default_params,
    log,
    measure,
    median,
    parser,
    shipped_splits,
)

TARGET_S = 3.0
QUESTION = "When does the Maritime Museum open?"
_FLOOR = """
import sys, time
t = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = tok(sys.argv[2], return_tensors="pt", add_special_tokens=False)
model.generate(**ids, max_new_tokens=int(sys.argv[3]), do_sample=False)
"""


def _workspace(root: Path, steps: int, base: str) -> Path:
    """A workspace with `base` fine-tuned (LoRA, `steps` steps), evaluated and registered."""
    import yaml

    from stages.evaluate import evaluate
    from stages.finetune import finetune
    from stages.register import register

    p = default_params([f"model.base={base}"])
    splits = shipped_splits(root / "data", p)
    ft = p.finetune.model_copy(update={"max_steps": steps, "batch_size": 4, "save_steps": 1000})
    finetune(splits, root / "models" / "finetune", ft, p.model, root / "ckpt", None)
    ev = p.evaluate.model_copy(update={"max_examples": 8, "compare_base": False})
    evaluate(splits, root / "models" / "finetune", root / "reports" / "evaluate", ev)
    store = p.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{root}/mlflow.db"})
    here = Path.cwd()
    os.chdir(root)  # MLflow puts a SQLite store's artifacts in ./mlruns: the workspace's, as in make run
    try:
        register(Path("models/finetune"), Path("reports/evaluate"), Path("reports/register"),
                 p.register, store, p.evaluate.generation, repo_root=REPO)  # fmt: skip
    finally:
        os.chdir(here)
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["mlflow"]["tracking_uri"] = store.tracking_uri
    raw["model"]["base"] = base
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return root


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return wall, proc.stdout.strip()


def _entry(cache: Path) -> Path:
    (entry,) = (cache / "registry").glob("*/*")  # the workspace's one version
    return entry


def run(repeats: int = 3, steps: int = 3, base: str = "embedded") -> dict[str, Any]:
    from tagtune.models import cache_root

    with tempfile.TemporaryDirectory(prefix="tagtune-bench-chat-") as tmp:
        ws = _workspace(Path(tmp) / "ws", steps, base)
        cache = Path(tmp) / "cache"  # the registry cache of this run; the converted base is shared
        cache.mkdir()
        os.symlink(cache_root() / "models", cache / "models")
        env = {**os.environ, "TAGTUNE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        chat = [sys.executable, "-m", "tagtune.app.cli", "chat", "-q", QUESTION]
        mlruns = sum(f.stat().st_size for f in (ws / "mlruns").rglob("*") if f.is_file())
        first, cached, floor, answers = [], [], [], set()
        for i in range(repeats):
            log(f"chat start {i + 1}/{repeats}: first (empty cache), cached, floor")
            shutil.rmtree(cache / "registry", ignore_errors=True)
            wall, answer = _timed(chat, ws, env)
            first.append(wall)
            answers.add(answer)
            wall, answer = _timed(chat, ws, env)
            cached.append(wall)
            answers.add(answer)
            merged = _entry(cache) / "artifacts" / "model"
            prompt = f"{QUESTION} <QUESTION>\n"
            floor.append(_timed([sys.executable, "-c", _FLOOR, str(merged), prompt, "24"], ws, env)[0])
    return {
        "bench": "chat_start",
        "base": base,
        "steps": steps,
        "repeats": repeats,
        "version_bytes": mlruns,
        "first_start_s": round(median(first), 2),
        "cached_start_s": round(median(cached), 2),
        "floor_s": round(median(floor), 2),
        "first_runs": [round(x, 2) for x in first],
        "cached_runs": [round(x, 2) for x in cached],
        "floor_runs": [round(x, 2) for x in floor],
        "same_answer_every_start": len(answers) == 1,
        "target_s": TARGET_S,
        "met": median(cached) <= TARGET_S,
    }


def summary(r: dict[str, Any]) -> str:
    return (
        f"chat cold start (`tagtune chat -q`, fresh process, median of {r['repeats']}): first start "
        f"{r['first_start_s']:.1f} s (pull + merge), cached {r['cached_start_s']:.1f} s (target <= "
        f"{r['target_s']:.0f} s: {'met' if r['met'] else 'MISSED'}); floor (import torch+transformers, "
        f"load the merged model, generate) {r['floor_s']:.1f} s; registry version {r['version_bytes'] / 1e6:.1f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (first, cached, floor)")
    ap.add_argument("--steps", type=int, default=3, help="fine-tuning steps of the registered version")
    ap.add_argument("--base", default="embedded", help="model.base spec (default: embedded)")
    args = ap.parse_args(argv)
    return measure(run, summary, args.repeats, args.steps, args.base)


if __name__ == "__main__":
    raise SystemExit(main())
