"""Export a fine-tuned model to where people run small models: a merged HF dir, a GGUF file
(llama.cpp, LM Studio, ...) or an Ollama model (GGUF + Modelfile).

    tagtune export --format gguf --out town.gguf [--quant q8_0]     # @champion from the registry
    tagtune export --format ollama --out town/ --model models/finetune && cd town && ollama create town

The GGUF writer follows llama.cpp's convert_hf_to_gguf.py for the Llama architecture (SmolLM2 is
one): the same metadata keys, q/k rows permuted to GGML's rotary layout, norms and other 1-D
tensors kept F32, Q8_0 only for rows whose length is a multiple of 32 (else F16), no output.weight
when the embeddings are tied, the BPE vocabulary with llama.cpp's pre-tokenizer name. Two things
differ on purpose, both so the model behaves as tagtune trained and evaluated it: BOS/EOS are never
added to a prompt (tagtune's inference adds none), and tagtune's own tag tokens
(`format.tags.special_tokens`) are USER_DEFINED rather than CONTROL, so llama.cpp prints `<END>` and
a stop string can match it. The chat template renders a question exactly as `render_prompt` does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from tagtune.config import FormatConfig, GenerationConfig
from tagtune.errors import TagtuneError
from tagtune.io import atomic_path, check_replaceable, read_json
from tagtune.models import export_model_dir, find_model, load_tokenizer
from tagtune.retrieval import FACTS_FILE
from tagtune.templates import TEMPLATE_FILE, render_turn, renderer, write_template

FORMATS = ("merged", "gguf", "ollama")
OUTTYPES = ("f16", "q8_0", "f32")  # llama.cpp's --outtype names
ARCHITECTURES = ("LlamaForCausalLM",)  # what the GGUF writer knows; SmolLM2 is one
MERGED_FILES = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model")  # an HF model dir's files
OLLAMA_FILES = ("model.gguf", "Modelfile")


# ----------------------------------------------------------------------------------- the input
def model_source(path: str | Path, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """(complete HF model dir, template facts) for a finetune output, a pulled version or an HF dir.

    An adapter-only model is merged into its base under `workdir` first (`export_model_dir`), so
    every format starts from a plain HF model; weights are checked against their recorded hashes.

    Raises:
        TagtuneError: nothing there, no model or template.json, or weights that changed.
    """
    path = Path(path)
    if not path.exists():
        raise TagtuneError(f"{path}: no such model directory (a finetune output, a pulled dir or an HF dir)")
    model_dir = export_model_dir(path, workdir / "merged")
    _, template_file = find_model(path)
    return model_dir, read_json(template_file)


def is_grounded(path: str | Path) -> bool:
    """Whether the model was trained to answer from retrieved facts (which no export carries along)."""
    root, _ = find_model(path)
    training = root / "training.json"
    return (root / "index" / FACTS_FILE).is_file() or bool(
        training.is_file() and read_json(training).get("grounded")
    )


def check_request(fmt: str, out: Path, outtype: str | None = None, force: bool = False) -> None:
    """Refuse a bad request before any model is loaded or pulled (the CLI calls this first).

    Raises:
        TagtuneError: unknown format or quantisation (or one given for `merged`), a GGUF path not
            ending in .gguf, or an `out` holding files tagtune did not write (`check_replaceable`).
    """
    if fmt not in FORMATS:
        raise TagtuneError(f"--format {fmt}: unknown format (choose one of: {', '.join(FORMATS)})")
    if outtype is not None and outtype not in OUTTYPES:
        raise TagtuneError(f"--quant {outtype}: unknown quantisation (choose one of: {', '.join(OUTTYPES)})")
    if fmt == "merged" and outtype is not None:
        raise TagtuneError(
            f"--quant {outtype}: a merged export keeps the weights as they are (gguf/ollama only)"
        )
    if fmt == "gguf" and out.suffix != ".gguf":
        raise TagtuneError(f"--out {out}: a GGUF export is one file and its name must end in .gguf")
    check_replaceable(out, {"merged": MERGED_FILES, "ollama": OLLAMA_FILES}.get(fmt, ()), force)


def _refuse_classifier(template: dict[str, Any], fmt: str) -> None:
    if template.get("task") == "classification":
        raise TagtuneError(
            f"{fmt}: this is a classification model (a label head, not a text generator), which "
            "llama.cpp and Ollama cannot run; export it with --format merged"
        )


# -------------------------------------------------------------------------------------- merged
def export_merged(model_dir: Path, template: dict[str, Any], dest: Path, force: bool = False) -> Path:
    """Write a complete HF safetensors model dir (weights, config, tokenizer) + template.json.

    The files are copied as they are (the bytes evaluate scored), so the copy reloads to identical
    logits; `dest` is written atomically and replaces only a previous export (or anything, `force`).

    Raises:
        TagtuneError: `model_dir` has no safetensors weights; OutputPathError: `dest` is not ours.
    """
    model_dir, dest = Path(model_dir), Path(dest)
    if not any(model_dir.glob("*.safetensors")):
        raise TagtuneError(f"{model_dir}: no *.safetensors weights to export")
    with atomic_path(dest, MERGED_FILES, force) as tmp:
        tmp.mkdir()
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.name != TEMPLATE_FILE:
                shutil.copy2(f, tmp / f.name)
        write_template(tmp, template)
    return dest


# ---------------------------------------------------------------------------- GGUF: hyperparams
def _hparams(model_dir: Path) -> dict[str, Any]:
    """config.json of a model the GGUF writer supports.

    Raises:
        TagtuneError: another architecture, or a RoPE scaling this writer does not carry over.
    """
    hp = read_json(model_dir / "config.json")
    arch = (hp.get("architectures") or ["(none given)"])[0]
    if arch not in ARCHITECTURES:
        raise TagtuneError(
            f"{model_dir}: architecture {arch} cannot be exported to GGUF yet (supported: "
            f"{', '.join(ARCHITECTURES)}); use --format merged"
        )
    rope = {**(hp.get("rope_scaling") or {}), **(hp.get("rope_parameters") or {})}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear"):
        raise TagtuneError(
            f"{model_dir}: RoPE scaling {rope.get('rope_type')!r} cannot be exported to GGUF yet"
        )
    hp["_rope"] = rope
    return hp


def _write_hparams(w: Any, hp: dict[str, Any], ftype: int) -> None:
    """The `llama.*` keys, as convert_hf_to_gguf.py's TextModel and LlamaModel write them."""
    import gguf

    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp.get("num_key_value_heads") or hp["num_attention_heads"])
    rope = hp["_rope"]
    if rope.get("rope_type", rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_freq_base(rope.get("rope_theta", hp.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if (head_dim := hp.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(ftype)
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(head_dim or hp["hidden_size"] // hp["num_attention_heads"])


# ------------------------------------------------------------------------------- GGUF: tensors
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout (halves) → GGML's (interleaved pairs): llama.cpp's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) of every weight; F16 stays F16, anything else (BF16, F64) becomes F32."""
    import torch
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = f.get_tensor(name)
                yield name, (t if t.dtype in (torch.float16, torch.float32) else t.float()).numpy()


def _gguf_tensors(model_dir: Path, hp: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, array) in llama.cpp's naming, q/k permuted, the tied lm_head left out."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["num_hidden_layers"])
    n_head = hp["num_attention_heads"]
    n_kv = hp.get("num_key_value_heads") or n_head
    for name, data in _hf_tensors(model_dir):
        if name.endswith(".rotary_emb.inv_freq") or (
            name == "lm_head.weight" and hp.get("tie_word_embeddings")
        ):
            continue  # recomputed by llama.cpp / the same matrix as token_embd
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise TagtuneError(f"{model_dir}: tensor {name} has no GGUF name for the llama architecture")
        yield new, data


def _qtype(name: str, data: np.ndarray, outtype: str) -> Any:
    """llama.cpp's choice: F32 for 1-D tensors, norms and non-weights; else the file's type."""
    from gguf import GGMLQuantizationType as Q

    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    return {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[outtype]


def _add_tensors(w: Any, model_dir: Path, hp: dict[str, Any], outtype: str) -> None:
    import gguf

    for name, data in _gguf_tensors(model_dir, hp):
        qtype = _qtype(name, data, outtype)
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # Q8_0 needs rows of a multiple of 32: llama.cpp falls back to F16
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, packed, raw_dtype=qtype)


# ------------------------------------------------------------------------------- GGUF: tokenizer
# llama.cpp names a BPE pre-tokenizer by hashing the ids this text encodes to (its
# get_vocab_base_pre); a vocabulary it does not know falls back to the tokenizer.json shape below.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 "
    "33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2"
    "\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def _pre_tokenizer(tok: Any, model_dir: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this tokenizer.

    Raises:
        TagtuneError: a pre-tokenizer llama.cpp would split differently from this one.
    """
    if pre := _PRE_BY_HASH.get(sha256(str(tok.encode(_CHKTXT)).encode()).hexdigest()):
        return pre
    spec = read_json(model_dir / "tokenizer.json").get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1].get("use_regex", True) and not steps[-1].get("add_prefix_space")
    if kinds == ["ByteLevel"] and byte_level:
        return "gpt-2"  # the GPT-2 regex, which llama.cpp's "gpt-2" pre-tokenizer uses too
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level:
        return "smollm"  # digits one by one, then the GPT-2 regex
    raise TagtuneError(f"{model_dir}: pre-tokenizer {kinds} has no llama.cpp equivalent this export knows")


def _vocab(tok: Any, vocab_size: int, tags: list[str]) -> tuple[list[str], list[int]]:
    """Tokens and their types as llama.cpp's get_vocab_base lists them, ids past the tokenizer
    padded as UNUSED; tagtune's tag tokens are USER_DEFINED so they print and can stop generation."""
    from gguf import TokenType

    by_id = {i: t for t, i in tok.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise TagtuneError(
            f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings"
        )
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        kind = TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalised
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            special = (decoder[i].special or looks_special) and token not in tags
            kind = TokenType.CONTROL if special else TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _jinja_str(text: str) -> str:
    """`text` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template(
    template: dict[str, Any], tokenizer_template: str | list[Any] | None
) -> str | list[Any] | None:
    """A Jinja chat template (tokenizer.chat_template) rendering a conversation as training did.

    `tagged`: `{question} <QUESTION>\\n`, answers `{answer} <END>` + `\\n` between turns; `text`: the
    turns joined by newlines; `chat`: the tokenizer's own template, with `format.system_prompt`
    as the default system message when one is set (as tagtune's `chat` renderer does).
    """
    cfg = FormatConfig.model_validate(template["format"])
    if cfg.template == "chat":
        if cfg.system_prompt is None or not isinstance(tokenizer_template, str):
            return tokenizer_template
        system = "{'role': 'system', 'content': " + _jinja_str(cfg.system_prompt) + "}"
        return (
            "{%- if messages[0]['role'] != 'system' -%}{%- set messages = [" + system + "] + messages -%}"
            "{%- endif -%}" + tokenizer_template
        )
    if cfg.template == "text":
        return (
            "{%- for m in messages -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
            "{{ m['content'] | trim if m['role'] == 'user' else m['content'] }}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '\\n' }}{%- endif -%}"
        )
    question, end = _jinja_str(f" {cfg.tags.question}\n"), _jinja_str(f" {cfg.tags.end}")
    return (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{{ m['content'] + '\\n' }}"
        "{%- elif m['role'] == 'user' -%}{{ m['content'] | trim }}{{ " + question + " }}"
        "{%- else -%}{{ m['content'] }}{{ " + end + " }}{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}"
        "{%- endif -%}{%- endfor -%}"
    )


def _add_vocab(w: Any, model_dir: Path, template: dict[str, Any], vocab_size: int) -> None:
    """tokenizer.ggml.*: llama.cpp's _set_vocab_gpt2, plus tagtune's chat template and no BOS/EOS."""
    import gguf

    tok = load_tokenizer(str(model_dir))
    tokens, types = _vocab(tok, vocab_size, template.get("special_tokens") or [])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tok, model_dir))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.chat_template = chat_template(template, special.chat_template)
    # tagtune tokenises prompts with add_special_tokens=False: a BOS/EOS would be a prompt it never saw
    special.add_special_token.update(bos=False, eos=False)
    special.add_to_gguf(w, quiet=True)


# -------------------------------------------------------------------------------------- GGUF
def export_gguf(
    model_dir: Path, template: dict[str, Any], dest_file: Path, outtype: str = "f16", force: bool = False
) -> Path:
    """Write `model_dir` as one GGUF file that llama.cpp, LM Studio and Ollama load.

    Args:
        model_dir: a complete HF model dir (config.json, safetensors, tokenizer); see `model_source`.
        template: the template facts the model was trained with (its chat template comes from them).
        dest_file: the .gguf file, written atomically (a failed export leaves nothing behind).
        outtype: `f16` (default, what llama.cpp's converter writes), `q8_0` (about half the size,
            close to lossless) or `f32`.

    Raises:
        TagtuneError: a classification model, an architecture other than Llama, or an unknown outtype.
    """
    import gguf

    _refuse_classifier(template, "gguf")
    if outtype not in OUTTYPES:
        raise TagtuneError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    model_dir, dest_file = Path(model_dir), Path(dest_file)
    hp = _hparams(model_dir)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        outtype, gguf.LlamaFileType.MOSTLY_Q8_0
    )
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_tensors(w, model_dir, hp, outtype)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(dest_file.stem)
    _write_hparams(w, hp, ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(w, model_dir, template, hp["vocab_size"])
    with atomic_path(dest_file, force=force) as tmp:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return dest_file


# ------------------------------------------------------------------------------------ Ollama
_Q, _A, _S = "\x02", "\x03", "\x01"  # stand-ins for the question, the answer, the system prompt


def _go_text(text: str) -> str:
    """Literal text inside a Go template (only `{{` would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(template: dict[str, Any], tokenizer: Any = None) -> tuple[str, str | None]:
    """(TEMPLATE, SYSTEM or None) for a Modelfile: a question rendered exactly as `render_prompt`.

    The frame around the question and the answer comes from tagtune's own renderer (`render_turn`
    with stand-ins), so it cannot drift from training. Ollama's legacy variables are used: for the
    last question Ollama renders `head{{ .Prompt }}mid` and cuts at `{{ .Response }}`; each earlier
    turn is rendered whole, with the answer's closing taken from a two-turn rendering, so a
    conversation reads as training renders one where every turn opens alike (`tagged`, `text`).
    A `chat` template's head holds the system block, which Ollama repeats on every earlier turn.
    """
    cfg = FormatConfig.model_validate(template["format"])
    facts, system = template, cfg.system_prompt
    if system is not None:  # only the `chat` renderer shows it; then Ollama's SYSTEM can override it
        facts = {**template, "format": {**template["format"], "system_prompt": _S}}
    text = "".join(s for s, _ in render_turn(_Q, _A, facts, tokenizer))
    head, rest = text.split(_Q)
    mid, tail = rest.split(_A)
    turns = [{"role": r, "content": c} for r, c in (("user", _Q), ("assistant", _A)) * 2]
    two = FormatConfig.model_validate(facts["format"])
    between = "".join(s for s, _ in renderer(two, tokenizer)(turns, two)).split(_A)[1].split(_Q)[0]
    if between.endswith(head):  # the next turn opens with `head` again: close the answer as trained
        tail = between[: len(between) - len(head)]
    if _S not in head:
        system = None
    head = _go_text(head).replace(_S, "{{ .System }}")
    body = f"{head}{{{{ .Prompt }}}}{_go_text(mid)}{{{{ .Response }}}}{_go_text(tail)}"
    return body, system


def _modelfile_string(text: str, what: str) -> str:
    if '"""' in text:
        raise TagtuneError(f'{what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(template: dict[str, Any], tokenizer: Any, gen: GenerationConfig) -> str:
    """An Ollama Modelfile for `./model.gguf`: the prompt template, the stop strings (end tag, EOS)
    and tagtune's generation settings (greedy decoding is temperature 0 in Ollama)."""
    body, system = ollama_template(template, tokenizer)
    lines = ["# written by `tagtune export`; in this directory: ollama create NAME -f Modelfile"]
    lines += ["FROM ./model.gguf", f"TEMPLATE {_modelfile_string(body, 'the prompt template')}"]
    if system is not None:
        lines.append(f"SYSTEM {_modelfile_string(system, 'format.system_prompt')}")
    for stop in dict.fromkeys(s for s in (template.get("end_marker"), tokenizer.eos_token) if s):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    lines.append(f"PARAMETER temperature {gen.temperature if gen.do_sample else 0}")
    lines += [f"PARAMETER top_k {gen.top_k}", f"PARAMETER top_p {gen.top_p}"]
    lines.append(f"PARAMETER repeat_penalty {gen.repetition_penalty}")
    if gen.repetition_penalty != 1.0:  # transformers penalises every earlier token, not the last 64
        lines.append("PARAMETER repeat_last_n -1")
    lines.append(f"PARAMETER num_predict {gen.max_new_tokens}")
    return "\n".join(lines) + "\n"


def export_ollama(
    model_dir: Path,
    template: dict[str, Any],
    dest_dir: Path,
    outtype: str = "f16",
    gen: GenerationConfig | None = None,
    force: bool = False,
) -> Path:
    """Write `dest_dir/model.gguf` + `dest_dir/Modelfile` (then `ollama create NAME -f Modelfile`).

    Raises:
        TagtuneError: a classification model, or what `export_gguf` refuses.
    """
    _refuse_classifier(template, "ollama")
    model_dir, dest_dir = Path(model_dir), Path(dest_dir)
    text = modelfile(template, load_tokenizer(str(model_dir)), gen or GenerationConfig())
    with atomic_path(dest_dir, OLLAMA_FILES, force) as tmp:
        tmp.mkdir()
        export_gguf(model_dir, template, tmp / "model.gguf", outtype)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
    return dest_dir


def export(
    fmt: str,
    model_dir: Path,
    template: dict[str, Any],
    out: Path,
    outtype: str | None = None,
    gen: GenerationConfig | None = None,
    force: bool = False,
) -> Path:
    """Write `model_dir` to `out` in format `fmt` (see FORMATS; `outtype` None: f16); what the CLI calls."""
    check_request(fmt, Path(out), outtype, force)
    outtype = outtype or "f16"
    writers = {
        "merged": lambda: export_merged(model_dir, template, out, force),
        "gguf": lambda: export_gguf(model_dir, template, out, outtype, force),
        "ollama": lambda: export_ollama(model_dir, template, out, outtype, gen, force),
    }
    return writers[fmt]()
