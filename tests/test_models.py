"""Loading models: half-precision weights on a CPU that would run them emulated."""

from __future__ import annotations

import shutil

import pytest

from tagtune import models


@pytest.fixture
def bf16_dir(tmp_path, tiny_llama):
    """The tiny Llama saved in bf16, as tagtune stores full/freeze versions and most hub models are."""
    import torch

    dest = tmp_path / "bf16"
    shutil.copytree(tiny_llama, dest)
    models.load_model(str(tiny_llama), dtype=torch.float32).to(torch.bfloat16).save_pretrained(dest)
    return dest


@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_checkpoint_runs_in_fp32_only_where_the_cpu_would_emulate_bf16(bf16_dir, native, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: native)
    model, _ = models.load_saved(bf16_dir)
    assert model.dtype == (torch.bfloat16 if native else torch.float32)
    stored = models.load_model(str(bf16_dir), dtype=torch.bfloat16)
    for (name, p), q in zip(model.named_parameters(), stored.parameters(), strict=True):
        assert torch.equal(p.float(), q.float()), name  # the same values: only the arithmetic changes


def test_runnable_upcasts_a_merged_half_model_exactly_and_leaves_fp32_alone(bf16_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    half = models.load_model(str(bf16_dir), dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in half.named_parameters()}
    out = models.runnable(half)
    assert out.dtype == torch.float32
    assert all(torch.equal(p, before[n].float()) for n, p in out.named_parameters())
    fp32 = models.load_model(str(bf16_dir), dtype=torch.float32)
    assert models.runnable(fp32) is fp32
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.runnable(models.load_model(str(bf16_dir), dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_auto_precision_and_a_warning_for_half_precision_where_the_cpu_would_emulate_it(monkeypatch, capsys):
    import torch

    from stages import finetune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native in (False, True):
        monkeypatch.setattr(finetune, "cpu_has_bf16", lambda native=native: native)
        monkeypatch.setattr(finetune, "emulates_half", lambda native=native: not native)
        assert finetune.resolve_precision("auto", "lora") == ("bf16" if native else "fp32")
        assert finetune.resolve_precision("auto", "full") == "fp32"
        assert capsys.readouterr().err == ""
        assert finetune.resolve_precision("bf16", "lora") == "bf16"  # asked for: kept, but said
        assert ("runs emulated" in capsys.readouterr().err) != native
