"""The local model store: manifests plus content-addressed blobs, in Ollama's layout.

    <root>/models/manifests/<host>/<namespace>/<model>/<tag>   JSON manifest (a list of layers)
    <root>/models/blobs/sha256-<hex>                           content, named by its sha256
    <root>/cache/<key>/                                         model directories assembled from blobs
    <root>/cache/prepared-<key>/                                quantized loads saved (weights/prepared.py)
    <root>/cache/kernels/                                       native kernels built for this CPU (kernels/)

A layer is a blob plus an Ollama media type: the weights (one GGUF, or the
files of a Hugging Face directory, each with its relative name), adapters,
template, system, license, messages and parameters. The config blob records
what the weights are (format, family, size, quantization, context length).
A manifest holds only content, so the same model always gets the same manifest.

Every write goes to a temp file that is renamed into place: a reader never sees
half a blob or half a manifest, and a killed writer leaves only `.tmp-*` files,
which `prune` removes. Writers hold a shared lock on `models/.lock`; `prune`
holds it exclusively, so it never deletes a blob that a running `create` has
written but not yet referenced.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Sequence

import gguf
from safetensors import safe_open

from tunelab.errors import DownloadError, InvalidOption, ModelFormatError, ModelNotFound, ModelfileError, StoreError
from tunelab.options import validate_options
from tunelab.registry.model_name import ModelName, parse_model_name
from tunelab.registry.modelfile import Modelfile, format_modelfile

log = logging.getLogger(__name__)

MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

# Files of a Hugging Face model or PEFT adapter directory worth keeping (weights, configs, tokenizer).
MODEL_DIR_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")
ADAPTER_DIR_SUFFIXES = (".safetensors", ".json", ".bin", ".gguf")
_DIGEST = re.compile(r"(?:sha256[:-])?([0-9a-f]{64})")
_TEMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def default_store_root() -> Path:
    """`$TUNELAB_HOME`, else `~/.tunelab`."""
    return Path(os.environ.get("TUNELAB_HOME") or Path.home() / ".tunelab")


@dataclass(frozen=True)
class Layer:
    """One manifest entry: a blob, its media type, and its file name inside a directory (if any)."""

    media_type: str
    digest: str
    size: int
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        entry = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        return entry | ({"name": self.name} if self.name else {})

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> "Layer":
        name = entry.get("name")
        if name is not None and (PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts):
            raise ValueError(f"layer name {name!r} is not a relative path")
        return cls(entry["mediaType"], _digest(entry["digest"]), int(entry["size"]), name)


@dataclass(frozen=True)
class ModelDetails:
    """What the weights are, as `ollama list` and `/api/tags` report it."""

    format: str  # "gguf" | "safetensors"
    family: str
    parameter_size: str
    quantization_level: str
    context_length: int | None

    def to_config(self) -> dict[str, Any]:
        """Ollama's config blob keys, plus the context length."""
        return {"model_format": self.format, "model_family": self.family, "model_families": [self.family],
                "model_type": self.parameter_size, "file_type": self.quantization_level,
                "context_length": self.context_length}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelDetails":
        return cls(config["model_format"], config["model_family"], config["model_type"], config["file_type"],
                   config.get("context_length"))


@dataclass
class ModelContent:
    """Everything a manifest says, with blobs named by digest."""

    weights: list[Layer]
    details: ModelDetails
    adapters: list[Layer] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    template: str | None = None
    license: list[str] = field(default_factory=list)
    messages: list[tuple[str, str]] = field(default_factory=list)
    requires: str | None = None


@dataclass(frozen=True)
class ModelRecord:
    """A stored model, resolved to files on disk: what `show` prints and what the loader opens."""

    name: str
    digest: str  # sha256 of the manifest: the model's id
    weights_path: Path  # the GGUF file, or a directory of symlinks to the stored HF files
    details: ModelDetails
    parameters: dict[str, Any]
    system: str | None
    template: str | None
    messages: list[tuple[str, str]]
    license: list[str]
    adapters: list[Path]
    requires: str | None
    size: int
    modified: datetime

    def modelfile(self) -> Modelfile:
        """A standalone Modelfile: FROM the stored weights, with every stored setting spelled out."""
        return Modelfile(from_=str(self.weights_path), parameters=dict(self.parameters), system=self.system,
                         template=self.template, adapters=[str(path) for path in self.adapters],
                         messages=list(self.messages), license=list(self.license), requires=self.requires)

    def modelfile_text(self) -> str:
        """`show --modelfile`: the standalone Modelfile, with a header naming the model."""
        header = ('# Modelfile generated by "tunelab show"\n'
                  "# To build a new Modelfile based on this one, replace the FROM line with:\n"
                  f"# FROM {self.name}\n\n")
        return header + format_modelfile(self.modelfile())


@dataclass(frozen=True)
class ModelEntry:
    """One row of `tunelab list`."""

    name: str
    digest: str
    size: int
    modified: datetime
    details: ModelDetails


class Store:
    """Manifests and blobs under `root/models`, laid out as Ollama lays out `~/.ollama/models`."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_store_root()
        self.manifests_dir = self.root / "models" / "manifests"
        self.blobs_dir = self.root / "models" / "blobs"
        self.cache_dir = self.root / "cache"
        self._lock_held = threading.local()

    # Blobs

    def add_blob_from_file(self, path: Path | str, expected_sha256: str | None = None, link: bool = False) -> str:
        """Store a file as a blob and return its digest ("sha256:<hex>").

        The file is hashed while it is copied to a temp file, which is renamed into
        place only if the hash matches `expected_sha256` (else DownloadError, nothing
        kept). `link=True` hardlinks instead of copying when both are on one filesystem.
        """
        path = Path(path)
        expected = _digest(expected_sha256) if expected_sha256 else None
        with self._locked(fcntl.LOCK_SH):
            temp = self._temp_path(self.blobs_dir)
            try:
                digest = self._link_blob(path, temp) if link else None
                if digest is None:
                    digest = self._copy_blob(path, temp)
                if expected is not None and digest != expected:
                    raise DownloadError(f"{path} has digest {digest}, expected {expected}: the file is damaged "
                                        "or not the one asked for; fetch it again")
                os.replace(temp, self._blob_file(digest))
            finally:
                temp.unlink(missing_ok=True)  # left behind only when renaming onto its own hardlink
        return digest

    def add_blob_bytes(self, data: bytes) -> str:
        """Store bytes as a blob and return its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        final = self._blob_file(digest)
        with self._locked(fcntl.LOCK_SH):
            if not (final.is_file() and final.stat().st_size == len(data)):
                self._atomic_write(final, data)
        return digest

    def blob_path(self, digest: str, size: int | None = None) -> Path:
        """The file of a blob; StoreError if it is missing or (given `size`) truncated."""
        path = self._blob_file(digest)
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from {self.blobs_dir}; "
                             "remove the model and create or pull it again") from None
        if size is not None and actual != size:
            raise StoreError(f"blob {digest} has {actual} bytes, its manifest says {size}: it is damaged; "
                             "remove the model and create or pull it again")
        return path

    def verify_blob(self, digest: str) -> None:
        """Rehash a blob; StoreError if its content no longer matches its name."""
        with open(self.blob_path(digest), "rb") as f:
            actual = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        if actual != _digest(digest):
            raise StoreError(f"blob {digest} is damaged (its content hashes to {actual}); "
                             "remove the model and create or pull it again")

    # Models

    def create(self, name: str, modelfile: Modelfile, base_dir: Path | str | None = None) -> ModelRecord:
        """Build a model from a Modelfile and store it under `name`.

        FROM is a store model (its layers are shared, then overridden), a GGUF file,
        or a Hugging Face directory; relative paths are read from `base_dir`.
        Bad input raises before anything is written.
        """
        target = parse_model_name(name)
        parameters = _checked_parameters(modelfile.parameters)
        base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
        with self._locked(fcntl.LOCK_SH):
            source = self._locate_from(modelfile.from_, base_dir)
            adapter_paths = [_locate_adapter(value, base_dir) for value in modelfile.adapters]
            groups = [path.name for path in adapter_paths if path.is_dir()]
            if len(set(groups)) != len(groups):
                raise ModelfileError(f"ADAPTER directories must have different names, got {groups}")
            if isinstance(source, ModelContent):
                content = replace(source, parameters=source.parameters | parameters)
            elif source.is_dir():
                content = self._hf_content(source)
                content.parameters = parameters
            else:
                content = self._gguf_content(self.add_blob_from_file(source))
                content.parameters = parameters
            content.adapters = content.adapters + [layer for path in adapter_paths
                                                   for layer in self._adapter_layers(path)]
            content.template = modelfile.template if modelfile.template is not None else content.template
            content.system = modelfile.system if modelfile.system is not None else content.system
            content.messages = list(modelfile.messages) or content.messages
            content.license = list(modelfile.license) or content.license
            content.requires = modelfile.requires or content.requires
            return self._write_model(target, content)

    def register_gguf(self, name: str, weights: Path | str, parameters: dict[str, Any] | None = None, *,
                      template: str | None = None, system: str | None = None,
                      messages: Sequence[tuple[str, str]] = (), license: Sequence[str] = (),
                      adapters: Sequence[str] = ()) -> ModelRecord:
        """Store a GGUF model under `name`; `weights` is a GGUF file path or the digest of a stored blob.

        `adapters` are digests of stored adapter blobs. Used by pull and by Ollama import.
        """
        target = parse_model_name(name)
        parameters = _checked_parameters(parameters or {})
        with self._locked(fcntl.LOCK_SH):
            is_digest = isinstance(weights, str) and weights.startswith("sha256:")
            content = self._gguf_content(_digest(weights) if is_digest else self.add_blob_from_file(weights))
            content.adapters = [self._blob_layer(MEDIA_ADAPTER, _digest(d)) for d in adapters]
            content.parameters, content.template, content.system = parameters, template, system
            content.messages, content.license = list(messages), list(license)
            return self._write_model(target, content)

    def resolve(self, name: str | ModelName) -> ModelRecord:
        """The stored model `name`, with its weights and adapters as paths; ModelNotFound lists what exists."""
        target = parse_model_name(name)
        with self._locked(fcntl.LOCK_SH):
            manifest_path = self._manifest_file(target)
            data = self._read_manifest_bytes(target)
            content = self._content(target, data)
            fmt = content.details.format
            weights = (self.blob_path(content.weights[0].digest, content.weights[0].size) if fmt == "gguf"
                       else self._assemble(content.weights))
            return ModelRecord(
                name=target.display, digest="sha256:" + hashlib.sha256(data).hexdigest(), weights_path=weights,
                details=content.details, parameters=content.parameters, system=content.system,
                template=content.template, messages=content.messages, license=content.license,
                adapters=self._adapter_paths(content.adapters), requires=content.requires,
                size=_manifest_size(json.loads(data)),
                modified=datetime.fromtimestamp(manifest_path.stat().st_mtime, timezone.utc))

    def show(self, name: str | ModelName) -> ModelRecord:
        """What `tunelab show` prints: the resolved record (see `ModelRecord.modelfile_text`)."""
        return self.resolve(name)

    def list(self) -> list[ModelEntry]:
        """Every stored model, newest first; an unreadable manifest is skipped with a warning."""
        entries = []
        for target, path in self._manifest_files():
            try:
                data = path.read_bytes()
                content = self._content(target, data)
            except (StoreError, OSError) as exc:
                log.warning("skipping %s: %s", target.display, exc)
                continue
            entries.append(ModelEntry(target.display, "sha256:" + hashlib.sha256(data).hexdigest(),
                                      _manifest_size(json.loads(data)),
                                      datetime.fromtimestamp(path.stat().st_mtime, timezone.utc), content.details))
        return sorted(entries, key=lambda entry: entry.modified, reverse=True)

    def copy(self, source: str, destination: str) -> ModelRecord:
        """Store the model `source` under a second name too; the two share every blob."""
        target = parse_model_name(destination)
        with self._locked(fcntl.LOCK_SH):
            origin = parse_model_name(source)
            data = self._read_manifest_bytes(origin)
            self._content(origin, data)  # refuse to copy a corrupt manifest
            self._atomic_write(self._manifest_file(target), data)
        return self.resolve(target)

    def remove(self, name: str) -> None:
        """Delete the model `name`, then every blob no other model uses."""
        target = parse_model_name(name)
        with self._locked(fcntl.LOCK_EX):
            self._read_manifest_bytes(target)  # ModelNotFound with the list of models
            path = self._manifest_file(target)
            path.unlink()
            for parent in list(path.parents)[: len(target.path_parts) - 1]:
                if any(parent.iterdir()):
                    break
                parent.rmdir()
            self._prune()

    def prune(self) -> None:
        """Delete blobs no manifest uses, temp files left by killed writers, and stale assembled dirs."""
        with self._locked(fcntl.LOCK_EX):
            self._prune()

    # Internals: reading

    def _manifest_file(self, target: ModelName) -> Path:
        return self.manifests_dir.joinpath(*target.path_parts)

    def _manifest_files(self) -> Iterator[tuple[ModelName, Path]]:
        for path in sorted(self.manifests_dir.glob("*/*/*/*")):
            if path.is_file() and not path.name.startswith(_TEMP_PREFIX):
                yield ModelName(*path.relative_to(self.manifests_dir).parts), path

    def _read_manifest_bytes(self, target: ModelName) -> bytes:
        try:
            return self._manifest_file(target).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            names = ", ".join(sorted(name.display for name, _ in self._manifest_files())) or "none"
            raise ModelNotFound(f"model '{target.display}' not found; local models: {names}. "
                                "Create or pull it first") from None

    def _content(self, target: ModelName, data: bytes) -> ModelContent:
        """Read a manifest and its small blobs; StoreError naming the model if any of it is corrupt."""
        try:
            manifest = json.loads(data)
            config = json.loads(self._read_small_blob(Layer.from_json(manifest["config"])))
            content = ModelContent(weights=[], details=ModelDetails.from_config(config),
                                   requires=config.get("requires"))
            for layer in map(Layer.from_json, manifest["layers"]):
                kind = layer.media_type
                if kind == MEDIA_MODEL:
                    content.weights.append(layer)
                elif kind == MEDIA_ADAPTER:
                    content.adapters.append(layer)
                elif kind == MEDIA_TEMPLATE:
                    content.template = self._read_small_blob(layer).decode()
                elif kind == MEDIA_SYSTEM:
                    content.system = self._read_small_blob(layer).decode()
                elif kind == MEDIA_LICENSE:
                    content.license.append(self._read_small_blob(layer).decode())
                elif kind == MEDIA_MESSAGES:
                    messages = json.loads(self._read_small_blob(layer))
                    content.messages = [(m["role"], m["content"]) for m in messages]
                elif kind == MEDIA_PARAMS:
                    content.parameters = _checked_parameters(json.loads(self._read_small_blob(layer)),
                                                             ignore_unknown=True)
                else:
                    log.warning("model %s: ignoring a layer of type %s", target.display, kind)
            if not content.weights:
                raise ValueError("it has no model layer")
        except (ValueError, KeyError, TypeError, InvalidOption, UnicodeDecodeError) as exc:
            raise StoreError(f"manifest of model '{target.display}' ({self._manifest_file(target)}) is corrupt: "
                             f"{exc}; remove it and create or pull the model again") from None
        return content

    def _read_small_blob(self, layer: Layer) -> bytes:
        """Read a config or text blob, checking it against its digest (cheap at this size)."""
        data = self.blob_path(layer.digest, layer.size).read_bytes()
        if "sha256:" + hashlib.sha256(data).hexdigest() != layer.digest:
            raise StoreError(f"blob {layer.digest} is damaged; remove the model and create or pull it again")
        return data

    def _adapter_paths(self, layers: list[Layer]) -> list[Path]:
        """A file adapter is its blob; a directory adapter ("dir/file" layers) is assembled from its blobs."""
        paths, groups = [], {}
        for layer in layers:
            if layer.name is None:
                paths.append(self.blob_path(layer.digest, layer.size))
            else:
                group = PurePosixPath(layer.name).parts[0]
                if group not in groups:
                    groups[group] = len(paths)
                    paths.append(group)
        for group, index in groups.items():
            members = [layer for layer in layers if layer.name and PurePosixPath(layer.name).parts[0] == group]
            paths[index] = self._assemble(members) / group
        return paths

    def _assemble(self, layers: list[Layer]) -> Path:
        """A directory of symlinks named as the layers say, pointing at their blobs; built once and reused."""
        key = hashlib.sha256(json.dumps(sorted((layer.name, layer.digest) for layer in layers)).encode())
        final = self.cache_dir / key.hexdigest()[:32]
        if final.is_dir():
            return final
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.cache_dir))
        for layer in layers:
            link = temp / layer.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(self.blob_path(layer.digest, layer.size))
        try:
            os.rename(temp, final)
        except OSError:  # another process assembled the same directory first
            shutil.rmtree(temp)
        return final

    # Internals: writing

    def _locate_from(self, value: str, base_dir: Path) -> ModelContent | Path:
        """What FROM names: an existing path, else a store model; checked before anything is written."""
        path = _expand(value, base_dir)
        if path.is_dir():
            if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
                raise ModelfileError(f"FROM {value}: {path} is not a model directory; it needs config.json and "
                                     "*.safetensors files (or point FROM at a .gguf file)")
            return path
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ModelFormatError(f"FROM {value}: {path} is not a GGUF file; point FROM at a .gguf file, "
                                           "a model directory or a model name")
            return path
        if path.exists():  # a pipe can be read only once: its content is checked after it is stored
            return path
        try:
            base = parse_model_name(value)
        except StoreError:
            raise ModelfileError(f"FROM {value}: no such file or directory ({path}), "
                                 "and not a model name either") from None
        try:
            return self._content(base, self._read_manifest_bytes(base))
        except ModelNotFound as exc:
            raise ModelNotFound(f"FROM {value}: no file at {path}, and {exc}") from None

    def _gguf_content(self, digest: str) -> ModelContent:
        layer = self._blob_layer(MEDIA_MODEL, digest)
        details = self._stored_details(layer) or _gguf_details(self.blob_path(digest))
        return ModelContent(weights=[layer], details=details)

    def _stored_details(self, weights: Layer) -> ModelDetails | None:
        """Details are a function of the weights, so a model already holding them has them (GGUF reads are slow)."""
        for target, path in self._manifest_files():
            data = path.read_bytes()
            if weights.digest.encode() not in data:
                continue
            try:
                content = self._content(target, data)
            except StoreError:
                continue
            if [weights] == content.weights:
                return content.details
        return None

    def _hf_content(self, directory: Path) -> ModelContent:
        files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in MODEL_DIR_SUFFIXES
                       and not p.name.startswith("."))
        layers = [self._blob_layer(MEDIA_MODEL, self.add_blob_from_file(p), p.name) for p in files]
        blobs = {layer.name: self.blob_path(layer.digest) for layer in layers}
        return ModelContent(weights=layers, details=_hf_details(blobs))

    def _adapter_layers(self, path: Path) -> list[Layer]:
        if not path.is_dir():
            return [self._blob_layer(MEDIA_ADAPTER, self.add_blob_from_file(path))]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in ADAPTER_DIR_SUFFIXES)
        return [self._blob_layer(MEDIA_ADAPTER, self.add_blob_from_file(p), f"{path.name}/{p.name}") for p in files]

    def _blob_layer(self, media_type: str, digest: str, name: str | None = None) -> Layer:
        return Layer(media_type, digest, self.blob_path(digest).stat().st_size, name)

    def _write_model(self, target: ModelName, content: ModelContent) -> ModelRecord:
        layers = content.weights + content.adapters
        if content.template is not None:
            layers.append(self._bytes_layer(MEDIA_TEMPLATE, content.template.encode()))
        if content.system is not None:
            layers.append(self._bytes_layer(MEDIA_SYSTEM, content.system.encode()))
        layers += [self._bytes_layer(MEDIA_LICENSE, text.encode()) for text in content.license]
        if content.messages:
            messages = [{"role": role, "content": text} for role, text in content.messages]
            layers.append(self._bytes_layer(MEDIA_MESSAGES, _json_bytes(messages)))
        if content.parameters:
            layers.append(self._bytes_layer(MEDIA_PARAMS, _json_bytes(content.parameters)))
        config = content.details.to_config() | ({"requires": content.requires} if content.requires else {})
        manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                    "config": self._bytes_layer(MEDIA_CONFIG, _json_bytes(config)).to_json(),
                    "layers": [layer.to_json() for layer in layers]}
        self._atomic_write(self._manifest_file(target), json.dumps(manifest, indent=2).encode())
        return self.resolve(target)

    def _bytes_layer(self, media_type: str, data: bytes) -> Layer:
        return Layer(media_type, self.add_blob_bytes(data), len(data))

    def _copy_blob(self, source: Path, temp: Path) -> str:
        digest = hashlib.sha256()
        with open(source, "rb") as src, open(temp, "xb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        return "sha256:" + digest.hexdigest()

    def _link_blob(self, source: Path, temp: Path) -> str | None:
        """Hardlink `source` to `temp` and return its digest, or None when it cannot be linked."""
        try:
            os.link(source, temp)
        except OSError:
            return None
        with open(temp, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()

    def _atomic_write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = self._temp_path(path.parent)
        try:
            with open(temp, "xb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp, 0o644)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def _temp_path(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{_TEMP_PREFIX}{os.getpid()}-{os.urandom(8).hex()}"

    def _blob_file(self, digest: str) -> Path:
        return self.blobs_dir / f"sha256-{_digest_hex(digest)}"

    def _prune(self) -> None:
        used: set[str] = set()
        for target, path in self._manifest_files():
            try:
                manifest = json.loads(path.read_bytes())
                used.update(Layer.from_json(entry).digest for entry in [manifest["config"], *manifest["layers"]])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("not pruning blobs: the manifest of %s is unreadable (%s)", target.display, exc)
                return
        for path in self.manifests_dir.rglob(f"{_TEMP_PREFIX}*"):
            path.unlink()
        for path in self.blobs_dir.glob("*"):
            if path.name.startswith(_TEMP_PREFIX) or "sha256:" + path.name.removeprefix("sha256-") not in used:
                path.unlink()
        for path in self.cache_dir.glob("*"):
            links = [p for p in path.rglob("*") if p.is_symlink()]
            if path.name.startswith(_TEMP_PREFIX) or any(not p.exists() for p in links):
                shutil.rmtree(path)

    @contextmanager
    def _locked(self, mode: int):
        """Hold the store lock; re-entrant within a thread, so public methods can call each other."""
        if getattr(self._lock_held, "value", False):
            yield
            return
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.root / "models" / ".lock", "a") as lock:
            fcntl.flock(lock, mode)
            self._lock_held.value = True
            try:
                yield
            finally:
                self._lock_held.value = False


def _digest_hex(digest: str) -> str:
    match = _DIGEST.fullmatch(digest.strip().lower())
    if match is None:
        raise StoreError(f"invalid digest {digest!r}; expected 'sha256:' followed by 64 hex digits")
    return match.group(1)


def _digest(digest: str) -> str:
    """The canonical spelling "sha256:<hex>" of a digest given as sha256:<hex>, sha256-<hex> or <hex>."""
    return "sha256:" + _digest_hex(digest)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _manifest_size(manifest: dict[str, Any]) -> int:
    return sum(int(entry["size"]) for entry in [manifest["config"], *manifest["layers"]])


def _checked_parameters(parameters: dict[str, Any], ignore_unknown: bool = False) -> dict[str, Any]:
    """Typed, range-checked parameters, with list options as lists (JSON's shape)."""
    checked = validate_options(parameters, ignore_unknown=ignore_unknown)
    return {name: list(value) if isinstance(value, tuple) else value for name, value in checked.items()}


def _expand(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _locate_adapter(value: str, base_dir: Path) -> Path:
    path = _expand(value, base_dir)
    if not path.exists():
        raise ModelfileError(f"ADAPTER {value}: no such file or directory ({path})")
    if path.is_dir() and not any(p.suffix in ADAPTER_DIR_SUFFIXES for p in path.iterdir()):
        raise ModelfileError(f"ADAPTER {value}: {path} holds no adapter files (*.safetensors, *.gguf)")
    return path


def _human_count(count: int) -> str:
    """A parameter count as Ollama prints it: 134.52M, 7.6B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            number = count / scale
            return f"{number:.0f}{unit}" if number >= 100 else f"{number:.{1 if number >= 10 else 2}f}{unit}"
    return str(count)


def _gguf_details(path: Path) -> ModelDetails:
    """Format facts from GGUF metadata, as Ollama's config blob records them."""
    from tunelab.weights.gguf_file import GGUFFile  # here, not at the top: it imports torch, which list/show skip

    weights = GGUFFile(path)
    family = weights.architecture
    num_params = sum(math.prod(shape) for shape in weights.tensor_shapes().values())
    try:
        quantization = gguf.LlamaFileType(weights.metadata.get("general.file_type")).name
    except ValueError:
        quantization = "unknown"
    return ModelDetails("gguf", family, _human_count(num_params),
                        quantization.removeprefix("MOSTLY_").removeprefix("ALL_"),
                        weights.metadata.get(f"{family}.context_length"))


def _hf_details(files: dict[str, Path]) -> ModelDetails:
    """Format facts from a Hugging Face directory's config.json and safetensors headers."""
    try:
        config = json.loads(files["config.json"].read_text())
        num_params = 0
        for name, path in files.items():
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt") as tensors:
                    num_params += sum(math.prod(tensors.get_slice(key).get_shape()) for key in tensors.keys())
    except (ValueError, OSError) as exc:
        raise ModelFormatError(f"the model directory's config.json or safetensors files are unreadable: {exc}")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "unknown")
    quantization = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dtype, dtype.upper())
    return ModelDetails("safetensors", config.get("model_type", "unknown"), _human_count(num_params), quantization,
                        config.get("max_position_embeddings"))
