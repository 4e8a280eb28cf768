"""Smoke tests of bench/: every benchmark's code path at the tiniest size (tiny model, 1-2 steps).

No assertion on speed (these are not timed tests): only that each produces a well-formed result.
"""

from __future__ import annotations

import json
import math

import pytest

from bench import chat_start, finetune_throughput, generation, memory, mfu, orchestration, run
from bench._common import machine_info


def _well_formed(r: dict, name: str, positive: tuple[str, ...]) -> None:
    assert r["bench"] == name
    assert isinstance(r["met"], bool)
    json.dumps(r)  # what bench.run writes
    for key in positive:
        assert isinstance(r[key], int | float) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])


def test_finetune_throughput_runs_both_arms(tiny_llama):
    r = finetune_throughput.run(str(tiny_llama), steps=1, repeats=1, seed_max_length=64)
    _well_formed(r, "finetune_throughput", ("seed_tokens_per_s", "tagtune_tokens_per_s", "ratio"))
    assert r["seed_runs"][0]["steps"] == r["tagtune_runs"][0]["steps"] == 1
    assert r["seed_runs"][0]["padded_tokens"] >= r["seed_runs"][0]["tokens_seen"]


def test_mfu_of_a_full_finetune(tiny_llama):
    r = mfu.run(str(tiny_llama), steps=2, logging_steps=1, peak_repeats=1, peak_sizes=(128,), profile=True)
    _well_formed(r, "mfu", ("tokens_per_s", "flops_per_token", "achieved_gflops", "peak_gflops_after", "mfu"))
    assert r["method"] == "full" and r["n_matmul_params"] > 0
    assert r["profile_shares"]["matmul"] > 0 and 0.99 < sum(r["profile_shares"].values()) < 1.01


def test_generation_batched_vs_one_by_one(tiny_llama):
    r = generation.run(str(tiny_llama), questions=3, repeats=1, max_new_tokens=3)
    _well_formed(r, "generation", ("batched_tokens_per_s", "one_by_one_tokens_per_s", "ratio"))
    assert r["batched_runs"][0]["tokens"] > 0 and r["one_by_one_runs"][0]["tokens"] > 0


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
            "met": False,
            "mfu": 0.3,
            "profile_shares": {"matmul": 0.6, "attention": 0.4},
        },
    }
    md = run.table(results, machine_info())
    assert "| Peak RSS" in md and "2.93 GiB" in md and "failed: exit 1" in md and "cores" in md
    assert "| Full fine-tune MFU" in md and "**missed**" in md and "MFU missed: step time" in md
