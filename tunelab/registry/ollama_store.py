"""Import models from an existing Ollama store (`$OLLAMA_MODELS` or `~/.ollama/models`).

Ollama lays its store out as tunelab does: JSON manifests under
`manifests/<host>/<namespace>/<model>/<tag>` whose layers are blobs named
`blobs/sha256-<hex>`. An import hardlinks the GGUF into the tunelab store (a
copy only across filesystems) and registers the parameters, template, system
prompt, license and seed messages as Ollama stored them. The template stays
Ollama's Go text/template source; chat rendering decides how to use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from tunelab.errors import InvalidOption, ModelFormatError, ModelNotFound, StoreError
from tunelab.options import OPTION_SPECS, coerce_option
from tunelab.registry.model_name import ModelName, parse_model_name
from tunelab.registry.modelfile import MESSAGE_ROLES
from tunelab.registry.store import (MEDIA_ADAPTER, MEDIA_LICENSE, MEDIA_MESSAGES, MEDIA_MODEL, MEDIA_PARAMS,
                                    MEDIA_SYSTEM, MEDIA_TEMPLATE, ModelRecord, Store)

log = logging.getLogger(__name__)


def default_ollama_models_dir() -> Path:
    """`$OLLAMA_MODELS`, else `~/.ollama/models`, as Ollama itself decides."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def list_ollama_models(ollama_models_dir: Path | str | None = None) -> list[str]:
    """Names of the models in an Ollama store, as `ollama list` spells them."""
    manifests = Path(ollama_models_dir or default_ollama_models_dir()) / "manifests"
    return sorted(ModelName(*path.relative_to(manifests).parts).display
                  for path in manifests.glob("*/*/*/*") if path.is_file())


def import_ollama_model(store: Store, name: str, ollama_models_dir: Path | str | None = None,
                        as_name: str | None = None) -> ModelRecord:
    """Register the Ollama model `name` in `store` (as `as_name`, default the same name), linking its GGUF."""
    source = parse_model_name(name)
    models_dir = Path(ollama_models_dir) if ollama_models_dir is not None else default_ollama_models_dir()
    manifest_path = models_dir.joinpath("manifests", *source.path_parts)
    try:
        manifest = json.loads(manifest_path.read_bytes())
        layers = [(entry["mediaType"], entry["digest"]) for entry in manifest["layers"]]
    except FileNotFoundError:
        found = ", ".join(list_ollama_models(models_dir)) or "none"
        raise ModelNotFound(f"model '{source.display}' is not in the Ollama store at {models_dir}; "
                            f"it has: {found}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"Ollama manifest {manifest_path} is unreadable ({exc}); "
                         f"run `ollama pull {source.display}` to repair it") from None

    weights, adapters, parameters, template, system, licenses, messages = None, [], {}, None, None, [], []
    for media_type, digest in layers:
        if media_type in (MEDIA_MODEL, MEDIA_ADAPTER):
            stored = store.add_blob_from_file(_blob_file(models_dir, digest), expected_sha256=digest, link=True)
            if media_type == MEDIA_MODEL:
                weights = stored
            else:
                adapters.append(stored)
        elif media_type == MEDIA_PARAMS:
            parameters = _supported_parameters(json.loads(_read_blob(models_dir, digest)), source)
        elif media_type == MEDIA_TEMPLATE:
            template = _read_blob(models_dir, digest).decode()
        elif media_type == MEDIA_SYSTEM:
            system = _read_blob(models_dir, digest).decode()
        elif media_type == MEDIA_LICENSE:
            licenses.append(_read_blob(models_dir, digest).decode())
        elif media_type == MEDIA_MESSAGES:
            messages = _supported_messages(json.loads(_read_blob(models_dir, digest)), source)
        else:
            log.warning("%s: skipping a %s layer, which tunelab does not use", source.display, media_type)
    if weights is None:
        raise ModelFormatError(f"Ollama model '{source.display}' has no GGUF weights layer; "
                               "only GGUF models can be imported")
    return store.register_gguf(as_name or source.display, weights, parameters, template=template, system=system,
                               messages=messages, license=licenses, adapters=adapters)


def _blob_file(models_dir: Path, digest: str) -> Path:
    """Ollama names blobs `sha256-<hex>`; early releases used `sha256:<hex>`."""
    hex_digest = digest.removeprefix("sha256:").removeprefix("sha256-")
    for candidate in (f"sha256-{hex_digest}", f"sha256:{hex_digest}"):
        if (models_dir / "blobs" / candidate).is_file():
            return models_dir / "blobs" / candidate
    raise StoreError(f"the Ollama store at {models_dir} lacks blob {digest}; "
                     "run `ollama pull` for the model to repair it")


def _read_blob(models_dir: Path, digest: str) -> bytes:
    data = _blob_file(models_dir, digest).read_bytes()
    if hashlib.sha256(data).hexdigest() != digest.removeprefix("sha256:"):
        raise StoreError(f"Ollama blob {digest} in {models_dir} is damaged; "
                         "run `ollama pull` for the model to repair it")
    return data


def _supported_parameters(raw: dict, source: ModelName) -> dict:
    """Ollama's typed parameters, minus the ones tunelab lacks or rejects (each skipped with a warning)."""
    kept = {}
    for key, value in raw.items():
        try:
            if key not in OPTION_SPECS:
                raise InvalidOption("tunelab has no such parameter")
            coerce_option(key, value)
        except InvalidOption as exc:
            log.warning("%s: skipping parameter %s=%r: %s", source.display, key, value, exc)
            continue
        kept[key] = value
    return kept


def _supported_messages(raw: list, source: ModelName) -> list[tuple[str, str]]:
    kept = [(m["role"], m.get("content", "")) for m in raw if m.get("role") in MESSAGE_ROLES]
    if len(kept) != len(raw):
        log.warning("%s: skipping %d seed messages whose role is not one of %s",
                    source.display, len(raw) - len(kept), ", ".join(MESSAGE_ROLES))
    return kept
