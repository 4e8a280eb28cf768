"""Reranking retrieved facts with a trained cross-encoder, with a "none of these" answer.

    reranker = train_reranker(train_examples, base_dir, cfg, seed, precision)   # finetune, grounded
    index = attach(FactIndex.load("data/index"), model_root)                      # every consumer
    index.search(["Where is the Hollin Gallery?"], k=2)   # BM25 top-`candidates`, reranked, top k

Why: BM25 finds the right fact among its top 8 for ~92-96% of unseen phrasings, but ranks it first for
only ~60-65%: facts about one place share its name ("The Hollin Gallery is open…", "The Hollin Gallery on
Fore Street … is free"), and a grounded 135M model given several of them copies the wrong one as often as
not. A cross-encoder reads question and fact together. It is the base model itself, LoRA-tuned to answer
"Does the fact answer the question?": its score is logit(" Yes") − logit(" No") after the prompt below.

Training (listwise, on the train split only): per question, its fact among BM25's hard negatives, a
softmax over the candidates *plus a null option whose score is fixed at 0*. Target: the gold fact; or
the null option for out-of-domain questions and for a `retrieval.gold_absent` share of in-domain ones
trained with their fact removed. So a score above 0 means "this fact answers it, better than nothing
does", and the best fact's score is the grounded answer's confidence: evaluate chooses the abstention
threshold on it (tagtune/grounding.py; 0 when none is chosen). Where 0 sits moves from run to run and
with the number of negatives, hence the threshold chosen on val rather than 0 alone (README: Results).
The loss is not one HF Trainer or TRL offers (a listwise softmax with a fixed null logit), hence the
short loop here.

The adapter is saved in finetune's output (`reranker/`), registered with the model, and attached to the
fact index by evaluate, the pyfunc, chat and the UI (`attach`): a fact added later is scored too, so new
facts still need no retraining.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

# RERANKER_DIR: in finetune output and versions; MERGED_*, WEIGHTS_KEY: as the merged answering model's
from tagtune.models import MERGED_DIR, MERGED_RECORD, RERANKER_DIR, WEIGHTS_KEY, block_list_name
from tagtune.retrieval import FactIndex, Hit, facts_from_examples
from tagtune.text import normalize

META_FILE = "reranker.json"  # beside the adapter: candidates per question, training facts, base reference
PROMPT = "Fact: {fact}\nQuestion: {question}\nDoes the fact answer the question? Answer:"


class Reranker:
    """Scores (question, fact) pairs; `rerank` orders BM25's candidates by them."""

    def __init__(self, model: Any, tokenizer: Any, candidates: int = 8, batch_size: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.candidates, self.batch_size = candidates, batch_size
        self.yes, self.no = (tokenizer(w, add_special_tokens=False)["input_ids"][-1] for w in (" Yes", " No"))

    def _logits(self, pairs: list[tuple[str, str]]):
        """Score of each (question, fact) pair as a tensor (gradients flow: training uses it too)."""
        import torch.nn.functional as F

        self.tokenizer.padding_side = "left"  # the score is read at the last position
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        texts = [PROMPT.format(fact=f, question=q) for q, f in pairs]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.model.device)
        # the last hidden state through the two rows of the LM head the score reads. The whole head, even
        # on the last position only (logits_to_keep=1), made torch copy its 49,152 x 576 weight once per
        # sequence: with frozen weights (a merged adapter, LoRA training) its matmul of the strided
        # [B, 1, H] slice becomes a bmm on an expanded weight, 58% of scoring time in a profile
        # (bench/rerank.py). (Heads that rescale logits, e.g. Gemma's soft-capping, are not supported.)
        hidden = self.model.get_decoder()(**enc).last_hidden_state[:, -1]
        head = self.model.get_output_embeddings()
        rows = [self.yes, self.no]
        bias = None if head.bias is None else head.bias[rows]
        logits = F.linear(hidden, head.weight[rows], bias).float()
        return logits[:, 0] - logits[:, 1]

    def scores(self, pairs: list[tuple[str, str]]) -> list[float]:
        import torch

        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(pairs), self.batch_size):
                out += self._logits(pairs[i : i + self.batch_size]).tolist()
        return out

    def rerank(self, questions: list[str], candidates: list[list[Hit]], k: int) -> list[list[Hit]]:
        """The top `k` of each candidate list by reranker score (scores replaced: > 0 = it answers)."""
        pairs = [(q, h.fact.text) for q, hits in zip(questions, candidates, strict=True) for h in hits]
        flat = iter(self.scores(pairs))
        out = []
        for hits in candidates:
            scored = [Hit(h.fact, round(next(flat), 4)) for h in hits]
            out.append(sorted(scored, key=lambda h: -h.score)[:k])
        return out

    @classmethod
    def load(
        cls, directory: str | Path, base: Any, tokenizer: Any, candidates: int, layers: int = 0
    ) -> Reranker:
        """The adapter in `directory` on `base` (a model object of the same base, cut to its first
        `layers` blocks as in training), merged."""
        from tagtune.models import runnable

        return cls(runnable(_merge(directory, base, layers)).eval(), tokenizer, candidates)


def _merge(directory: str | Path, base: Any, layers: int) -> Any:
    """The adapter in `directory` merged into `base` cut to `layers` blocks, in the base's dtype."""
    from peft import PeftModel

    return PeftModel.from_pretrained(truncate(base, layers), str(directory)).merge_and_unload()


def truncate(model: Any, layers: int) -> Any:
    """`model` keeping only its first `layers` transformer blocks (0 or more than it has: all of them).

    Why: a cheaper reranker, in training and at every question asked. Measured (README: what was
    tried): SmolLM2's first 15 of 30 blocks cost half and ranked a few points below all of them.
    """
    n = model.config.num_hidden_layers
    if not 0 < layers < n:
        return model
    parent, _, attr = block_list_name(model).rpartition(".")
    setattr(model.get_submodule(parent), attr, getattr(model.get_submodule(parent), attr)[:layers])
    model.config.num_hidden_layers = layers
    return model


def _adapted(model: Any, top: int) -> str | list[str]:
    """LoRA's targets: every linear layer of the blocks ("all-linear"), or of the last `top` blocks only.

    Why: activations below the first adapted block need no gradient, so the backward pass (2/3 of a
    step's FLOPs) stops there. peft's `layers_to_transform` refuses "all-linear", hence full names.
    """
    import torch
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    n = model.config.num_hidden_layers
    if not 0 < top < n:
        return "all-linear"
    prefixes = tuple(f"{block_list_name(model)}.{i}." for i in range(n - top, n))
    linear = (torch.nn.Linear, Conv1D)
    return [k for k, m in model.named_modules() if isinstance(m, linear) and k.startswith(prefixes)]


def attach(index: FactIndex | None, root: str | Path, candidates: int | None = None) -> FactIndex | None:
    """`index` with the reranker saved under `root/reranker` (finetune's output or a version's
    artifacts), if there is one; `index` unchanged otherwise. A merged copy kept there (`keep_merged`,
    a chat cache entry) is loaded instead of base + adapter, after checking its sha256."""
    directory = Path(root) / RERANKER_DIR
    if index is None or not (directory / "adapter_config.json").is_file():
        return index
    import torch

    from tagtune.io import read_json
    from tagtune.models import load_model, load_tokenizer, runnable, verify_weights

    meta = read_json(directory / META_FILE)
    candidates = candidates or meta["candidates"]
    merged = directory / MERGED_DIR
    if (merged / MERGED_RECORD).is_file():
        record = read_json(merged / MERGED_RECORD)
        hint = f"a cached merge of {directory}'s adapter: delete {merged} and the next chat start rebuilds it"
        verify_weights(merged, record[WEIGHTS_KEY], merged / MERGED_RECORD, hint)
        model = load_model(str(merged), dtype=getattr(torch, record["dtype"]), local_files_only=True)
        index.reranker = Reranker(runnable(model).eval(), load_tokenizer(str(merged)), candidates)
    else:
        base, tokenizer = _base_of(directory, meta)
        index.reranker = Reranker.load(directory, base, tokenizer, candidates, meta.get("layers", 0))
    return index


def _base_of(directory: Path, meta: dict[str, Any]) -> tuple[Any, Any]:
    """(model, tokenizer) of the base the adapter in `directory` was trained on, verified by its sha256,
    in the dtype training held it in."""
    import torch

    from tagtune.models import load_model, load_tokenizer, resolve_reference

    base_dir = resolve_reference(meta["base"], directory / META_FILE)  # the same bytes it was trained on
    dtype = meta["base"].get("dtype")
    base = load_model(base_dir, "causal_lm", dtype=getattr(torch, dtype) if dtype else None)
    return base, load_tokenizer(base_dir)


def keep_merged(root: str | Path) -> None:
    """Give a cached grounded version's reranker a merged copy, `reranker/merged/` (once, atomically,
    with its sha256 and dtype), so every later `attach` loads one model: no base resolution, no peft
    import, no merge (2.7 s of a `tagtune chat` start in a profile; README: Benchmarks).

    As `tagtune.models.keep_merged` for the answering model: only for tagtune's own cache entries.
    """
    from tagtune.io import atomic_path, read_json, write_json
    from tagtune.models import weights_sha256

    directory = Path(root) / RERANKER_DIR
    kept = (directory / MERGED_DIR / MERGED_RECORD).is_file()
    if kept or not (directory / "adapter_config.json").is_file():
        return
    meta = read_json(directory / META_FILE)
    base, tokenizer = _base_of(directory, meta)
    model = _merge(directory, base, meta.get("layers", 0))  # its merge dtype: bf16 stays half the bytes
    with atomic_path(directory / MERGED_DIR, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {WEIGHTS_KEY: weights_sha256(tmp, (".",)), "dtype": str(model.dtype).removeprefix("torch.")}
        write_json(tmp / MERGED_RECORD, record)


# -------------------------------------------------------------------------------------------- training
def training_lists(
    examples: list[dict[str, Any]], index: FactIndex, negatives: int, gold_absent: float, seed: int
) -> list[tuple[str, list[str], int]]:
    """(question, candidate facts, target) per train question: BM25's `negatives` best facts other than
    its own, and target = the gold's position + 1; or 0 (the null option) for out-of-domain questions
    and a `gold_absent` share trained without their fact."""
    rng = random.Random(seed)
    rows = [ex for ex in examples if ex.get("kind") in ("qa", "refusal")]
    out = []
    for ex, hits in zip(rows, index.search([ex["question"] for ex in rows], negatives + 1), strict=True):
        gold = ex["reference"] if ex["kind"] == "qa" else None
        negs = [h.fact.text for h in hits if gold is None or normalize(h.fact.text) != normalize(gold)]
        negs = negs[:negatives]
        if gold is not None and rng.random() >= gold_absent:
            at = rng.randrange(len(negs) + 1)
            out.append((ex["question"], [*negs[:at], gold, *negs[at:]], at + 1))
        elif negs:
            out.append((ex["question"], negs, 0))
    return out


def train_reranker(
    examples: list[dict[str, Any]], base: Any, tokenizer: Any, cfg: Any, gold_absent: float, seed: int,
) -> tuple[Reranker, dict[str, Any]]:  # fmt: skip
    """LoRA-tune `base` (the base model, loaded for this) as a reranker on the train split's questions.

    Args:
        cfg: `retrieval.rerank` (steps, candidates, batch_questions, learning_rate, lora_r).
    Returns:
        (the reranker, facts for training.json: steps, lists, first/last loss, seconds).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    index = FactIndex(facts_from_examples(examples))
    lists = training_lists(examples, index, cfg.negatives, gold_absent, seed)
    base = truncate(base, cfg.layers)
    model = get_peft_model(
        base,
        LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules=_adapted(base, cfg.adapt_layers)),
    )
    reranker = Reranker(model, tokenizer, cfg.candidates)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    rng, losses, start = random.Random(seed), [], time.perf_counter()
    model.train()
    for _ in range(cfg.steps):
        batch = rng.sample(lists, min(cfg.batch_questions, len(lists)))
        scores = reranker._logits([(q, f) for q, facts, _ in batch for f in facts])
        loss, at = 0.0, 0
        for _, facts, target in batch:  # lists differ in length when the index is small
            row = torch.cat([torch.zeros(1), scores[at : at + len(facts)]])  # the null option at 0
            loss = loss + torch.nn.functional.cross_entropy(row[None], torch.tensor([target]))
            at += len(facts)
        (loss / len(batch)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / len(batch))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"reranker loss is not finite at step {len(losses)}")
    model.eval()
    facts = {"steps": cfg.steps, "lists": len(lists), "candidates": cfg.candidates, "layers": cfg.layers,
             "adapt_layers": cfg.adapt_layers, "negatives": cfg.negatives,
             "loss_first": round(losses[0], 4) if losses else None,
             "loss_last": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4) if losses else None,
             "wall_time_s": round(time.perf_counter() - start, 1)}  # fmt: skip
    return reranker, facts


def save_reranker(reranker: Reranker, dest: Path, facts: dict[str, Any], base: dict[str, Any]) -> None:
    """The adapter and reranker.json (its training facts, candidates, and `base`: the content-hashed
    reference to the base model it was trained on, `tagtune.models.base_reference`) to `dest`."""
    from tagtune.io import write_json

    reranker.model.save_pretrained(dest)
    write_json(dest / META_FILE, {**facts, "base": base})
