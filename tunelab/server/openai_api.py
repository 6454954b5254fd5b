"""The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Thinking comes back as `reasoning_content` (DeepSeek, llama.cpp and Qwen's
own docs) and, with the same text, as `reasoning` (Ollama and current vLLM),
so clients reading either name see it. Tool calls stream the way OpenAI
streams them: a first delta with the call's index, id and name, then its
arguments as a JSON string. `/v1/completions` continues the prompt as raw
text (no chat template), as OpenAI, vLLM and llama.cpp do.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from tunelab.chat.tool_calls import ToolCall
from tunelab.engine.request import FinishReason, TokenEvent
from tunelab.errors import InvalidRequest
from tunelab.generation import prepare_chat, prepare_completion
from tunelab.registry.model_name import DEFAULT_NAMESPACE, parse_model_name
from tunelab.runtime import ModelRuntime
from tunelab.server.model_manager import parse_keep_alive
from tunelab.server.openai_schemas import ChatCompletionRequest, CompletionRequest, ResponseFormat
from tunelab.server.streaming import Generation, StreamResponse, error_message, split_events, sse_frames, token_logprob

router = APIRouter(prefix="/v1")

SSE = "text/event-stream"
FINGERPRINT = "fp_tunelab"


def _error_body(exc: BaseException) -> dict:
    return {"error": {"message": error_message(exc), "type": "api_error", "param": None, "code": None}}


def _json_mode(response_format: ResponseFormat | None) -> bool:
    """Whether `response_format` asks for JSON mode; json_schema is refused (only plain JSON is enforced)."""
    if response_format is None or response_format.type == "text":
        return False
    if response_format.type == "json_object":
        return True
    if response_format.type == "json_schema":
        raise InvalidRequest("response_format json_schema is not supported; use {\"type\": \"json_object\"} "
                             "and describe the fields in the prompt")
    raise InvalidRequest(f"response_format.type {response_format.type!r} is not one of text, json_object, "
                         "json_schema")


def _finish_reason(reason: FinishReason, has_tool_calls: bool) -> str:
    if reason is FinishReason.LENGTH:
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


def _usage(token: TokenEvent) -> dict[str, Any]:
    return {"prompt_tokens": token.num_prompt_tokens, "completion_tokens": token.num_generated_tokens,
            "total_tokens": token.num_prompt_tokens + token.num_generated_tokens,
            "prompt_tokens_details": {"cached_tokens": token.num_cached_tokens}}


def _logprob_content(runtime: ModelRuntime, token: TokenEvent) -> list[dict]:
    """Chat-style log-probabilities of one token: `[{token, logprob, bytes, top_logprobs}]`."""
    if token.token_id is None or token.logprob is None:
        return []
    entry = token_logprob(runtime.tokenizer, token.token_id, token.logprob)
    entry["top_logprobs"] = [token_logprob(runtime.tokenizer, i, lp) for i, lp in token.top_logprobs or []]
    return [entry]


def _reasoning(text: str) -> dict[str, str]:
    return {"reasoning_content": text, "reasoning": text}


def _tool_call(call: ToolCall, index: int) -> dict[str, Any]:
    return {"index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


# ---- chat completions --------------------------------------------------------------------------

@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """A chat turn: thinking, answer and tool calls, streamed as SSE or in one response."""
    started = time.perf_counter()
    options = body.tunelab_options()
    think = body.think_switch()
    tools = body.tools_to_render()
    prefill = body.tool_prefill()
    json_mode = _json_mode(body.response_format)
    messages = [message.for_template() for message in body.messages]

    def prepare(runtime: ModelRuntime):
        return prepare_chat(runtime, messages, options=options, tools=tools, think=think,
                            sampling_extras=body.sampling_extras(), prefill=prefill, json_mode=json_mode)

    generation = await Generation.start(request.app.state.manager, body.model, options, prepare,
                                        keep_alive=parse_keep_alive(body.keep_alive), started=started)
    head = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": body.model,
            "system_fingerprint": FINGERPRINT}
    if body.stream:
        chunks = _chat_chunks(generation, request, body, head | {"object": "chat.completion.chunk"})
        return StreamResponse(sse_frames(chunks, _error_body), SSE, generation.close)
    try:
        return JSONResponse(await _chat_completion(generation, request, body, head | {"object": "chat.completion"}))
    finally:
        generation.close()


async def _chat_chunks(generation: Generation, request: Request, body: ChatCompletionRequest,
                       head: dict) -> AsyncIterator[dict]:
    def chunk(delta: dict, finish_reason: str | None = None, logprobs: list | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                  "finish_reason": finish_reason}
        return head | {"choices": [choice]}

    yield chunk({"role": "assistant", "content": ""})
    num_calls = 0
    async for step in generation.steps(request.receive):
        thinking, content, calls = split_events(step.events)
        logprobs = _logprob_content(generation.runtime, step.token) if body.logprobs else []
        if thinking:
            yield chunk(_reasoning(thinking))
        if content or logprobs:
            yield chunk({"content": content}, logprobs=logprobs)
        for call in calls:
            header = _tool_call(call, num_calls)
            arguments = header["function"]["arguments"]
            header["function"]["arguments"] = ""
            yield chunk({"tool_calls": [header]})
            yield chunk({"tool_calls": [{"index": num_calls, "function": {"arguments": arguments}}]})
            num_calls += 1
        reason = step.token.finish_reason
        if reason is not None and reason is not FinishReason.CANCELLED:
            yield chunk({}, _finish_reason(reason, num_calls > 0))
            if body.include_usage:
                yield head | {"choices": [], "usage": _usage(step.token)}


async def _chat_completion(generation: Generation, request: Request, body: ChatCompletionRequest,
                           head: dict) -> dict:
    thinking, content, calls, logprobs = [], [], [], []
    async for step in generation.steps(request.receive):
        step_thinking, step_content, step_calls = split_events(step.events)
        thinking.append(step_thinking)
        content.append(step_content)
        calls += step_calls
        if body.logprobs:
            logprobs += _logprob_content(generation.runtime, step.token)
    last = generation.last
    if last is None or last.finish_reason in (None, FinishReason.CANCELLED):
        return {}  # the client went away; nobody reads this
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or (None if calls else "")}
    if any(thinking):
        message |= _reasoning("".join(thinking))
    if calls:
        message["tool_calls"] = [_tool_call(call, i) | {"index": i} for i, call in enumerate(calls)]
    choice = {"index": 0, "message": message, "logprobs": {"content": logprobs} if body.logprobs else None,
              "finish_reason": _finish_reason(last.finish_reason, bool(calls))}
    return head | {"choices": [choice], "usage": _usage(last)}


# ---- text completions --------------------------------------------------------------------------

@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Continue a prompt as raw text (no chat template)."""
    started = time.perf_counter()
    options = body.tunelab_options()
    prompt = body.prompt_text()
    if body.suffix:
        raise InvalidRequest("suffix (fill-in-the-middle) is not supported; leave suffix out")

    def prepare(runtime: ModelRuntime):
        return prepare_completion(runtime, prompt, raw=True, options=options, sampling_extras=body.sampling_extras())

    generation = await Generation.start(request.app.state.manager, body.model, options, prepare,
                                        keep_alive=parse_keep_alive(body.keep_alive), started=started)
    head = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()),
            "model": body.model, "system_fingerprint": FINGERPRINT}
    chunks = _completion_chunks(generation, request, body, prompt, head)
    if body.stream:
        return StreamResponse(sse_frames(chunks, _error_body), SSE, generation.close)
    try:
        return JSONResponse(await _fold_completion(chunks))
    finally:
        generation.close()


def _legacy_logprobs(runtime: ModelRuntime, token: TokenEvent, offset: int) -> dict[str, list] | None:
    """The completions API's logprobs shape: parallel lists of tokens, logprobs, top choices, offsets."""
    if token.token_id is None or token.logprob is None:
        return None
    entry = token_logprob(runtime.tokenizer, token.token_id, token.logprob)
    top = {token_logprob(runtime.tokenizer, i, lp)["token"]: lp for i, lp in token.top_logprobs or []}
    return {"tokens": [entry["token"]], "token_logprobs": [entry["logprob"]], "top_logprobs": [top],
            "text_offset": [offset]}


async def _completion_chunks(generation: Generation, request: Request, body: CompletionRequest, prompt: str,
                             head: dict) -> AsyncIterator[dict]:
    def chunk(text: str, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
        return head | {"choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}]}

    offset = 0
    if body.echo:
        yield chunk(prompt)
        offset = len(prompt)
    async for step in generation.steps(request.receive):
        token = step.token
        logprobs = _legacy_logprobs(generation.runtime, token, offset) if body.logprobs is not None else None
        if token.text or logprobs:
            yield chunk(token.text, logprobs)
        offset += len(token.text)
        if token.finish_reason is not None and token.finish_reason is not FinishReason.CANCELLED:
            yield chunk("", finish_reason=_finish_reason(token.finish_reason, False))
            if body.include_usage or not body.stream:
                yield head | {"choices": [], "usage": _usage(token)}


async def _fold_completion(chunks: AsyncIterator[dict]) -> dict:
    """One completion from its chunks: texts joined, logprob lists concatenated, usage kept."""
    text, logprobs, finish_reason, final = [], None, None, {}
    async for chunk in chunks:
        if "usage" in chunk:
            final = chunk
            continue
        choice = chunk["choices"][0]
        text.append(choice["text"])
        finish_reason = choice["finish_reason"] or finish_reason
        if choice["logprobs"]:
            logprobs = logprobs or {key: [] for key in choice["logprobs"]}
            for key, values in choice["logprobs"].items():
                logprobs[key] += values
    if not final:
        return {}
    return final | {"choices": [{"text": "".join(text), "index": 0, "logprobs": logprobs,
                                 "finish_reason": finish_reason}]}


# ---- models ------------------------------------------------------------------------------------

def _model_card(name: str, modified: datetime) -> dict[str, Any]:
    namespace = parse_model_name(name).namespace
    return {"id": name, "object": "model", "created": int(modified.timestamp()),
            "owned_by": "library" if namespace == DEFAULT_NAMESPACE else namespace}


@router.get("/models")
async def models(request: Request) -> dict:
    """Every stored model, OpenAI-style."""
    entries = await asyncio.to_thread(request.app.state.store.list)
    return {"object": "list", "data": [_model_card(entry.name, entry.modified) for entry in entries]}


@router.get("/models/{name:path}")
async def model(name: str, request: Request) -> dict:
    """One stored model; 404 if there is none by that name."""
    record = await asyncio.to_thread(request.app.state.store.resolve, name)
    return _model_card(record.name, record.modified)
