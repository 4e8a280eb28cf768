"""Fine-tune throughput: tagtune's real finetune stage vs the seeds' way, real (non-pad) tokens/s.

    python -m bench.finetune_throughput [--steps 8] [--repeats 3] [--base embedded]

Both arms train the same base model on the same tagged data (the shipped data through the real
ingest → format → split) for the same number of optimizer steps, alternating seed/tagtune/seed/...
in one process; each reports non-pad tokens seen ÷ wall time of `trainer.train()` (tagtune's own
`tokens_per_s` fact). tagtune runs `stages.finetune.finetune` with params.yaml's defaults (LoRA
all-linear r=16, batch 16, length-grouped dynamic padding, bf16 frozen base on AMX/AVX512-BF16 CPUs).
The headline ratio is median(tagtune) / median(seed); the per-pair ratios show the drift.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench._common import (
    base_dir,
    default_params,
    log,
    measure,
    median,
    parser,
    shipped_splits,
)
from bench.seed_baseline import SEED_MAX_LENGTH, train_seed_way

TARGET_RATIO = 10.0


def tagtune_trial(splits: Path, work: Path, params, steps: int) -> dict[str, Any]:
    """One run of the real finetune stage (fresh checkpoint dir, MLflow off); its training facts."""
    from stages.finetune import finetune

    cfg = params.finetune.model_copy(update={"max_steps": steps})
    facts = finetune(splits, work / "out", cfg, params.model, work / "ckpt", None)
    return {k: facts[k] for k in ("steps", "tokens_seen", "wall_time_s", "tokens_per_s", "precision")}


def run(
    base: str = "embedded",
    steps: int = 8,
    repeats: int = 3,
    seed_max_length: int = SEED_MAX_LENGTH,
) -> dict[str, Any]:
    """Alternate seed/tagtune `repeats` times; returns the JSON result (see module doc)."""
    params = default_params()
    params = params.model_copy(update={"model": params.model.model_copy(update={"base": base})})
    seed_runs: list[dict[str, Any]] = []
    tag_runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tagtune-bench-") as tmp:
        root = Path(tmp)
        splits = shipped_splits(root, params)
        model_dir = base_dir(base)
        for i in range(repeats):
            work = root / f"trial-{i}"
            log(f"finetune_throughput {i + 1}/{repeats}: seed way, {steps} steps")
            seed_runs.append(train_seed_way(splits, model_dir, work / "seed", steps, seed_max_length))
            log(f"finetune_throughput {i + 1}/{repeats}: tagtune finetune, {steps} steps")
            tag_runs.append(tagtune_trial(splits, work, params, steps))
            shutil.rmtree(work, ignore_errors=True)
    seed_tps = median([r["tokens_per_s"] for r in seed_runs])
    tag_tps = median([r["tokens_per_s"] for r in tag_runs])
    ratio = tag_tps / seed_tps
    return {
        "bench": "finetune_throughput",
        "base": base,
        "steps": steps,
        "repeats": repeats,
        "seed_tokens_per_s": round(seed_tps, 2),
        "tagtune_tokens_per_s": round(tag_tps, 2),
        "ratio": round(ratio, 2),
        "pair_ratios": [
            round(t["tokens_per_s"] / s["tokens_per_s"], 2) for s, t in zip(seed_runs, tag_runs, strict=True)
        ],
        "target_ratio": TARGET_RATIO,
        "met": ratio >= TARGET_RATIO,
        "tagtune_precision": tag_runs[0]["precision"],
        "seed_padding_factor": round(
            median([r["padded_tokens"] / max(r["tokens_seen"], 1) for r in seed_runs]), 2
        ),
        "seed_runs": seed_runs,
        "tagtune_runs": tag_runs,
    }


def summary(r: dict[str, Any]) -> str:
    return (
        f"fine-tune throughput ({r['steps']} steps x {r['repeats']} alternating runs, real tokens/s): "
        f"tagtune {r['tagtune_tokens_per_s']:.0f} ({r['tagtune_precision']}) vs seed way "
        f"{r['seed_tokens_per_s']:.0f} (padding x{r['seed_padding_factor']}) = {r['ratio']:.1f}x "
        f"(pairs {r['pair_ratios']}; target >= {r['target_ratio']:.0f}x: {'met' if r['met'] else 'MISSED'})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (both arms)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per arm, alternating")
    ap.add_argument("--base", default="embedded", help="model.base spec (default: embedded)")
    args = ap.parse_args(argv)
    return measure(run, summary, args.base, args.steps, args.repeats)


if __name__ == "__main__":
    raise SystemExit(main())
