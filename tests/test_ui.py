"""The Gradio chat page in real headless Chromium: it shows the served version, answers, and a 👎 with
a correction lands in the feedback table, its snapshot and the next ingest. Concurrent users do not crash it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from flowrepo import ANSWER, QUESTION, env, memorised_workspace

from stages.feedback import snapshot_feedback
from stages.ingest import ingest
from tagtune.config import load_params, parse_params
from tagtune.io import read_jsonl

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CORRECTION = "The museum opens at 10 am on weekdays."
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_llama):
    """`tagtune ui` (a real server process) serving the memorised workspace's @champion from the
    registry, with its feedback table in a tmp DB (ui.feedback_db)."""
    ws = memorised_workspace(tmp_path_factory.getbasetemp(), tiny_llama)
    tmp = tmp_path_factory.mktemp("ui")
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    port, db = _free_port(), str(tmp / "feedback.db")
    raw["ui"].update(port=port, feedback_db=db, max_queue=2)
    raw["ingest"]["allow_outside"] = True  # the feedback snapshot lives in a tmp dir, outside the workspace
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tagtune.app.cli", "ui", "-p", str(tmp / "params.yaml")],
        cwd=ws,
        env=env(ws),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"tagtune ui exited {proc.returncode}: {proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "tagtune ui did not come up"
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield {"url": url, "params": load_params(tmp / "params.yaml"), "ws": ws}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server process we started
        proc.wait(timeout=30)


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian chromium + chromium-driver (`make browser`; CI installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--window-size=1200,1100",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_question_answer_and_correction_reach_the_next_ingest(page, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tagtune.app.ui import FeedbackStore

    d, wait = browser, WebDriverWait(browser, 90)
    d.get(page["url"])
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
    assert "Serving tagtune-town v1 (@champion)" in d.find_element(By.ID, "model-info").text
    assert len(d.find_elements(By.CSS_SELECTOR, "input[type=range]")) >= 5  # generation sliders

    d.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
    d.find_element(By.ID, "send").click()
    wait.until(lambda d: "Rate the answer" in d.find_element(By.ID, "feedback-status").text)
    chat = d.find_element(By.ID, "chat").text
    assert QUESTION in chat and ANSWER in chat  # the memorised answer, cut at the end tag

    d.find_element(By.CSS_SELECTOR, "#correction textarea").send_keys(CORRECTION)
    d.find_element(By.ID, "thumbs-down").click()
    wait.until(lambda d: "Saved feedback #1" in d.find_element(By.ID, "feedback-status").text)
    d.save_screenshot(str(tmp_path / "ui.png"))

    p = page["params"]
    (row,) = FeedbackStore(p.ui.feedback_db).rows()
    assert (row["question"], row["model_answer"], row["rating"]) == (QUESTION, ANSWER, -1)
    assert row["correction"] == row["answer"] == CORRECTION
    assert (row["model_name"], row["model_version"]) == ("tagtune-town", "1")

    # the next `dvc repro`: the feedback stage snapshots this page's table (with its provenance), and
    # params.yaml's feedback source (data/feedback/examples.jsonl) feeds it to ingest
    assert snapshot_feedback(Path(p.ui.feedback_db), tmp_path / "feedback")["examples"] == 1
    snap = str(tmp_path / "feedback" / "examples.jsonl")
    sources = [
        s.model_copy(update={"path": snap}) if "feedback" in str(s.path) else s for s in p.ingest.sources
    ]
    stats = ingest(
        p.ingest.model_copy(update={"sources": sources}), tmp_path / "ingested", base_dir=page["ws"]
    )
    fed = [r for r in read_jsonl(tmp_path / "ingested" / "rows.jsonl") if r["source"] == snap]
    assert stats["rows"] == 13 and len(fed) == 1
    assert fed[0]["messages"] == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": CORRECTION},
    ]


def _text(content) -> str:
    """A chat message's text (Gradio 6 returns a list of typed parts)."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


def test_concurrent_users_get_answers_or_a_queue_full_message(page):
    """8 clients at once against max_queue=2: each is answered or told the queue is full; the
    server keeps serving."""
    from gradio_client import Client

    args = (QUESTION, [], False, 0.9, 30, 0.95, 1.0, 16)
    results: list[object] = []

    def ask():
        try:
            history = Client(page["url"], verbose=False).predict(*args, api_name="/ask")[0]
            results.append(_text(history[-1]["content"]))
        except Exception as e:  # noqa: BLE001 - the test inspects what each client got
            results.append(e)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 8
    answers = [r for r in results if isinstance(r, str)]
    errors = [r for r in results if not isinstance(r, str)]
    assert answers and all(a == ANSWER for a in answers), results
    assert all("queue" in str(e).lower() for e in errors), errors
    history = Client(page["url"], verbose=False).predict(*args, api_name="/ask")[0]
    assert _text(history[-1]["content"]) == ANSWER


def test_the_shipped_params_learn_from_the_ui_feedback_and_a_source_list_without_it_does_not():
    from tagtune.app.ui import is_ingested

    root = Path(__file__).resolve().parents[1]
    p = load_params(root / "params.yaml")
    db = root / p.ui.feedback_db
    assert is_ingested(p, db, root)  # the feedback stage's snapshot is an ingest source
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["ingest"]["sources"] = [s for s in raw["ingest"]["sources"] if "feedback" not in s["path"]]
    raw["split"]["train_only"] = []
    assert not is_ingested(parse_params(raw, "params.yaml"), db, root)  # the UI warns at start
