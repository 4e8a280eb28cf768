"""Grounded answers: retrieved facts in the prompt, RAFT-style training examples, sources, abstention.

Training (finetune): each single-turn question gets the top-`k` facts of the index in its prompt —
with its own fact among them (at a position drawn per example), or, for a `retrieval.gold_absent`
share of the questions and for every out-of-domain question, without it, answered with the refusal.
So the model learns to copy from the right fact and to say it does not know when none fits (RAFT,
Zhang et al. 2024, with the refusal as the target of the no-fact examples).

Inference (evaluate, the pyfunc model, chat, UI): `ground` retrieves (reranked by the trained
cross-encoder of tagtune/rerank.py when the model has one: its score also says whether any fact answers
the question), renders the prompt exactly as training did, and after generation `cite` names the fact
the answer came from (its `source:line`).
`abstain` replaces an answer whose `confidence` is below the threshold evaluate chose on the val split
with the refusal. The confidence is the reranker's score of the fact in the prompt when the model has
a reranker (whether the right fact was found is what decides an answer: measured in README), else the
mean log-probability of the answer's tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from tagtune.generation import Answer, generate_answers
from tagtune.retrieval import FactIndex, Hit
from tagtune.templates import Segments, refusal_answer, render_prompt, render_turn
from tagtune.text import normalize, stable_hash, token_f1

CITE_MIN_F1 = 0.5  # an answer cites the retrieved fact it overlaps most, if at least this much
GROUNDED_KINDS = ("qa", "refusal")  # single-turn rows; multi-turn chats and text keep their segments


@dataclass(frozen=True)
class Grounded:
    prompt: str
    hits: list[Hit]  # what retrieval put into the prompt, best first
    reranked: bool = False  # hits[].score are the reranker's (> 0: the fact answers the question)


def ground(
    questions: list[str], index: FactIndex, template: dict[str, Any], k: int, tokenizer: Any = None
) -> list[Grounded]:
    """Prompts with the top-`k` facts of `index` for each question (and whether its reranker, if it
    has one, found none that answers it)."""
    out = []
    for question, hits in zip(questions, index.search(questions, k), strict=True):
        context = [h.fact.text for h in hits]
        reranked = index.reranker is not None
        out.append(Grounded(render_prompt(question, template, tokenizer, context), hits, reranked))
    return out


def cite(answer: str, hits: list[Hit]) -> Hit | None:
    """The retrieved fact the answer was taken from (highest token F1 ≥ CITE_MIN_F1), or None."""
    scored = [(token_f1(answer, h.fact.text), i) for i, h in enumerate(hits)]
    best = max(scored, default=(0.0, -1))
    return hits[best[1]] if best[0] >= CITE_MIN_F1 else None


NONE_FITS = 0.0  # the reranker's "none of these" score: the threshold when evaluate chose none


def confidence(logprob: float | None, hits: list[Hit], reranked: bool) -> float | None:
    """How sure an answer is: the reranker's score of the best fact (reranked hits; no fact at all:
    below any threshold), else the mean log-probability of the answer's tokens (None: unknown)."""
    if reranked:
        return hits[0].score if hits else -math.inf
    return logprob


def threshold_for(chosen: float | None, reranked: bool) -> float | None:
    """The abstention threshold in force: evaluate's (chosen on val), else for a reranked model its
    own "none of these" (NONE_FITS: no fact scored above it → the refusal), else none."""
    if chosen is None and reranked:
        return NONE_FITS
    return chosen


def below(conf: float | None, threshold: float | None) -> bool:
    """Whether an answer of confidence `conf` is refused at `threshold` (None: never; unknown: kept)."""
    return threshold is not None and conf is not None and conf < threshold


def abstain(answer: str, conf: float | None, threshold: float | None, template: dict[str, Any]) -> str:
    """`answer`, or the refusal when its confidence is below `threshold` (None: never abstain)."""
    if not below(conf, threshold):
        return answer
    return refusal_answer(template)


def training_segments(
    examples: list[dict[str, Any]],
    index: FactIndex,
    template: dict[str, Any],
    k: int,
    gold_absent: float,
    seed: int,
    tokenizer: Any = None,
) -> list[dict[str, Any]]:
    """`examples` with the segments of single-turn rows re-rendered with retrieved facts (RAFT).

    Per example (drawn from a hash of `seed` and its id, so the same data gives the same examples):
    in-domain with its fact → `k` facts including it, answer kept; in-domain without it (a
    `gold_absent` share) and out-of-domain → `k` facts without it, answered with the refusal.
    """
    questions = [ex["question"] for ex in examples if ex.get("kind") in GROUNDED_KINDS]
    searched = iter(index.search(questions, k + 1))  # one spare: the gold may have to be dropped
    refusal = refusal_answer(template)
    out = []
    for ex in examples:
        if ex.get("kind") not in GROUNDED_KINDS:
            out.append(ex)
            continue
        rng = random.Random(stable_hash(str(seed), ex.get("id") or ex["question"]))
        gold = normalize(ex["reference"]) if ex["kind"] == "qa" else None
        others = [h.fact.text for h in next(searched) if normalize(h.fact.text) != gold][:k]
        keep = gold is not None and rng.random() >= gold_absent
        if keep:
            others = others[: k - 1]
            others.insert(rng.randrange(len(others) + 1), ex["reference"])
        answer = ex["reference"] if keep else refusal
        segments: Segments = render_turn(ex["question"], answer, template, tokenizer, others)
        out.append({**ex, "segments": segments, "grounded": "gold" if keep else "absent"})
    return out


@dataclass(frozen=True)
class Reply:
    text: str  # what the user sees: the answer, or the refusal when it abstained
    sources: list[str]  # `source:line` of the fact the answer came from ([] when none / refused)
    answer: Answer  # the generation itself (before abstention): logprob, stopped, tokens; see NOT_ASKED


# a reranked question whose best fact scores below the threshold is refused before generating: its
# confidence does not depend on the answer, so generating it (~1 s on 2 cores) would change nothing
NOT_ASKED = Answer(text="", new_tokens=0, stopped=True)


def reply(
    model: Any,
    tokenizer: Any,
    template: dict[str, Any],
    questions: list[str],
    gen: Any,
    batch_size: int = 16,
    index: FactIndex | None = None,
    k: int = 4,
    threshold: float | None = None,
) -> list[Reply]:
    """Answer `questions` as a registered model does: grounded in `index` when given, abstaining below
    `threshold`, citing the fact each answer came from. Without an index: the plain prompt."""
    if index is None:
        found = [Grounded(render_prompt(q, template, tokenizer), []) for q in questions]
    else:
        found = ground(questions, index, template, k, tokenizer)
    asked = [asks(g, threshold) for g in found]
    prompts = [g.prompt for g, a in zip(found, asked, strict=True) if a]
    end = template.get("end_marker")
    generated = iter(generate_answers(model, tokenizer, prompts, gen, end, batch_size) if prompts else [])
    return [
        finish(g, next(generated) if a else NOT_ASKED, threshold, template)
        for g, a in zip(found, asked, strict=True)
    ]


def asks(g: Grounded, threshold: float | None) -> bool:
    """Whether `g`'s question is generated at all: not when reranked and its best fact scores below
    the threshold in force (`threshold_for`: evaluate's `threshold`, else the reranker's own)."""
    return not (g.reranked and below(confidence(None, g.hits, True), threshold_for(threshold, g.reranked)))


def finish(g: Grounded, answer: Answer, threshold: float | None, template: dict[str, Any]) -> Reply:
    """The reply to `g`'s question given its generated `answer` (NOT_ASKED when `asks` said no): the
    answer or the refusal below the threshold in force, and the source it cites."""
    conf = confidence(answer.logprob, g.hits, g.reranked)
    text = abstain(answer.text, conf, threshold_for(threshold, g.reranked), template)
    source = cite(text, g.hits)
    return Reply(text, [source.fact.where] if source else [], answer)
