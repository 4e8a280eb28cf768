"""Answer generation shared by evaluate, the MLflow pyfunc model, `tagtune chat` and the UI.

Batches are left-padded (decoder-only models continue from the right edge), sorted by prompt length
so little padding is wasted, decoded with the KV cache, and stopped per sequence at the end marker
(`<END>`) or EOS. The answer is cut at the marker; `stopped=False` means it hit `max_new_tokens`
(a truncated answer — one of the seeds' failure modes). `stream_answer` yields one answer as it is
generated (chat, the UI); `classify` predicts labels for a sequence-classification model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tagtune.config import GenerationConfig


@dataclass(frozen=True)
class Answer:
    text: str  # the answer, cut at the end marker, stripped
    new_tokens: int  # tokens generated (including the stop token)
    stopped: bool  # ended at the end marker / EOS rather than max_new_tokens
    logprob: float | None = None  # mean log-probability of the generated tokens: the answer's confidence


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
            gen_out = model.generate(
                **enc,
                **kw,
                stop_strings=stop,
                tokenizer=tokenizer if stop else None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
            # log p of each chosen token under the (processed) distribution it was drawn from
            token_lp = model.compute_transition_scores(
                gen_out.sequences, gen_out.scores, normalize_logits=True
            )
        new = gen_out.sequences[:, enc["input_ids"].shape[1] :]
        for j, (row, i) in enumerate(zip(new, idx, strict=True)):
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
            logprob = float(token_lp[j, : len(ids)].float().mean()) if ids else None
            out[i] = Answer(text=text, new_tokens=len(ids), stopped=found, logprob=logprob)
    return out  # type: ignore[return-value]


def classify(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16) -> list[str]:
    """Predicted label names for `texts` (batched, right-padded)."""
    import torch

    tokenizer.padding_side = "right"
    id2label = model.config.id2label
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            logits = model(**enc.to(model.device)).logits
        out += [str(id2label[int(j)]) for j in logits.argmax(-1).tolist()]
    return out


def _held_back(buf: str, marker: str | None) -> int:
    """How many trailing chars of `buf` to hold: a possible start of `marker`, or trailing spaces."""
    hold = 0
    if marker:
        for k in range(min(len(marker) - 1, len(buf)), 0, -1):
            if buf.endswith(marker[:k]):
                hold = k
                break
    rest = buf[: len(buf) - hold]
    return hold + len(rest) - len(rest.rstrip())  # "answer <E": hold " <E", the space may end it


def stream_answer(
    model: Any, tokenizer: Any, prompt: str, gen: GenerationConfig, end_marker: str | None
) -> Iterator[str]:
    """Yield the answer to `prompt` as it is generated; stops at the end marker, which is never yielded."""
    import torch
    from transformers import TextIteratorStreamer

    tok = tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(
                    **enc,
                    **generation_kwargs(gen),
                    streamer=streamer,
                    stop_strings=[end_marker] if end_marker else None,
                    tokenizer=tok if end_marker else None,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            failed.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    buf, started, exhausted = "", False, False
    try:
        for piece in streamer:
            buf += piece
            if not started:
                buf = buf.lstrip()
            if end_marker and (i := buf.find(end_marker)) != -1:
                buf = buf[:i].rstrip()
                break
            keep = _held_back(buf, end_marker)
            if len(buf) > keep:
                started = True
                yield buf[: len(buf) - keep]
                buf = buf[len(buf) - keep :]
        else:
            exhausted, buf = True, buf.rstrip()
        if buf:
            yield buf
    finally:
        if not exhausted:  # stopped early (marker, or the caller closed us): let generate() finish
            for _ in streamer:
                pass
        thread.join()
    if failed:
        raise failed[0]
