"""The seeds' way of fine-tuning, written faithfully as a small script (the baseline tagtune is compared to).

    python -m bench.seed_baseline [--steps 3] [--base embedded]

What the seed scripts did, kept as-is (including their bugs, because that is what is measured):
HF Trainer with the default collator; every example tokenised with `padding="max_length",
max_length=512, truncation=True`; `pad_token = eos_token`; `labels = input_ids` (a plain copy);
peft LoRA with the defaults they used (r=8, alpha=16, dropout 0.05, default target modules), fp32;
batch 4. Trained on the same tagged text tagtune trains on: `{question} <QUESTION>\\n{answer} <END>`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import base_dir, emit, log, parser, quiet, shipped_splits, stdout_to_stderr

SEED_MAX_LENGTH = 512  # every example padded to this
SEED_BATCH_SIZE = 4


def tagged_texts(splits: Path) -> list[str]:
    """The train split as the seeds saw it: each example's tagged text, prompt and answer joined."""
    from tagtune.io import read_jsonl

    return ["".join(text for text, _ in ex["segments"]) for ex in read_jsonl(Path(splits) / "train.jsonl")]


def train_seed_way(
    splits: Path,
    model_dir: str,
    out_dir: Path,
    max_steps: int,
    max_length: int = SEED_MAX_LENGTH,
    batch_size: int = SEED_BATCH_SIZE,
) -> dict[str, Any]:
    """Fine-tune `model_dir` on `splits/train.jsonl` the seeds' way for `max_steps` optimizer steps.

    Returns:
        steps, tokens_seen (non-pad), padded_tokens (what the model actually computed on),
        wall_time_s (of `trainer.train()`, as tagtune's finetune reports it), tokens_per_s (non-pad).
    """
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # fp32
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM"))

    def tokenize(batch: dict[str, list[str]]) -> dict[str, Any]:
        enc = tokenizer(batch["text"], padding="max_length", max_length=max_length, truncation=True)
        # The seeds' labels: a plain copy of input_ids. This also trains on the prompt, and trains
        # every pad position to predict EOS (pad == eos); masking pads by `ids == pad_token_id`, the
        # other common seed variant, would mask the real EOS too (transformers #23530). Their bug,
        # measured as-is: it costs nothing extra per step, the padding is what costs.
        enc["labels"] = [ids.copy() for ids in enc["input_ids"]]
        return enc

    ds = Dataset.from_dict({"text": tagged_texts(splits)}).map(
        tokenize, batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=2e-4,
        logging_steps=10,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        # instrumentation only (not in the seeds): counts attention_mask == 1, i.e. real tokens
        include_num_input_tokens_seen="non_padding",
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    steps = trainer.state.global_step
    real = int(trainer.state.num_input_tokens_seen)
    return {
        "steps": steps,
        "tokens_seen": real,
        "padded_tokens": steps * batch_size * max_length,
        "wall_time_s": round(wall, 3),
        "tokens_per_s": round(real / wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--base", default="embedded", help="model.base spec (default: embedded)")
    args = ap.parse_args(argv)
    quiet()
    with tempfile.TemporaryDirectory(prefix="tagtune-bench-") as tmp, stdout_to_stderr():
        splits = shipped_splits(Path(tmp))
        log(f"seed baseline: {args.steps} steps on {args.base}")
        r = train_seed_way(splits, base_dir(args.base), Path(tmp) / "seed", args.steps)
    emit(
        {"bench": "seed_baseline", **r},
        f"seed way: {r['steps']} steps, {r['tokens_seen']} real tokens of {r['padded_tokens']} computed "
        f"({r['padded_tokens'] / max(r['tokens_seen'], 1):.1f}x padding), {r['tokens_per_s']:.0f} real tokens/s",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
