"""params.yaml is the public contract: it validates, builds every stage config, and errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tinydata import run_stage_cli

import stages
from tagtune.config import load_params, parse_params
from tagtune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
STAGES = list(stages.STAGES)  # the wiring table: dvc.yaml, the flow, bench and tests share it


def test_shipped_params_validate_and_hold_the_public_keys():
    p = load_params(REPO / "params.yaml")
    assert p.ingest.sources and all(s.path and s.format for s in p.ingest.sources)
    assert p.model.base == "embedded"
    assert p.finetune.max_steps > 0
    assert p.register.model_name
    assert p.mlflow.tracking_uri.startswith("sqlite:///")
    for section in STAGES:  # one section per stage, plus paths/model/mlflow
        if section == "feedback":  # it snapshots the table `ui.feedback_db` names: the UI's setting
            assert p.ui.feedback_db
            continue
        assert getattr(p, section) is not None


def test_params_yaml_opens_with_the_commands():
    head = (REPO / "params.yaml").read_text().splitlines()[:12]
    assert any("dvc repro" in line for line in head) and any("dvc exp run -S" in line for line in head)


def test_dvc_yaml_names_every_stage_and_each_runs_its_module():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == STAGES
    for name, stage in dvc["stages"].items():
        assert stage["cmd"].startswith(f"python -m stages.{name}")
        assert (REPO / "stages" / f"{name}.py").is_file()
    paths = load_params(REPO / "params.yaml").paths.model_dump()
    for stage in dvc["stages"].values():  # paths come from params (`${paths.x}`), never repeated by hand
        for out in stage.get("outs", []):
            out = next(iter(out)) if isinstance(out, dict) else out
            assert out.startswith("${paths.") and out[len("${paths.") :].split("}")[0] in paths, out


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"finetune": {"lora": {"r": 0}}}, "finetune.lora.r: Input should be greater than 0"),
        ({"finetune": {"max_step": 5}}, "finetune.max_step: unknown key"),
        ({"finetune": {"method": "qlora"}}, "finetune.method: Input should be 'lora', 'full' or 'freeze'"),
        ({"finetune": {"batch_size": "many"}}, "finetune.batch_size"),
        (
            {"split": {"val_fraction": 0.6, "test_fraction": 0.5}},
            "split: Value error, val_fraction + test_fraction",
        ),
        (
            {"ingest": {"sources": [{"format": "qa"}]}},
            "ingest.sources.0: Value error, format 'qa' needs `path`",
        ),
        ({"ingest": {"sources": [{"path": "x", "format": "xml"}]}}, "ingest.sources.0.format"),
        ({"evaluate": {"generation": {"top_p": 1.5}}}, "evaluate.generation.top_p"),
        ({"modle": {}}, "modle: unknown key"),
        ({"split": {"train_only": ["data/nope.csv"]}}, "split.train_only.0: 'data/nope.csv' is not the path"),
    ],
)
def test_bad_params_name_the_key_path(raw, needle):
    with pytest.raises(ConfigError) as e:
        parse_params(raw, "params.yaml")
    assert needle in str(e.value)


def test_overrides_are_validated_too(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("finetune: {max_steps: 10}\n")
    assert load_params(f, ["finetune.max_steps=50"]).finetune.max_steps == 50
    with pytest.raises(ConfigError, match="finetune.max_steps: Input should be greater than or equal to 0"):
        load_params(f, ["finetune.max_steps=-1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_params(f, ["finetune.max_steps"])


def test_invalid_yaml_names_the_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("split:\n  seed: 1\n  val_fraction: [0.1\n")
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: invalid YAML"):
        load_params(f)


def test_a_stage_cli_with_broken_params_exits_nonzero_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("split: {seed: 1, strategy: random}\n")
    r = run_stage_cli(tmp_path, "split")
    assert r.returncode == 1
    assert "split.strategy: Input should be 'phrasing', 'group' or 'example'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()
