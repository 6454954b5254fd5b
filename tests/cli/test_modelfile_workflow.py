"""The Ollama workflow through the real CLI: create a variant, run it, show it, save a REPL session."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelab.generation import prepare_chat
from tunelab.registry.store import Store
from tunelab.runtime import open_model

SYSTEM = "You are a careful senior Python developer. Answer with code only."
MODELFILE = f'''# a coding variant
FROM qwen2.5-coder:0.5b
PARAMETER temperature 0.1
PARAMETER repeat_penalty 1.1
PARAMETER num_ctx 2048
SYSTEM """{SYSTEM}"""
'''


def cli(*args: str, home: Path, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, TUNELAB_HOME=str(home), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, env=env,
                          timeout=600, **kwargs)


def register_linked(home: Path, name: str, gguf: Path) -> Store:
    """A store holding `name`, its weights hardlinked from the shared test copy (no 500 MB copy)."""
    store = Store(home)
    store.register_gguf(name, store.add_blob_from_file(gguf, link=True))
    return store


def test_created_variant_runs_with_its_parameters_and_system_prompt(tmp_path, qwen_coder_path):
    home = tmp_path / "home"
    store = register_linked(home, "qwen2.5-coder:0.5b", qwen_coder_path)
    (tmp_path / "qwen-dev.modelfile").write_text(MODELFILE)
    created = cli("create", "qwen-dev", "-f", str(tmp_path / "qwen-dev.modelfile"), home=home)
    assert created.returncode == 0, created.stderr

    runtime = open_model("qwen-dev", store)
    try:
        options = runtime.options()
        assert options["temperature"] == 0.1 and options["repeat_penalty"] == 1.1
        assert runtime.engine.config.num_ctx == 2048
        prepared = prepare_chat(runtime, [{"role": "user", "content": "reverse a list"}])
        assert prepared.prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
        assert prepared.request.params.temperature == 0.1 and prepared.request.params.repeat_penalty == 1.1
        # A request's own option wins over the Modelfile's; the rest stay.
        override = prepare_chat(runtime, [{"role": "user", "content": "x"}], options={"temperature": 0.7})
        assert override.request.params.temperature == 0.7 and override.request.params.repeat_penalty == 1.1
    finally:
        runtime.close()

    shown = cli("show", "qwen-dev", "--modelfile", home=home)
    assert shown.returncode == 0, shown.stderr
    (tmp_path / "again.modelfile").write_text(shown.stdout)
    assert cli("create", "qwen-dev-again", "-f", str(tmp_path / "again.modelfile"), home=home).returncode == 0
    assert store.resolve("qwen-dev-again").digest == store.resolve("qwen-dev").digest

    listing = cli("list", home=home).stdout
    assert "qwen-dev:latest" in listing and "qwen2.5-coder:0.5b" in listing


def test_repl_set_show_and_save_make_a_derived_model(tmp_path, smollm2_path):
    home = tmp_path / "home"
    store = register_linked(home, "smollm2:135m", smollm2_path)
    main, child = pty.openpty()
    env = dict(os.environ, TUNELAB_HOME=str(home), COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "run", "smollm2:135m"], stdin=child,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    os.close(child)
    for line in ("/set parameter temperature 0.3", "/set parameter stop <|im_end|> END", '/set system "Be brief."',
                 "/show parameters", "/save brief-smol", "/bye"):
        os.write(main, (line + "\n").encode())
        time.sleep(0.2)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        os.close(main)
    assert proc.returncode == 0, output
    assert "temperature" in output and "0.3" in output
    saved = store.resolve("brief-smol")
    assert saved.parameters["temperature"] == 0.3
    assert list(saved.parameters["stop"]) == ["<|im_end|>", "END"]
    assert saved.system == "Be brief."


@pytest.mark.parametrize("bad, message", [
    ("FROM qwen2.5-coder:0.5b\nPARAMETER temperature hot\n", "line 2"),
    ("FROM ./missing.gguf\n", "missing"),
    ("FRUM x\n", "line 1"),
])
def test_bad_modelfiles_fail_with_the_line_and_write_nothing(tmp_path, bad, message):
    home = tmp_path / "home"
    (tmp_path / "bad.modelfile").write_text(bad)
    result = cli("create", "bad", "-f", str(tmp_path / "bad.modelfile"), home=home)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert Store(home).list() == []
