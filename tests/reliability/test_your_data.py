"""A user's own data with the shipped params: nothing of the sample leaks in, and defaults follow the
task (items 9, 10, 11; item 12: preview.md).

- classification data: the out-of-domain refusal rows do not apply (skipped with a note) and split works;
- the shipped refusal settings belong to the shipped sample: with other sources they are refused
  before anything runs, naming `format.refusal`;
- `text` data with `format.template: text`: the gate metric is perplexity (lower is better), the
  pipeline registers, and the report shows generated continuations of held-out line openings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import one_line_error, shipped_params, stage_cli, write_params

from stages.format import format_examples
from tagtune.config import FormatConfig
from tagtune.errors import DataError
from tagtune.io import read_jsonl, write_jsonl

SAMPLE_REFUSAL = shipped_params()["format"]["refusal"]["answer"]


def _user_workspace(tmp_path: Path, source: dict, **sections) -> Path:
    """The shipped params.yaml with only the source (and the given sections) changed."""
    p = shipped_params()
    p["ingest"]["sources"][0] = source
    for key, value in sections.items():
        section, _, name = key.partition("__")
        p[section][name] = value
    write_params(tmp_path, p)
    ood = tmp_path / "data" / "raw" / "ood_questions.txt"  # the shipped sample's list, as in a clone
    ood.parent.mkdir(parents=True, exist_ok=True)
    ood.write_text((Path(__file__).resolve().parents[2] / "data/raw/ood_questions.txt").read_text())
    return tmp_path


def _classification_csv(path: Path) -> None:
    rows = ["text,label"]
    for i in range(20):
        rows += [f"The ferry {i} was late again,complaint", f"Lovely harbour festival number {i},praise"]
    path.write_text("\n".join(rows) + "\n")


def _stages(ws: Path, *names: str) -> list:
    results = []
    for name in names:
        r = stage_cli(ws, name)
        results.append(r)
        if r.returncode != 0:
            break
    return results


def test_classification_with_the_shipped_params_fails_clearly_or_works(tmp_path):
    ws = _user_workspace(
        tmp_path,
        {"path": "data/raw/reviews.csv", "format": "classification"},
        finetune__task="classification",
    )
    _classification_csv(ws / "data" / "raw" / "reviews.csv")
    results = _stages(ws, "ingest", "format", "split")
    if (
        results[-1].returncode != 0
    ):  # the sample's refusal settings are refused, by name, before anything runs
        assert "format.refusal" in one_line_error(results[-1]) and len(results) == 1
        assert not (ws / "data" / "ingest").exists()


def test_classification_data_skips_the_refusal_rows_with_a_note(tmp_path):
    refusal = {**shipped_params()["format"]["refusal"], "for_sources": ["data/raw/reviews.csv"]}
    ws = _user_workspace(
        tmp_path,
        {"path": "data/raw/reviews.csv", "format": "classification"},
        finetune__task="classification",
        format__refusal=refusal,
    )
    _classification_csv(ws / "data" / "raw" / "reviews.csv")
    results = _stages(ws, "ingest", "format", "split")
    assert [r.returncode for r in results] == [0, 0, 0], results[-1].stderr[-3000:]
    assert "format.refusal" in results[1].stderr and "classification" in results[1].stderr
    stats = json.loads((ws / "data" / "format" / "stats.json").read_text())
    assert stats["refusal_rows"] == 0 and "classification" in stats["refusal_skipped"]
    assert all(r["kind"] == "classification" for r in read_jsonl(ws / "data" / "format" / "examples.jsonl"))


def test_the_sample_refusal_settings_do_not_apply_to_other_data(tmp_path):
    ws = _user_workspace(tmp_path, {"path": "data/raw/python_faq.csv", "format": "qa"})
    (ws / "data" / "raw" / "python_faq.csv").write_text(
        "question,answer\nHow do I reverse a list in Python?,Use reversed(xs) or xs[::-1].\n"
    )
    line = one_line_error(stage_cli(ws, "ingest"))
    assert "format.refusal" in line and "sample" in line, line
    assert not (ws / "data" / "ingest").exists()


def test_own_refusal_questions_that_are_in_domain_questions_are_an_error(tmp_path):
    (tmp_path / "ingested").mkdir()
    msgs = [
        {"role": "user", "content": "How do I reverse a list in Python?"},
        {"role": "assistant", "content": "xs[::-1]"},
    ]
    write_jsonl(
        tmp_path / "ingested" / "rows.jsonl",
        [{"source": "faq.csv", "line": 2, "kind": "chat", "messages": msgs}],
    )
    (tmp_path / "ood.txt").write_text("What is the capital of France?\nhow do I reverse a list in python\n")
    cfg = FormatConfig.model_validate({"refusal": {"answer": "Sorry, only Python.", "questions": "ood.txt"}})
    with pytest.raises(DataError, match=r"ood.txt:2: .*in-domain question \(faq.csv:2\)"):
        format_examples(tmp_path / "ingested", tmp_path / "out", cfg, base_dir=tmp_path)


@pytest.mark.integration
def test_text_lines_gate_on_perplexity_and_the_report_shows_continuations(tmp_path, tiny_llama, monkeypatch):
    from stages import STAGES
    from tagtune.config import load_params

    lines = [
        f"The tide at Cobble Quay turns {n} times before the ferry leaves for the island" for n in range(40)
    ]
    ws = _user_workspace(
        tmp_path,
        {"path": "data/raw/lines.txt", "format": "text"},
        format__template="text",
        format__refusal=None,
        model__base=str(tiny_llama),
    )
    (ws / "data" / "raw" / "lines.txt").write_text("\n".join(lines) + "\n")
    p = load_params(ws / "params.yaml", [
        "finetune.max_steps=2", "finetune.batch_size=8", "finetune.max_length=64", "finetune.precision=fp32",
        f"mlflow.tracking_uri=sqlite:///{ws / 'mlflow.db'}", "evaluate.generation.max_new_tokens=6",
    ])  # fmt: skip
    assert (p.register.metric, p.register.greater_is_better) == ("perplexity", False)
    monkeypatch.chdir(ws)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TAGTUNE_CACHE", str(ws / ".cache"))
    results = {name: run(p, ws) for name, run in STAGES.items()}
    assert results["register"]["metric"] == "tuned.perplexity" and results["register"]["version"] == "1"
    report = (ws / "reports" / "evaluate" / "report.md").read_text()
    samples = [row for row in report.splitlines() if row.startswith("| text |")]
    assert samples, report
    assert all(row.split("|")[4].strip() not in ("", "—") for row in samples), samples  # tuned continuation
    opening = samples[0].split("|")[2].strip()
    assert opening and any(line.startswith(opening) for line in lines)


def test_preview_md_truncates_long_lines(tmp_path):
    (tmp_path / "ingested").mkdir()
    rows = [{"source": "big.txt", "line": 1, "kind": "text", "text": "word " * 400_000}]
    write_jsonl(tmp_path / "ingested" / "rows.jsonl", rows)
    format_examples(tmp_path / "ingested", tmp_path / "out", FormatConfig(template="text"), base_dir=tmp_path)
    preview = (tmp_path / "out" / "preview.md").read_text()
    assert len(preview) < 10_000 and "more characters" in preview
