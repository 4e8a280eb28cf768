"""Answer generation shared by evaluate, the MLflow pyfunc model, `tagtune chat` and the UI.

Batches are left-padded (decoder-only models continue from the right edge), sorted by prompt tokens
so little padding is wasted, and decoded with the KV cache by one loop (`_decode`) that drops each
row from the batch as it ends at the end marker (`<END>`) or EOS and lets waiting prompts take the
free slots (continuous batching): a batch costs what its unfinished rows cost, not its longest answer
times its size, and it stays full while prompts wait. Inputs and logits processing are `generate()`'s,
so greedy answers are `generate()`'s answers. The answer is cut at the marker; `stopped=False` means
it hit `max_new_tokens` (a truncated answer — one of the seeds' failure modes). `stream_answer`
yields one answer as the same loop generates it (chat, the UI); `classify` predicts labels for a
sequence-classification model.
"""

from __future__ import annotations

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


def _processors(gen: GenerationConfig, pad_lengths: Any) -> Any:
    """The logits processing `generate()` applies for `gen`, in its order (penalty, then sampling warpers).

    `pad_lengths`: each row's left padding, which the repetition penalty ignores (as `generate` does).
    """
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if gen.repetition_penalty != 1.0:
        procs.append(
            RepetitionPenaltyLogitsProcessor(gen.repetition_penalty, prompt_ignore_length=pad_lengths)
        )
    if gen.do_sample:
        if gen.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(gen.temperature))
        if gen.top_k:
            procs.append(TopKLogitsWarper(gen.top_k))
        if gen.top_p < 1.0:
            procs.append(TopPLogitsWarper(gen.top_p))
    return procs


def _next_logits(model: Any, ids: Any, mask: Any, pos: Any, cache: Any) -> Any:
    """fp32 logits of the next token after each row (the KV cache holds everything before `ids`)."""
    import torch

    with torch.inference_mode():  # per call, not around the generator: the caller's code runs between steps
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return out.logits[:, -1].float()


@dataclass
class _Batch:
    """The rows being decoded, left-padded; between steps the cache holds every column of `seqs`."""

    live: list[int]  # each row's index in `_decode`'s `rows`
    seqs: Any  # [rows, T] token ids, pad on the left
    mask: Any  # [rows, T] 1 = a real token
    pos: Any  # [rows, 1] the position of each row's last token
    pads: Any  # [rows] left padding, which the repetition penalty ignores (as `generate` does)
    cache: Any


def _unless_full(mask: Any) -> Any:
    """The attention mask, or None when no row is padded: as generate() does (a faster attention path)."""
    return None if bool(mask.all()) else mask


def _prefill(model: Any, tokenizer: Any, rows: list[list[int]], live: list[int]) -> tuple[_Batch, Any]:
    """Start `rows[live]` as one left-padded batch: (the batch, the logits of each row's first token)."""
    from transformers import DynamicCache

    enc = tokenizer.pad({"input_ids": [rows[r] for r in live]}, return_tensors="pt").to(model.device)
    seqs, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    batch = _Batch(live, seqs, mask, pos[:, -1:], (mask == 0).sum(-1), DynamicCache(config=model.config))
    return batch, _next_logits(model, seqs, _unless_full(mask), pos, batch.cache)


def _advance(model: Any, batch: _Batch, nxt: Any) -> Any:
    """Feed each row its new token `nxt`; the logits of the token after it."""
    import torch

    batch.pos = batch.pos + 1
    batch.seqs = torch.cat([batch.seqs, nxt[:, None]], -1)
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.live), 1)], -1)
    return _next_logits(model, nxt[:, None], _unless_full(batch.mask), batch.pos, batch.cache)


def _keep(batch: _Batch, keep: list[int]) -> None:
    """Keep the rows at `keep` (and their cache), then drop the left columns no row uses any more."""
    import torch

    if len(keep) < len(batch.live):
        sel = torch.tensor(keep, device=batch.seqs.device)
        batch.cache.batch_select_indices(sel)
        batch.live = [batch.live[j] for j in keep]
        batch.seqs, batch.mask, batch.pos, batch.pads = (
            t[sel] for t in (batch.seqs, batch.mask, batch.pos, batch.pads)
        )
    cut = int(batch.pads.min())  # every row is padded at least this far: masked everywhere, so unused
    if cut:
        batch.seqs, batch.mask, batch.pads = batch.seqs[:, cut:], batch.mask[:, cut:], batch.pads - cut
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[..., cut:, :], layer.values[..., cut:, :]


def _join(a: _Batch, b: _Batch, pad_id: int) -> _Batch:
    """One batch of the rows of `a` then `b`, the shorter side padded on the left to the longer."""
    import torch
    import torch.nn.functional as F

    width = max(a.seqs.shape[1], b.seqs.shape[1])
    ga, gb = width - a.seqs.shape[1], width - b.seqs.shape[1]

    def both(x: Any, y: Any, dims: tuple[int, ...] = (), value: int = 0) -> Any:
        # pad the T axis on the left (`dims`: zero padding for the axes after T), then stack the rows
        return torch.cat([F.pad(x, (*dims, ga, 0), value=value), F.pad(y, (*dims, gb, 0), value=value)])

    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        # keys/values [rows, heads, T, dim]: zeros under a 0 mask, like the pad tokens
        la.keys, la.values = both(la.keys, lb.keys, (0, 0)), both(la.values, lb.values, (0, 0))
    seqs, mask = both(a.seqs, b.seqs, value=pad_id), both(a.mask, b.mask)
    pos, pads = torch.cat([a.pos, b.pos]), torch.cat([a.pads + ga, b.pads + gb])
    return _Batch(a.live + b.live, seqs, mask, pos, pads, a.cache)


def _joinable(cache: Any) -> bool:
    """Rows can join a running batch: every cache layer is a plain growing one (no sliding window)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _decode(
    model: Any,
    tokenizer: Any,
    rows: list[list[int]],
    gen: GenerationConfig,
    end_marker: str | None,
    slots: int = 0,
) -> Iterator[list[tuple[int, int, float]]]:
    """Decode the token lists `rows`, at most `slots` (0: all) at a time in one left-padded batch with the
    KV cache, one token per row a step.

    A row leaves the batch (and its cache) as soon as it ends — EOS, the end marker in its text, or
    `max_new_tokens` — and waiting rows join it once a quarter of the slots are free (continuous
    batching): answers end at very different lengths, and decoding is bound by reading the weights
    once a step, so a step costs little more for 32 rows than for 8. Joining rows are prefilled
    together and padded on the left to the batch; masked columns change no row's result. Inputs,
    positions and logits processing are `generate()`'s, so greedy tokens are its tokens.

    Yields:
        Per step, `(row, token, log p of the token under the processed distribution)` of each live row.
    """
    import torch

    slots = slots or len(rows)
    waiting = list(range(len(rows)))[::-1]  # popped from the end: rows in their given order
    new: list[list[int]] = [[] for _ in rows]
    batch, logits = _prefill(model, tokenizer, rows, [waiting.pop() for _ in range(min(slots, len(rows)))])
    # a prefill reads the weights once more: let a quarter of the slots free up first
    refill = max(1, slots // 4) if _joinable(batch.cache) else slots
    while True:
        scores = _processors(gen, batch.pads)(batch.seqs, logits)
        nxt = torch.multinomial(scores.softmax(-1), 1)[:, 0] if gen.do_sample else scores.argmax(-1)
        logp = scores.log_softmax(-1).gather(-1, nxt[:, None])[:, 0]
        yield [(r, t, lp) for r, t, lp in zip(batch.live, nxt.tolist(), logp.tolist(), strict=True)]
        for r, t in zip(batch.live, nxt.tolist(), strict=True):
            new[r].append(t)
        keep = [j for j, r in enumerate(batch.live) if not _ended(new[r], tokenizer, end_marker, gen)]
        if keep:
            _keep(batch, keep)
            logits = _advance(model, batch, nxt[keep])
        free = slots - len(keep)
        if waiting and (free >= refill or not keep):
            joining = [waiting.pop() for _ in range(min(free, len(waiting)))]
            joined, first = _prefill(model, tokenizer, rows, joining)
            if keep:
                batch, logits = _join(batch, joined, tokenizer.pad_token_id), torch.cat([logits, first])
            else:
                batch, logits = joined, first
        elif not keep:
            return


def _ended(tokens: list[int], tokenizer: Any, end_marker: str | None, gen: GenerationConfig) -> bool:
    """The answer so far ends here: `max_new_tokens`, its last token is EOS, or its text holds the end marker."""
    if len(tokens) >= gen.max_new_tokens or tokens[-1] == tokenizer.eos_token_id:
        return True
    # the marker spans several tokens ("Ġ<", "END", ">"), so look at text; one short decode per row a step
    return bool(end_marker) and end_marker in tokenizer.decode(tokens[-len(end_marker) :])


def _pad_left(tokenizer: Any) -> None:
    """Left padding (decoder-only models continue from the right edge), pad = EOS if the model has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


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
    _pad_left(tokenizer)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    # by tokens: rows that join the batch together pad little
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    new: list[list[int]] = [[] for _ in order]
    logps: list[list[float]] = [[] for _ in order]
    model.eval()
    for step in _decode(model, tokenizer, [ids[i] for i in order], gen, end_marker, batch_size):
        for r, t, lp in step:
            new[r].append(t)
            logps[r].append(lp)
    out: list[Answer | None] = [None] * len(prompts)
    for i, toks, lps in zip(order, new, logps, strict=True):
        raw = tokenizer.decode(toks, skip_special_tokens=False)
        text, found = cut_answer(raw, end_marker, tokenizer.eos_token)
        logprob = float(torch.tensor(lps).mean()) if lps else None
        out[i] = Answer(text=text, new_tokens=len(toks), stopped=found, logprob=logprob)
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
    """Yield the answer to `prompt` as it is generated; stops at the end marker, which is never yielded.

    The same decoding as `generate_answers` (one row), so the pieces join to its answer's text. Each
    step yields what the new token adds, less a tail that may still become the end marker; closing the
    iterator stops generation at once.
    """
    _pad_left(tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens: list[int] = []
    sent = 0  # chars of the answer already yielded
    text = ""
    for ((_, token, _),) in _decode(model, tokenizer, [ids], gen, end_marker):
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
        if end_marker and (i := text.find(end_marker)) != -1:
            text = text[:i]
            break
        # hold a possible start of the marker, trailing spaces, and a half-decoded character
        ready = len(text) - _held_back(text, end_marker) if not text.endswith("\ufffd") else sent
        if ready > sent:
            yield text[sent:ready]
            sent = ready
    if len(text.rstrip()) > sent:
        yield text.rstrip()[sent:]
