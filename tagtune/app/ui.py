"""The chat page: ask the served model, rate its answers, correct them — the next retrain learns them.

    tagtune ui                               # models:/<register.model_name>@champion, http://127.0.0.1:7860
    tagtune ui --version 3 --port 7861       # another registered version / port
    tagtune ui --model-dir models/finetune  # the local finetune output, no registry

The page shows which model version it serves, sliders for the generation params, and 👍 / 👎 with
an optional corrected answer for the last reply. Every verdict is a row of the SQLite table
`feedback` in `ui.feedback_db`; the view `feedback_examples` turns them into training rows
(question, answer) that the `sql` ingest source reads (see params.yaml):

- the latest verdict per question wins (case and surrounding spaces ignored), so a later correction
  replaces an earlier one and a later 👎 withdraws an earlier 👍;
- a correction (with either thumb) trains `question → correction`;
- 👍 without a correction trains `question → the model's answer` (reinforces a good answer);
- 👎 without a correction is recorded but trains nothing (we know it is wrong, not what is right).

Each question is answered on its own (the model is trained on single question → answer turns; the
conversation on the page is only a log). Requests wait in a bounded queue (`ui.max_queue`; beyond it users get "queue full", the server stays
up) and `ui.concurrency` answers are generated at once. Bound to 127.0.0.1 unless `ui.host` says
otherwise: anyone who can reach the page can use the model and write training data.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import sys
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

from tagtune.app.chat import model_label
from tagtune.config import GenerationConfig, Params, UiConfig
from tagtune.errors import TagtuneError

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at    TEXT NOT NULL,                              -- UTC, ISO 8601
    question      TEXT NOT NULL,
    model_answer  TEXT NOT NULL,                              -- what the model replied
    rating        INTEGER NOT NULL CHECK (rating IN (-1, 1)), -- 👍 = 1, 👎 = -1
    correction    TEXT,                                       -- the user's corrected answer, if any
    answer        TEXT,                                       -- training answer; NULL = not trained on
    model_name    TEXT,
    model_version TEXT
);
CREATE VIEW IF NOT EXISTS feedback_examples AS
    SELECT question, answer FROM feedback AS f
    WHERE answer IS NOT NULL
      AND id = (SELECT MAX(id) FROM feedback AS g WHERE lower(trim(g.question)) = lower(trim(f.question)))
    ORDER BY id;
"""
EXAMPLES_QUERY = "SELECT question, answer FROM feedback_examples"  # what params.yaml's sql source runs


class FeedbackStore:
    """The feedback table: thread-safe appends from concurrent page sessions."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        """Open (creating file + schema on the first verdict: until then the optional source is absent)."""
        # rollback journal (not WAL): no -wal/-shm files beside the DB for ingest to trip over
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30)
        conn.executescript(SCHEMA)
        return conn

    def record(
        self,
        question: str,
        model_answer: str,
        rating: int,
        correction: str | None = None,
        model_name: str | None = None,
        model_version: str | None = None,
    ) -> dict[str, Any]:
        """Store one verdict; returns the row (its `answer` is None when it trains nothing).

        Raises:
            TagtuneError: rating is not 1 or -1, or the question is empty.
        """
        if rating not in (1, -1):
            raise TagtuneError(f"feedback rating must be 1 (👍) or -1 (👎), got {rating!r}")
        question, correction = question.strip(), (correction or "").strip() or None
        if not question:
            raise TagtuneError("feedback needs the question it is about")
        answer = correction or (model_answer.strip() if rating == 1 else None) or None
        row = {
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "question": question,
            "model_answer": model_answer,
            "rating": rating,
            "correction": correction,
            "answer": answer,
            "model_name": model_name,
            "model_version": None if model_version is None else str(model_version),
        }
        with self._lock, closing(self._connect()) as conn, conn:
            cur = conn.execute(
                f"INSERT INTO feedback ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            row["id"] = cur.lastrowid
        return row

    def rows(self) -> list[dict[str, Any]]:
        """Every stored verdict, oldest first."""
        if not self.path.is_file():
            return []
        with closing(self._connect()) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM feedback ORDER BY id")]

    def examples(self) -> list[dict[str, str]]:
        """The training rows the `sql` ingest source reads."""
        if not self.path.is_file():
            return []
        with closing(self._connect()) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(EXAMPLES_QUERY)]


def is_ingested(params: Params, feedback_db: Path, base_dir: Path = Path(".")) -> bool:
    """True if ingest.sources reads `feedback_db`'s verdicts (else feedback never trains): the feedback
    stage's snapshot of ui.feedback_db (`paths.feedback`/examples.jsonl, the shipped way), or an `sql`
    entry on the database itself."""
    from stages.feedback import EXAMPLES_FILE

    target = feedback_db.resolve()
    snapshot = (base_dir / params.paths.feedback / EXAMPLES_FILE).resolve()
    for src in params.ingest.sources:
        if src.format != "sql":
            if (
                src.path
                and (base_dir / src.path).resolve() == snapshot
                and target == (base_dir / params.ui.feedback_db).resolve()
            ):
                return True
            continue
        path = src.path
        if src.url and src.url.startswith("sqlite:///"):
            path = src.url[len("sqlite:///") :]
        if path and (base_dir / path).resolve() == target:
            return True
    return False


# ------------------------------------------------------------------------------------------- page
def _responder(bot: Any, cfg: UiConfig):
    """The `ask` handler: stream `bot`'s answer into the conversation, then offer the rating.

    A question over `ui.max_question_chars`, or past the model's context, is refused at once: it never
    reaches the model (and does not hold a generation slot for a minute).
    """

    def respond(question, history, do_sample, temperature, top_k, top_p, repetition_penalty, max_new):
        import gradio as gr

        question = (question or "").strip()
        history = list(history or [])
        if not question:
            yield history, "", None, "Type a question first."
            return
        if len(question) > cfg.max_question_chars:
            raise gr.Error(
                f"Question too long: {len(question)} characters (at most {cfg.max_question_chars}, ui.max_question_chars)."
            )
        try:
            g = GenerationConfig(
                do_sample=bool(do_sample),
                temperature=float(temperature),
                top_k=int(top_k),
                top_p=float(top_p),
                repetition_penalty=float(repetition_penalty),
                max_new_tokens=int(max_new),
            )
        except ValueError as e:
            raise gr.Error(f"generation params: {e}") from None
        if problem := bot.too_long(question, g):
            raise gr.Error(problem[0].upper() + problem[1:] + ".")
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        for piece in bot.stream(question, g):
            answer += piece
            history[-1] = {"role": "assistant", "content": answer}
            yield history, "", None, ""
        shown = answer + (f"\n\n*Source: {', '.join(bot.last_sources)}*" if bot.last_sources else "")
        history[-1] = {"role": "assistant", "content": shown}
        yield (
            history,
            "",
            {"question": question, "answer": answer},
            "Rate the answer: 👍 / 👎 (+ correction).",
        )

    return respond


def _rater(bot: Any, store: FeedbackStore, rating: int):
    """The 👍 (rating 1) or 👎 (-1) handler: store the verdict on the last answer."""

    def handler(last, correction):
        if not last:
            return "Ask a question first, then rate the answer.", correction
        row = store.record(
            last["question"],
            last["answer"],
            rating,
            correction,
            bot.info.get("model_name"),
            bot.info.get("version"),
        )
        if row["answer"] is None:
            msg = f"Saved feedback #{row['id']} (👎 without a correction: not used for training)."
        elif row["correction"]:
            msg = f"Saved feedback #{row['id']}: the next retrain learns your corrected answer."
        else:
            msg = f"Saved feedback #{row['id']}: the next retrain reinforces this answer."
        return msg, ""

    return handler


def build_app(bot: Any, store: FeedbackStore, cfg: UiConfig, gen: GenerationConfig):
    """The Gradio Blocks page for `bot` (a tagtune.app.chat.Chatbot), writing verdicts to `store`."""
    import gradio as gr

    label = model_label(bot.info)
    with gr.Blocks(title="tagtune chat", analytics_enabled=False) as app:
        gr.Markdown(f"## tagtune chat\nServing **{label}**", elem_id="model-info")
        chat = gr.Chatbot(elem_id="chat", height=380, feedback_options=None, label="Conversation")
        with gr.Row():
            question = gr.Textbox(
                placeholder="Ask a question and press Enter", show_label=False, scale=5, elem_id="question"
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            up = gr.Button("👍 Good answer", elem_id="thumbs-up", scale=1)
            down = gr.Button("👎 Wrong answer", elem_id="thumbs-down", scale=1)
            correction = gr.Textbox(
                label="Corrected answer (optional; sent with 👍 or 👎)", scale=4, elem_id="correction"
            )
        status = gr.Markdown("", elem_id="feedback-status")
        with gr.Accordion("Generation", open=True):
            do_sample = gr.Checkbox(gen.do_sample, label="sample (off = greedy)", elem_id="do-sample")
            temperature = gr.Slider(0.05, 2.0, gen.temperature, step=0.05, label="temperature")
            top_k = gr.Slider(0, 200, gen.top_k, step=1, label="top_k (0 = off)")
            top_p = gr.Slider(0.05, 1.0, gen.top_p, step=0.01, label="top_p")
            rep = gr.Slider(1.0, 2.0, gen.repetition_penalty, step=0.05, label="repetition_penalty")
            max_new = gr.Slider(8, 512, gen.max_new_tokens, step=8, label="max_new_tokens")
        last = gr.State(None)

        ask = dict(
            fn=_responder(bot, cfg),
            inputs=[question, chat, do_sample, temperature, top_k, top_p, rep, max_new],
            outputs=[chat, question, last, status],
            concurrency_limit=cfg.concurrency,
            concurrency_id="generate",  # Enter and Send share the generation slots
        )
        send.click(**ask, api_name="ask")
        question.submit(**ask, api_name=False)
        up.click(_rater(bot, store, 1), [last, correction], [status, correction], api_name="thumbs_up")
        down.click(_rater(bot, store, -1), [last, correction], [status, correction], api_name="thumbs_down")
    app.queue(max_size=cfg.max_queue)
    return app


def serve(
    params: Params,
    bot: Any,
    host: str | None = None,
    port: int | None = None,
    block: bool = True,
    base_dir: Path = Path("."),
):
    """Launch the page; returns the Gradio app (when `block=False`, it keeps serving in the background)."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage pings
    cfg = params.ui
    db = (base_dir / cfg.feedback_db).resolve()
    store = FeedbackStore(db)
    if not is_ingested(params, db, base_dir):
        print(
            f"tagtune ui: warning: feedback goes to {db}, but no entry of ingest.sources reads it, so "
            f"retraining will not learn from it (add: path: {params.paths.feedback}/examples.jsonl, "
            f"format: qa, optional: true, overrides: true — the feedback stage snapshots ui.feedback_db there)",
            file=sys.stderr,
        )
    app = build_app(bot, store, cfg, params.evaluate.generation)
    host, port = host or cfg.host, port or cfg.port
    print(f"tagtune ui: serving {model_label(bot.info)} on http://{host}:{port} (feedback → {db})")
    try:
        app.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=not block,
            show_error=True,
            quiet=True,
            footer_links=[],
            max_file_size=cfg.max_upload_kb * 1024,  # the page takes no files; bound Gradio's upload route
        )
    except OSError as e:  # port in use: gradio says "Cannot find empty port"
        raise TagtuneError(f"ui: cannot serve on {host}:{port}: {e}") from None
    return app
