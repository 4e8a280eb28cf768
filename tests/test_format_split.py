"""format and split on tiny hand-made rows: templates, refusal, dedupe, preview, determinism, stability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinydata import OOD, cls_rows, qa_rows, run_stage_cli

from stages.format import format_examples
from stages.split import assign, split
from tagtune.config import FormatConfig, RefusalConfig, SplitConfig
from tagtune.errors import DataError
from tagtune.io import read_jsonl, write_jsonl
from tagtune.templates import render_prompt

REPO = Path(__file__).resolve().parents[1]


def _ingested(root: Path, rows: list[dict]) -> Path:
    (root / "ing").mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "ing" / "rows.jsonl", rows)
    return root / "ing"


def _qa(q: str, a: str, line: int = 2, group: str | None = None) -> dict:
    return {
        "source": "faq.csv",
        "line": line,
        "kind": "chat",
        "group": group,
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
    }


# ------------------------------------------------------------------------------------------- format
def test_tagged_template_masks_the_question_and_trains_the_answer(tmp_path):
    stats = format_examples(
        _ingested(tmp_path, [_qa("Where is the harbour?", "East of the bridge.")]),
        tmp_path / "t",
        FormatConfig(),
    )
    (ex,) = read_jsonl(tmp_path / "t" / "examples.jsonl")
    assert ex["segments"] == [
        ["Where is the harbour? <QUESTION>\n", False],
        ["East of the bridge. <END>", True],
    ]
    assert ex["prompt"] == "Where is the harbour? <QUESTION>\n" and ex["reference"] == "East of the bridge."
    assert (ex["source"], ex["line"], ex["kind"]) == ("faq.csv", 2, "qa")
    assert stats["examples"] == 1
    meta = json.loads((tmp_path / "t" / "template.json").read_text())
    assert meta["end_marker"] == "<END>" and meta["task"] == "causal_lm"


def test_multi_turn_chat_trains_every_answer(tmp_path):
    row = {
        "source": "c.jsonl",
        "line": 1,
        "kind": "chat",
        "group": None,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ],
    }
    format_examples(_ingested(tmp_path, [row]), tmp_path / "t", FormatConfig())
    (ex,) = read_jsonl(tmp_path / "t" / "examples.jsonl")
    assert [s for s, t in ex["segments"] if t] == ["Hello. <END>", "Goodbye. <END>"]
    assert (
        ex["kind"] == "chat" and ex["prompt"].endswith("Bye <QUESTION>\n") and ex["reference"] == "Goodbye."
    )


def test_text_template_trains_everything(tmp_path):
    rows = [
        {"source": "t.txt", "line": 3, "kind": "text", "text": "Brindlemoor has a harbour.", "group": None}
    ]
    format_examples(_ingested(tmp_path, rows), tmp_path / "t", FormatConfig(template="text"))
    (ex,) = read_jsonl(tmp_path / "t" / "examples.jsonl")
    assert ex["segments"] == [["Brindlemoor has a harbour.", True]] and ex["kind"] == "text"


def test_chat_template_uses_the_models_own_template(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    format_examples(
        _ingested(tmp_path, [_qa("Hi?", "Hello.")]),
        tmp_path / "t",
        FormatConfig(template="chat"),
        tokenizer=tok,
    )
    (ex,) = read_jsonl(tmp_path / "t" / "examples.jsonl")
    assert ex["segments"] == [["<|user|>Hi?<|end|><|assistant|>", False], ["Hello.<|end|>", True]]
    meta = json.loads((tmp_path / "t" / "template.json").read_text())
    assert render_prompt("Hi?", meta, tok) == "<|user|>Hi?<|end|><|assistant|>"


def test_render_prompt_matches_training_prompts(tmp_path):
    format_examples(_ingested(tmp_path, qa_rows(2, 2)), tmp_path / "t", FormatConfig())
    meta = json.loads((tmp_path / "t" / "template.json").read_text())
    for ex in read_jsonl(tmp_path / "t" / "examples.jsonl"):
        assert render_prompt(ex["question"], meta) == ex["prompt"]


def test_refusal_rows_are_added_and_duplicates_removed(tmp_path):
    (tmp_path / "ood.txt").write_text("\n".join(OOD) + "\n\n")
    rows = [
        _qa("Where is the harbour?", "East."),
        _qa("Where is the harbour?", "East.", 3),
        _qa("  where is the HARBOUR ", "east", 4),
    ]
    cfg = FormatConfig(refusal=RefusalConfig(answer="Sorry, only Brindlemoor.", questions="ood.txt"))
    stats = format_examples(_ingested(tmp_path, rows), tmp_path / "t", cfg, base_dir=tmp_path)
    assert stats["exact_duplicates"] == 1 and stats["normalized_duplicates"] == 1
    assert stats["refusal_rows"] == len(OOD) and stats["examples"] == 1 + len(OOD)
    refusals = [e for e in read_jsonl(tmp_path / "t" / "examples.jsonl") if e["kind"] == "refusal"]
    assert refusals[0]["reference"] == "Sorry, only Brindlemoor." and refusals[0]["line"] == 1
    preview = (tmp_path / "t" / "preview.md").read_text()
    assert "⟦East. <END>⟧" in preview and "Where is the harbour? <QUESTION>" in preview


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"", "ood.txt: no refusal questions"), (b"ok?\n\xff\xfe bad\n", "ood.txt:2: not valid UTF-8")],
)
def test_bad_refusal_file_names_file_and_line_and_writes_nothing(tmp_path, content, needle):
    (tmp_path / "ood.txt").write_bytes(content)
    cfg = FormatConfig(refusal=RefusalConfig(questions="ood.txt"))
    with pytest.raises(DataError, match=needle):
        format_examples(_ingested(tmp_path, [_qa("Q?", "A.")]), tmp_path / "t", cfg, base_dir=tmp_path)
    assert not (tmp_path / "t").exists()


def test_format_cli_missing_input_exits_nonzero_without_output(tmp_path):
    (tmp_path / "params.yaml").write_text("format: {refusal: null}\n")
    r = run_stage_cli(tmp_path, "format")
    assert r.returncode == 1 and "data/ingest/rows.jsonl: file not found" in r.stderr
    assert not (tmp_path / "data" / "format").exists()


# -------------------------------------------------------------------------------------------- split
def _tagged(tmp_path: Path, rows: list[dict], cfg: FormatConfig | None = None) -> Path:
    format_examples(_ingested(tmp_path, rows), tmp_path / "t", cfg or FormatConfig(), base_dir=tmp_path)
    return tmp_path / "t"


def test_split_is_byte_identical_for_same_data_and_seed(tmp_path):
    t = _tagged(tmp_path, qa_rows(20, 3))
    split(t, tmp_path / "a", SplitConfig())
    split(t, tmp_path / "b", SplitConfig())
    for name in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{name}.jsonl"
        ).read_bytes()
    split(t, tmp_path / "c", SplitConfig(seed=7))
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()


@pytest.mark.parametrize("strategy", ["phrasing", "group", "example"])
def test_appending_rows_never_moves_existing_rows(tmp_path, strategy):
    cfg = SplitConfig(strategy=strategy, val_fraction=0.2, test_fraction=0.3)
    old = read_jsonl(_tagged(tmp_path / "old", qa_rows(20, 3)) / "examples.jsonl")
    new = read_jsonl(
        _tagged(
            tmp_path / "new",
            qa_rows(30, 3)
            + [_qa("What time does museum 3 open today?", "Museum 3 opens at 4 am.", 99, "m3")],
        )
        / "examples.jsonl"
    )
    before = dict(zip([e["id"] for e in old], assign(old, cfg), strict=True))
    after = dict(zip([e["id"] for e in new], assign(new, cfg), strict=True))
    assert all(after[k] == v for k, v in before.items())


def test_phrasing_strategy_tests_unseen_phrasings_of_facts_taught_in_train(tmp_path):
    split(_tagged(tmp_path, qa_rows(40, 3)), tmp_path / "s", SplitConfig(strategy="phrasing"))
    train = read_jsonl(tmp_path / "s" / "train.jsonl")
    test = read_jsonl(tmp_path / "s" / "test.jsonl")
    assert test, "expected some held-out phrasings"
    train_groups = {e["group"] for e in train}
    assert all(e["group"] in train_groups for e in test)  # every test fact was taught


def test_group_strategy_holds_out_whole_facts(tmp_path):
    split(_tagged(tmp_path, qa_rows(40, 3)), tmp_path / "s", SplitConfig(strategy="group"))
    groups = {
        n: {e["group"] for e in read_jsonl(tmp_path / "s" / f"{n}.jsonl")} for n in ("train", "val", "test")
    }
    assert groups["test"] and not groups["test"] & groups["train"] and not groups["val"] & groups["train"]


def test_an_overrides_source_replaces_the_answers_it_corrects(tmp_path):
    faq = [
        _qa("When does the museum open?", "At 9 am.", 2, "m"),
        _qa("Where is the harbour?", "East.", 3, "h"),
    ]
    fix = {
        **_qa(" when does the MUSEUM open? ", "At 10 am on weekdays.", 2),
        "source": "fb.jsonl",
        "overrides": True,
    }
    (tmp_path / "i").mkdir()
    write_jsonl(tmp_path / "i" / "rows.jsonl", [*faq, fix])
    stats = format_examples(tmp_path / "i", tmp_path / "t", FormatConfig(), base_dir=tmp_path)
    got = {(e["question"].strip(), e["reference"]) for e in read_jsonl(tmp_path / "t" / "examples.jsonl")}
    assert got == {
        ("when does the MUSEUM open?", "At 10 am on weekdays."),
        ("Where is the harbour?", "East."),
    }
    assert stats["overridden"] == 1


def test_train_only_sources_always_train_unless_their_text_is_held_out(tmp_path):
    faq = qa_rows(30, 3)
    held = [e for e, n in zip(faq, assign(read_jsonl(_tagged(tmp_path / "a", faq) / "examples.jsonl"),
                                           SplitConfig()), strict=True) if n != "train"]  # fmt: skip
    fb = [
        {**_qa(f"Is museum {i} free on Sundays?", "Yes.", i + 2), "source": "data/fb.jsonl"}
        for i in range(30)
    ]
    leaked = {**held[0], "source": "data/fb.jsonl"}  # a user's verdict on a held-out question
    ex = read_jsonl(_tagged(tmp_path / "b", faq + fb + [leaked]) / "examples.jsonl")
    names = assign(ex, SplitConfig(train_only=["./data/fb.jsonl"]))
    assert {n for e, n in zip(ex, names, strict=True) if e["source"] == "data/fb.jsonl"} == {"train"}
    assert len([n for n in names if n != "train"]) == len(held)  # the held-out one stayed held out
    assert set(assign(ex, SplitConfig())[len(faq) :]) != {"train"}  # without it, some fb rows are held out


def test_no_example_text_appears_in_two_splits(tmp_path):
    rows = qa_rows(30, 3) + [_qa("What time does museum 1 open?", "Different answer.", 500)]
    split(_tagged(tmp_path, rows), tmp_path / "s", SplitConfig(strategy="example", test_fraction=0.4))
    seen: dict[str, str] = {}
    for name in ("train", "val", "test"):
        for e in read_jsonl(tmp_path / "s" / f"{name}.jsonl"):
            assert seen.setdefault(e["prompt"].lower(), name) == name


def test_classification_split_keeps_every_label_in_train(tmp_path):
    stats = split(_tagged(tmp_path, cls_rows() * 1), tmp_path / "s", SplitConfig(test_fraction=0.3))
    assert set(stats["labels"]["train"]) == {"neg", "pos"}


def test_label_missing_from_train_is_an_error(tmp_path):
    rows = cls_rows() + [
        {
            "source": "cls.csv",
            "line": 99,
            "kind": "classification",
            "text": "meh",
            "label": "mixed",
            "group": None,
        }
    ]
    cfg = SplitConfig(test_fraction=0.99 - 0.0, val_fraction=0.0)
    with pytest.raises(DataError, match="labels .* have no train rows|train split is empty"):
        split(_tagged(tmp_path, rows), tmp_path / "s", cfg)
    assert not (tmp_path / "s").exists()
