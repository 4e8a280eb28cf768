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

import numpy as np
import pytest
from flowrepo import stop
from test_register import _free_port, _wait_http, mlflow_cfg, server  # noqa: F401 - fixtures

from tagtune.config import EvaluateConfig, FormatConfig, GenerationConfig, RegisterConfig
from tagtune.generation import generate_answers
from tagtune.models import load_finetuned, load_model, load_tokenizer, resolve_base
from tagtune.templates import render_prompt, template_facts

pytestmark = pytest.mark.llamacpp

REPO = Path(__file__).resolve().parents[1]
GEN = GenerationConfig(max_new_tokens=24)  # every tiny-model answer stops at <END> before this
QUESTIONS = [  # trained phrasings, held-out phrasings and out-of-domain questions (refusals)
    "What time does the museum open?",
    "When is the museum open?",
    "Where is the harbour?",
    "How do I get to the harbour?",
    "Who wrote Hamlet?",
    "Where is the nearest airport?",
]
# q8_0 via llama.cpp on the tiny model, measured (2026-11-25): token-identical greedy answers on
# 6/6 questions for this model and for 12 others (base seeds 1-7, 40-80 steps): 78/78. q8_0 rounds
# each block of 32 weights to int8 under one scale and llama.cpp rounds the activations to q8_0 too
# (at most 0.6% of the largest logit here, below), while this model's smallest top-2 logit gap on
# these questions is 4.5% of it; one flipped answer is still allowed, a near-tie a retrained model may have.
Q8_0_MIN_IDENTICAL = 5
# max |Δ logit| / max |logit| at each question's first answer token, measured on the same model:
# f32 5e-5 (summation order), f16 2.4e-4, q8_0 5.9e-3; bounds ~4x (q8_0 2.5x). The logits catch what
# answers can miss: with q/k left in HF's rotary layout, this model still answered all 6 alike, but
# its f32 logits were off by 2-9%.
TINY_MAX_LOGIT_ERROR = {"f32": 2e-4, "f16": 1e-3, "q8_0": 1.5e-2}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: `make test-llamacpp` installs the llamacpp extra")
    return llama_cpp


def _llama(gguf: Path, n_ctx: int):
    """llama.cpp on one thread (CI machines are small); no BOS: the GGUF says add_bos_token=false."""
    return _llama_cpp().Llama(
        model_path=str(gguf), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=False, verbose=False
    )


def _llama_answers(llm: Any, prompts: list[str], stop_at: str | None, max_tokens: int) -> list[str]:
    """Greedy answers from llama.cpp (EOS ends them too), stripped as `cut_answer` strips them."""
    out = []
    for prompt in prompts:
        done = llm.create_completion(
            prompt,
            max_tokens=max_tokens,
            temperature=0,  # llama-cpp-python's greedy sampler
            repeat_penalty=1.0,  # GenerationConfig's default: no penalty
            stop=[stop_at] if stop_at else [],
        )
        out.append(done["choices"][0]["text"].strip())
    return out


def _printed(text: str) -> str:
    """`text` as llama-cpp-python prints the same tokens: it decodes bytes that are not UTF-8 with
    errors="ignore" where transformers writes U+FFFD (a half-trained model emits such byte tokens)."""
    return text.replace("\ufffd", "")


def _same_tokens(llm: Any, tok: Any, prompts: list[str]) -> None:
    """llama.cpp tokenises every prompt (special tokens parsed, no BOS) to transformers' ids."""
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(p.encode(), add_bos=False, special=True) == ids, p


def _next_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for the token after `ids` (the first answer token of a prompt)."""
    llm.reset()
    llm.eval(ids)
    ptr = _llama_cpp().llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def _logit_errors(llm: Any, ids: list[list[int]], ref: list[np.ndarray]) -> list[float]:
    """max |llama.cpp logit - transformers logit| / max |logit|, at each prompt's first answer token."""
    return [
        float(np.abs(_next_logits(llm, i) - r).max() / np.abs(r).max()) for i, r in zip(ids, ref, strict=True)
    ]


def _texts(answers) -> list[str]:
    return [a.text for a in answers]


# ------------------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, server, request) -> dict[str, Any]:  # noqa: F811 - the imported fixture
    """Full fine-tuning, 60 steps, on the tiny data, evaluated on the server's tracking store, and its
    transformers answers: what every other way of running it must reproduce.

    Full, not LoRA: LoRA on a 32-wide random model leaves every logit under 0.8 and the top two
    tokens as close as 0.004, one bf16 step (the frozen base is bf16 on CPUs with AVX512-BF16); full
    fine-tuning in fp32 gives logits up to 5 and a smallest top-2 gap of 0.23 on these questions, so
    an answer that differs is a bug, not a coin toss."""
    from test_evaluate import make_pipeline

    from stages.evaluate import evaluate

    root = tmp_path_factory.mktemp("consistency")
    splits, finetuned = make_pipeline(root, max_steps=60, method="full")
    cfg = request.getfixturevalue("mlflow_cfg")
    evaluate(splits, finetuned, root / "eval", EvaluateConfig(generation=GEN, batch_size=4), cfg)
    model, tok = load_finetuned(finetuned)
    template = json.loads((finetuned / "template.json").read_text(encoding="utf-8"))
    prompts = [render_prompt(q, template, tok) for q in QUESTIONS]
    hf = _texts(generate_answers(model, tok, prompts, GEN, template["end_marker"]))
    return {"root": root, "finetuned": finetuned, "tok": tok, "prompts": prompts, "hf": hf}


def test_tiny_model_answers_each_question_its_own_way(tiny):
    """A consistency check is only as strong as its answers differ: both facts and the refusal."""
    assert len(set(tiny["hf"])) >= 3 and all(tiny["hf"]), tiny["hf"]


def test_merged_export_and_gguf_via_llama_cpp_answer_like_transformers(tiny, tmp_path):
    import gguf
    import torch

    from tagtune.export import export_gguf, export_merged, model_source

    model_dir, template = model_source(tiny["finetuned"], tmp_path / "work")
    merged = export_merged(model_dir, template, tmp_path / "merged")
    model, tok = load_finetuned(merged)
    assert _texts(generate_answers(model, tok, tiny["prompts"], GEN, template["end_marker"])) == tiny["hf"]

    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in tiny["prompts"]]
    with torch.inference_mode():  # the merged export's weights are the trained model's bytes
        ref = [model(torch.tensor([i])).logits[0, -1].numpy() for i in ids]
    got, files = {}, {}
    for outtype in ("f32", "f16", "q8_0"):
        files[outtype] = export_gguf(model_dir, template, tmp_path / f"tiny-{outtype}.gguf", outtype)
        llm = _llama(files[outtype], n_ctx=256)
        _same_tokens(llm, tiny["tok"], tiny["prompts"])
        errors = _logit_errors(llm, ids, ref)
        assert max(errors) <= TINY_MAX_LOGIT_ERROR[outtype], (outtype, errors)
        got[outtype] = _llama_answers(llm, tiny["prompts"], template["end_marker"], GEN.max_new_tokens)
        llm.close()
    expected = [_printed(a) for a in tiny["hf"]]
    assert got["f32"] == expected
    assert got["f16"] == expected
    same = sum(a == b for a, b in zip(got["q8_0"], expected, strict=True))
    assert same >= Q8_0_MIN_IDENTICAL, list(zip(got["q8_0"], expected, strict=True))

    # our q8_0 is llama.cpp's: its own quantizer, run on our f32 file, writes the same bytes
    lc = _llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype, params.nthread = lc.LLAMA_FTYPE_MOSTLY_Q8_0, 1
    theirs = tmp_path / "tiny-q8_0-by-llama-cpp.gguf"
    assert lc.llama_model_quantize(str(files["f32"]).encode(), str(theirs).encode(), params) == 0
    ours = {t.name: t for t in gguf.GGUFReader(files["q8_0"]).tensors}
    for t in gguf.GGUFReader(theirs).tensors:
        assert t.tensor_type == ours[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(ours[t.name].data)), t.name


def test_mlflow_models_serve_answers_like_transformers(tiny, mlflow_cfg, tmp_path):  # noqa: F811
    """The registered version (full fine-tuning: the model in bf16) behind the real HTTP server."""
    from stages.register import register

    finetuned, evaluation = tiny["finetuned"], tiny["root"] / "eval"
    cfg = RegisterConfig(model_name="consistency")
    rec = register(finetuned, evaluation, tmp_path / "reg", cfg, mlflow_cfg, GEN, REPO)
    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/consistency/{rec['version']}",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_cfg.tracking_uri, "PYTHONPATH": ""}
    # mlflow starts `uvicorn` by name: the venv's, also when the venv is not activated
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with open(log, "w") as out:  # cwd outside the repo: tagtune comes from the model's code/
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
# The embedded base (SmolLM2-135M-Instruct, a Q4_1 GGUF dequantised to fp32), measured (2026-11-25):
# at each prompt's first answer token llama.cpp's logits differ from transformers' by at most 0.18%
# of the largest logit in f16 and 3.5% in q8_0 (0.9 of 25). f16 answered all 3 questions token for
# token as transformers did; q8_0 1 of 3: "capital of France" opens with a near-tie ("The" 25.33 vs
# "L" 25.24 in transformers) that q8_0 flips ("L'Étoile, la Cité, ..."), and "primary colours" parts
# after 15 identical tokens. The bounds leave about 2x room.
REAL_MAX_LOGIT_ERROR = {"f16": 0.005, "q8_0": 0.06}  # max |Δ logit| / max |logit|
REAL_MIN_IDENTICAL = {"f16": 3, "q8_0": 1}  # of 3 answers


@pytest.mark.real_model
def test_real_base_gguf_via_llama_cpp_answers_like_transformers(tmp_path, monkeypatch):
    """The real base exported to GGUF f16 and q8_0 and run by llama.cpp, against transformers:
    greedy, the `chat` template (its own ChatML), 24 new tokens."""
    import torch

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
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with torch.inference_mode():
        ref = [model(torch.tensor([i])).logits[0, -1].numpy() for i in ids]
    for outtype in ("f16", "q8_0"):
        llm = _llama(export_gguf(Path(base), facts, tmp_path / f"base-{outtype}.gguf", outtype), n_ctx=512)
        _same_tokens(llm, tok, prompts)
        errors = _logit_errors(llm, ids, ref)
        assert max(errors) <= REAL_MAX_LOGIT_ERROR[outtype], (outtype, errors)
        got = _llama_answers(llm, prompts, facts["end_marker"], gen.max_new_tokens)
        same = sum(a == _printed(b) for a, b in zip(got, hf, strict=True))
        assert same >= REAL_MIN_IDENTICAL[outtype], (outtype, list(zip(got, hf, strict=True)))
        llm.close()
