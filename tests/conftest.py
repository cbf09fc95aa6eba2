"""Test setup: everything hermetic under a temp PICOCHAT_HOME, CPU, few threads."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("PICOCHAT_DEVICE", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _picochat_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "picochat_home"))
    yield


@pytest.fixture
def shared_data():
    """../shared/data when present (tests that need it skip otherwise)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
