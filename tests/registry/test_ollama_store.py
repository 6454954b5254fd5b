import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from tunelab.errors import DownloadError, ModelNotFound, StoreError
from tunelab.registry.modelfile import parse_modelfile
from tunelab.registry.ollama_store import import_ollama_model, list_ollama_models
from tunelab.registry.store import Store
from real_models import real_model_path

SMOLLM2 = real_model_path("smollm2:135m")

# What `ollama show --modelfile` gives for an imported SmolLM2 with a chat template and tuned parameters.
GO_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
               "{{ end }}<|im_start|>assistant\n")
# Ollama writes params with Go's encoder: typed values, `stop` as a list, <, > escaped, whole floats as ints.
PARAMS_JSON = (b'{"draft_num_predict":4,"num_ctx":8192,"repeat_penalty":1,'
               b'"stop":["\\u003c|im_start|\\u003e","\\u003c|im_end|\\u003e"],'
               b'"temperature":0.2,"top_k":20,"top_p":0.95}')
MESSAGES_JSON = b'[{"role":"user","content":"hi"},{"role":"assistant","content":"Hello!"}]'


def add_blob(models: Path, data: bytes | None = None, source: Path | None = None) -> dict:
    """Put a blob into an Ollama layout the way Ollama names it; return its manifest entry (without mediaType)."""
    if source is not None:
        with open(source, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        target = models / "blobs" / f"sha256-{digest}"
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        return {"digest": f"sha256:{digest}", "size": source.stat().st_size}
    digest = hashlib.sha256(data).hexdigest()
    (models / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_ollama_model(models: Path, name_parts: tuple[str, ...], layers: list[tuple[str, dict]]) -> None:
    config = add_blob(models, json.dumps({"model_format": "gguf", "model_family": "llama",
                                          "model_type": "134.52M", "file_type": "Q4_1"}).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
                "layers": [{"mediaType": f"application/vnd.ollama.image.{kind}", **entry} for kind, entry in layers]}
    path = models.joinpath("manifests", *name_parts)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest))


@pytest.fixture
def ollama_models(tmp_path):
    """An Ollama store holding smollm2:135m, built from the real GGUF (hardlinked when possible)."""
    models = tmp_path / "ollama" / "models"
    (models / "blobs").mkdir(parents=True)
    write_ollama_model(models, ("registry.ollama.ai", "library", "smollm2", "135m"), [
        ("model", add_blob(models, source=SMOLLM2)),
        ("template", add_blob(models, GO_TEMPLATE.encode())),
        ("license", add_blob(models, b"Apache License 2.0")),
        ("params", add_blob(models, PARAMS_JSON)),
        ("system", add_blob(models, b"You are a concise assistant.")),
        ("messages", add_blob(models, MESSAGES_JSON)),
        ("projector", add_blob(models, b"vision tower, unused")),
    ])
    return models


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    return Store()


def test_import_links_the_gguf_and_registers_what_the_ollama_manifest_says(store, ollama_models, caplog):
    with caplog.at_level(logging.WARNING, logger="tunelab.registry.ollama_store"):
        record = import_ollama_model(store, "smollm2:135m", ollama_models)
    ollama_params = json.loads(PARAMS_JSON)
    del ollama_params["draft_num_predict"]  # Ollama's speculative-decoding knob; tunelab has none
    assert record.parameters == ollama_params
    assert record.parameters["stop"] == ["<|im_start|>", "<|im_end|>"]
    assert isinstance(record.parameters["repeat_penalty"], float)
    assert record.template == GO_TEMPLATE
    assert record.system == "You are a concise assistant."
    assert record.license == ["Apache License 2.0"]
    assert record.messages == [("user", "hi"), ("assistant", "Hello!")]
    assert record.name == "smollm2:135m"
    assert (record.details.family, record.details.quantization_level) == ("llama", "Q4_1")
    assert (record.details.context_length, record.details.parameter_size) == (8192, "135M")
    ollama_gguf = next(p for p in (ollama_models / "blobs").iterdir() if p.stat().st_size == SMOLLM2.stat().st_size)
    assert record.weights_path.stat().st_ino == ollama_gguf.stat().st_ino  # linked, not copied
    assert "skipping parameter draft_num_predict" in caplog.text
    assert "skipping a application/vnd.ollama.image.projector layer" in caplog.text

    recreated = store.create("smollm2-copy", parse_modelfile(record.modelfile_text()))
    assert recreated.digest == record.digest


def test_imported_model_runs_with_the_imported_settings(store, ollama_models):
    from tunelab.generation import collect, prepare_chat
    from tunelab.runtime import open_model

    import_ollama_model(store, "smollm2:135m", ollama_models)
    runtime = open_model("smollm2:135m", store, pull_missing=False)
    try:
        assert runtime.engine.config.num_ctx == 8192 and runtime.system == "You are a concise assistant."
        prepared = prepare_chat(runtime, [{"role": "user", "content": "What is the capital of France?"}],
                                options={"num_predict": 12})
        # The Go TEMPLATE is kept as data; the prompt comes from the GGUF's own chat template,
        # with the imported SYSTEM and MESSAGE seeds in front of the user's turn.
        assert prepared.prompt.startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n"
                                          "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>")
        params = prepared.request.params
        assert (params.temperature, params.top_k, params.top_p) == (0.2, 20, 0.95)
        reply = collect(prepared, runtime.engine.generate(prepared.request))
    finally:
        runtime.close()
    assert reply.token_ids and reply.content.strip()


def test_import_reads_ollama_models_from_the_environment_and_can_rename(store, ollama_models, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama_models))
    assert list_ollama_models() == ["smollm2:135m"]
    record = import_ollama_model(store, "smollm2:135m", as_name="me/smol:tuned")
    assert record.name == "me/smol:tuned"
    assert [entry.name for entry in store.list()] == ["me/smol:tuned"]


def test_importing_a_model_ollama_lacks_lists_what_it_has(store, ollama_models):
    with pytest.raises(ModelNotFound) as info:
        import_ollama_model(store, "qwen3:14b", ollama_models)
    assert "model 'qwen3:14b' is not in the Ollama store" in str(info.value)
    assert "it has: smollm2:135m" in str(info.value)


def test_a_damaged_ollama_blob_is_refused_and_nothing_is_registered(store, tmp_path):
    models = tmp_path / "damaged"
    (models / "blobs").mkdir(parents=True)
    claimed = {"digest": "sha256:" + hashlib.sha256(b"the real weights").hexdigest(), "size": 15}
    (models / "blobs" / f"sha256-{claimed['digest'][7:]}").write_bytes(b"GGUF but other!")
    write_ollama_model(models, ("registry.ollama.ai", "library", "broken", "latest"), [("model", claimed)])
    with pytest.raises(DownloadError, match="has digest sha256:"):
        import_ollama_model(store, "broken", models)
    assert store.list() == [] and not any(store.blobs_dir.glob("sha256-*"))

    params = add_blob(models, b'{"temperature":0.1}')
    (models / "blobs" / f"sha256-{params['digest'][7:]}").write_bytes(b'{"temperature":0.9}')
    write_ollama_model(models, ("registry.ollama.ai", "library", "tampered", "latest"), [("params", params)])
    with pytest.raises(StoreError, match="is damaged"):
        import_ollama_model(store, "tampered", models)


def test_an_unreadable_ollama_manifest_names_the_file(store, tmp_path):
    path = tmp_path / "models" / "manifests" / "registry.ollama.ai" / "library" / "half" / "latest"
    path.parent.mkdir(parents=True)
    path.write_text('{"layers": [')
    with pytest.raises(StoreError, match=f"Ollama manifest {path} is unreadable"):
        import_ollama_model(store, "half", tmp_path / "models")
