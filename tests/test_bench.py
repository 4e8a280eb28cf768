"""Smoke tests of bench/: every benchmark's code path at the tiniest size (tiny model, 1-2 steps).

No assertion on speed (these are not timed tests): only that each produces a well-formed result.
"""

from __future__ import annotations

import json
import math

import pytest

from bench import chat_start, finetune_throughput, generation, memory, mfu, orchestration, rerank, run
from bench._common import machine_info


def _well_formed(r: dict, name: str, positive: tuple[str, ...]) -> None:
    assert r["bench"] == name
    assert isinstance(r["met"], bool)
    json.dumps(r)  # what bench.run writes
    for key in positive:
        assert isinstance(r[key], int | float) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])


def test_finetune_throughput_runs_every_arm(tiny_llama):
    r = finetune_throughput.run(str(tiny_llama), steps=1, repeats=1, seed_max_length=64, packed_batch=2)
    positive = ("seed_tokens_per_s", "tagtune_tokens_per_s", "ratio", "packed_tokens_per_s", "packed_ratio")
    _well_formed(r, "finetune_throughput", positive)
    assert isinstance(r["met_packed"], bool)
    assert r["seed_runs"][0]["steps"] == r["tagtune_runs"][0]["steps"] == r["packed_runs"][0]["steps"] == 1
    assert r["seed_runs"][0]["padded_tokens"] >= r["seed_runs"][0]["tokens_seen"]
    assert r["packed_runs"][0]["train_rows"] < r["tagtune_runs"][0]["train_rows"]  # examples share rows


def test_mfu_of_a_full_and_a_lora_finetune(tiny_llama):
    r = mfu.run(str(tiny_llama), steps=2, logging_steps=1, peak_repeats=1, peak_sizes=(128,), profile=True)
    assert r["bench"] == "mfu" and isinstance(r["met"], bool) and set(r["methods"]) == {"full", "lora"}
    for m in r["methods"].values():
        _well_formed(
            {"bench": "mfu", **m}, "mfu", ("tokens_per_s", "flops_per_token", "achieved_gflops", "mfu")
        )
        assert m["profile_shares"]["matmul"] > 0 and 0.99 < sum(m["profile_shares"].values()) < 1.01
    full, lora = r["methods"]["full"], r["methods"]["lora"]
    assert full["precision"] == "fp32" and full["n_adapter_params"] == 0 < lora["n_adapter_params"]
    assert full["n_matmul_params"] == lora["n_matmul_params"] > full["n_lm_head_params"] > 0
    assert 0 < full["lm_head_share_of_positions"] < 1  # prompt positions run no LM head


def test_step_flops_count_what_a_lora_step_runs(tiny_llama):
    """4 FLOPs per frozen weight (forward + input gradient), 6 per adapter weight, LM head only where
    the next token is trained, attention over each example's own tokens."""
    from tagtune.config import FinetuneConfig

    feats = [{"length": 4, "labels": [-100, -100, 7, 8]}, {"length": 2, "labels": [-100, 9]}]
    full = mfu.step_flops(str(tiny_llama), feats, FinetuneConfig(method="full"))
    lora = mfu.step_flops(str(tiny_llama), feats, FinetuneConfig(method="lora"))
    body, head = full["n_matmul_params"] - full["n_lm_head_params"], full["n_lm_head_params"]
    attention = 12 * full["layers"] * full["attn_dim"] * (16 + 4) / 6
    assert full["lm_head_share_of_positions"] == pytest.approx(3 / 6, abs=1e-3)
    assert full["flops_per_token"] == pytest.approx(6 * body + 6 * head * 0.5 + attention)
    adapters = lora["n_adapter_params"]
    assert lora["flops_per_token"] == pytest.approx(4 * body + 4 * head * 0.5 + 6 * adapters + attention)


def test_generation_batched_vs_one_by_one(tiny_llama):
    r = generation.run(str(tiny_llama), questions=3, repeats=1, max_new_tokens=3)
    _well_formed(r, "generation", ("batched_tokens_per_s", "one_by_one_tokens_per_s", "ratio"))
    assert r["batched_runs"][0]["tokens"] > 0 and r["one_by_one_runs"][0]["tokens"] > 0


def test_rerank_scores_alike_with_two_head_rows_and_the_whole_head(tiny_llama):
    r = rerank.run(str(tiny_llama), questions=2, repeats=1)
    _well_formed(r, "rerank", ("pairs_per_s", "whole_head_pairs_per_s", "ratio"))
    assert r["pairs"] > 2 and r["max_score_diff"] <= rerank.SAME_SCORE  # the same score, read two ways


def test_memory_of_the_finetune_stage_in_a_child(tiny_llama):
    r = memory.run(str(tiny_llama), steps=1)
    _well_formed(r, "memory", ("peak_rss_mb", "stage_peak_rss_mb_after_training"))
    assert r["steps"] == 1 and r["peak_rss_mb"] >= r["stage_peak_rss_mb_after_training"] * 0.99


@pytest.mark.integration  # starts Prefect's ephemeral API server and runs the dvc CLI
def test_orchestration_flow_vs_direct_and_noop_repro(tiny_llama):
    tiny = ["finetune.max_length=64", "finetune.batch_size=4", "retrieval.enabled=false"]
    r = orchestration.run(
        str(tiny_llama), 2, 2, 1, max_new_tokens=3, extra=tiny, warm_prefect=False, noop_repeats=1
    )
    _well_formed(r, "orchestration", ("flow_s", "direct_s", "steady_step_s", "noop_repro_s"))
    assert r["stages_run"] == 0  # the flow left the workspace up to date
    assert set(r["direct_stage_s"]) == {
        "feedback",
        "ingest",
        "format",
        "split",
        "index",
        "finetune",
        "evaluate",
        "register",
    }


def test_chat_start_first_cached_and_floor(tiny_llama):
    r = chat_start.run(repeats=1, steps=2, base=str(tiny_llama))
    _well_formed(r, "chat_start", ("first_start_s", "cached_start_s", "floor_s", "version_bytes"))
    assert r["same_answer_every_start"]


def test_readme_table_has_a_row_per_target_and_the_machine():
    results = {
        "memory": {
            "bench": "memory",
            "method": "lora",
            "precision": "bf16",
            "peak_rss_mb": 3000.0,
            "met": True,
        },
        "generation": {"bench": "generation", "error": "exit 1"},
        "mfu": {
            "bench": "mfu",
            "device": "cpu",
            "met": False,
            "methods": {"full": _mfu(0.7), "lora": _mfu(0.3)},
        },
        "finetune_throughput": {
            **{"bench": "finetune_throughput", "ratio": 25.0, "met": True, "packed_ratio": 26.0},
            **{"met_packed": False, "packed_target_ratio": 30.0, "packed_vs_shipped": 1.04},
        },
    }
    md = run.table(results, machine_info())
    assert "| Peak RSS" in md and "2.93 GiB" in md and "failed: exit 1" in md and "cores" in md
    assert "| Full fine-tune MFU" in md and "| LoRA fine-tune" in md and "**missed**" in md
    assert "Lora fine-tune MFU missed: step time" in md and "aten::mm 60%" in md
    assert "| Fine-tune throughput with `finetune.packing: true`" in md and "≥ 30×" in md
    assert "Packed fine-tune throughput missed" in md


def test_a_partial_rerun_keeps_each_rows_machine():
    """`bench.run --only X` keeps the other rows: the table must not print X's machine under them."""
    here, there = machine_info(), {**machine_info(), "cpu": "Another CPU", "date": "2026-01-01 00:00 UTC"}
    mem = {"bench": "memory", "method": "lora", "precision": "bf16", "peak_rss_mb": 3000.0, "met": True}
    results = {"memory": {**mem, "machine": there}, "generation": {"bench": "generation", "machine": here}}
    md = run.table(results, here)
    assert "more than one machine" in md and "memory: 2026-01-01 00:00 UTC on Another CPU" in md
    assert f"generation: {here['date']} on {here['cpu']}" in md
    one = run.table({"memory": {**mem, "machine": here}}, here)
    assert "more than one machine" not in one and f"Measured {here['date']} on {here['cpu']}" in one


def _mfu(mfu: float) -> dict:
    """A bench.mfu method result as the README table reads it."""
    return {
        **{"method": "lora" if mfu < 0.5 else "full", "precision": "bf16", "mfu": mfu, "met": mfu > 0.5},
        **{"achieved_gflops": 300.0, "tokens_per_s": 600.0, "peak_gflops_before": 1000.0},
        **{
            "peak_gflops_after": 990.0,
            "target_mfu": 0.6,
            "profile_shares": {"matmul": 0.6, "attention": 0.4},
        },
        "profile_top_ops": {"aten::mm": 0.6},
    }
