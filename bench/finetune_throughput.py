"""Fine-tune throughput: tagtune's real finetune stage (as shipped, and packed) vs the seeds' way, real tokens/s.

    python -m bench.finetune_throughput [--steps 8] [--repeats 3] [--base embedded] [--packed-batch 16]

All arms train the same base model on the same tagged data (the shipped data through the real
ingest → format → split) for the same number of optimizer steps, alternating seed/tagtune/packed/
seed/... in one process; each reports non-pad tokens seen ÷ wall time of `trainer.train()` (tagtune's
own `tokens_per_s` fact). tagtune runs `stages.finetune.finetune` with params.yaml's finetune section
(LoRA all-linear r=16, batch 16, length-grouped dynamic padding, bf16 frozen base on
AMX/AVX512-BF16 CPUs); the packed arm is the same with `finetune.packing: true` and `--packed-batch`
rows of `finetune.max_length` tokens per step. The ratios are median(arm) / median(seed); the
per-pair ratios show the drift.
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

TARGET_RATIO = 10.0  # finetune as shipped
TARGET_PACKED_RATIO = 30.0  # finetune.packing: true
# packed arm: rows of finetune.max_length (256) tokens per step: 3 ≈ the ~750 tokens of the shipped 16
# examples (mean 46 tokens); 16 rows measured 0.8x the tokens/s (larger activations, 256² attention)
PACKED_BATCH = 3


def tagtune_trial(splits: Path, work: Path, params, steps: int, **update: Any) -> dict[str, Any]:
    """One run of the real finetune stage (fresh checkpoint dir, MLflow off, finetune params changed
    by `update`); its training facts."""
    from stages.finetune import finetune

    cfg = params.finetune.model_copy(update={"max_steps": steps, **update})
    facts = finetune(splits, work / "out", cfg, params.model, work / "ckpt", None)
    keys = ("steps", "tokens_seen", "wall_time_s", "tokens_per_s", "precision", "train_rows")
    return {k: facts[k] for k in keys}


def _ratios(runs: list[dict[str, Any]], seed_runs: list[dict[str, Any]]) -> tuple[float, float, list[float]]:
    """(median tokens/s of `runs`, its ratio to the seed way's median, the per-pair ratios)."""
    tps = median([r["tokens_per_s"] for r in runs])
    pairs = [round(t["tokens_per_s"] / s["tokens_per_s"], 2) for s, t in zip(seed_runs, runs, strict=True)]
    return tps, tps / median([r["tokens_per_s"] for r in seed_runs]), pairs


def run(
    base: str = "embedded",
    steps: int = 8,
    repeats: int = 3,
    seed_max_length: int = SEED_MAX_LENGTH,
    packed_batch: int = PACKED_BATCH,
) -> dict[str, Any]:
    """Alternate seed/tagtune/packed `repeats` times; returns the JSON result (see module doc)."""
    params = default_params()
    params = params.model_copy(update={"model": params.model.model_copy(update={"base": base})})
    seed_runs: list[dict[str, Any]] = []
    tag_runs: list[dict[str, Any]] = []
    packed_runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tagtune-bench-") as tmp:
        root = Path(tmp)
        splits = shipped_splits(root, params)
        model_dir = base_dir(base)
        for i in range(repeats):
            work = root / f"trial-{i}"
            log(f"finetune_throughput {i + 1}/{repeats}: seed way, {steps} steps")
            seed_runs.append(train_seed_way(splits, model_dir, work / "seed", steps, seed_max_length))
            log(f"finetune_throughput {i + 1}/{repeats}: tagtune finetune, {steps} steps")
            tag_runs.append(tagtune_trial(splits, work / "shipped", params, steps))
            log(f"finetune_throughput {i + 1}/{repeats}: tagtune finetune packed, {steps} steps")
            packed_runs.append(
                tagtune_trial(splits, work / "packed", params, steps, packing=True, batch_size=packed_batch)
            )
            shutil.rmtree(work, ignore_errors=True)
    seed_tps = median([r["tokens_per_s"] for r in seed_runs])
    tag_tps, ratio, pairs = _ratios(tag_runs, seed_runs)
    packed_tps, packed_ratio, packed_pairs = _ratios(packed_runs, seed_runs)
    return {
        "bench": "finetune_throughput",
        "base": base,
        "steps": steps,
        "repeats": repeats,
        "seed_tokens_per_s": round(seed_tps, 2),
        "tagtune_tokens_per_s": round(tag_tps, 2),
        "ratio": round(ratio, 2),
        "pair_ratios": pairs,
        "target_ratio": TARGET_RATIO,
        "met": ratio >= TARGET_RATIO,
        "packed_batch_size": packed_batch,
        "packed_tokens_per_s": round(packed_tps, 2),
        "packed_ratio": round(packed_ratio, 2),
        "packed_pair_ratios": packed_pairs,
        "packed_target_ratio": TARGET_PACKED_RATIO,
        "met_packed": packed_ratio >= TARGET_PACKED_RATIO,
        "packed_vs_shipped": round(packed_tps / tag_tps, 2),
        "tagtune_precision": tag_runs[0]["precision"],
        "seed_padding_factor": round(
            median([r["padded_tokens"] / max(r["tokens_seen"], 1) for r in seed_runs]), 2
        ),
        "seed_runs": seed_runs,
        "tagtune_runs": tag_runs,
        "packed_runs": packed_runs,
    }


def summary(r: dict[str, Any]) -> str:
    return (
        f"fine-tune throughput ({r['steps']} steps x {r['repeats']} alternating runs, real tokens/s): "
        f"tagtune {r['tagtune_tokens_per_s']:.0f} ({r['tagtune_precision']}) vs seed way "
        f"{r['seed_tokens_per_s']:.0f} (padding x{r['seed_padding_factor']}) = {r['ratio']:.1f}x "
        f"(pairs {r['pair_ratios']}; target >= {r['target_ratio']:.0f}x: {'met' if r['met'] else 'MISSED'}); "
        f"packed ({r['packed_batch_size']} rows/step) {r['packed_tokens_per_s']:.0f} = {r['packed_ratio']:.1f}x "
        f"(pairs {r['packed_pair_ratios']}; target >= {r['packed_target_ratio']:.0f}x: "
        f"{'met' if r['met_packed'] else 'MISSED'})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (both arms)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per arm, alternating")
    ap.add_argument("--base", default="embedded", help="model.base spec (default: embedded)")
    ap.add_argument("--packed-batch", type=int, default=PACKED_BATCH, help="packed arm: rows per step")
    args = ap.parse_args(argv)
    return measure(run, summary, args.base, args.steps, args.repeats, packed_batch=args.packed_batch)


if __name__ == "__main__":
    raise SystemExit(main())
