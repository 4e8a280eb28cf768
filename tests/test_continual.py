"""Continual retraining: `finetune.init: champion` continues the registry's champion on the rows it has
not seen plus a replayed share of those it has."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tinydata import make_splits, qa_rows

from stages.evaluate import evaluate
from stages.finetune import finetune, warm_start_rows
from stages.register import register
from tagtune.config import EvaluateConfig, FinetuneConfig, MlflowConfig, ModelConfig, RegisterConfig
from tagtune.errors import ConfigError
from tagtune.io import read_jsonl
from tagtune.registry import champion_start

SFT = dict(max_steps=6, batch_size=4, save_steps=100, logging_steps=2, learning_rate=5e-3, precision="fp32")


def test_warm_start_rows_are_the_new_ones_plus_a_seeded_replay_share():
    train = [{"id": f"e{i}"} for i in range(10)]
    seen = {f"e{i}" for i in range(8)}
    rows, counts = warm_start_rows(train, seen, 0.5, seed=1)
    assert counts == {"new": 2, "replayed": 4, "seen": 8}
    assert [r["id"] for r in rows][-2:] == ["e8", "e9"] and len(rows) == 6
    assert warm_start_rows(train, seen, 0.5, seed=1)[0] == rows  # deterministic
    assert warm_start_rows(train, seen, 0.0, seed=1)[0] == train[8:]
    assert warm_start_rows(train, seen, 1.0, seed=1)[0] == train
    assert warm_start_rows(train, set(), 0.5, seed=1)[0] == train  # nothing seen: all new


@pytest.mark.integration
def test_warm_start_continues_the_champion(tmp_path, tiny_llama):
    from mlflow import MlflowClient

    cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="warm", timeout_s=10)
    base = ModelConfig(base=str(tiny_llama))
    v1_splits = make_splits(tmp_path / "d1", rows=qa_rows(n_facts=8))
    finetune(v1_splits, tmp_path / "v1", FinetuneConfig(**SFT), base, tmp_path / "ck1", cfg)
    evaluate(
        v1_splits, tmp_path / "v1", tmp_path / "e1", EvaluateConfig(batch_size=8, compare_base=False), cfg
    )
    rec = register(tmp_path / "v1", tmp_path / "e1", tmp_path / "r1", RegisterConfig(model_name="warm"), cfg)
    MlflowClient(cfg.tracking_uri).set_registered_model_alias("warm", "champion", rec["version"])

    start = champion_start("warm", cfg, tmp_path / "pulled")
    v1_train = [ex["id"] for ex in read_jsonl(v1_splits / "train.jsonl")]
    assert start["version"] == rec["version"] and start["train_ids"] == v1_train

    v2_splits = make_splits(tmp_path / "d2", rows=qa_rows(n_facts=10))  # two new facts
    v2_train = read_jsonl(v2_splits / "train.jsonl")
    seen = sum(ex["id"] in set(v1_train) for ex in v2_train)
    assert 0 < seen < len(v2_train)
    # a vanishing learning rate: the warm-started adapter must still be the champion's
    warm = FinetuneConfig(**{**SFT, "learning_rate": 1e-12}, init="champion", replay=0.5)
    facts = finetune(v2_splits, tmp_path / "v2", warm, base, tmp_path / "ck2", cfg, start=start)
    rows = {"new": len(v2_train) - seen, "replayed": round(0.5 * seen), "seen": seen}
    assert facts["init"] == {
        "from": "champion",
        "version": rec["version"],
        "run_id": start["run_id"],
        "rows": rows,
    }
    assert facts["train_examples"] == rows["new"] + rows["replayed"]
    champion = load_file(str(tmp_path / "v1" / "adapter" / "adapter_model.safetensors"))
    continued = load_file(str(tmp_path / "v2" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(champion[k], continued[k], atol=1e-6) for k in champion)

    with pytest.raises(
        ConfigError, match="finetune.init: champion .* is a lora model, finetune.method is 'full'"
    ):
        finetune(v2_splits, tmp_path / "v3", FinetuneConfig(**SFT, method="full", init="champion"), base,
                 tmp_path / "ck3", cfg, start=start)  # fmt: skip
    assert not (tmp_path / "v3").exists()
