"""Train/serve consistency, checked with llama.cpp itself: one tiny model trained on the tiny town
data answers the same questions greedily (a) in transformers, (b) from its merged export reloaded,
(c) from its GGUF export run by llama.cpp (llama-cpp-python), (d) served by a real
`mlflow models serve`; and the real embedded base, exported to GGUF, against transformers.

    make test-llamacpp      # installs the `llamacpp` extra (builds llama.cpp from source), runs these

Marked `llamacpp` (the whole module) and deselected by `make test`, so CI never builds llama.cpp;
llama-cpp-python is imported inside the tests, so a run that selects them without it fails loudly
instead of skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from flowrepo import stop
from test_register import _free_port, _wait_http, mlflow_cfg, server  # noqa: F401 - fixtures

from tagtune.config import EvaluateConfig, FormatConfig, GenerationConfig, RegisterConfig
from tagtune.generation import generate_answers
from tagtune.models import load_finetuned, load_model, load_tokenizer, resolve_base
from tagtune.templates import render_prompt, template_facts

pytestmark = pytest.mark.llamacpp

REPO = Path(__file__).resolve().parents[1]
GEN = GenerationConfig(max_new_tokens=24)  # every answer below stops at <END> well before this
QUESTIONS = [  # trained phrasings, held-out phrasings and out-of-domain questions (refusals)
    "What time does the museum open?",
    "When is the museum open?",
    "Where is the harbour?",
    "How do I get to the harbour?",
    "Who wrote Hamlet?",
    "Where is the nearest airport?",
]
# q8_0 through llama.cpp: on the tiny model below, measured identical on 6/6 questions (greedy
# argmax never flipped). q8_0 quantises each 32-weight block to int8 with its own scale and llama.cpp
# also quantises the activations to q8_0 before each matmul (~0.7% relative logit error, test_export),
# so a near-tie between two tokens may flip; one flipped answer of six is allowed.
Q8_0_MIN_IDENTICAL = 5


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: `make test-llamacpp` installs the llamacpp extra")
    return llama_cpp


def _llama(gguf: Path, n_ctx: int):
    """llama.cpp on one thread (CI machines are small), no BOS: the GGUF says add_bos_token=false."""
    return _llama_cpp().Llama(
        model_path=str(gguf), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=False, verbose=False
    )


def _llama_answers(llm: Any, prompts: list[str], stop_at: str | None, max_tokens: int) -> list[str]:
    """Greedy answers from llama.cpp, stripped as `cut_answer` strips them (EOS also ends them)."""
    out = []
    for prompt in prompts:
        done = llm.create_completion(
            prompt,
            max_tokens=max_tokens,
            temperature=0,  # llama-cpp-python: the greedy sampler
            repeat_penalty=1.0,  # GenerationConfig's default: no penalty
            stop=[stop_at] if stop_at else [],
        )
        out.append(done["choices"][0]["text"].strip())
    return out


def _same_tokens(llm: Any, tok: Any, prompts: list[str]) -> None:
    """llama.cpp tokenises every prompt (special tokens parsed, no BOS) to transformers' ids."""
    for p in prompts:
        assert llm.tokenize(p.encode(), add_bos=False, special=True) == tok(p, add_special_tokens=False)[
            "input_ids"
        ], p


def _texts(answers) -> list[str]:
    return [a.text for a in answers]


# ------------------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, server, request) -> dict[str, Any]:  # noqa: F811 - the imported fixture
    """The default recipe (LoRA, merged) on the tiny data, evaluated on the server's tracking store,
    with its transformers answers: what every other way of running it must reproduce."""
    from test_evaluate import make_pipeline

    from stages.evaluate import evaluate

    root = tmp_path_factory.mktemp("consistency")
    splits, finetuned = make_pipeline(root, max_steps=60, method="lora")
    cfg = request.getfixturevalue("mlflow_cfg")
    evaluate(splits, finetuned, root / "eval", EvaluateConfig(generation=GEN, batch_size=4), cfg)
    model, tok = load_finetuned(finetuned)
    template = json.loads((finetuned / "template.json").read_text(encoding="utf-8"))
    prompts = [render_prompt(q, template, tok) for q in QUESTIONS]
    hf = _texts(generate_answers(model, tok, prompts, GEN, template["end_marker"]))
    return {"root": root, "finetuned": finetuned, "template": template, "tok": tok, "prompts": prompts, "hf": hf}


def test_tiny_model_answers_each_question_its_own_way(tiny):
    """A consistency check is only as strong as its answers are distinct: the trained facts and the
    refusal, not one string for every question."""
    hf = tiny["hf"]
    assert len(set(hf)) >= 3, hf
    assert all(a for a in hf), hf


def test_merged_export_and_gguf_via_llama_cpp_answer_like_transformers(tiny, tmp_path):
    from tagtune.export import export_gguf, export_merged, model_source

    model_dir, template = model_source(tiny["finetuned"], tmp_path / "work")
    merged = export_merged(model_dir, template, tmp_path / "merged")
    model, tok = load_finetuned(merged)
    assert _texts(generate_answers(model, tok, tiny["prompts"], GEN, template["end_marker"])) == tiny["hf"]

    got = {}
    for outtype in ("f32", "f16", "q8_0"):
        llm = _llama(export_gguf(model_dir, template, tmp_path / f"tiny-{outtype}.gguf", outtype), n_ctx=256)
        _same_tokens(llm, tiny["tok"], tiny["prompts"])
        got[outtype] = _llama_answers(llm, tiny["prompts"], template["end_marker"], GEN.max_new_tokens)
    print(json.dumps({"hf": tiny["hf"], **got}, indent=1))
    assert got["f32"] == tiny["hf"]
    assert got["f16"] == tiny["hf"]
    same = sum(a == b for a, b in zip(got["q8_0"], tiny["hf"], strict=True))
    assert same >= Q8_0_MIN_IDENTICAL, list(zip(got["q8_0"], tiny["hf"], strict=True))


def test_mlflow_models_serve_answers_like_transformers(tiny, mlflow_cfg, tmp_path):  # noqa: F811
    """The registered version (adapter + base reference, rebuilt at load) behind the real HTTP server."""
    from stages.register import register

    finetuned, evaluation = tiny["finetuned"], tiny["root"] / "eval"
    rec = register(
        finetuned, evaluation, tmp_path / "reg", RegisterConfig(model_name="consistency"), mlflow_cfg, GEN, REPO
    )
    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/consistency/{rec['version']}",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_cfg.tracking_uri, "PYTHONPATH": ""}
    with open(log, "w") as out:  # cwd outside the repo: tagtune comes from the model's code/ (as test_register)
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout=150)
        payload = {"inputs": QUESTIONS, "params": {"max_new_tokens": GEN.max_new_tokens}}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            served = json.loads(r.read())["predictions"]
    finally:
        stop(proc)
    assert served == tiny["hf"]


# ------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_real_base_gguf_via_llama_cpp_answers_like_transformers(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (the embedded base, a Q4_1 GGUF dequantised to fp32) exported to GGUF
    f16 and q8_0 and run by llama.cpp, against transformers, greedy, the chat template, 24 tokens."""
    from tagtune.export import export_gguf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = resolve_base("embedded")
    facts = template_facts(FormatConfig(template="chat"), "causal_lm")
    tok, model = load_tokenizer(base), load_model(base).eval()
    questions = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 11?"]
    prompts = [render_prompt(q, facts, tok) for q in questions]
    gen = GenerationConfig(max_new_tokens=24)
    # one prompt at a time: no left padding in the reference
    hf = _texts(generate_answers(model, tok, prompts, gen, facts["end_marker"], batch_size=1))
    assert "Paris" in hf[0], hf
    got = {}
    for outtype in ("f16", "q8_0"):
        llm = _llama(export_gguf(Path(base), facts, tmp_path / f"base-{outtype}.gguf", outtype), n_ctx=512)
        _same_tokens(llm, tok, prompts)
        got[outtype] = _llama_answers(llm, prompts, facts["end_marker"], gen.max_new_tokens)
        del llm
    print(json.dumps({"hf": hf, **got}, indent=1))
    assert got["f16"] == hf
    assert got["q8_0"] == hf
