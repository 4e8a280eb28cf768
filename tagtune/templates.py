"""Templates: how a conversation becomes training text, and how a question becomes a prompt.

    from tagtune.templates import render_prompt, read_template
    render_prompt("When does the museum open?", read_template("data/split"))

A rendered example is a list of segments `[[text, trained], ...]`, so finetune puts loss on the answers
only (the model stops echoing questions). Templates (`format.template`):

- `tagged` (default, the seeds' format): `{question} <QUESTION>\\n{answer} <END>`
- `chat`: the base model's own chat template (SmolLM2 has one); system prompt configurable
- `text`: raw text, loss on everything

The format stage writes the *template facts* (`template.json`: the `format:` section it rendered
with, the end marker, added tag tokens, the refusal answer, the task) next to the data; split passes
them on with the splits and finetune saves them with the model, so every consumer renders a question
exactly as training did, through `render_prompt` here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tagtune.config import FormatConfig
from tagtune.errors import DataError
from tagtune.io import read_json, write_json

Segments = list[list[Any]]  # [[text, trained: bool], ...]
Renderer = Callable[[list[dict[str, str]], FormatConfig], Segments]
TEMPLATE_FILE = "template.json"  # the template facts, beside the data or the model they describe
SENTINEL = "\x00"  # stands in for the answer when rendering an inference prompt


def _render_tagged(messages: list[dict[str, str]], cfg: FormatConfig) -> Segments:
    segs: Segments = []
    for m in messages:
        if m["role"] == "system":
            segs.append([m["content"] + "\n", False])
        elif m["role"] == "user":
            segs.append([f"{m['content']} {cfg.tags.question}\n", False])
        else:
            segs.append([f"{m['content']} {cfg.tags.end}", True])
            segs.append(["\n", False])
    return segs[:-1]  # drop the separator after the last answer


def _render_text(messages: list[dict[str, str]], cfg: FormatConfig) -> Segments:
    return [["\n".join(m["content"] for m in messages), True]]


def _chat_renderer(tokenizer: Any) -> Renderer:
    """Render with the tokenizer's chat template, finding each answer span by prefix difference."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("format.template", None, "template 'chat' needs a base model with a chat template")

    def render(messages: list[dict[str, str]], cfg: FormatConfig) -> Segments:
        if cfg.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        segs: Segments = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (before.startswith(done) and full.startswith(before)):
                raise DataError("format.template", None, "chat template is not prefix-stable; use 'tagged'")
            segs.append([before[len(done) :], False])
            segs.append([full[len(before) :], True])
            done = full
        return segs

    return render


_RENDERERS: dict[str, Renderer] = {"tagged": _render_tagged, "text": _render_text}


def renderer(cfg: FormatConfig, tokenizer: Any = None) -> Renderer:
    """The renderer of `cfg.template` (`chat` needs the base model's tokenizer)."""
    return _chat_renderer(tokenizer) if cfg.template == "chat" else _RENDERERS[cfg.template]


def template_facts(cfg: FormatConfig, task: str, refusal: str | None = None) -> dict[str, Any]:
    """What inference needs to know about the data's template (written as template.json).

    `refusal`: the answer to questions the model cannot answer (format stage resolves it).
    """
    special = (
        [cfg.tags.question, cfg.tags.end] if cfg.template == "tagged" and cfg.tags.special_tokens else []
    )
    return {
        "template": cfg.template,
        # lets inference render a question exactly as training did (for_sources is a params check only)
        "format": cfg.model_dump(exclude={"refusal": {"for_sources"}}),
        "tags": cfg.tags.model_dump(),
        # generation stops at this string; finetune appends EOS after it so the model learns to stop
        "end_marker": cfg.tags.end if cfg.template == "tagged" else None,
        "special_tokens": special,
        "refusal_answer": refusal,  # None: DEFAULT_REFUSAL, see `refusal_answer`
        "task": task,
    }


DEFAULT_REFUSAL = "Sorry, I don't know that."  # when the data defines no refusal (format.refusal)


def refusal_answer(facts: dict[str, Any]) -> str:
    """What the model says when it does not know: the data's refusal, else DEFAULT_REFUSAL."""
    return facts.get("refusal_answer") or DEFAULT_REFUSAL


def read_template(directory: str | Path) -> dict[str, Any]:
    """The template facts stored in `directory` (a data or model directory)."""
    return read_json(Path(directory) / TEMPLATE_FILE)


def write_template(directory: str | Path, facts: dict[str, Any]) -> None:
    write_json(Path(directory) / TEMPLATE_FILE, facts)


def context_text(facts: list[str]) -> str:
    """The retrieved facts as the prompt shows them (a system message before the question)."""
    return "Facts:\n" + "\n".join(f"- {f}" for f in facts)


def render_turn(
    question: str, answer: str, facts: dict[str, Any], tokenizer: Any = None, context: list[str] | None = None
) -> Segments:
    """One question → answer turn rendered as training renders it, with retrieved `context` facts.

    The context goes into the system message (after `format.system_prompt`, when one is set).
    """
    cfg = FormatConfig.model_validate(facts["format"])
    msgs = [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer}]
    if context is not None:
        system = "\n\n".join(x for x in (cfg.system_prompt, context_text(context)) if x)
        msgs.insert(0, {"role": "system", "content": system})
    return renderer(cfg, tokenizer)(msgs, cfg)


def render_prompt(
    question: str, facts: dict[str, Any], tokenizer: Any = None, context: list[str] | None = None
) -> str:
    """The prompt a model trained on this template expects for `question` (used at inference).

    Renders the turn with SENTINEL as the answer, with the same renderer training used, and keeps
    the text before the sentinel, so inference can never drift from the training format.
    """
    text = "".join(s for s, _ in render_turn(question, SENTINEL, facts, tokenizer, context))
    return text[: text.index(SENTINEL)]
