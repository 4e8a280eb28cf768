"""`tagtune export` on a tiny random Llama: the GGUF reads back with llama.cpp's keys and tensor
types, transformers loads it to the same logits (within each type's measured error), the chat
template and the Ollama TEMPLATE render a question exactly as `render_prompt`, and bad requests
fail with one line and leave nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from flowrepo import tagtune

from tagtune.config import FormatConfig, GenerationConfig, TagsConfig
from tagtune.errors import TagtuneError
from tagtune.export import chat_template, export_gguf, export_merged, export_ollama, ollama_template
from tagtune.templates import render_prompt, renderer, template_facts

TAGGED = template_facts(FormatConfig(), "causal_lm")
QUESTIONS = ["What time does the museum open?", "  Where is the harbour? ", "abc 0123456789 <>!"]
PROMPTS = [  # what the logits are compared on: prompts as tagtune renders them, and an answer
    "What time does the museum open? <QUESTION>\n",
    "Where is the harbour? <QUESTION>\nThe harbour is east of the old bridge. <END>",
    "great film, loved it",
]
CHATML = (  # SmolLM2's chat template (a default system prompt when none is given)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# max |logit difference| / max |logit| after a GGUF round trip, measured on this model: f32 0 (the
# same floats); f16 2.5e-4 (each weight within 2^-11 relative, errors mostly cancel in the sums);
# q8_0 6.6e-3 (32-weight blocks scaled by their max/127). The bounds leave 3-4x room. Greedy argmax
# agreed on every position for all three; q8_0 is allowed 10% of near-ties to flip.
TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "q8_0": 2e-2}


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _logits(model, tok) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(tok(p, return_tensors="pt")["input_ids"]).logits[0] for p in PROMPTS]


def _ollama_prompt(template: str, question: str, system: str = "", history: tuple = ()) -> str:
    """What Ollama's template.go renders with a TEMPLATE that uses only its legacy variables: each
    earlier (question, answer) turn whole, the system prompt on the first turn only, then the last
    question with the template cut at {{ .Response }} (checked by hand against Go's text/template)."""

    def fill(text: str, prompt: str, response: str = "") -> str:
        for var, value in (
            ("{{ .System }}", system),
            ("{{ .Prompt }}", prompt),
            ("{{ .Response }}", response),
        ):
            text = text.replace(var, value)
        assert "{{" not in text, text
        return text

    rendered = ""
    for q, a in history:
        rendered += fill(template, q, a)
        system = ""
    return rendered + fill(template.split("{{ .Response }}")[0], question)


def _modelfile_block(text: str, keyword: str) -> str:
    return text.split(f'{keyword} """', 1)[1].split('"""', 1)[0]


# ------------------------------------------------------------------------------------------ GGUF
@pytest.mark.parametrize(("outtype", "file_type", "weights"), [("f16", 1, "F16"), ("q8_0", 7, "Q8_0")])
def test_gguf_has_llama_cpp_metadata_and_tensor_types(tiny_llama, tmp_path, outtype, file_type, weights):
    import gguf

    out = export_gguf(tiny_llama, TAGGED, tmp_path / "tiny.gguf", outtype)
    r = gguf.GGUFReader(out)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    expected = {
        "general.architecture": "llama",
        "general.file_type": file_type,
        "llama.block_count": 2,
        "llama.context_length": 256,
        "llama.embedding_length": 32,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 10000.0,
        "llama.rope.dimension_count": 8,
        "llama.vocab_size": 400,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",  # the test tokenizer: GPT-2's byte-level regex
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert len(meta["tokenizer.ggml.tokens"]) == 400
    assert meta["tokenizer.ggml.tokens"][0] == "<|endoftext|>"
    assert meta["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL
    merges = json.loads((tiny_llama / "tokenizer.json").read_text())["model"]["merges"]
    assert [m.split(" ") for m in meta["tokenizer.ggml.merges"]] == [
        m if isinstance(m, list) else m.split(" ") for m in merges
    ]
    assert meta["tokenizer.chat_template"] == chat_template(TAGGED, None)

    types = {t.name: t.tensor_type.name for t in r.tensors}
    blocks = [f"blk.{b}.{n}.weight" for b in (0, 1) for n in ("attn_q", "attn_k", "attn_v", "attn_output")]
    blocks += [f"blk.{b}.{n}.weight" for b in (0, 1) for n in ("ffn_gate", "ffn_up", "ffn_down")]
    norms = ["output_norm.weight"] + [
        f"blk.{b}.{n}.weight" for b in (0, 1) for n in ("attn_norm", "ffn_norm")
    ]
    # tied embeddings: no output.weight, llama.cpp reads token_embd for the output
    assert types == {
        "token_embd.weight": weights,
        **dict.fromkeys(blocks, weights),
        **dict.fromkeys(norms, "F32"),
    }


def test_q8_0_keeps_rows_not_a_multiple_of_32_in_f16(tiny_llama, tmp_path):
    """llama.cpp's fallback: Q8_0 packs blocks of 32, so 48-wide rows stay F16 (96-wide ones pack)."""
    import gguf
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        vocab_size=400,
        tie_word_embeddings=True,
    )
    dest = tmp_path / "wide"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dest)
    _tokenizer(tiny_llama).save_pretrained(dest)
    r = gguf.GGUFReader(export_gguf(dest, TAGGED, tmp_path / "wide.gguf", "q8_0"))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == "F16"  # rows of 48
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_gguf_loads_back_to_the_same_logits(tiny_llama, tmp_path, outtype):
    """transformers dequantises the GGUF (undoing the q/k permutation), as tagtune loads its base."""
    from transformers import AutoModelForCausalLM

    out = export_gguf(tiny_llama, TAGGED, tmp_path / "tiny.gguf", outtype)
    tok = _tokenizer(tiny_llama)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    gguf_tok = _tokenizer_from_gguf(out)
    for p in PROMPTS:
        assert gguf_tok(p)["input_ids"] == tok(p)["input_ids"]
    agree = []
    for a, b in zip(_logits(hf, tok), _logits(back, tok), strict=True):
        assert float((a - b).abs().max() / a.abs().max()) <= TOLERANCE[outtype]
        agree.append(float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    assert min(agree) >= (1.0 if outtype != "q8_0" else 0.9)


def _tokenizer_from_gguf(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_tag_tokens_are_user_defined_so_llama_cpp_prints_them(tiny_llama, tmp_path):
    """Tags added to the vocabulary (`format.tags.special_tokens`) are text the model writes and a
    stop string matches: USER_DEFINED, not CONTROL (which llama.cpp hides from the output)."""
    import gguf
    from transformers import AutoModelForCausalLM

    facts = template_facts(FormatConfig(tags=TagsConfig(special_tokens=True)), "causal_lm")
    tok = _tokenizer(tiny_llama)
    tok.add_special_tokens({"additional_special_tokens": facts["special_tokens"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path / "tagged")
    tok.save_pretrained(tmp_path / "tagged")
    out = export_gguf(tmp_path / "tagged", facts, tmp_path / "tagged.gguf")
    fields = gguf.GGUFReader(out).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    kinds = {t: gguf.TokenType(types[tokens.index(t)]).name for t in ["<|endoftext|>", "<QUESTION>", "<END>"]}
    assert kinds == {"<|endoftext|>": "CONTROL", "<QUESTION>": "USER_DEFINED", "<END>": "USER_DEFINED"}
    assert len(tokens) == fields["llama.vocab_size"].contents() == 402


def test_other_architectures_and_classifiers_are_refused(tiny_gpt2, tiny_llama, tmp_path):
    with pytest.raises(TagtuneError, match="architecture GPT2LMHeadModel cannot be exported to GGUF"):
        export_gguf(tiny_gpt2, TAGGED, tmp_path / "gpt2.gguf")
    classifier = {**TAGGED, "task": "classification"}
    with pytest.raises(TagtuneError, match="classification model"):
        export_ollama(tiny_llama, classifier, tmp_path / "clf")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("fmt", ["tagged", "text"])
def test_gguf_chat_template_renders_like_training(tiny_llama, fmt):
    facts = template_facts(FormatConfig(template=fmt), "causal_lm")
    tok, jinja = _tokenizer(tiny_llama), chat_template(facts, None)
    for q in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        rendered = tok.apply_chat_template(
            msgs, chat_template=jinja, tokenize=False, add_generation_prompt=True
        )
        assert rendered == render_prompt(q, facts)
    cfg = FormatConfig(template=fmt)
    turns = [
        {"role": r, "content": c}
        for r, c in [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    ]
    assert tok.apply_chat_template(turns, chat_template=jinja, tokenize=False) == "".join(
        s for s, _ in renderer(cfg)(turns, cfg)
    )


def test_chat_template_keeps_the_tokenizers_template_and_the_system_prompt(tiny_llama):
    tok = _tokenizer(tiny_llama)
    tok.chat_template = CHATML
    for system in (None, "Answer in one sentence."):
        facts = template_facts(FormatConfig(template="chat", system_prompt=system), "causal_lm")
        jinja = chat_template(facts, CHATML)
        msgs = [{"role": "user", "content": QUESTIONS[0]}]
        got = tok.apply_chat_template(msgs, chat_template=jinja, tokenize=False, add_generation_prompt=True)
        assert got == render_prompt(QUESTIONS[0], facts, tok)
        body, sys_prompt = ollama_template(facts, tok)
        assert sys_prompt == system
        assert _ollama_prompt(body, QUESTIONS[0], sys_prompt or "") == render_prompt(QUESTIONS[0], facts, tok)


# ------------------------------------------------------------------------------------- Ollama
def test_ollama_modelfile_renders_questions_like_render_prompt_and_stops_at_the_end_tag(tiny_llama, tmp_path):
    import gguf

    gen = GenerationConfig(max_new_tokens=48, repetition_penalty=1.1)
    out = export_ollama(tiny_llama, TAGGED, tmp_path / "town", "q8_0", gen)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    text = (out / "Modelfile").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "FROM ./model.gguf" in lines
    assert 'PARAMETER stop "<END>"' in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert "PARAMETER temperature 0" in lines  # greedy, as evaluate decodes
    assert {"PARAMETER num_predict 48", "PARAMETER repeat_penalty 1.1", "PARAMETER repeat_last_n -1"} <= set(
        lines
    )
    assert "SYSTEM" not in text  # the tagged template has no system prompt
    template = _modelfile_block(text, "TEMPLATE")
    for q in QUESTIONS:
        assert _ollama_prompt(template, q.strip()) == render_prompt(q, TAGGED)
    # an earlier turn closes its answer as training does, so a conversation renders as trained
    turns = [{"role": r, "content": c} for r, c in [("user", "Q1"), ("assistant", "A1"), ("user", "Q2")]]
    cfg = FormatConfig()
    trained = "".join(s for s, _ in renderer(cfg)([*turns, {"role": "assistant", "content": "A2"}], cfg))
    assert _ollama_prompt(template, "Q2", history=[("Q1", "A1")]) == trained[: trained.index("A2")]
    assert gguf.GGUFReader(out / "model.gguf").fields["general.file_type"].contents() == 7


# ------------------------------------------------------------------------------------- merged
def test_merged_export_reloads_to_identical_logits(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from tagtune.templates import read_template

    out = export_merged(tiny_llama, TAGGED, tmp_path / "merged")
    assert read_template(out) == TAGGED
    tok = _tokenizer(out)
    a = _logits(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), tok)
    b = _logits(AutoModelForCausalLM.from_pretrained(out).eval(), tok)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------- CLI
@pytest.fixture
def ws(tmp_path, tiny_llama, tiny_gpt2) -> Path:
    """A workspace with params.yaml and two local models with template.json (Llama, GPT-2)."""
    (tmp_path / "params.yaml").write_text("evaluate:\n  generation:\n    max_new_tokens: 40\n")
    for name, src in (("llama", tiny_llama), ("gpt2", tiny_gpt2)):
        shutil.copytree(src, tmp_path / name)
        (tmp_path / name / "template.json").write_text(json.dumps(TAGGED))
    return tmp_path


def _error_line(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    return r.stderr.strip()


def test_cli_errors_are_one_line_and_leave_no_output(ws):
    before = sorted(p.name for p in ws.iterdir())
    r = tagtune(ws, "export", "--format", "onnx", "--out", "town.onnx", "--model", "llama", timeout=120)
    assert (
        _error_line(r)
        == "tagtune export: error: --format onnx: unknown format (choose one of: merged, gguf, ollama)"
    )
    r = tagtune(ws, "export", "--format", "gguf", "--out", "town.gguf", "--model", "nowhere", timeout=120)
    assert _error_line(r).startswith("tagtune export: error: nowhere: no such model directory")
    r = tagtune(ws, "export", "--format", "ollama", "--out", "town", "--model", "gpt2", timeout=120)
    assert "architecture GPT2LMHeadModel cannot be exported to GGUF" in _error_line(r)
    assert sorted(p.name for p in ws.iterdir()) == before  # no output, no temp dir left beside it


def test_cli_exports_a_local_model_to_ollama(ws):
    r = tagtune(
        ws,
        "export",
        "--format",
        "ollama",
        "--out",
        "town",
        "--quant",
        "q8_0",
        "--model",
        "llama",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exported llama to town (ollama q8_0" in r.stdout
    assert "PARAMETER num_predict 40" in (ws / "town" / "Modelfile").read_text()  # from params.yaml
    assert (ws / "town" / "model.gguf").stat().st_size > 0
