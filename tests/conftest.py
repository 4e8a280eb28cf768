"""Shared pytest setup: make the repo's packages (`tagtune`, `stages`, `flows`) importable without installing."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------ tiny models and datasets (shared)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random-init Llama + tokenizer trained in the test (session-cached)."""
    from tinymodels import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    from tinymodels import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch) -> str:
    """Point MLflow at a temporary SQLite store (no server): stages log without side effects."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
