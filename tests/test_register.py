"""register + serving against a REAL `mlflow server` (SQLite backend, local artifact root, 127.0.0.1):
pyfunc load + predict, `mlflow models serve` over HTTP, the promotion gate, retries, rollback, pull and
the Chatbot, the registry re-check behind the DVC design, and a fast failure when MLflow is down.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from flowrepo import stop

from stages.evaluate import evaluate
from stages.register import check_registered, register
from tagtune.app.chat import Chatbot
from tagtune.config import EvaluateConfig, GenerationConfig, MlflowConfig, RegisterConfig
from tagtune.generation import _held_back
from tagtune.io import read_json, write_json
from tagtune.registry import CHALLENGER, CHAMPION, RegistryError, decide, parse_model_uri, pull, rollback
from tagtune.tracking import TrackingError

REPO = Path(__file__).resolve().parents[1]
GEN = GenerationConfig(max_new_tokens=16)
QUESTION = "When does the museum open?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Start `mlflow server` (health is awaited by `mlflow_cfg`, so the models train meanwhile)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root}/db",
        "--default-artifact-root", str(root / "art"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    mp = pytest.MonkeyPatch()
    try:
        uri = f"http://127.0.0.1:{port}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # what users set; wins over mlflow.tracking_uri
        yield {"uri": uri, "proc": proc, "log": log}
    finally:
        mp.undo()
        stop(proc)


@pytest.fixture(scope="module")
def mlflow_cfg(server) -> MlflowConfig:
    _wait_http(f"{server['uri']}/health", server["proc"], server["log"], timeout=120)
    return MlflowConfig(tracking_uri=server["uri"], experiment="registertest", timeout_s=10)


@pytest.fixture(scope="module")
def models(tmp_path_factory, server, request) -> dict[str, tuple[Path, Path]]:
    """A model trained for 40 steps and a worse one (2 steps) on the same tiny data, both evaluated
    (and logged to the server, attached to their runs)."""
    from test_evaluate import make_pipeline

    root = tmp_path_factory.mktemp("models")
    trained = {
        "good": make_pipeline(root / "good", max_steps=40),
        "worse": make_pipeline(root / "worse", max_steps=2, base=root / "good" / "base"),
    }
    mlflow_cfg = request.getfixturevalue("mlflow_cfg")
    out = {}
    for name, (splits, finetuned) in trained.items():
        cfg = EvaluateConfig(generation=GEN, batch_size=4)
        evaluate(splits, finetuned, root / name / "eval", cfg, mlflow_cfg)
        out[name] = (finetuned, root / name / "eval")
    good, worse = (read_json(out[n][1] / "metrics.json") for n in ("good", "worse"))
    assert good["tuned.answer_f1"] > max(worse["tuned.answer_f1"], good["base.answer_f1"]), (good, worse)
    return out


def _register(models, name: str, which: str, tmp_path: Path, mlflow_cfg, **kw) -> dict:
    finetuned, evaluation = models[which]
    cfg = RegisterConfig(model_name=name, **kw)
    return register(finetuned, evaluation, tmp_path / "reg", cfg, mlflow_cfg, GEN, repo_root=REPO)


# ------------------------------------------------------------------------------------- no server
def test_decide_needs_to_beat_champion_and_base_by_the_margin():
    cfg = RegisterConfig(metric="answer_f1", min_delta=0.05)
    assert decide(0.8, None, None, cfg)[0]
    assert decide(0.8, 0.7, 0.1, cfg)[0]
    ok, reason = decide(0.74, 0.7, 0.1, cfg)
    assert not ok and "current champion" in reason and "min_delta=0.05" in reason
    assert not decide(0.8, None, 0.8, cfg)[0]
    lower = RegisterConfig(metric="perplexity", greater_is_better=False)
    assert decide(3.0, 4.0, 50.0, lower)[0] and not decide(4.0, 4.0, 50.0, lower)[0]


def test_parse_model_uri_and_stream_holdback():
    assert parse_model_uri("models:/town@champion") == ("town", None, "champion")
    assert parse_model_uri("models:/town/3") == ("town", "3", None)
    with pytest.raises(Exception, match="models:/"):
        parse_model_uri("runs:/abc/model")
    assert _held_back("The museum <EN", "<END>") == len(" <EN")
    assert _held_back("The museum", "<END>") == 0
    assert _held_back("The museum  ", None) == 2


def test_dvc_yaml_register_stage_is_never_restored_from_run_cache():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["register"]
    outs = [o if isinstance(o, dict) else {o: {}} for o in stage["outs"]]
    assert all(next(iter(o.values())).get("cache") is False for o in outs)
    assert "${paths.evaluate}/metrics.json" in stage["deps"]


# ---------------------------------------------------------------------------------- real server
@pytest.mark.integration
def test_register_promotes_and_pyfunc_predicts(models, mlflow_cfg, tmp_path):
    import mlflow
    import pandas as pd

    from tagtune import tracking

    rec = _register(models, "town", "good", tmp_path, mlflow_cfg)
    assert rec["created"] and rec["alias"] == CHAMPION and rec["previous_champion"] is None
    assert read_json(tmp_path / "reg" / "register.json") == rec
    mv = tracking.client(mlflow_cfg).get_model_version("town", rec["version"])
    for tag in ("git.commit", "base_model", "base_model_id", "tagtune.fingerprint", "metric.tuned.answer_f1"):
        assert mv.tags.get(tag), tag
    assert mv.tags["git.commit"] != "unknown"
    assert mv.run_id == rec["run_id"]

    model = mlflow.pyfunc.load_model("models:/town@champion")
    answers = model.predict([QUESTION, "Where is the harbour?"])
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert not any("<END>" in a for a in answers)
    frame = model.predict(pd.DataFrame({"question": [QUESTION]}))
    assert list(frame.columns) == ["answer"] and frame["answer"][0] == answers[0]
    short = model.predict([QUESTION], params={"max_new_tokens": 2})[0]
    assert len(short) < len(answers[0]) or answers[0] == short


@pytest.fixture(scope="module")
def lora(models, mlflow_cfg, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """A LoRA model (merged too, as finetune.merge does by default), evaluated: `models`' shape."""
    from test_evaluate import make_pipeline

    root = tmp_path_factory.mktemp("lora")
    splits, finetuned = make_pipeline(
        root, max_steps=40, method="lora", base=models["good"][0].parent / "base"
    )
    evaluate(splits, finetuned, root / "eval", EvaluateConfig(generation=GEN, batch_size=4), mlflow_cfg)
    return {"good": (finetuned, root / "eval")}


def test_lora_version_stores_the_adapter_and_reloads_to_the_same_logits(lora, mlflow_cfg, tmp_path):
    """A LoRA version is adapter/ + base.json (no merged model); pulled and served, it rebuilds on the
    verified base to the logits of the model finetune wrote."""
    import mlflow
    import torch

    from tagtune.models import load_finetuned

    rec = _register(lora, "lean", "good", tmp_path, mlflow_cfg)
    pulled = tmp_path / "pulled"
    pull(rec["model_uri"], pulled, mlflow_cfg)
    art = pulled / "artifacts"
    assert (art / "adapter" / "adapter_model.safetensors").is_file() and not (art / "model").exists()
    assert not (art / "adapter" / "tokenizer.json").exists()  # no tokens added: the base's tokenizer
    ref = read_json(art / "base.json")
    assert Path(ref["spec"]).is_dir() and ref["weights_sha256"], ref
    merged = lora["good"][0] / "model"
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    assert size(art / "adapter") < size(merged)  # the real model: 19 MB vs 260 MB (test_real_model)
    served = mlflow.pyfunc.load_model(rec["model_uri"]).unwrap_python_model()
    reference, tok = load_finetuned(lora["good"][0])
    ids = tok(f"{QUESTION} <QUESTION>\n", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        for loaded in (served.model, load_finetuned(pulled)[0]):
            torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_adapter_version_refuses_a_missing_or_tampered_base(lora, mlflow_cfg, tmp_path):
    from tagtune.models import ModelIntegrityError, load_finetuned

    rec = _register(lora, "lean", "good", tmp_path, mlflow_cfg)
    pulled = tmp_path / "pulled"
    pull(rec["model_uri"], pulled, mlflow_cfg)
    ref_file = pulled / "artifacts" / "base.json"
    ref = read_json(ref_file)
    base = shutil.copytree(ref["spec"], tmp_path / "base-copy")
    write_json(ref_file, {**ref, "spec": str(tmp_path / "gone")})
    with pytest.raises(ModelIntegrityError, match="cannot be resolved here"):
        load_finetuned(pulled)
    write_json(ref_file, {**ref, "spec": str(base)})
    load_finetuned(pulled)  # an identical copy of the base is the same base
    weights = next(Path(base).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="not the model this adapter was trained on"):
        load_finetuned(pulled)


def test_a_pulled_version_reads_its_config_as_mlflow_does_and_checks_its_adapter(lora, mlflow_cfg, tmp_path):
    """`version_config` (read without importing MLflow) is what MLflow's loader reports, so a pulled
    version's recorded weight hashes are checked: a flipped bit in its adapter is refused."""
    import mlflow

    from tagtune.models import WEIGHTS_KEY, ModelIntegrityError, load_finetuned, version_config

    rec = _register(lora, "checked", "good", tmp_path, mlflow_cfg)
    pulled = tmp_path / "pulled"
    pull(rec["model_uri"], pulled, mlflow_cfg)
    config = version_config(pulled)
    assert config == mlflow.pyfunc.load_model(rec["model_uri"]).model_config
    assert "adapter/adapter_model.safetensors" in config[WEIGHTS_KEY]
    load_finetuned(pulled)  # as registered
    weights = pulled / "artifacts" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="adapter_model.safetensors: sha256 differs"):
        load_finetuned(pulled)


def test_alias_resolution_without_mlflow_matches_the_client(lora, mlflow_cfg, tmp_path, monkeypatch):
    """chat resolves `@champion` over the REST API (http) or read-only SQL (sqlite) without importing
    MLflow; both must answer exactly what MlflowClient answers, and defer to it for errors."""
    from tagtune.errors import TagtuneError
    from tagtune.registry import _resolve_fast, _resolve_with_client, resolve_version

    rec = _register(lora, "fast", "good", tmp_path / "http", mlflow_cfg)
    sqlite_cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/reg.db", experiment="fast", timeout_s=10)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    rec_sqlite = _register(lora, "fast", "good", tmp_path / "sqlite", sqlite_cfg)
    for cfg, r in ((mlflow_cfg, rec), (sqlite_cfg, rec_sqlite)):
        for uri in ("models:/fast@champion", f"models:/fast/{r['version']}"):
            fast = _resolve_fast(uri, cfg)
            assert fast is not None and fast == _resolve_with_client(uri, cfg), (cfg.tracking_uri, uri)
        assert _resolve_fast("models:/fast@nope", cfg) is None
        with pytest.raises(TagtuneError, match="not found in the registry"):
            resolve_version("models:/fast@nope", cfg)


def test_per_example_gate_refuses_a_candidate_that_breaks_champion_answers(models, mlflow_cfg, tmp_path):
    """A damaged candidate (the 2-step model: its real answers) whose aggregate is made to win (its
    metrics.json is crafted above the champion's) still breaks the questions the champion answered
    correctly: refused, with the reason and every regression listed beside the champion's answer."""
    champion = _register(models, "per-example", "good", tmp_path / "a", mlflow_cfg)
    assert champion["alias"] == CHAMPION and champion["compared_with"] is None
    crafted = shutil.copytree(models["worse"][1], tmp_path / "worse-eval")
    metrics = read_json(crafted / "metrics.json")
    good = read_json(models["good"][1] / "metrics.json")
    write_json(crafted / "metrics.json", {**metrics, "tuned.answer_f1": good["tuned.answer_f1"] + 0.05})
    damaged = {"good": (models["worse"][0], crafted)}
    rec = _register(damaged, "per-example", "good", tmp_path / "b", mlflow_cfg)
    assert rec["alias"] == CHALLENGER and rec["compared_with"] == champion["version"], rec["reason"]
    assert rec["reason"].startswith("it breaks ") and "max_regressions=0.05" in rec["reason"]
    assert len(rec["regressions"]) >= 1 and len(rec["regressions"]) > len(rec["fixes"])
    report = (tmp_path / "b" / "reg" / "regressions.md").read_text()
    first = rec["regressions"][0]
    assert f"| {first['question']} | {first['champion']} |" in report and "## Fixes" in report
    # forgetting across the versions so far: the champion's test questions are the frozen old slice
    assert "## Forgetting across versions" in report and f"| v{rec['version']} | " in report
    assert (tmp_path / "b" / "reg" / "forgetting.png").stat().st_size > 1000
    # the per-example gate off: the crafted aggregate alone promotes it
    again = _register(damaged, "per-example", "good", tmp_path / "c", mlflow_cfg, max_regressions=1.0)
    assert again["alias"] == CHAMPION and again["version"] == rec["version"]


def test_a_not_worse_retrain_on_new_feedback_is_promoted():
    """A correction is a train row, so the retrain that learnt it usually ties the champion on test."""
    from types import SimpleNamespace as Version

    from tagtune.registry import TAG_FEEDBACK, _is_feedback_retrain

    cfg = RegisterConfig(metric="answer_f1", greater_is_better=True)
    champion, candidate = Version(tags={TAG_FEEDBACK: "none"}), Version(tags={TAG_FEEDBACK: "f00d"})
    assert _is_feedback_retrain(candidate, champion, 0.8, 0.8, cfg)
    assert _is_feedback_retrain(candidate, champion, 0.78, 0.8, cfg)  # within feedback_tolerance (0.02)
    assert not _is_feedback_retrain(candidate, champion, 0.77, 0.8, cfg)  # worse: no
    assert not _is_feedback_retrain(candidate, Version(tags={TAG_FEEDBACK: "f00d"}), 0.8, 0.8, cfg)  # seen
    assert not _is_feedback_retrain(Version(tags={TAG_FEEDBACK: "none"}), champion, 0.8, 0.8, cfg)
    assert not _is_feedback_retrain(candidate, None, 0.8, None, cfg)


@pytest.mark.integration
def test_classification_model_registers_and_predicts_labels(mlflow_cfg, tmp_path):
    import mlflow
    from test_evaluate import make_pipeline

    splits, finetuned = make_pipeline(tmp_path / "cls", task="classification", max_steps=10)
    evaluate(splits, finetuned, tmp_path / "eval", EvaluateConfig(batch_size=4), mlflow_cfg)
    rec = register(
        finetuned,
        tmp_path / "eval",
        tmp_path / "reg",
        RegisterConfig(model_name="cls", metric="f1"),
        mlflow_cfg,
    )
    labels = mlflow.pyfunc.load_model(rec["model_uri"]).predict(["great film", "terrible plot"])
    assert len(labels) == 2 and set(labels) <= {"pos", "neg"}
    with pytest.raises(RegistryError, match="register.metric: 'answer_f1' is not in the evaluation metrics"):
        register(finetuned, tmp_path / "eval", tmp_path / "reg", RegisterConfig(model_name="cls"), mlflow_cfg)


@pytest.mark.integration
def test_retry_does_not_create_a_second_version(models, mlflow_cfg, tmp_path):
    from tagtune import tracking

    first = _register(models, "retry", "good", tmp_path, mlflow_cfg)
    again = _register(models, "retry", "good", tmp_path, mlflow_cfg)
    assert again["version"] == first["version"] and not again["created"]
    assert again["alias"] == CHAMPION and "already the champion" in again["reason"]
    assert len(tracking.client(mlflow_cfg).search_model_versions("name='retry'")) == 1


@pytest.mark.integration
def test_gate_keeps_a_worse_model_at_challenger(models, mlflow_cfg, tmp_path):
    from tagtune import tracking

    champ = _register(models, "gate", "good", tmp_path, mlflow_cfg)
    worse = _register(models, "gate", "worse", tmp_path, mlflow_cfg)
    assert worse["version"] != champ["version"] and worse["alias"] == CHALLENGER
    assert "does not beat" in worse["reason"]
    assert read_json(tmp_path / "reg" / "register.json")["decision"] == "challenger"
    c = tracking.client(mlflow_cfg)
    assert c.get_model_version_by_alias("gate", CHAMPION).version == champ["version"]
    assert c.get_model_version_by_alias("gate", CHALLENGER).version == worse["version"]
    again = _register(models, "gate", "worse", tmp_path, mlflow_cfg)  # a retry stays put
    assert again["version"] == worse["version"] and again["alias"] == CHALLENGER


@pytest.mark.integration
def test_rollback_restores_the_previous_champion(models, mlflow_cfg, tmp_path):
    from tagtune import tracking

    v1 = _register(models, "rb", "good", tmp_path, mlflow_cfg)
    # a second run that evaluates better (metrics edited: the gate only reads metrics.json)
    finetuned, evaluation = models["worse"]
    better = tmp_path / "better-eval"
    better.mkdir()
    m = read_json(evaluation / "metrics.json")
    m["tuned.answer_f1"] = 1.0
    write_json(better / "metrics.json", m)
    v2 = register(finetuned, better, tmp_path / "reg", RegisterConfig(model_name="rb"), mlflow_cfg, GEN, REPO)
    assert v2["alias"] == CHAMPION and v2["previous_champion"] == v1["version"]

    done = rollback("rb", mlflow_cfg)
    assert done == {
        "model_name": "rb",
        "from_version": v2["version"],
        "to_version": v1["version"],
        "alias": CHAMPION,
    }
    c = tracking.client(mlflow_cfg)
    assert c.get_model_version_by_alias("rb", CHAMPION).version == v1["version"]
    assert c.get_model_version_by_alias("rb", CHALLENGER).version == v2["version"]
    with pytest.raises(RegistryError, match="no recorded previous champion"):
        rollback("rb", mlflow_cfg)
    # a retry of the rolled-back run does not quietly re-promote it
    retry = register(
        finetuned, better, tmp_path / "reg", RegisterConfig(model_name="rb"), mlflow_cfg, GEN, REPO
    )
    assert (
        retry["version"] == v2["version"]
        and retry["alias"] == CHALLENGER
        and "rolled back" in retry["reason"]
    )
    assert c.get_model_version_by_alias("rb", CHAMPION).version == v1["version"]

    # the documented one-liner, through the real CLI (params.yaml + MLFLOW_TRACKING_URI)
    cli = subprocess.run(
        [sys.executable, "-m", "tagtune.registry", "rollback", "--name", "rb", "--to", v2["version"]],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["to_version"] == v2["version"]
    assert c.get_model_version_by_alias("rb", CHAMPION).version == v2["version"]


@pytest.mark.integration
def test_mlflow_models_serve_answers_http(models, mlflow_cfg, tmp_path):
    _register(models, "town", "good", tmp_path, mlflow_cfg)  # idempotent: v1 of "town" stays champion
    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/town@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_cfg.tracking_uri, "PYTHONPATH": ""}
    with open(log, "w") as out:  # cwd outside the repo: tagtune must come from the model's code/
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout=150)

        def post(payload: dict) -> list:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(payload).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["predictions"]

        preds = post({"inputs": [QUESTION, "Where is the harbour?"], "params": {"max_new_tokens": 12}})
        assert len(preds) == 2 and all(isinstance(p, str) and "<END>" not in p for p in preds)
        framed = post({"dataframe_split": {"columns": ["question"], "data": [[QUESTION]]}})
        assert framed[0]["answer"] == post({"inputs": [QUESTION]})[0]
    finally:
        stop(proc)


@pytest.mark.integration
def test_chatbot_from_uri_pull_and_stream(models, mlflow_cfg, tmp_path):
    import mlflow

    _register(models, "town", "good", tmp_path, mlflow_cfg)
    bot = Chatbot.from_uri("models:/town@champion", mlflow_cfg, cache_dir=str(tmp_path / "cache"))
    assert bot.info["model_name"] == "town" and bot.info["alias"] == CHAMPION and bot.info["run_id"]
    expected = mlflow.pyfunc.load_model("models:/town@champion").predict([QUESTION])[0]
    (answer,) = bot.answer([QUESTION], GEN)
    assert answer.text == expected
    pieces = list(bot.stream(QUESTION, GEN))
    assert "".join(pieces) == answer.text and not any("<END>" in p for p in pieces)

    root = pull("models:/town/1", tmp_path / "pulled", mlflow_cfg)  # full fine-tuning: the model, bf16
    assert (root / "model" / "config.json").is_file() and (root / "model" / "model.safetensors").is_file()
    assert read_json(root / "model" / "config.json")["dtype"] == "bfloat16"
    local = Chatbot.from_dir(tmp_path / "pulled")
    assert local.info["version"] == "1" and local.answer([QUESTION], GEN)[0].text == expected


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_chatbot_stream_ends_at_max_new_tokens_and_when_closed(models):
    """Streams that end without the end marker (length limit) or are closed early do not hang."""
    bot = Chatbot.from_dir(models["good"][0])
    assert bot.info["source"] == str(models["good"][0])
    for n in (1, 3, 40):
        gen = GenerationConfig(max_new_tokens=n)
        (answer,) = bot.answer([QUESTION], gen)
        assert "".join(bot.stream(QUESTION, gen)) == answer.text
    stream = bot.stream(QUESTION, GEN)
    next(stream, None)
    stream.close()


@pytest.mark.integration
def test_check_registered_removes_a_stale_register_json(models, mlflow_cfg, tmp_path):
    rec = _register(models, "town", "good", tmp_path, mlflow_cfg)
    out = tmp_path / "reg"
    assert check_registered(out, mlflow_cfg)["registered"]
    write_json(out / "register.json", {**rec, "version": "999"})  # as if the registry lost it
    result = check_registered(out, mlflow_cfg)
    assert not result["registered"] and "not in the registry" in result["reason"]
    assert not (out / "register.json").exists()


@pytest.mark.integration
def test_unreachable_mlflow_fails_fast_and_keeps_the_model(models, tmp_path, monkeypatch):
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    finetuned, evaluation = models["good"]
    start = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable") as err:
        register(
            finetuned, evaluation, tmp_path / "reg", RegisterConfig(), MlflowConfig(timeout_s=5), GEN, REPO
        )
    assert time.monotonic() - start < 30
    assert dead in str(err.value) and "stays on disk" in str(err.value)
    assert (finetuned / "model" / "config.json").is_file()
    assert not (tmp_path / "reg" / "register.json").exists()


@pytest.mark.integration
def test_dvc_reruns_an_uncached_stage_whose_output_was_removed(tmp_path):
    """The register stage's design, on a toy stage: unchanged → 0 stages; output removed (what
    `stages.register --check` does when the registry lost the version) → the command really runs
    again instead of being restored from DVC's run-cache."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    dvc = [sys.executable, "-m", "dvc"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip

    def sh(*args: str) -> str:
        r = subprocess.run(list(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout + r.stderr

    sh("git", "init", "-q")
    sh(*dvc, "init", "-q")
    (tmp_path / "dep.txt").write_text("model v1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  register:\n    cmd: echo run >> side_effects.log && echo registered > register.json\n"
        "    deps: [dep.txt]\n    outs:\n      - register.json:\n          cache: false\n"
    )
    sh(*dvc, "repro", "-q")
    assert "up to date" in sh(*dvc, "repro")  # nothing changed: 0 stages run
    (tmp_path / "register.json").unlink()
    sh(*dvc, "repro", "-q")
    assert (tmp_path / "side_effects.log").read_text().count("run") == 2
    (tmp_path / "dep.txt").write_text("model v2\n")
    sh(*dvc, "repro", "-q")
    (tmp_path / "dep.txt").write_text("model v1\n")  # inputs DVC has run before: no run-cache restore
    sh(*dvc, "repro", "-q")
    assert (tmp_path / "side_effects.log").read_text().count("run") == 4
