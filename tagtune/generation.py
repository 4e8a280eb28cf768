"""Batched answer generation shared by evaluate, the MLflow pyfunc model, `tagtune chat` and the UI.

Batches are left-padded (decoder-only models continue from the right edge), sorted by prompt length
so little padding is wasted, decoded with the KV cache, and stopped per sequence at the end marker
(`<END>`) or EOS. The answer is cut at the marker; `stopped=False` means it hit `max_new_tokens`
(a truncated answer — one of the seeds' failure modes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tagtune.config import GenerationConfig


@dataclass(frozen=True)
class Answer:
    text: str  # the answer, cut at the end marker, stripped
    new_tokens: int  # tokens generated (including the stop token)
    stopped: bool  # ended at the end marker / EOS rather than max_new_tokens


def generation_kwargs(gen: GenerationConfig) -> dict[str, Any]:
    """`generate()` kwargs from params (sampling knobs only when sampling)."""
    kw: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "do_sample": gen.do_sample,
        "repetition_penalty": gen.repetition_penalty,
    }
    if gen.do_sample:
        kw.update(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
    else:  # silence "temperature is set but do_sample=False" from the model's generation_config
        kw.update(temperature=None, top_k=None, top_p=None)
    return kw


def cut_answer(text: str, end_marker: str | None, eos_token: str | None) -> tuple[str, bool]:
    """(answer before the first end marker / EOS, whether one was found)."""
    cut, found = len(text), False
    for marker in (end_marker, eos_token):
        if marker and (i := text.find(marker)) != -1 and i < cut:
            cut, found = i, True
    return text[:cut].strip(), found


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    gen: GenerationConfig,
    end_marker: str | None,
    batch_size: int = 16,
) -> list[Answer]:
    """Answer every prompt, `batch_size` at a time; results in the order of `prompts`."""
    import torch

    if not prompts:
        return []
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Answer | None] = [None] * len(prompts)
    kw = generation_kwargs(gen)
    stop = [end_marker] if end_marker else None
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
        )
        enc = enc.to(model.device)
        with torch.inference_mode():
            seqs = model.generate(
                **enc,
                **kw,
                stop_strings=stop,
                tokenizer=tokenizer if stop else None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = seqs[:, enc["input_ids"].shape[1] :]
        for row, i in zip(new, idx, strict=True):
            ids = row.tolist()
            # trailing pads (finished early while others went on) are not generated tokens
            while (
                ids
                and ids[-1] == tokenizer.pad_token_id
                and len(ids) > 1
                and ids[-2] == tokenizer.pad_token_id
            ):
                ids.pop()
            raw = tokenizer.decode(ids, skip_special_tokens=False)
            text, found = cut_answer(raw, end_marker, tokenizer.eos_token)
            out[i] = Answer(text=text, new_tokens=len(ids), stopped=found)
    return out  # type: ignore[return-value]
