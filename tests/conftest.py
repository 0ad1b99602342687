"""Shared test setup: no model hub (fail fast), no progress-bar noise, a path to ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LSDC_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_csv() -> Path | None:
    """The real competition tables when ../shared is present, else None (tests then use committed fixtures)."""
    p = SHARED / "rsna_csv"
    return p if (p / "train.csv").exists() else None
