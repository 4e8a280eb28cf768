"""The feedback loop end to end, on the real embedded base model: a user corrects an answer in the real
UI (headless Chromium); the scheduled retraining deployment (a real Prefect server running it every
minute) picks the correction up — it replaces the answer it corrects (`overrides`), always trains
(`split.train_only`), continues the champion (`finetune.init: champion`) and adds DPO (the correction
chosen over the model's answer) — and registers a new champion that gives the corrected answer; the
next scheduled run trains 0 steps."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from flowrepo import (
    deployment,
    free_port,
    make_workspace,
    prefect_server,
    start,
    stop,
    tagtune,
    wait_for,
)
from test_ui import browser  # noqa: F401 - the headless Chromium fixture

# a question the data does not answer (not in its out-of-domain list either): the user teaches a new fact
QUESTION, CORRECTION = "Is there a bus to the beach?", "Yes, bus 7 goes to the beach every hour."
# the deadlines below only catch a hang: a 2-core CPU without bf16 trains the real model ~5x slower than
# one with AVX512-BF16 (152 vs 775 tokens/s, README: Benchmarks), and a scheduled run then takes minutes
pytestmark = [pytest.mark.integration, pytest.mark.real_model, pytest.mark.timeout(2700)]


def _real_workspace(root: Path) -> Path:
    """flowrepo's workspace on the real base model, trained enough to answer its facts (LoRA)."""
    from tagtune.models import resolve_base

    ws = make_workspace(root, Path(resolve_base("embedded")))  # the already dequantised base dir
    p = yaml.safe_load((ws / "params.yaml").read_text())
    # later runs continue the champion on every row (replay 1.0) plus the correction
    p["finetune"].update(max_steps=30, batch_size=8, learning_rate=0.002, threads=0, save_steps=100,
                         init="champion", replay=1.0)  # fmt: skip
    p["preference"].update(method="dpo", steps=10, batch_size=2)
    p["evaluate"].update(compare_base=False, generation={"max_new_tokens": 24})
    # 3 test questions: one reworded answer moves F1 by 0.1-0.3 and is a third of the per-example gate, so
    # here the gates cannot tell noise from harm (both are tested on their own in test_register.py): a
    # retrain on new verdicts is promoted (feedback_tolerance), whatever the 3 answers do
    p["register"].update(feedback_tolerance=1.0, max_regressions=1.0)
    p["schedule"]["cron"] = "* * * * *"  # every minute: the test waits for real scheduled runs
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return ws


def _summaries(api: str, deployment_id: str) -> list[tuple[dict, str]]:
    """(flow run, its pipeline summary) of the deployment's completed runs, oldest first."""
    http = httpx.Client(base_url=api, timeout=10)
    flt = {
        "deployments": {"id": {"any_": [deployment_id]}},
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
    }
    runs = sorted(http.post("/flow_runs/filter", json=flt).json(), key=lambda r: r["start_time"])
    out = []
    for run in runs:
        key = {"flow_run_id": {"any_": [run["id"]]}, "key": {"any_": ["pipeline-summary"]}}
        found = http.post("/artifacts/filter", json={"artifacts": key}).json()
        out.append((run, found[0]["data"] if found else ""))
    return out


def _completed_after(api: str, dep: str, since: str) -> list[tuple[dict, str]]:
    return [(r, s) for r, s in _summaries(api, dep) if r["start_time"] > since]


def _ask_and_correct(url: str, driver) -> str:
    """Ask QUESTION on the page, give 👎 with CORRECTION; returns the model's answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 120)
    driver.get(url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
    assert "v1 (@champion)" in driver.find_element(By.ID, "model-info").text
    driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: "Rate the answer" in d.find_element(By.ID, "feedback-status").text)
    answer = driver.find_element(By.ID, "chat").text.split(QUESTION, 1)[1].strip()
    driver.find_element(By.CSS_SELECTOR, "#correction textarea").send_keys(CORRECTION)
    driver.find_element(By.ID, "thumbs-down").click()
    wait.until(lambda d: "Saved feedback #1" in d.find_element(By.ID, "feedback-status").text)
    return answer


def test_a_correction_in_the_ui_becomes_the_next_champions_answer(tmp_path, browser):  # noqa: F811
    ws = _real_workspace(tmp_path / "ws")
    with prefect_server(ws, tmp_path) as (api, e):
        deploy_log = tmp_path / "deploy.log"
        served = (start([sys.executable, "-m", "tagtune.app.cli", "deploy"], ws, e, deploy_log), deploy_log)
        try:
            dep = wait_for(lambda: deployment(api), 120, "the retrain deployment", served)["id"]
            # the first scheduled run trains v1 (no champion yet: it becomes the champion)
            wait_for(lambda: _summaries(api, dep), 900, "the first scheduled run", served)
            assert tagtune(ws, "show").returncode == 0

            port = free_port()
            ui_log = tmp_path / "ui.log"
            ui = start([sys.executable, "-m", "tagtune.app.cli", "ui", "--port", str(port)], ws, e, ui_log)
            try:
                url = f"http://127.0.0.1:{port}/"
                wait_for(
                    lambda: httpx.get(url, timeout=5).status_code == 200, 180, "tagtune ui", (ui, ui_log)
                )
                answered = _ask_and_correct(url, browser)
            finally:
                stop(ui)
            assert answered and answered != CORRECTION
            given = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())

            # the next scheduled run that starts after the verdict retrains on it
            retrained = wait_for(lambda: _completed_after(api, dep, given), 900, "the retrain", served)[0]
            registered = json.loads((ws / "reports" / "register" / "register.json").read_text())
            assert re.search(r"; [1-9]\d* training steps", retrained[1]), retrained[1]
            assert registered["alias"] == "champion", registered["reason"]
            show = tagtune(ws, "chat", "-q", QUESTION)
            assert show.returncode == 0, show.stderr[-2000:]
            assert CORRECTION in show.stdout, (show.stdout, answered)

            # and the one after it, with nothing new, trains nothing
            after = retrained[0]["start_time"]
            idle = wait_for(lambda: _completed_after(api, dep, after), 600, "an idle scheduled run", served)[
                0
            ]
            assert "nothing changed since the last run: 0 training steps" in idle[1]
        finally:
            stop(served[0])
