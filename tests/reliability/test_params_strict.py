"""Params that would train garbage or crash later are refused up front, in one line (items 7 and 8)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import one_line_error, stage_cli, write_params

from tagtune.config import load_params, parse_params
from tagtune.errors import ConfigError


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (
            {"finetune": {"learning_rate": float("inf")}},
            "finetune.learning_rate: Input should be a finite number",
        ),
        ({"finetune": {"epochs": float("inf")}}, "finetune.epochs: Input should be a finite number"),
        (
            {"finetune": {"lora": {"alpha": float("nan")}}},
            "finetune.lora.alpha: Input should be a finite number",
        ),
        ({"evaluate": {"generation": {"temperature": float("inf")}}}, "evaluate.generation.temperature"),
        ({"mlflow": {"timeout_s": float("inf")}}, "mlflow.timeout_s"),
        (
            {"finetune": {"max_length": 10_000_000}},
            "finetune.max_length: Input should be less than or equal to",
        ),
        ({"finetune": {"batch_size": True}}, "finetune.batch_size: Input should be a valid integer"),
        ({"finetune": {"max_steps": 2.5}}, "finetune.max_steps: Input should be a valid integer"),
        ({"finetune": {"learning_rate": True}}, "finetune.learning_rate: Input should be a valid number"),
        ({"register": {"metric": "nope"}}, "register.metric: 'nope' is not a metric evaluate produces"),
        (
            {"format": {"template": "text"}, "register": {"metric": "answer_f1"}},
            "register.metric: 'answer_f1' is not a metric evaluate produces",
        ),
        ({"finetune": {"task": "classification"}, "register": {"metric": "perplexity"}}, "register.metric"),
        (
            {"register": {"metric": "perplexity", "greater_is_better": True}},
            "register.greater_is_better: lower perplexity is better",
        ),
    ],
)
def test_bad_values_fail_at_validation_naming_the_key(raw, needle):
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    assert needle in str(e.value), str(e.value)


def test_gate_metric_and_direction_follow_the_task_and_template():
    assert (parse_params({}).register.metric, parse_params({}).register.greater_is_better) == (
        "answer_f1",
        True,
    )
    text = parse_params({"format": {"template": "text"}}).register
    assert (text.metric, text.greater_is_better) == ("perplexity", False)
    cls = parse_params({"finetune": {"task": "classification"}}).register
    assert (cls.metric, cls.greater_is_better) == ("f1", True)
    ppl = parse_params({"register": {"metric": "perplexity"}}).register
    assert ppl.greater_is_better is False


def _params_file(tmp_path: Path, text: str | bytes) -> Path:
    f = tmp_path / "params.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return f


def test_duplicate_yaml_keys_name_file_and_line(tmp_path):
    f = _params_file(tmp_path, "finetune:\n  max_steps: 10\n  batch_size: 4\n  max_steps: 500\n")
    with pytest.raises(ConfigError, match=r"params.yaml:4: duplicate key 'max_steps' \(first at line 2\)"):
        load_params(f)


def test_empty_params_file_is_refused(tmp_path):
    for text in ("", "# only a comment\n", "\n\n"):
        with pytest.raises(ConfigError, match="params.yaml: empty"):
            load_params(_params_file(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (b"finetune:\n  max_steps: 10\n  # caf\xe9\n", "params.yaml:3: not valid UTF-8"),
        ("finetune:\n  epochs: .inf\n  max_steps: 0\n", "finetune.epochs: Input should be a finite number"),
    ],
)
def test_params_that_used_to_crash_give_one_line(tmp_path, text, needle):
    _params_file(tmp_path, text)
    line = one_line_error(stage_cli(tmp_path, "finetune"))
    assert needle in line, line
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("spec", ["no-such-org/no-such-model", "gpt-404"])
def test_unknown_hub_model_fails_fast_offline(tmp_path, spec, monkeypatch):
    from tagtune.models import resolve_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty local cache

    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"model.base: '{spec}'.*not in the local Hugging Face cache"):
        resolve_base(spec)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("spec", ["not a model!", "a/b/c/d", "https://example.com/x"])
def test_a_base_that_names_nothing_loadable_is_a_config_error(spec):
    from tagtune.models import resolve_base

    with pytest.raises(ConfigError, match="model.base"):
        resolve_base(spec)


def test_max_length_beyond_the_model_context_fails_before_training(tmp_path, tiny_llama):
    from tinydata import make_splits

    from stages.finetune import finetune
    from tagtune.config import FinetuneConfig, ModelConfig

    splits = make_splits(tmp_path / "data")
    cfg = FinetuneConfig(max_length=4096, max_steps=2, batch_size=4, precision="fp32")
    with pytest.raises(
        ConfigError, match=r"finetune.max_length: 4096 is beyond the base model's context \(256"
    ):
        finetune(splits, tmp_path / "out", cfg, ModelConfig(base=str(tiny_llama)), tmp_path / "ck", None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_shipped_params_gate_is_unchanged():
    from conftest import REPO

    p = load_params(REPO / "params.yaml")
    assert (p.register.metric, p.register.greater_is_better) == ("answer_f1", True)


def test_stage_cli_reports_the_first_problem_in_one_line(tmp_path):
    write_params(tmp_path, {"finetune": {"batch_size": True}})
    line = one_line_error(stage_cli(tmp_path, "split"))
    assert "finetune.batch_size" in line
