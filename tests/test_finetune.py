"""finetune on tiny random-init Llama and GPT-2 models: what trains, what must not, labels, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tinydata import cls_rows, make_splits, qa_rows

from stages.finetune import finetune
from tagtune.config import FinetuneConfig, FormatConfig, ModelConfig, RefusalConfig, TagsConfig
from tagtune.encoding import (
    IGNORE_INDEX,
    PackCollator,
    PadCollator,
    TrainedLogitsOnly,
    build_lm_features,
    encode_example,
    pack_rows,
)
from tagtune.models import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
FAST = dict(max_steps=6, batch_size=4, save_steps=100, logging_steps=2, learning_rate=5e-3, precision="fp32")


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def _run(tmp_path: Path, base: Path, **kw) -> dict:
    splits = make_splits(tmp_path / "data")
    cfg = FinetuneConfig(**{**FAST, **kw})
    return finetune(splits, tmp_path / "out", cfg, ModelConfig(base=str(base)), tmp_path / "ckpt", None)


# ------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_labels_mask_prompt_and_keep_end_tag_and_eos_when_pad_is_eos(arch, request):
    tok = load_tokenizer(str(request.getfixturevalue(arch)))
    assert tok.pad_token_id == tok.eos_token_id  # the case that silently masks EOS in many scripts
    segs = [["Where is the harbour? <QUESTION>\n", False], ["East of the bridge. <END>", True]]
    enc = encode_example(segs, tok, max_length=128)
    n_prompt = len(tok(segs[0][0], add_special_tokens=False)["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert enc["labels"][-1] == tok.eos_token_id  # EOS trained: the model learns to stop
    answer = tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX])
    assert "<END>" in answer and "harbour" not in answer


def test_truncation_that_removes_every_answer_token_drops_the_example(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    segs = [["What time does the museum open? " * 10, False], ["9 am <END>", True]]
    feats, counts = build_lm_features([{"segments": segs}], tok, max_length=16)
    assert feats == [] and counts == {"truncated": 0, "dropped": 1}


EXAMPLES = [
    [["Where is the harbour? <QUESTION>\n", False], ["East of the old bridge. <END>", True]],
    [["Open? <QUESTION>\n", False], ["9 am. <END>", True]],
    [["What time does the museum open on Sundays? <QUESTION>\n", False], ["Noon. <END>", True]],
    [["Harbour? <QUESTION>\n", False], ["East. <END>", True]],
]


def _per_example_losses(model, feats: list[dict]) -> list[tuple[float, int]]:
    """(mean loss, tokens that carry loss) of each example run alone, unpadded."""
    out = []
    with torch.no_grad():
        for f in feats:
            ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
            k = int((labels[0, 1:] != IGNORE_INDEX).sum())  # shifted: tokens that carry loss
            out.append((model(input_ids=ids, labels=labels).loss.item(), k))
    return out


def _weighted(losses: list[tuple[float, int]]) -> float:
    return sum(loss * k for loss, k in losses) / sum(k for _, k in losses)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_padded_batch_loss_equals_per_example_loss(arch, request):
    """Dynamic padding must not change the loss: batch loss == token-weighted unpadded losses, also
    when the LM head runs on trained positions only (TrainedLogitsOnly, what finetune uses)."""
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(arch)
    tok = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    feats = [encode_example(s, tok, 128) for s in EXAMPLES]
    batch = PadCollator(tok.pad_token_id)(feats)
    assert batch["input_ids"].shape[1] == max(len(f["input_ids"]) for f in feats)
    trained_only = TrainedLogitsOnly(PadCollator(tok.pad_token_id))(feats)
    expected = _weighted(_per_example_losses(model, feats))
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(expected, rel=1e-5)
        out = model(**trained_only)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.logits.shape[0] == sum(k for _, k in _per_example_losses(model, feats))  # no prompt logits


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_packed_rows_give_each_example_its_unpacked_loss(arch, request):
    """Packed examples are invisible to each other: every example's loss inside a packed row equals
    its loss run alone, and the batch loss equals the token-weighted mean. The same row without the
    4D mask (a plain 2D mask, position_ids still restarting) changes the later examples' logits: the
    model really uses the mask."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(arch)
    tok = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    feats = [{**encode_example(s, tok, 128), "origin": f"ex:{i}"} for i, s in enumerate(EXAMPLES)]
    for f in feats:
        f["length"] = len(f["input_ids"])
    rows = pack_rows(feats, max_length=40)
    assert len(rows) < len(feats) and all(r["length"] <= 40 for r in rows)
    assert sorted(e["origin"] for r in rows for e in r["examples"]) == [f["origin"] for f in feats]
    batch = PackCollator(tok.pad_token_id)(rows)
    two_d = batch["attention_mask"].diagonal(dim1=-2, dim2=-1)[:, 0]
    with torch.no_grad():
        out = model(**batch)
        leaky = _by_example(model(**{**batch, "attention_mask": two_d}).logits, rows)
        alone = {f["origin"]: model(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in feats}
    assert out.loss.item() == pytest.approx(_weighted(_per_example_losses(model, feats)), rel=1e-5)
    packed = _by_example(out.logits, rows)
    for f, (loss, _) in zip(feats, _per_example_losses(model, feats), strict=True):
        logits, labels = packed[f["origin"]], torch.tensor(f["labels"])
        assert F.cross_entropy(logits[:-1], labels[1:]).item() == pytest.approx(loss, rel=1e-5)
    later = [e["origin"] for r in rows for e in r["examples"][1:]]  # the first of a row sees nothing before
    assert later and all(torch.allclose(packed[o], alone[o], atol=1e-5) for o in later)
    assert not any(torch.allclose(leaky[o], alone[o], atol=1e-4) for o in later)
    trained_only = TrainedLogitsOnly(PackCollator(tok.pad_token_id))(rows)
    with torch.no_grad():
        assert model(**trained_only).loss.item() == pytest.approx(out.loss.item(), rel=1e-5)


def _by_example(logits, rows) -> dict[str, torch.Tensor]:
    """Each packed example's logits, cut from its row by its span."""
    spans = {}
    for i, row in enumerate(rows):
        at = 0
        for ex in row["examples"]:
            spans[ex["origin"]] = logits[i, at : at + ex["length"]]
            at += ex["length"]
    return spans


def test_packing_never_predicts_an_example_from_the_previous_one(tiny_llama):
    """Each example's first label is masked in its row, so the count of loss-carrying tokens (what
    Trainer divides by: num_items_in_batch) is the unpacked count; pads attend to nothing."""
    tok = load_tokenizer(str(tiny_llama))
    feats = [encode_example(s, tok, 128) for s in EXAMPLES]
    for i, f in enumerate(feats):
        f.update(length=len(f["input_ids"]), origin=f"ex:{i}")
    rows = pack_rows(feats, max_length=64)
    batch = PackCollator(tok.pad_token_id)(rows)
    unpacked = PadCollator(tok.pad_token_id)(feats)
    count = lambda b: int((b["labels"][:, 1:] != IGNORE_INDEX).sum())  # noqa: E731
    assert count(batch) == count(unpacked)
    for i, row in enumerate(rows):
        starts = torch.tensor([0, *[e["length"] for e in row["examples"]]]).cumsum(0)[:-1]
        assert (batch["labels"][i, starts] == IGNORE_INDEX).all()
        assert (batch["position_ids"][i, starts] == 0).all()
    real = batch["attention_mask"].diagonal(dim1=-2, dim2=-1).sum()
    assert real == sum(f["length"] for f in feats)  # what finetune counts as tokens seen
    for i, row in enumerate(rows):  # a pad attends to nothing and nothing attends to it
        mask = batch["attention_mask"][i, 0]
        assert not mask[row["length"] :].any() and not mask[:, row["length"] :].any()


# ------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_lora_changes_adapter_weights_and_not_base_weights(tmp_path, arch, request):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = request.getfixturevalue(arch)
    facts = _run(tmp_path, base)
    assert facts["steps"] == 6 and facts["trainable_params"] < facts["total_params"]
    before = _weights(base)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "out" / "adapter")
    lora_b = {k: v for k, v in peft.state_dict().items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # lora_B starts at zero
    for k, v in peft.state_dict().items():
        if "base_layer.weight" in k:
            name = k.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(v, before[name], rtol=0, atol=0)
    merged = _weights(tmp_path / "out" / "model")
    assert any(not torch.equal(merged[k], before[k]) for k in before if k in merged)


def test_freeze_trains_only_the_last_blocks(tmp_path, tiny_llama):
    _run(tmp_path, tiny_llama, method="freeze", trainable_layers=1)
    before, after = _weights(tiny_llama), _weights(tmp_path / "out" / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed), changed


def test_full_finetune_changes_embeddings(tmp_path, tiny_gpt2):
    facts = _run(tmp_path, tiny_gpt2, method="full")
    assert facts["trainable_params"] == facts["total_params"]
    before, after = _weights(tiny_gpt2), _weights(tmp_path / "out" / "model")
    assert not torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])


def test_special_tag_tokens_are_added_and_the_saved_model_reloads(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ood.txt").write_text("What is the capital of France?\n")
    fmt = FormatConfig(tags=TagsConfig(special_tokens=True), refusal=RefusalConfig(questions="ood.txt"))
    splits = make_splits(tmp_path / "data", fmt=fmt)
    finetune(
        splits,
        tmp_path / "out",
        FinetuneConfig(**FAST),
        ModelConfig(base=str(tiny_llama)),
        tmp_path / "ck",
        None,
    )
    tok = load_tokenizer(str(tmp_path / "out" / "model"))
    assert len(tok("<END>", add_special_tokens=False)["input_ids"]) == 1  # one token, not "<", "END", ">"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base.resize_token_embeddings(len(tok))
    PeftModel.from_pretrained(base, tmp_path / "out" / "adapter")  # no size-mismatch error


def test_classification_trains_and_predicts(tmp_path, tiny_gpt2):
    from transformers import AutoModelForSequenceClassification

    splits = make_splits(tmp_path / "data", rows=cls_rows(), fmt=FormatConfig())
    facts = finetune(
        splits,
        tmp_path / "out",
        FinetuneConfig(**{**FAST, "task": "classification", "max_steps": 10}),
        ModelConfig(base=str(tiny_gpt2)),
        tmp_path / "ck",
        None,
    )
    assert facts["labels"] == ["neg", "pos"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model").eval()
    tok = load_tokenizer(str(tmp_path / "out" / "model"))
    assert model.config.pad_token_id == tok.pad_token_id  # GPT-2 has none by default
    enc = tok(["great film", "terrible and bad plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    assert len(pred) == 2 and set(pred) <= {0, 1}
    assert model.config.id2label[pred[0]] in ("neg", "pos")


def test_task_mismatch_is_a_clear_error(tmp_path, tiny_llama):
    from tagtune.errors import DataError

    splits = make_splits(tmp_path / "data")
    with pytest.raises(DataError, match="finetune.task"):
        finetune(
            splits,
            tmp_path / "out",
            FinetuneConfig(**FAST, task="classification"),
            ModelConfig(base=str(tiny_llama)),
            tmp_path / "ck",
            None,
        )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- resume
DRIVER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import stages.finetune as ft
    from tagtune.config import FinetuneConfig, ModelConfig

    kill_at = int(sys.argv[2])
    real = ft._callbacks

    def callbacks(*a, **k):
        from transformers import TrainerCallback

        class Killer(TrainerCallback):
            # runs before MarkComplete: checkpoint-<kill_at> is on disk but not marked complete
            def on_save(self, args, state, control, **kw):
                if state.global_step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        return [Killer(), *real(*a, **k)] if kill_at else real(*a, **k)

    ft._callbacks = callbacks
    root = Path(sys.argv[1])
    cfg = FinetuneConfig(max_steps=12, save_steps=4, batch_size=4, logging_steps=1, precision="fp32")
    ft.finetune(root / "data" / "splits", root / "out", cfg, ModelConfig(base=sys.argv[3]), root / "ckpt", None)
""")


def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path, tiny_llama):
    make_splits(tmp_path / "data")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, str(driver), str(tmp_path), "8", str(tiny_llama)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # really SIGKILLed, mid-save
    assert (tmp_path / "ckpt" / "checkpoint-4" / "COMPLETE").is_file()
    assert not (tmp_path / "ckpt" / "checkpoint-8" / "COMPLETE").exists()
    assert not (tmp_path / "out").exists()  # no partial output

    resumed = subprocess.run(
        [sys.executable, str(driver), str(tmp_path), "0", str(tiny_llama)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "incomplete checkpoint" in resumed.stderr and "checkpoint-8" in resumed.stderr
    facts = json.loads((tmp_path / "out" / "training.json").read_text())
    assert facts["resumed_from_step"] == 4 and facts["steps"] == 12


def test_changed_data_does_not_resume_stale_checkpoints(tmp_path, tiny_llama):
    _run(tmp_path, tiny_llama)
    more_data = make_splits(tmp_path / "data2", rows=qa_rows(n_facts=9))  # same params, new rows
    facts = finetune(
        more_data,
        tmp_path / "out",
        FinetuneConfig(**FAST),
        ModelConfig(base=str(tiny_llama)),
        tmp_path / "ckpt",
        None,
    )
    assert facts["resumed_from_step"] == 0 and facts["steps"] == 6


def test_unchanged_rerun_resumes_at_the_end_and_trains_zero_steps(tmp_path, tiny_llama):
    first = _run(tmp_path, tiny_llama, save_steps=3)
    model = _weights(tmp_path / "out" / "model")
    again = _run(tmp_path, tiny_llama, save_steps=3)
    assert first["steps"] == again["steps"] == 6
    assert again["resumed_from_step"] == 6 and again["train_loss"] > 0
    after = _weights(tmp_path / "out" / "model")
    assert all(torch.equal(model[k], after[k]) for k in model)  # no extra step was taken


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_packed_finetune_trains_counts_real_tokens_and_resumes(tmp_path, arch, request):
    """finetune.packing: each epoch sees every real token once (counted from the mask's diagonal, not
    its cells), every example passes the label audit, and a run cut before its last checkpoint
    resumes from the one before and trains on to the same step."""
    from tagtune.io import read_jsonl

    base = request.getfixturevalue(arch)
    kw = dict(packing=True, max_length=64, batch_size=2, max_steps=0, epochs=2, save_steps=2)
    facts = _run(tmp_path, base, **kw)
    rows = read_jsonl(tmp_path / "data" / "splits" / "train.jsonl")
    feats, _ = build_lm_features(rows, load_tokenizer(str(base)), 64)
    assert facts["train_examples"] == len(feats) > facts["train_rows"]
    assert facts["tokens_seen"] == 2 * sum(f["length"] for f in feats)  # real tokens, two epochs
    steps = facts["steps"]
    assert steps == 2 * -(-facts["train_rows"] // 2) and facts["train_loss"] > 0
    assert f"{len(feats)} train examples checked" in (tmp_path / "out" / "label_audit.md").read_text()

    import shutil

    shutil.rmtree(tmp_path / "ckpt" / f"checkpoint-{steps}")  # as if killed before the last save
    again = _run(tmp_path, base, **kw)
    assert again["resumed_from_step"] == steps - 2 and again["steps"] == steps
    resumed = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    before = load_file(str(tmp_path / "ckpt" / f"checkpoint-{steps - 2}" / "adapter_model.safetensors"))
    assert any(not torch.equal(resumed[k], before[k]) for k in before)  # it trained on from there


def test_packing_is_for_causal_lm_only():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="packing: true is for task causal_lm"):
        FinetuneConfig(packing=True, task="classification")


def test_cpu_training_runs_under_the_math_attention_kernel():
    """attention_kernel: auto picks SDPA's math kernel on CPU for padded batches (measured faster than
    its flash kernel on short rows), not for packed rows; `default` leaves PyTorch's choice alone."""
    from stages.finetune import _attention_kernel

    if torch.cuda.is_available():
        pytest.skip("auto keeps PyTorch's kernel choice on GPUs")
    with _attention_kernel(FinetuneConfig()):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    for cfg in (FinetuneConfig(attention_kernel="default"), FinetuneConfig(packing=True)):
        with _attention_kernel(cfg):
            assert torch.backends.cuda.flash_sdp_enabled()


def test_compiled_blocks_train_to_the_same_loss(tmp_path, tiny_llama):
    """finetune.compile: torch.compile per transformer block changes speed, not the numbers."""
    eager = _run(tmp_path / "eager", tiny_llama, max_steps=2)
    compiled = _run(tmp_path / "compiled", tiny_llama, max_steps=2, compile=True)
    assert compiled["steps"] == 2 and compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.integration
def test_two_process_ddp_on_cpu(tmp_path, tiny_llama):
    """`torchrun --nproc_per_node 2 -m stages.finetune` trains with gloo; rank 0 writes the output."""
    make_splits(tmp_path / "data")
    params = tmp_path / "params.yaml"
    params.write_text(
        textwrap.dedent(f"""
        paths: {{split: {tmp_path}/data/splits, finetune: {tmp_path}/out, checkpoints: {tmp_path}/ckpt}}
        model: {{base: {tiny_llama}}}
        finetune: {{max_steps: 4, batch_size: 2, save_steps: 100, precision: fp32, logging_steps: 1}}
        mlflow: {{tracking_uri: "sqlite:///{tmp_path}/mlflow.db"}}
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "stages.finetune", "--params", str(params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    facts = json.loads((tmp_path / "out" / "training.json").read_text())
    assert facts["world_size"] == 2 and facts["steps"] == 4
    assert facts["mlflow_run_id"]  # exactly one process logged


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (lambda d: (d / "base").mkdir(), "has no config.json"),
        (
            lambda d: (
                (d / "base").mkdir(),
                (d / "base" / "config.json").write_text("{}"),
                (d / "base" / "pytorch_model.bin").write_bytes(b"x"),
            ),
            "only has pickle",
        ),
        (
            lambda d: (
                (d / "base").mkdir(),
                (d / "base" / "config.json").write_text('{"model_type": "llama"}'),
                (d / "base" / "model.safetensors").write_bytes(b"broken"),
            ),
            "model.base: cannot load",
        ),
    ],
)
def test_bad_base_model_fails_clearly_without_output(tmp_path, setup, needle):
    from tagtune.errors import ConfigError

    splits = make_splits(tmp_path / "data")
    setup(tmp_path)
    with pytest.raises(ConfigError, match=needle):
        finetune(
            splits,
            tmp_path / "out",
            FinetuneConfig(**FAST),
            ModelConfig(base=str(tmp_path / "base")),
            tmp_path / "ck",
            None,
        )
    assert not (tmp_path / "out").exists()
