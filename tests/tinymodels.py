"""Tiny random-init models (Llama, GPT-2) with a tokenizer trained in the test: fast, offline."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "What time does the museum open? <QUESTION>",
    "The museum opens at 9 am. <END>",
    "Where is the harbour? <QUESTION>",
    "The harbour is east of the old bridge. <END>",
    "great film, loved it",
    "terrible plot and bad acting",
    "an ok movie",
    "Sorry, I can only answer questions about the town.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-<>/",
] * 20


def train_tokenizer(dest: Path, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on CORPUS, saved as a fast tokenizer with eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.save_pretrained(dest)
    return fast


def make_tiny_model(dest: Path, arch: str = "llama", vocab_size: int = 400, seed: int = 0) -> Path:
    """Save a 2-layer random-init `arch` (llama | gpt2) model + trained tokenizer to `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    tok = train_tokenizer(dest, vocab_size)
    common = dict(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **common,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    else:
        raise ValueError(arch)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dest, safe_serialization=True)
    return dest
