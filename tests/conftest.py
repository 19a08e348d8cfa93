"""Shared test setup: one CPU thread (fast and steady on a 2-core box), a private cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Alignment-independent MKL results, as `rnnkit train` asks for, so that the resume tests
# compare like with like (it must be set before the first matrix product of the process).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache from tests."""
    monkeypatch.setenv("RNNKIT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh corpus cache folder for download tests."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("RNNKIT_CACHE", str(folder))
    return folder


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server on 127.0.0.1 that stands in for every corpus host (via RNNKIT_MIRROR)."""
    from httpserver import LocalServer

    served = LocalServer()
    monkeypatch.setenv("RNNKIT_MIRROR", served.url)
    yield served
    served.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium page (one for the module), or a skip that says how to get one."""
    from browser import Browser, find_chromium

    executable = find_chromium()
    if executable is None:
        pytest.skip("no headless browser: install Chromium (Debian: apt-get install chromium) to run this test")
    with Browser(executable, tmp_path_factory.mktemp("chromium-profile")) as b:
        yield b


@pytest.fixture
def shared_corpora() -> Path:
    if not SHARED_CORPORA.is_dir():
        pytest.skip(f"real corpora not available at {SHARED_CORPORA}")
    return SHARED_CORPORA


@pytest.fixture
def tiny_text() -> str:
    return "the cat sat on the mat. the dog sat on the log.\n" * 20


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run only where torch sees a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
