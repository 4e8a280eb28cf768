"""Run every benchmark, write bench/results.json and print the README table.

    make bench                                  # = python -m bench.run (~19 min on 2 quiet cores)
    python -m bench.run --only generation,memory   # re-run some; the others' rows are kept

Each benchmark runs alone in a child process (`python -m bench.<name> ...`, so one's memory and
threads cannot skew the next), one after the other — never two trainings at once. Their stderr
(progress, warnings) goes to bench/results/<name>.log. Figures are ratios measured side by side
within one benchmark; absolute seconds from different runs of this suite are not comparable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from bench._common import JSON_PREFIX, REPO, log, machine_info, parser, quiet

# (name, arguments): sizes chosen to fit ~30 minutes on 2 cores; each figure is a side-by-side ratio
SUITE: list[tuple[str, list[str]]] = [
    ("finetune_throughput", ["--steps", "6", "--repeats", "3"]),  # ~6 min: the seed arm is ~10 s/step
    ("mfu", ["--steps", "8", "--profile"]),  # ~4 min: full and LoRA, each profiled
    ("generation", ["--questions", "128", "--repeats", "3", "--profile"]),  # ~12 min: fp32 (and bf16)
    ("rerank", ["--questions", "32", "--repeats", "3"]),  # ~1.5 min
    ("memory", ["--steps", "5"]),  # ~1 min
    ("orchestration", ["--steps", "3", "--examples", "4", "--repeats", "2"]),  # ~4 min
    ("chat_start", ["--repeats", "3", "--steps", "3"]),  # ~2 min
]
RESULTS = REPO / "bench" / "results.json"
LOGS = REPO / "bench" / "results"  # git-ignored


def run_one(name: str, args: list[str]) -> dict[str, Any]:
    """`python -m bench.<name> args` → its JSON result (or {"error": ...}); the summary is echoed."""
    LOGS.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", f"bench.{name}", *args]
    log(f"{name}: {' '.join(cmd[1:])} (log: {LOGS / f'{name}.log'})")
    t = time.perf_counter()
    with open(LOGS / f"{name}.log", "w") as err:
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    elapsed = round(time.perf_counter() - t, 1)
    lines = proc.stdout.splitlines()
    found = [i for i, line in enumerate(lines) if line.startswith(JSON_PREFIX)]
    if proc.returncode != 0 or not found:
        tail = (LOGS / f"{name}.log").read_text()[-2000:]
        log(f"{name}: FAILED ({proc.returncode}) after {elapsed} s\n{tail}")
        return {"bench": name, "error": f"exit {proc.returncode}", "elapsed_s": elapsed}
    result = json.loads(lines[found[-1]])
    print("\n".join(lines[found[-1] + 1 :]), flush=True)  # the human summary
    log(f"{name}: {elapsed} s")
    return {**result, "elapsed_s": elapsed}


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**missed**")


def _mfu_row(r: dict[str, Any], m: dict[str, Any]) -> str:
    """One README row per method `bench.mfu` measured."""
    if "error" in r:
        return f"| Fine-tune MFU | failed: {r['error']} | | | | — |"
    spec = f" ({m['mfu_vs_spec']:.0%} of {m['gpu']} spec)" if "mfu_vs_spec" in m else ""
    name = {"full": "Full fine-tune", "lora": "LoRA fine-tune (frozen base: no weight gradients)"}
    return (
        f"| {name.get(m['method'], m['method'])} MFU ({m['precision']}, {r.get('device')}) "
        f"| {m['achieved_gflops']:.0f} GFLOP/s ({m['tokens_per_s']:.0f} tokens/s) "
        f"| {max(m['peak_gflops_before'], m['peak_gflops_after']):.0f} GFLOP/s {m['precision']} matmul peak "
        f"| **{m['mfu']:.0%}**{spec} | ≥ {m['target_mfu']:.0%} | {_met(m['met'])} |"
    )


def table(results: dict[str, dict[str, Any]], machine: dict[str, Any]) -> str:
    """The Markdown table README shows (one row per target), with the machine underneath."""
    rows = [
        "| Measurement | tagtune | baseline | result | target | met |",
        "|---|---|---|---|---|---|",
    ]

    def add(name: str, cells: tuple[str, ...], ok_key: str = "met", arm: dict | None = None) -> None:
        """A row for benchmark `name`; `arm`: the part of its result the row is about (default: all)."""
        r = results.get(name)
        if r is None:
            return
        if "error" in r:
            rows.append(f"| {cells[0]} | failed: {r['error']} | | | {cells[4]} | — |")
            return
        rows.append("| " + " | ".join(cells) + f" | {_met((arm or r).get(ok_key))} |")

    if r := results.get("finetune_throughput"):
        add(
            "finetune_throughput",
            (
                f"Fine-tune throughput, real (non-pad) tokens/s ({r.get('steps')} steps, median of {r.get('repeats')})",
                f"{r.get('tagtune_tokens_per_s', 0):.0f} ({r.get('tagtune_precision')})",
                f"{r.get('seed_tokens_per_s', 0):.1f} (seed way, padding ×{r.get('seed_padding_factor')})",
                f"**{r.get('ratio', 0):.1f}×**",
            )
            + ("≥ 10×",),
        )
        if "packed_ratio" in r:
            add(
                "finetune_throughput",
                (
                    f"Fine-tune throughput with `finetune.packing: true` ({r.get('packed_batch_size')} rows of "
                    f"max_length per step)",
                    f"{r.get('packed_tokens_per_s', 0):.0f} ({r.get('tagtune_precision')}, "
                    f"×{r.get('packed_vs_shipped')} the shipped default)",
                    f"{r.get('seed_tokens_per_s', 0):.1f} (seed way)",
                    f"**{r.get('packed_ratio', 0):.1f}×**",
                )
                + (f"≥ {r.get('packed_target_ratio', 30):.0f}×",),
                "met_packed",
            )
    if r := results.get("mfu"):
        methods = list(r.get("methods", {}).values())
        rows += [_mfu_row(r, m) for m in methods] if "error" not in r else [_mfu_row(r, {})]
    if r := results.get("generation"):
        arms = [(name, a) for name, a in (("fp32", r), ("bf16", r.get("bf16"))) if a is not None]
        for name, a in arms:
            add(
                "generation",
                (
                    f"Evaluation generation, tokens/s ({r.get('questions')} questions, greedy, {name})",
                    f"{a.get('batched_tokens_per_s', 0):.0f} (batched)",
                    f"{a.get('one_by_one_tokens_per_s', 0):.1f} (one call per question)",
                    f"**{a.get('ratio', 0):.1f}×** (same answers {a.get('same_answers', 0):.0%})",
                    f"≥ {r.get('target_ratio', 10):.0f}×",
                ),
                arm=a,
            )
        if "held_transposed_ratio" in r:
            add(
                "generation",
                (
                    "Batched generation, fp32, weights held transposed in memory (`tagtune.models.answering`)",
                    f"{r['held_transposed_tokens_per_s']:.0f} tokens/s",
                    f"{r['stored_layout_tokens_per_s']:.0f} (the weights as stored)",
                    f"**{r['held_transposed_ratio']:.2f}×** (same answers {r['held_transposed_same_answers']:.0%})",
                    "same answers, faster",
                ),
                "met_held_transposed",
            )
        for name, a in arms:
            add(
                "generation",
                (
                    f"Chat first token, warm process ({name}; prompt to first streamed piece)",
                    f"{a.get('first_token_s', 0) * 1000:.0f} ms",
                    f"{a.get('first_token_floor_s', 0) * 1000:.0f} ms floor (one forward pass over the prompt)",
                    f"**{a.get('first_token_s', 0) * 1000:.0f} ms**",
                    f"≤ {r.get('target_first_token_s', 0.1) * 1000:.0f} ms",
                ),
                "met_first_token",
                arm=a,
            )
        for name, a in arms:
            if "grounded_first_token_s" not in a:
                continue
            add(
                "generation",
                (
                    f"Grounded chat first token, warm process ({name}; BM25 + the reranker's 8 candidates + prompt)",
                    f"{a['grounded_first_token_s'] * 1000:.0f} ms",
                    f"{a.get('first_token_s', 0) * 1000:.0f} ms ungrounded",
                    f"**{a['grounded_first_token_s'] * 1000:.0f} ms**",
                    f"≤ {r.get('target_first_token_s', 0.1) * 1000:.0f} ms",
                ),
                "met_grounded_first_token",
                arm=a,
            )
    if r := results.get("rerank"):
        add(
            "rerank",
            (
                f"Reranker scoring, question-fact pairs/s ({r.get('pairs')} pairs, {r.get('precision')}): the score's two LM-head rows",
                f"{r.get('pairs_per_s', 0):.1f}",
                f"{r.get('whole_head_pairs_per_s', 0):.1f} (the whole head at the last position)",
                f"**{r.get('ratio', 0):.2f}×** (scores within {r.get('max_score_diff', 0)})",
                "same scores, faster",
            ),
        )
    if r := results.get("orchestration"):
        add(
            "orchestration",
            (
                "Orchestration overhead (Prefect flow + MLflow vs stage functions)",
                f"{r.get('flow_s', 0):.0f} s flow",
                f"{r.get('direct_s', 0):.0f} s direct ({r.get('steps')} steps)",
                f"**{r.get('overhead_s', 0):.0f} s = ≤ {r.get('overhead_share_default', 0):.1%}** of a default "
                f"{r.get('default_steps')}-step run",
            )
            + ("≤ 5%",),
            "met_share",
        )
        add(
            "orchestration",
            (
                "No-op `dvc repro` (everything up to date)",
                f"{r.get('noop_repro_s', 0):.2f} s",
                "",
                f"**{r.get('noop_repro_s', 0):.2f} s, {r.get('stages_run')} stages run**",
            )
            + ("≤ 2 s, 0 stages",),
            "met_noop",
        )
    if r := results.get("memory"):
        add(
            "memory",
            (
                f"Peak RSS, default finetune ({r.get('method')}, {r.get('precision')}, whole process)",
                f"{r.get('peak_rss_mb', 0) / 1024:.2f} GiB",
                "",
                f"**{r.get('peak_rss_mb', 0) / 1024:.2f} GiB**",
            )
            + ("≤ 4 GiB",),
        )
    if r := results.get("chat_start"):
        add(
            "chat_start",
            (
                "`tagtune chat -q` start, fresh process, version cached (LoRA version of the embedded base)",
                f"{r.get('cached_start_s', 0):.1f} s",
                f"{r.get('floor_s', 0):.1f} s floor (torch + transformers + model + answer)",
                f"**{r.get('cached_start_s', 0):.1f} s** (first start {r.get('first_start_s', 0):.1f} s; "
                f"version {r.get('version_bytes', 0) / 1e6:.0f} MB)",
            )
            + ("≤ 3 s",),
        )
    rows += _limits(results)
    rows.append("")
    rows.append(_provenance(results, machine))
    return "\n".join(rows)


def _describe(m: dict[str, Any]) -> str:
    return (
        f"{m['date']} on {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads"
        f"{', AVX512-BF16' if m.get('cpu_bf16') else ''}{', AMX' if m.get('cpu_amx') else ''}"
        f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}), torch {m['torch']}, transformers "
        f"{m['transformers']}, Python {m['python']}; 1-min load average at the start: {m.get('load_avg_1m')}"
    )


def _provenance(results: dict[str, dict[str, Any]], machine: dict[str, Any]) -> str:
    """Where each row was measured. A partial run (`--only`) keeps the other benchmarks' rows, which
    may come from another machine and day: the table must say so, not print one machine for all."""
    by: dict[str, tuple[dict[str, Any], list[str]]] = {}  # machine as JSON (a dict is not hashable)
    for name, r in results.items():
        m = r.get("machine", machine)
        by.setdefault(json.dumps(m, sort_keys=True), (m, []))[1].append(name)
    if len(by) == 1:
        return f"Measured {_describe(next(iter(by.values()))[0])}."
    parts = [f"{', '.join(names)}: {_describe(m)}" for m, names in by.values()]
    return (
        "Measured on more than one machine (a partial `bench.run --only` re-run): " + "; ".join(parts) + "."
    )


def _limits(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per missed target: what the benchmark itself measured about the limit."""
    notes = []
    r = results.get("finetune_throughput", {})
    if r.get("met") is False:
        notes.append(
            f"Fine-tune throughput missed: per-pair ratios {r.get('pair_ratios')}; the seed way computes "
            f"×{r.get('seed_padding_factor')} padding, tagtune trains in {r.get('tagtune_precision')}."
        )
    if r.get("met_packed") is False:
        notes.append(
            f"Packed fine-tune throughput missed: per-pair ratios {r.get('packed_pair_ratios')}; packed "
            f"runs at ×{r.get('packed_vs_shipped')} the shipped default's tokens/s, whose length-grouped "
            "batches already carry little padding, while each packed token attends over its whole row."
        )
    for m in results.get("mfu", {}).get("methods", {}).values():
        if m.get("met") is False:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in m.get("profile_shares", {}).items())
            top = ", ".join(f"{k} {v:.0%}" for k, v in list(m.get("profile_top_ops", {}).items())[:6])
            notes.append(
                f"{m['method'].capitalize()} fine-tune MFU missed: step time (torch.profiler) = "
                f"{shares or 'not profiled (run with --profile)'}" + (f"; top ops: {top}." if top else ".")
            )
    r = results.get("generation", {})
    for name, a in (("fp32", r), ("bf16", r.get("bf16") or {})):
        if a.get("met") is False:
            ops = ", ".join(f"{k} {v:.0%}" for k, v in a.get("profile_top_ops", {}).items())
            notes.append(
                f"Generation ({name}) missed: per-pair ratios {a.get('pair_ratios')}; batched pass "
                f"(torch.profiler, self CPU time): {ops or 'not profiled (run with --profile)'}."
            )
    r = results.get("orchestration", {})
    if r.get("met_share") is False:
        notes.append(
            f"Orchestration overhead missed: {r.get('overhead_s')} s per run, of which Prefect's ephemeral "
            f"server start {r.get('prefect_server_start_s')} s."
        )
    if r.get("met_noop") is False:
        notes.append(
            f"No-op dvc repro missed: runs {r.get('noop_repro_runs_s')} s, {r.get('stages_run')} stages."
        )
    r = results.get("chat_start", {})
    if r.get("met") is False:
        notes.append(
            f"Chat start missed: {r.get('floor_s')} s of its {r.get('cached_start_s')} s is the floor of any "
            "Python chat over this model here (import torch + transformers, load 135M weights, generate)."
        )
    r = results.get("memory", {})
    if r.get("met") is False:
        notes.append(
            f"Memory missed: peak at {r.get('peak_at_s')} s of {r.get('wall_s')} s (see rss_timeline_mb)."
        )
    return ["", *notes] if notes else []


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--only", help="comma-separated subset, e.g. generation,memory")
    args = ap.parse_args(argv)
    quiet()
    names = [n for n, _ in SUITE]
    only = args.only.split(",") if args.only else names
    if bad := [n for n in only if n not in names]:
        ap.error(f"unknown benchmark(s) {bad}; known: {', '.join(names)}")
    machine = machine_info()
    start = time.perf_counter()
    results = {name: {**run_one(name, a), "machine": machine} for name, a in SUITE if name in only}
    total = round(time.perf_counter() - start, 1)
    if args.only and RESULTS.is_file():  # a partial run updates its rows, keeps the others and their machine
        old = json.loads(RESULTS.read_text(encoding="utf-8"))
        kept = {n: {"machine": old.get("machine", machine), **r} for n, r in old.get("results", {}).items()}
        results = {**kept, **results}
    md = table(results, machine)
    doc = {"machine": machine, "total_s": total, "results": results, "table": md}
    RESULTS.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\n{md}\n\n(total {total / 60:.1f} min; written {RESULTS.relative_to(REPO)})")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
