"""Killed and corrupted training runs lose nothing (item 4, item 12: loss history; the SIGKILL classic).

- SIGKILL mid-train → the re-run resumes from the last complete checkpoint, trains exactly the
  missing steps, and loss.csv / MLflow hold every logged step exactly once;
- a corrupt newest checkpoint (truncated or flipped bytes) is skipped with a warning naming it and
  the previous complete one is used.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_env
from tinydata import make_splits

from stages.finetune import finetune
from tagtune.config import FinetuneConfig, ModelConfig

DRIVER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import stages.finetune as ft
    from tagtune.config import FinetuneConfig, MlflowConfig, ModelConfig

    root, kill_at, base, store = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    real = ft._callbacks

    def callbacks(*a, **k):
        from transformers import TrainerCallback

        class Killer(TrainerCallback):
            # after the step's metrics were logged (and sent to MLflow): the worst moment to die
            def on_log(self, args, state, control, logs=None, **kw):
                if state.global_step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        return [*real(*a, **k), Killer()]

    ft._callbacks = callbacks
    cfg = FinetuneConfig(max_steps=12, save_steps=4, batch_size=4, logging_steps=1, precision="fp32",
                         learning_rate=5e-3, threads=1)
    ft.finetune(root / "splits", root / "out", cfg, ModelConfig(base=base), root / "ckpt",
                MlflowConfig(tracking_uri=f"sqlite:///{store}", experiment="resume"))
""")


def _losses(out: Path) -> dict[int, float]:
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice in loss.csv: {steps}"
    return {int(r["step"]): float(r["loss"]) for r in rows}


def _train(root: Path, kill_at: int, base: Path, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(root.parent / "driver.py"), str(root), str(kill_at), str(base), str(store)],
        env=run_env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.integration
def test_sigkill_mid_train_resumes_with_no_lost_steps_and_an_intact_loss_history(tmp_path, tiny_llama):
    from mlflow.tracking import MlflowClient

    (tmp_path / "driver.py").write_text(DRIVER)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    for root in (killed, whole):
        make_splits(root)
    store = tmp_path / "mlflow.db"

    r = _train(killed, 11, tiny_llama, store)
    assert r.returncode == -9, r.stderr[-3000:]  # really SIGKILLed, after checkpoint-8
    assert not (killed / "out").exists()
    r = _train(killed, 0, tiny_llama, store)
    assert r.returncode == 0, r.stderr[-3000:]
    facts = json.loads((killed / "out" / "training.json").read_text())
    assert facts["resumed_from_step"] == 8 and facts["steps"] == 12

    r = _train(whole, 0, tiny_llama, tmp_path / "other.db")  # the same run, never interrupted
    assert r.returncode == 0, r.stderr[-3000:]
    resumed, reference = _losses(killed / "out"), _losses(whole / "out")
    assert sorted(resumed) == list(range(1, 13))  # steps 1-8 came back from checkpoint-8
    before = {s: v for s, v in resumed.items() if s <= 8}
    assert before == pytest.approx({s: reference[s] for s in before}, rel=1e-6)  # the killed run's own losses
    # 9-12 were trained once more, on the same batches (HF's resume is not bit-exact: optimizer state reload)
    assert {s: resumed[s] for s in range(9, 13)} == pytest.approx(
        {s: reference[s] for s in range(9, 13)}, rel=1e-2
    )

    client = MlflowClient(f"sqlite:///{store}")
    history = client.get_metric_history(facts["mlflow_run_id"], "train/loss")
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, 13)), steps  # every step exactly once, across both processes
    assert client.get_run(facts["mlflow_run_id"]).info.status == "FINISHED"


FAST = dict(max_steps=8, save_steps=4, batch_size=4, logging_steps=2, precision="fp32", learning_rate=5e-3)


def _corrupt(ckpt: Path, how: str) -> None:
    weights = ckpt / "adapter_model.safetensors"
    data = weights.read_bytes()
    if how == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:  # flip bytes in the tensor data: the header still parses
        weights.write_bytes(data[:-64] + bytes(b ^ 0xFF for b in data[-64:]))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_llama, how, capfd):
    splits = make_splits(tmp_path / "data")
    cfg, base = FinetuneConfig(**FAST), ModelConfig(base=str(tiny_llama))
    finetune(splits, tmp_path / "out", cfg, base, tmp_path / "ckpt", None)
    _corrupt(tmp_path / "ckpt" / "checkpoint-8", how)
    capfd.readouterr()

    facts = finetune(splits, tmp_path / "out", cfg, base, tmp_path / "ckpt", None)
    err = capfd.readouterr().err
    assert "checkpoint-8" in err and "unreadable" in err and "checkpoint-4" in err, err
    assert facts["resumed_from_step"] == 4 and facts["steps"] == 8


def test_every_checkpoint_corrupt_starts_fresh(tmp_path, tiny_llama, capfd):
    splits = make_splits(tmp_path / "data")
    cfg, base = FinetuneConfig(**FAST), ModelConfig(base=str(tiny_llama))
    finetune(splits, tmp_path / "out", cfg, base, tmp_path / "ckpt", None)
    for step in (4, 8):
        _corrupt(tmp_path / "ckpt" / f"checkpoint-{step}", "truncate")
    facts = finetune(splits, tmp_path / "out", cfg, base, tmp_path / "ckpt", None)
    assert facts["resumed_from_step"] == 0 and facts["steps"] == 8
    assert "checkpoint-4" in capfd.readouterr().err
