"""Model-FLOPs utilisation of a full fine-tune through the real finetune stage, against measured matmul peak.

    python -m bench.mfu [--steps 8] [--base embedded] [--profile]

MFU = model FLOPs per token × tokens/s ÷ peak FLOP/s, where

- FLOPs per token = 6·N + 12·L·A·S̄ (PaLM, appendix B): N = weights that take part in a matmul per
  token (every nn.Linear, including the LM head, which SmolLM2 ties to the embedding: the
  embedding *lookup* is no matmul); 6 = 2 forward + 4 backward FLOPs per weight. 12·L·A·S̄ is the
  attention score/value matmuls (forward + backward) with L layers, A = heads × head_dim, and
  S̄ = Σs²/Σs the token-weighted mean length of the train examples (each token attends over its own
  example). Only real tokens count: padding is work, not model FLOPs.
- tokens/s = the stage's own steady-state rate: `loss.csv`'s per-logging-window tokens/s (median),
  which leaves out step 1 (warm-up) and the checkpoint Trainer saves when training ends.
- peak = best of several `torch.matmul` runs of 2048² and 4096² in the dtype the stage trained in
  (fp32 on CPU for method=full, see `resolve_precision`; bf16 on GPUs), measured in this process
  right before and right after training; the higher of the two is used.

On a GPU the result also reports MFU against the card's spec dense bf16/fp32 peak.
"""

from __future__ import annotations

import csv
import tempfile
import time
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

TARGET_MFU = 0.50
# dense (no sparsity) tensor-core peaks in FLOP/s, from NVIDIA's datasheets: {name substring: {dtype: peak}}
GPU_SPEC_PEAK = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30e12},
}


def matmul_peak(dtype_name: str, sizes: tuple[int, ...] = (2048, 4096), repeats: int = 3) -> dict[str, Any]:
    """Best FLOP/s of `torch.matmul` on n×n operands, over `repeats` timed runs per size (after a warm-up)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best: dict[int, float] = {}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        inner = 20 if device == "cuda" else 1  # a GPU matmul is too short to time alone
        torch.matmul(a, b)
        sync()
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(inner):
                torch.matmul(a, b)
            sync()
            best[n] = max(best.get(n, 0.0), 2 * n**3 * inner / (time.perf_counter() - t))
        del a, b
    return {"flops": max(best.values()), "by_size": {str(n): round(f / 1e9, 1) for n, f in best.items()}}


def model_flops_per_token(model_dir: str, train_lengths: list[int]) -> dict[str, Any]:
    """6·N + 12·L·A·S̄ for the model at `model_dir` (built on the meta device: no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_matmul = sum(
        m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn_dim = config.num_attention_heads * head_dim
    s_bar = sum(s * s for s in train_lengths) / sum(train_lengths)
    return {
        "n_matmul_params": n_matmul,
        "layers": layers,
        "attn_dim": attn_dim,
        "mean_context": round(s_bar, 1),
        "flops_per_token": 6 * n_matmul + 12 * layers * attn_dim * s_bar,
    }


def train_lengths(splits: Path, model_dir: str, max_length: int) -> list[int]:
    """Token lengths of the train examples exactly as finetune builds them."""
    from tagtune.encoding import build_lm_features
    from tagtune.io import read_jsonl
    from tagtune.models import load_tokenizer

    feats, _ = build_lm_features(read_jsonl(splits / "train.jsonl"), load_tokenizer(model_dir), max_length)
    return [f["length"] for f in feats]


def steady_tokens_per_s(loss_csv: Path) -> float | None:
    """Median of the per-logging-window tokens/s finetune wrote (the first row has none: warm-up).

    None when the run was too short to have a window (fewer than two logging steps).
    """
    with open(loss_csv, newline="") as f:
        rates = [float(r["tokens_per_s"]) for r in csv.DictReader(f) if r["tokens_per_s"]]
    return median(rates) if rates else None


def _op_group(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention"
    if "adam" in name or "foreach" in name:
        return "optimizer"
    if "log_softmax" in name or "nll_loss" in name:
        return "loss (log-softmax over the vocabulary)"
    return "elementwise, copies and the rest"


def profile_ops(splits: Path, cfg, model_cfg, work: Path, steps: int = 3) -> dict[str, Any]:
    """torch.profiler over steps 2..`steps` of the real stage: share of CPU time per op group, top ops.

    The profiler is attached through a Trainer callback (finetune builds its callback list in
    `_callbacks`); this run is separate from the measured one, whose timing it would distort.
    """
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    import stages.finetune as ft

    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=0, active=steps - 1))

    class _Profile(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            prof.start()

        def on_step_end(self, *a, **kw):
            prof.step()

        def on_train_end(self, *a, **kw):
            prof.stop()

    orig = ft._callbacks
    ft._callbacks = lambda *a: [*orig(*a), _Profile()]
    try:
        ft.finetune(
            splits, work / "out", cfg.model_copy(update={"max_steps": steps}), model_cfg, work / "ckpt", None
        )
    finally:
        ft._callbacks = orig
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total = sum(e.self_cpu_time_total for e in events) or 1
    groups: dict[str, float] = {}
    for e in events:
        g = _op_group(e.key)
        groups[g] = groups.get(g, 0.0) + e.self_cpu_time_total / total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {
        "profile_shares": {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "profile_top_ops": {e.key: round(e.self_cpu_time_total / total, 3) for e in top},
    }


def run(
    base: str = "embedded",
    steps: int = 8,
    logging_steps: int = 2,
    peak_repeats: int = 3,
    peak_sizes: tuple[int, ...] = (2048, 4096),
    profile: bool = False,
) -> dict[str, Any]:
    """Full fine-tune `steps` steps with the default params (method=full); returns the JSON result.

    With `profile`, a second short run under torch.profiler adds where the step time goes.
    """
    import torch

    from stages.finetune import finetune, resolve_precision

    params = default_params()
    model_cfg = params.model.model_copy(update={"base": base})
    cfg = params.finetune.model_copy(
        update={"method": "full", "max_steps": steps, "logging_steps": logging_steps}
    )
    precision = resolve_precision(cfg.precision, cfg.method)
    with tempfile.TemporaryDirectory(prefix="tagtune-bench-") as tmp:
        root = Path(tmp)
        splits = shipped_splits(root, params)
        model_dir = base_dir(base)
        flops = model_flops_per_token(model_dir, train_lengths(splits, model_dir, cfg.max_length))
        log(f"mfu: matmul peak ({precision}) before training")
        before = matmul_peak(precision, peak_sizes, peak_repeats)
        log(f"mfu: full fine-tune, {steps} steps")
        facts = finetune(splits, root / "out", cfg, model_cfg, root / "ckpt", None)
        tps = steady_tokens_per_s(root / "out" / "loss.csv") or facts["tokens_per_s"]
        log(f"mfu: matmul peak ({precision}) after training")
        after = matmul_peak(precision, peak_sizes, peak_repeats)
        prof = {}
        if profile and not torch.cuda.is_available():
            log("mfu: profiling 3 steps (a separate run)")
            prof = profile_ops(splits, cfg, model_cfg, root / "profile")
    peak = max(before["flops"], after["flops"])
    achieved = flops["flops_per_token"] * tps
    mfu = achieved / peak
    result: dict[str, Any] = {
        "bench": "mfu",
        "base": base,
        "method": "full",
        "steps": facts["steps"],
        "precision": facts["precision"],
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "tokens_per_s": round(tps, 1),
        "tokens_per_s_incl_warmup_and_save": facts["tokens_per_s"],
        **{k: v for k, v in flops.items() if k != "flops_per_token"},
        "flops_per_token": round(flops["flops_per_token"]),
        "achieved_gflops": round(achieved / 1e9, 1),
        "peak_gflops_before": round(before["flops"] / 1e9, 1),
        "peak_gflops_after": round(after["flops"] / 1e9, 1),
        "peak_by_size_before": before["by_size"],
        "mfu": round(mfu, 4),
        "target_mfu": TARGET_MFU,
        "met": mfu >= TARGET_MFU,
        **prof,
    }
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        spec = next((v for k, v in GPU_SPEC_PEAK.items() if k in name), None)
        result["gpu"] = name
        if spec and precision in spec:
            result["spec_peak_tflops"] = spec[precision] / 1e12
            result["mfu_vs_spec"] = round(achieved / spec[precision], 4)
    return result


def summary(r: dict[str, Any]) -> str:
    s = (
        f"full fine-tune MFU ({r['device']}, {r['precision']}, {r['threads']} threads): "
        f"{r['tokens_per_s']:.0f} tokens/s x {r['flops_per_token'] / 1e6:.0f} MFLOP/token = "
        f"{r['achieved_gflops']:.0f} GFLOP/s of {max(r['peak_gflops_before'], r['peak_gflops_after']):.0f} "
        f"measured matmul peak = {r['mfu']:.0%} (target >= {r['target_mfu']:.0%}: "
        f"{'met' if r['met'] else 'MISSED'})"
    )
    if "mfu_vs_spec" in r:
        s += f"; vs {r['gpu']} spec {r['spec_peak_tflops']:.0f} TFLOP/s: {r['mfu_vs_spec']:.1%}"
    if "profile_shares" in r:
        s += "\n  step time (torch.profiler): " + ", ".join(
            f"{k} {v:.0%}" for k, v in r["profile_shares"].items()
        )
    return s


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--base", default="embedded", help="model.base spec (default: embedded)")
    ap.add_argument("--profile", action="store_true", help="also profile 3 steps: where the time goes")
    args = ap.parse_args(argv)
    return measure(run, summary, args.base, args.steps, profile=args.profile)


if __name__ == "__main__":
    raise SystemExit(main())
