"""The per-example regression gate: which test questions a new version breaks or fixes vs the champion.

An aggregate metric can rise while answers users relied on break (fix five, break five, promoted).
Register keeps each version's per-question outcomes (from evaluate's answers.jsonl, tuned side) with
the version's MLflow run; a candidate that beats the champion on `register.metric` is still refused
when it gets wrong more than `register.max_regressions` (a fraction) of the questions the champion
answered correctly. Questions are matched by their normalised text, so a retrain on grown data
compares on the questions both versions were tested on.

Correct: an in-domain answer with token F1 >= 0.5 that is not a refusal (the confident-wrong rule's
complement); an out-of-domain question answered with the refusal; a classification row whose
predicted label is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tagtune.text import normalize

CORRECT_F1 = 0.5  # as evaluate's confident-wrong rate: F1 below this (and not refused) is wrong


def outcomes(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{normalised question: {question, answer, correct}} of the tuned model's rows of answers.jsonl."""
    out = {}
    for r in rows:
        if r.get("side", "tuned") != "tuned" or "question" not in r:
            continue
        if "correct" in r:
            correct = bool(r["correct"])
        elif r.get("kind") == "refusal":
            correct = bool(r.get("refused"))
        elif "f1" in r:
            correct = float(r["f1"]) >= CORRECT_F1 and not r.get("refused")
        else:
            continue  # a row with no per-question verdict (text perplexity rows)
        out[normalize(r["question"])] = {
            "question": r["question"],
            "answer": str(r.get("answer", r.get("prediction", ""))),
            "correct": correct,
        }
    return out


@dataclass(frozen=True)
class Comparison:
    shared: int  # questions both versions were tested on
    champion_correct: int  # of those, answered correctly by the champion
    regressions: list[dict[str, str]]  # champion right, candidate wrong: question, champion, candidate
    fixes: list[dict[str, str]]  # champion wrong, candidate right

    def allowed(self, max_regressions: float) -> int:
        """How many regressions `register.max_regressions` (a fraction of champion-correct) allows."""
        return int(max_regressions * self.champion_correct + 1e-9)


def compare(champion: dict[str, dict[str, Any]], candidate: dict[str, dict[str, Any]]) -> Comparison:
    """Regressions and fixes of `candidate` vs `champion` (both from `outcomes`), in question order."""
    shared = sorted(set(champion) & set(candidate))
    regressions, fixes = [], []
    for q in shared:
        old, new = champion[q], candidate[q]
        row = {"question": new["question"], "champion": old["answer"], "candidate": new["answer"]}
        if old["correct"] and not new["correct"]:
            regressions.append(row)
        elif new["correct"] and not old["correct"]:
            fixes.append(row)
    return Comparison(len(shared), sum(champion[q]["correct"] for q in shared), regressions, fixes)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report(cmp: Comparison, champion_version: str, candidate_version: str) -> str:
    """Markdown (to follow a heading): the counts, then a `## Regressions` and a `## Fixes` table with
    the champion's answer beside the candidate's."""
    lines = [
        f"{cmp.shared} test questions in common with champion v{champion_version}; it answered "
        f"{cmp.champion_correct} correctly. Regressions (champion right, v{candidate_version} wrong): "
        f"{len(cmp.regressions)}. Fixes: {len(cmp.fixes)}.",
    ]
    for title, rows in (("Regressions", cmp.regressions), ("Fixes", cmp.fixes)):
        lines += ["", f"## {title}", ""]
        if not rows:
            lines.append("none")
            continue
        lines += [f"| question | champion v{champion_version} | v{candidate_version} |", "|---|---|---|"]
        lines += [
            f"| {_cell(r['question'])} | {_cell(r['champion'])} | {_cell(r['candidate'])} |" for r in rows
        ]
    return "\n".join(lines) + "\n"


def forgetting(history: list[tuple[str, dict[str, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per version (oldest first): the share answered correctly of the *old slice* — the first kept
    version's test questions, frozen — and of the *new slice*, the questions tested only since.

    The split is append-stable, so the first version's test questions stay in every later test set:
    a drop on the old slice while the new slice rises is forgetting (continual retraining's risk).
    """
    if not history:
        return []
    frozen = set(history[0][1])
    rows = []
    for version, out in history:
        old = [o["correct"] for q, o in out.items() if q in frozen]
        new = [o["correct"] for q, o in out.items() if q not in frozen]
        rows.append({
            "version": version,
            "old_slice": len(old), "old_correct": round(sum(old) / len(old), 4) if old else None,
            "new_slice": len(new), "new_correct": round(sum(new) / len(new), 4) if new else None,
        })  # fmt: skip
    return rows


def forgetting_report(rows: list[dict[str, Any]]) -> str:
    """Markdown: the forgetting table (regressions.md's last section)."""
    lines = ["## Forgetting across versions", "",
             f"Old slice: the {rows[0]['old_slice']} test questions of v{rows[0]['version']} (frozen); new "
             "slice: the test questions added since. Share answered correctly.", "",
             "| version | old slice | new slice |", "|---|---|---|"]  # fmt: skip
    fmt = lambda v, n: "–" if v is None else f"{v:.3f} (n={n})"  # noqa: E731
    lines += [f"| v{r['version']} | {fmt(r['old_correct'], r['old_slice'])} | "
              f"{fmt(r['new_correct'], r['new_slice'])} |" for r in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_forgetting(rows: list[dict[str, Any]], dest) -> None:
    """forgetting.png: old vs new slice correctness by version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [f"v{r['version']}" for r in rows]
    for key, label in (("old_correct", "old slice (first version's test questions)"),
                       ("new_correct", "new slice (test questions added since)")):  # fmt: skip
        ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("answered correctly")
    ax.set_title("forgetting across registered versions")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)
