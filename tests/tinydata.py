"""Tiny ingested datasets run through the real format and split stages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stages.format import format_examples
from stages.split import split
from tagtune.config import FormatConfig, RefusalConfig, SplitConfig
from tagtune.io import write_jsonl

OOD = ["What is the capital of France?", "How do I bake bread?", "Who won the 1998 World Cup?"]


def qa_rows(n_facts: int = 8, phrasings: int = 3) -> list[dict]:
    """Ingested `chat` rows: `phrasings` questions per fact, grouped, with provenance."""
    rows = []
    for f in range(n_facts):
        for k in range(phrasings):
            q = [
                f"What time does museum {f} open?",
                f"When does museum {f} open?",
                f"Museum {f} opening time?",
            ][k % 3]
            rows.append(
                {
                    "source": "faq.csv",
                    "line": len(rows) + 2,
                    "kind": "chat",
                    "group": f"m{f}",
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": f"Museum {f} opens at {f + 1} am."},
                    ],
                }
            )
    return rows


def cls_rows() -> list[dict]:
    texts = {
        "pos": [
            "great film, loved it",
            "wonderful acting",
            "a great plot",
            "loved the music",
            "great fun",
            "wonderful and great",
        ],
        "neg": [
            "terrible plot and bad acting",
            "bad film",
            "terrible music",
            "awful and bad",
            "bad plot",
            "terrible, awful",
        ],
    }
    return [
        {"source": "cls.csv", "line": i + 2, "kind": "classification", "text": t, "label": lab, "group": None}
        for i, (lab, t) in enumerate((lab, t) for lab, ts in texts.items() for t in ts)
    ]


def make_splits(
    root: Path,
    rows: list[dict] | None = None,
    fmt: FormatConfig | None = None,
    split_cfg: SplitConfig | None = None,
    refusal: bool = True,
) -> Path:
    """ingested rows → format → split under `root`; returns the splits dir."""
    rows = qa_rows() if rows is None else rows
    (root / "ingested").mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "ingested" / "rows.jsonl", rows)
    if fmt is None:
        (root / "ood.txt").write_text("\n".join(OOD) + "\n")
        fmt = FormatConfig(
            refusal=RefusalConfig(answer="Sorry, only museums.", questions="ood.txt") if refusal else None
        )
    format_examples(root / "ingested", root / "tagged", fmt, base_dir=root)
    split(root / "tagged", root / "splits", split_cfg or SplitConfig(val_fraction=0.1, test_fraction=0.2))
    return root / "splits"


REPO = Path(__file__).resolve().parents[1]


def run_stage_cli(cwd: Path, stage: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m stages.<stage> --params params.yaml ARGS` in `cwd`, as DVC runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", f"stages.{stage}", "--params", "params.yaml", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
