"""Test setup: everything hermetic under a temp PICOCHAT_HOME, CPU, few threads."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("PICOCHAT_DEVICE", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("PICOCHAT_WORDS_URL", "")  # no word-list download: tests use local fallbacks or a local server

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _picochat_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "picochat_home"))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when other jobs share the cores (CI has 2). Opt in
    per module: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data():
    """Real, licensed data kept beside the checkout (SHARED_DATA), when present; tests that need it skip otherwise."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no data folder at {SHARED_DATA}")
    return SHARED_DATA
