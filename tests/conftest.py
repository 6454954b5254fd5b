"""Shared fixtures: the real models and throwaway stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from real_models import TEST_HOME, real_model_path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return real_model_path("smollm2:135m")


@pytest.fixture(scope="session")
def qwen_coder_path() -> Path:
    return real_model_path("qwen2.5-coder:0.5b")


@pytest.fixture(scope="session")
def shared_home() -> Path:
    """The cached test store that holds the pulled real models."""
    return TEST_HOME


@pytest.fixture()
def tunelab_home(tmp_path, monkeypatch) -> Path:
    """An empty store for one test, also seen by subprocesses through TUNELAB_HOME."""
    home = tmp_path / "home"
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    return home
