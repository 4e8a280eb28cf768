"""Model-FLOPs utilisation of the real finetune stage (full fine-tune and LoRA) against measured matmul peak.

    python -m bench.mfu [--steps 8] [--base embedded] [--methods full,lora] [--profile]

MFU = FLOPs a step actually runs per token × tokens/s ÷ peak FLOP/s. Per real token (PaLM, appendix B),
with N = weights that take part in a matmul (every nn.Linear/Conv1D, the LM head included: SmolLM2
ties it to the embedding, whose *lookup* is no matmul) split into the body and the LM head:

- full: 6·N_body + 6·N_head·k + 12·L·A·S̄ — 2 forward + 2 input-gradient + 2 weight-gradient FLOPs
  per weight; the LM head runs only at the k share of positions whose next token is trained
  (finetune's `TrainedLogitsOnly`: the prompt's logits are never computed).
- lora: 4·N_body + 4·N_head·k + 6·N_adapter + 12·L·A·S̄ — the frozen base runs forward and passes
  input gradients back (2 + 2), but computes no weight gradients; every adapter weight costs the
  full 6.
- 12·L·A·S̄ is the attention score/value matmuls (forward + backward) with L layers, A = heads ×
  head_dim, S̄ = Σs²/Σs the token-weighted mean example length (each token attends over its own
  example, packed or not). Padding and masked-out attention are work, not model FLOPs.

tokens/s is the stage's own steady-state rate: `loss.csv`'s per-logging-window tokens/s (median),
leaving out step 1 (warm-up) and the checkpoint Trainer saves when training ends. peak = best of
several `torch.matmul` runs of 2048² and 4096² in the dtype the step's matmuls run in (full: fp32 on
CPU, see `resolve_precision`; lora: bf16, the frozen base's dtype there; bf16 on GPUs), measured in
this process right before and right after that method's training; the higher is used.

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

TARGET_MFU = {"full": 0.65, "lora": 0.60}
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


def _matmul_params(model) -> tuple[int, int]:
    """(body, LM head) weights + biases of every nn.Linear / GPT-2 Conv1D in `model`."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    body = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear | Conv1D) and m is not head:
            body += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    return body, head.weight.numel()


def step_flops(model_dir: str, feats: list[dict], cfg) -> dict[str, Any]:
    """FLOPs per real token of a `cfg.method` step (module doc) for the model at `model_dir`, built on
    the meta device (no weights loaded); `feats` are the train examples as finetune encodes them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.finetune import prepare_model
    from tagtune.encoding import IGNORE_INDEX

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        body, head = _matmul_params(model)
        adapters = 0
        if cfg.method == "lora":
            wrapped = prepare_model(model, cfg, [])
            adapters = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    lengths = [f["length"] for f in feats]
    kept = sum(sum(lab != IGNORE_INDEX for lab in f["labels"][1:]) for f in feats) / sum(lengths)
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn_dim = config.num_attention_heads * head_dim
    s_bar = sum(s * s for s in lengths) / sum(lengths)
    per_weight = 6 if cfg.method == "full" else 4  # lora: no weight gradients for the frozen base
    flops = per_weight * (body + head * kept) + 6 * adapters + 12 * layers * attn_dim * s_bar
    return {
        "n_matmul_params": body + head,
        "n_lm_head_params": head,
        "n_adapter_params": adapters,
        "lm_head_share_of_positions": round(kept, 3),
        "layers": layers,
        "attn_dim": attn_dim,
        "mean_context": round(s_bar, 1),
        "flops_per_token": flops,
    }


def train_features(splits: Path, model_dir: str, max_length: int) -> list[dict]:
    """The train examples exactly as finetune encodes them (tokens, labels, length)."""
    from tagtune.encoding import build_lm_features
    from tagtune.io import read_jsonl
    from tagtune.models import load_tokenizer

    feats, _ = build_lm_features(read_jsonl(splits / "train.jsonl"), load_tokenizer(model_dir), max_length)
    return feats


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
    if name in ("aten::copy_", "aten::to", "aten::_to_copy"):
        return "dtype casts and copies"
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


def measure_method(
    method: str, splits: Path, params, model_dir: str, feats: list[dict], steps: int, logging_steps: int,
    peak: dict[str, Any], profile: bool, work: Path,
) -> dict[str, Any]:  # fmt: skip
    """MFU of `steps` steps of the real stage with the default params and `method` (see module doc)."""
    import torch

    from stages.finetune import finetune, resolve_precision

    cfg = params.finetune.model_copy(
        update={"method": method, "max_steps": steps, "logging_steps": logging_steps}
    )
    precision = resolve_precision(cfg.precision, cfg.method)
    flops = step_flops(model_dir, feats, cfg)
    log(f"mfu: matmul peak ({precision}) before training")
    before = matmul_peak(precision, **peak)
    log(f"mfu: {method} fine-tune, {steps} steps")
    facts = finetune(splits, work / "out", cfg, params.model, work / "ckpt", None)
    tps = steady_tokens_per_s(work / "out" / "loss.csv") or facts["tokens_per_s"]
    log(f"mfu: matmul peak ({precision}) after training")
    after = matmul_peak(precision, **peak)
    prof = {}
    if profile and not torch.cuda.is_available():
        log(f"mfu: profiling 3 {method} steps (a separate run)")
        prof = profile_ops(splits, cfg, params.model, work / "profile")
    achieved = flops["flops_per_token"] * tps
    mfu = achieved / max(before["flops"], after["flops"])
    result: dict[str, Any] = {
        "method": method,
        "steps": facts["steps"],
        "precision": precision,
        "tokens_per_s": round(tps, 1),
        "tokens_per_s_incl_warmup_and_save": facts["tokens_per_s"],
        **{k: v for k, v in flops.items() if k != "flops_per_token"},
        "flops_per_token": round(flops["flops_per_token"]),
        "achieved_gflops": round(achieved / 1e9, 1),
        "peak_gflops_before": round(before["flops"] / 1e9, 1),
        "peak_gflops_after": round(after["flops"] / 1e9, 1),
        "peak_by_size_before": before["by_size"],
        "mfu": round(mfu, 4),
        "target_mfu": TARGET_MFU[method],
        "met": mfu >= TARGET_MFU[method],
        **prof,
    }
    return {**result, **_vs_spec(achieved, precision)}


def _vs_spec(achieved: float, precision: str) -> dict[str, Any]:
    """On a GPU: its name, and MFU against its datasheet's dense peak in `precision` (if known)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    name = torch.cuda.get_device_name(0)
    spec = next((v for k, v in GPU_SPEC_PEAK.items() if k in name), None)
    if not spec or precision not in spec:
        return {"gpu": name}
    return {
        "gpu": name,
        "spec_peak_tflops": spec[precision] / 1e12,
        "mfu_vs_spec": round(achieved / spec[precision], 4),
    }


def run(
    base: str = "embedded",
    steps: int = 8,
    logging_steps: int = 2,
    peak_repeats: int = 3,
    peak_sizes: tuple[int, ...] = (2048, 4096),
    profile: bool = False,
    methods: tuple[str, ...] = ("full", "lora"),
) -> dict[str, Any]:
    """`measure_method` for each of `methods` on the shipped data; returns the JSON result.

    With `profile`, a second short run per method under torch.profiler adds where the step time goes.
    """
    import torch

    params = default_params()
    params = params.model_copy(update={"model": params.model.model_copy(update={"base": base})})
    peak = {"sizes": peak_sizes, "repeats": peak_repeats}
    with tempfile.TemporaryDirectory(prefix="tagtune-bench-") as tmp:
        root = Path(tmp)
        splits = shipped_splits(root, params)
        model_dir = base_dir(base)
        feats = train_features(splits, model_dir, params.finetune.max_length)
        results = {
            m: measure_method(
                m, splits, params, model_dir, feats, steps, logging_steps, peak, profile, root / m
            )
            for m in methods
        }
    return {
        "bench": "mfu",
        "base": base,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "met": all(r["met"] for r in results.values()),
        "methods": results,
    }


def summary(r: dict[str, Any]) -> str:
    lines = []
    for m in r["methods"].values():
        s = (
            f"{m['method']} fine-tune MFU ({r['device']}, {m['precision']}, {r['threads']} threads): "
            f"{m['tokens_per_s']:.0f} tokens/s x {m['flops_per_token'] / 1e6:.0f} MFLOP/token = "
            f"{m['achieved_gflops']:.0f} GFLOP/s of {max(m['peak_gflops_before'], m['peak_gflops_after']):.0f} "
            f"measured matmul peak = {m['mfu']:.0%} (target >= {m['target_mfu']:.0%}: "
            f"{'met' if m['met'] else 'MISSED'})"
        )
        if "mfu_vs_spec" in m:
            s += f"; vs {m['gpu']} spec {m['spec_peak_tflops']:.0f} TFLOP/s: {m['mfu_vs_spec']:.1%}"
        if "profile_shares" in m:
            s += "\n  step time (torch.profiler): " + ", ".join(
                f"{k} {v:.0%}" for k, v in m["profile_shares"].items()
            )
        lines.append(s)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--base", default="embedded", help="model.base spec (default: embedded)")
    ap.add_argument("--methods", default="full,lora", help="comma-separated: full, lora")
    ap.add_argument("--profile", action="store_true", help="also profile 3 steps: where the time goes")
    args = ap.parse_args(argv)
    methods = tuple(args.methods.split(","))
    if bad := [m for m in methods if m not in TARGET_MFU]:
        ap.error(f"unknown method(s) {bad}; known: {', '.join(TARGET_MFU)}")
    return measure(run, summary, args.base, args.steps, profile=args.profile, methods=methods)


if __name__ == "__main__":
    raise SystemExit(main())
