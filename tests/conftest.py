"""Shared fixtures: where the real data is, and tiny seeded models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$JTUCKER_DATA`` or ``<repo>/../shared/data``, if it exists."""
    candidate = Path(os.environ.get("JTUCKER_DATA", REPO.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    """The real data folder; the test is skipped with the reason when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("needs ../shared/data (or JTUCKER_DATA): real CIFAR-10 / weights not on this machine")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Extraction caches go to a per-session temp folder, never the user's home.
    monkeypatch.setenv("JTUCKER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)
