"""Grounded answers end to end: new facts without retraining (real dvc), the real model answering and
citing a fact it was never trained on."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from flowrepo import env, make_workspace

REPO = Path(__file__).resolve().parents[1]
NEWS_HEADER = "question,answer\n"
NEWS = [("When is the regatta?", "The Brindlemoor regatta is on the second Saturday of August.")]
NEW_FACT = ("Where is the new bike shop?", "The new bike shop is on Harbour Lane, next to the bakery.")


def _dvc(root: Path, *args: str) -> str:
    r = subprocess.run(["dvc", *args], cwd=root, env=env(root), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _ran(out: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", out)


def _with_news(root: Path) -> None:
    """A `train: false` source: facts indexed for answers, never trained on."""
    (root / "data" / "raw" / "news.csv").write_text(
        NEWS_HEADER + "".join(f'"{q}","{a}"\n' for q, a in NEWS), encoding="utf-8"
    )
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["ingest"]["sources"].append({"path": "data/raw/news.csv", "format": "qa", "train": False})
    p["retrieval"]["enabled"] = True
    p["finetune"]["max_length"] = 160  # room for the retrieved facts in each prompt
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.mark.integration
def test_a_new_fact_is_indexed_by_dvc_repro_without_retraining(tmp_path, tiny_llama):
    root = make_workspace(tmp_path / "ws", tiny_llama)
    _with_news(root)
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["retrieval"]["rerank"] = {"steps": 4, "candidates": 4}  # a (tiny) trained reranker on the way too
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    first = _ran(_dvc(root, "repro"))
    assert first == ["feedback", "ingest", "format", "split", "index", "finetune", "evaluate", "register"]
    with open(root / "data" / "raw" / "news.csv", "a", encoding="utf-8") as f:
        f.write(f'"{NEW_FACT[0]}","{NEW_FACT[1]}"\n')
    second = _ran(_dvc(root, "repro"))
    # format re-runs (its input dir changed) but writes the same examples: split and finetune stay put
    assert "finetune" not in second and "split" not in second, second
    assert {"ingest", "index", "evaluate", "register"} <= set(second), second
    from tagtune.retrieval import FactIndex

    hit = FactIndex.load(root / "data" / "index").search([NEW_FACT[0]], 1)[0][0]
    assert hit.fact.text == NEW_FACT[1] and hit.fact.where == "data/raw/news.csv:3"
    # the registered version ships the reranker beside its index; pulled, it reranks the new fact too
    from flowrepo import tagtune

    pulled = tmp_path / "pulled"  # @champion: the same weights with the new facts (a knowledge refresh)
    r = tagtune(root, "pull", "--dest", str(pulled))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (pulled / "artifacts" / "reranker" / "reranker.json").is_file()
    from tagtune.rerank import attach

    index = attach(FactIndex.load(pulled / "artifacts" / "index"), pulled / "artifacts")
    assert index.reranker is not None and NEW_FACT[1] in [
        h.fact.text for h in index.search([NEW_FACT[0]], 4)[0]
    ]
    # chat answers as evaluate measured it: the version's k and its val-chosen threshold (if any)
    from tagtune.app.chat import Chatbot

    trained = json.loads((root / "models" / "finetune" / "training.json").read_text())["grounded"]["k"]
    chosen = json.loads((root / "reports" / "evaluate" / "metrics.json").read_text()).get("abstain.threshold")
    grounding = Chatbot.from_dir(pulled).grounding
    assert grounding["retrieval_k"] == trained and grounding.get("abstain_threshold") == chosen, grounding
    assert _ran(_dvc(root, "repro")) == ["feedback"]  # the snapshot always runs; nothing else


@pytest.mark.real_model
@pytest.mark.integration
def test_the_real_model_answers_a_new_fact_from_the_index_and_cites_it(tmp_path):
    """Trained grounded for a few steps on part of the shipped data; a fact added afterwards to a
    `train: false` source is answered from the re-built index, with its source, without retraining."""
    from flowrepo import tagtune

    root = make_workspace(tmp_path / "ws", "embedded")
    shipped = (REPO / "data" / "raw" / "town_faq.csv").read_text(encoding="utf-8").splitlines()
    (root / "data" / "raw" / "faq.csv").write_text(
        "\n".join(shipped[:91]) + "\n", encoding="utf-8"
    )  # 30 facts
    _with_news(root)
    p = yaml.safe_load((root / "params.yaml").read_text())
    # 16 steps of 8 with one fact per prompt: it copies its fact (40 steps with k=3 took 12 min on a
    # CPU without bf16, most of the suite's time)
    p["finetune"].update(max_steps=16, batch_size=8, learning_rate=0.001, logging_steps=4, threads=0)
    p["split"].update(test_fraction=0.15, val_fraction=0.1)
    p["retrieval"]["k"] = 1
    p["retrieval"]["rerank"]["steps"] = 0  # BM25's order (the reranker's own tests: test_rerank.py)
    p["evaluate"].update(
        compare_base=False, max_examples=8, max_confident_wrong=1.0, generation={"max_new_tokens": 40}
    )
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env_extra = {"TAGTUNE_CACHE": str(Path.home() / ".cache" / "tagtune")}  # the converted base, once
    r = subprocess.run(
        ["dvc", "repro"], cwd=root, env=env(root, **env_extra), capture_output=True, text=True, timeout=1200
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    with open(root / "data" / "raw" / "news.csv", "a", encoding="utf-8") as f:
        f.write(f'"{NEW_FACT[0]}","{NEW_FACT[1]}"\n')
    r = subprocess.run(
        ["dvc", "repro"], cwd=root, env=env(root, **env_extra), capture_output=True, text=True, timeout=1200
    )
    assert r.returncode == 0 and "finetune" not in _ran(r.stdout), r.stdout[-3000:] + r.stderr[-3000:]

    chat = tagtune(root, "chat", "--model-dir", "models/finetune", "-q", NEW_FACT[0], **env_extra)
    assert chat.returncode == 0, chat.stderr[-2000:]
    from tagtune.text import token_f1

    answer, *rest = chat.stdout.strip().splitlines()
    assert token_f1(answer, NEW_FACT[1]) >= 0.5, chat.stdout
    assert "source: data/raw/news.csv:3" in chat.stdout, chat.stdout
