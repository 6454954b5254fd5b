"""`tunelab explain` on a real model: its stage table is the pipeline's, and its draws are the engine's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tunelab.explain import explain_steps
from tunelab.generation import collect, prepare_chat
from tunelab.registry.store import Store
from tunelab.runtime import open_model

OPTIONS = {"temperature": 0.8, "top_k": 30, "top_p": 0.9, "min_p": 0.02, "repeat_penalty": 1.1, "seed": 42,
           "num_predict": 6}


@pytest.fixture(scope="module")
def runtime(qwen_coder_path, tmp_path_factory):
    rt = open_model(str(qwen_coder_path), Store(tmp_path_factory.mktemp("home")),
                    {"dtype": "float32", "num_thread": 1})
    yield rt
    rt.close()


def test_explained_steps_draw_exactly_what_the_engine_generates(runtime):
    messages = [{"role": "user", "content": "Name a sorting algorithm."}]
    prepared = prepare_chat(runtime, messages, options=OPTIONS)
    steps = explain_steps(runtime, prepared, num_steps=6)
    engine_reply = collect(prepared, runtime.engine.generate(prepare_chat(runtime, messages, options=OPTIONS).request))
    assert [s.trace.drawn_id for s in steps] == engine_reply.token_ids[:len(steps)]
    first = steps[0].trace
    assert first.stage_names == ["raw", "penalties", "top_k", "top_p", "min_p", "temperature"]
    assert first.num_alive[0] == runtime.config.vocab_size and first.num_alive[2] == 30
    assert abs(sum(first.final_probs) - 1) < 1e-3 or first.num_alive[-1] > len(first.token_ids)
    # A token top-k removed never comes back at a later stage.
    for c in range(len(first.token_ids)):
        removed_at = [s for s in range(len(first.stage_names)) if first.removed[s][c]]
        if removed_at:
            assert all(first.probs[s][c] == 0 for s in range(removed_at[0], len(first.stage_names)))


def test_explain_command_prints_the_stage_table(qwen_coder_path, tmp_path):
    env = dict(os.environ, TUNELAB_HOME=str(tmp_path / "home"), COLUMNS="160")
    result = subprocess.run([sys.executable, "-m", "tunelab", "explain", str(qwen_coder_path), "def add(a, b):",
                             "--raw", "--top-k", "5", "--seed", "1"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    for column in ("raw", "top-k", "top-p", "temp", "★"):
        assert column in result.stdout
    assert "✗ cut" in result.stdout  # top-k 5 removed some of the raw top candidates


def test_explain_runs_the_engines_kv_cache_type(smollm2_path, tmp_path):
    """With a q8_0 cache the engine's logits are those of 8-bit keys: explain must use the same cache."""
    runtime = open_model(str(smollm2_path), Store(tmp_path / "home"),
                         {"dtype": "int8", "kv_cache_type": "q8_0", "num_thread": 1})
    try:
        messages = [{"role": "user", "content": "Name a sorting algorithm."}]
        prepared = prepare_chat(runtime, messages, options=OPTIONS)
        steps = explain_steps(runtime, prepared, num_steps=6)
        reply = collect(prepared, runtime.engine.generate(prepare_chat(runtime, messages, options=OPTIONS).request))
        assert [s.trace.drawn_id for s in steps] == reply.token_ids[:len(steps)]
    finally:
        runtime.close()
