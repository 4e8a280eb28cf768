"""Shared pytest setup: make the repo's packages (`tagtune`, `stages`, `flows`) importable without installing."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
