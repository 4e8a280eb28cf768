"""Garbage never passes as success (item 5, item 12: runs left RUNNING, the label audit).

- a diverging run (NaN/inf loss or grad norm) stops with one line, exit 1, no model, MLflow run FAILED;
- evaluate refuses non-finite metrics and never writes `Infinity`/`NaN` into JSON;
- finetune records the sha256 of the weights it wrote; evaluate, register and serving verify it;
- the pre-flight label audit fails a run whose end tag/EOS would not be trained, and logs rendered
  examples with the trained span marked.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_tree, one_line_error, stage_cli, write_params
from tinydata import make_splits

from tagtune.errors import TagtuneError
from tagtune.io import write_jsonl


def _runs(store: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_diverging_run_stops_with_one_line_and_writes_no_model(tmp_path, tiny_llama):
    make_splits(tmp_path / "data")
    write_params(
        tmp_path,
        {
            "paths": {"split": "data/splits"},
            "model": {"base": str(tiny_llama)},
            "finetune": {
                "learning_rate": 1e30,
                "lr_scheduler": "constant",
                "warmup_ratio": 0,
                "max_steps": 8,
                "batch_size": 4,
                "save_steps": 2,
                "logging_steps": 1,
                "precision": "fp32",
            },
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        },
    )
    line = one_line_error(stage_cli(tmp_path, "finetune"))
    assert "finetune:" in line and "not finite" in line and "finetune.learning_rate" in line, line
    assert not (tmp_path / "models" / "finetune").exists()
    ckpts = tmp_path / "models" / "checkpoints"
    assert not any((p / "COMPLETE").exists() for p in ckpts.glob("checkpoint-*"))  # nothing to resume from
    (run,) = _runs(tmp_path / "mlflow.db")
    assert run.info.status == "FAILED"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _eval_workspace(tmp_path: Path, finetuned: Path) -> Path:
    make_splits(tmp_path / "data")
    write_params(
        tmp_path,
        {
            "paths": {"split": "data/splits", "finetune": str(finetuned)},
            "evaluate": {"batch_size": 8, "compare_base": False, "generation": {"max_new_tokens": 4}},
            "mlflow": {"log_runs": False},
        },
    )
    return tmp_path


def test_tampered_weights_are_refused_by_evaluate_register_and_chat(tmp_path, tiny_finetuned):
    finetuned = copy_tree(tiny_finetuned, tmp_path / "finetuned")
    weights = finetuned / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:-50] = bytes(50)  # zero some tensor bytes: still a readable safetensors file
    weights.write_bytes(bytes(data))
    ws = _eval_workspace(tmp_path / "ws", finetuned)
    for stage in ("evaluate", "register"):
        line = one_line_error(stage_cli(ws, stage))
        assert "model.safetensors" in line and "sha256" in line and "training.json" in line, line
    assert not (ws / "reports").exists()

    from tagtune.app.chat import Chatbot

    with pytest.raises(TagtuneError, match="sha256"):
        Chatbot.from_dir(finetuned)


def test_a_truncated_model_is_one_line(tmp_path, tiny_finetuned):
    finetuned = copy_tree(tiny_finetuned, tmp_path / "finetuned")
    weights = finetuned / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = one_line_error(stage_cli(_eval_workspace(tmp_path / "ws", finetuned), "evaluate"))
    assert "model.safetensors" in line, line


def test_training_json_records_the_weights_hash(tiny_finetuned):
    recorded = json.loads((tiny_finetuned / "training.json").read_text())["weights_sha256"]
    assert recorded == {"model/model.safetensors": _sha256(tiny_finetuned / "model" / "model.safetensors")}


def test_evaluate_refuses_non_finite_metrics(tmp_path, tiny_finetuned):
    """A broken model that got past finetune (its hash recorded as if finetune wrote it)."""
    import torch
    from safetensors.torch import load_file, save_file

    finetuned = copy_tree(tiny_finetuned, tmp_path / "finetuned")
    weights = finetuned / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if "norm" in k)
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    training = json.loads((finetuned / "training.json").read_text())
    training["weights_sha256"] = {"model/model.safetensors": _sha256(weights)}
    (finetuned / "training.json").write_text(json.dumps(training))

    ws = _eval_workspace(tmp_path / "ws", finetuned)
    line = one_line_error(stage_cli(ws, "evaluate"))
    assert "not finite" in line and "tuned." in line, line
    assert not (ws / "reports").exists()


def test_json_writers_never_write_infinity(tmp_path):
    with pytest.raises(TagtuneError, match="rows.jsonl:2.*not finite"):
        write_jsonl(tmp_path / "rows.jsonl", [{"loss": 1.0}, {"loss": float("inf")}])


# ------------------------------------------------------------------------------------- label audit
def _split_dir(tmp_path: Path, trailing_untrained: bool) -> Path:
    """A split whose examples end with an untrained segment: EOS would be masked (a template bug)."""
    splits = make_splits(tmp_path / "data")
    if trailing_untrained:
        for name in ("train", "val"):
            path = splits / f"{name}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            for r in rows:
                r["segments"].append(["\n", False])
            write_jsonl(path, rows)
    return splits


def test_label_audit_fails_a_run_whose_eos_is_masked(tmp_path, tiny_llama):
    from stages.finetune import LabelAuditError, finetune
    from tagtune.config import FinetuneConfig, ModelConfig

    splits = _split_dir(tmp_path, trailing_untrained=True)
    cfg = FinetuneConfig(max_steps=2, batch_size=4, precision="fp32")
    with pytest.raises(LabelAuditError, match=r"faq.csv:\d+.*EOS.*not trained"):
        finetune(splits, tmp_path / "out", cfg, ModelConfig(base=str(tiny_llama)), tmp_path / "ck", None)
    assert not (tmp_path / "out").exists() and not list((tmp_path / "ck").glob("checkpoint-*"))


def test_label_audit_logs_rendered_examples_to_mlflow(tmp_path, tiny_llama, monkeypatch):
    from mlflow.tracking import MlflowClient

    from stages.finetune import finetune
    from tagtune.config import FinetuneConfig, MlflowConfig, ModelConfig

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the cwd
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    splits = _split_dir(tmp_path, trailing_untrained=False)
    store = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = FinetuneConfig(max_steps=2, batch_size=4, precision="fp32")
    facts = finetune(splits, tmp_path / "out", cfg, ModelConfig(base=str(tiny_llama)), tmp_path / "ck", store)
    client = MlflowClient(store.tracking_uri)
    local = client.download_artifacts(facts["mlflow_run_id"], "finetune/label_audit.md", str(tmp_path / "dl"))
    text = Path(local).read_text()
    assert "⟦" in text and "<END>" in text and "⟧" in text and "EOS" in text
    assert text == (tmp_path / "out" / "label_audit.md").read_text()
    shutil.rmtree(tmp_path / "dl")
