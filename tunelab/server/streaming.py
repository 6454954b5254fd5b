"""One HTTP request's run on the engine, and the wire framing of its output.

`Generation` takes a model from the `ModelManager`, submits the prepared
request, and yields its output as `Step`s: each engine token with the
thinking / answer / tool-call events the output parser made certain. When the
client goes away (a closed connection, seen while waiting for tokens or while
writing them) the request is cancelled in the engine, which frees its KV
blocks at the next step, and the model is released.

`ndjson_frames` (Ollama) and `sse_frames` (OpenAI) turn response objects into
bytes; an error after the status line went out becomes a final error frame,
since the status can no longer change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tunelab.chat.output_parser import ContentDelta, Event, ThinkingDelta, ToolCall
from tunelab.engine.engine import RequestHandle
from tunelab.engine.request import TokenEvent
from tunelab.errors import TunelabError
from tunelab.generation import PreparedRequest
from tunelab.runtime import ModelRuntime
from tunelab.server.model_manager import Lease, ModelManager
from tunelab.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One engine event and the parsed output it completed."""

    token: TokenEvent
    events: list[Event]


class Generation:
    """A request running on the resident model, from submit to its last token (or cancellation)."""

    def __init__(self, manager: ModelManager, lease: Lease, prepared: PreparedRequest, handle: RequestHandle,
                 keep_alive: float | None, started: float):
        self.manager = manager
        self.lease = lease
        self.prepared = prepared
        self.handle = handle
        self.keep_alive = keep_alive
        self.started = started  # perf_counter when the HTTP request arrived
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self.finished: float | None = None
        self.last: TokenEvent | None = None
        self.thinking_unclosed = False
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        threading.Thread(target=self._forward, name=f"tunelab-events-{handle.request_id}", daemon=True).start()

    @classmethod
    async def start(cls, manager: ModelManager, model: str, options: dict[str, Any],
                    prepare: Callable[[ModelRuntime], PreparedRequest], *, keep_alive: float | None,
                    started: float) -> Generation:
        """Acquire `model`, build the request with `prepare(runtime)` and submit it.

        Errors (unknown model, bad options, prompt too long) raise here, before any output.
        """
        lease = await manager.acquire(model, options)
        try:
            prepared = await asyncio.to_thread(prepare, lease.runtime)
            handle = lease.runtime.engine.submit(prepared.request)
        except BaseException:
            manager.release(lease, keep_alive)
            raise
        return cls(manager, lease, prepared, handle, keep_alive, started)

    @property
    def runtime(self) -> ModelRuntime:
        return self.lease.runtime

    @property
    def is_done(self) -> bool:
        return self.last is not None and self.last.finish_reason is not None

    async def steps(self, receive: Receive) -> AsyncIterator[Step]:
        """The request's output as it is produced; stops early (and cancels) if the client disconnects."""
        parser = self.prepared.parser()
        disconnected = asyncio.ensure_future(_client_disconnect(receive))
        try:
            while not self.is_done:
                next_event = asyncio.ensure_future(self._events.get())
                await asyncio.wait({next_event, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if not next_event.done():
                    next_event.cancel()
                    log.info("client went away; cancelling request %d", self.handle.request_id)
                    return
                event = self.last = next_event.result()
                now = time.perf_counter()
                if event.token_id is not None and self.first_token is None:
                    self.first_token = now
                events = parser.feed(event.text)
                if event.finish_reason is not None:
                    self.finished = now
                    events += parser.finish()
                    self.thinking_unclosed = parser.thinking_unclosed
                yield Step(event, events)
        finally:
            disconnected.cancel()
            self.close()

    def close(self) -> None:
        """Cancel the request if it is still running and give the model back; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if not self.is_done:
            self.runtime.engine.cancel(self.handle.request_id)
        self.manager.release(self.lease, self.keep_alive)

    def _forward(self) -> None:
        """Move engine events from the handle's thread-safe queue onto the event loop."""
        while not self._closed or not self.handle.events.empty():
            try:
                event = self.handle.events.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._loop.call_soon_threadsafe(self._events.put_nowait, event)
            except RuntimeError:  # the loop has shut down
                return
            if event.finish_reason is not None:
                return


def split_events(events: list[Event]) -> tuple[str, str, list[ToolCall]]:
    """A step's parsed output as (thinking text, answer text, tool calls)."""
    thinking = "".join(e.text for e in events if isinstance(e, ThinkingDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return thinking, content, [e for e in events if isinstance(e, ToolCall)]


def token_logprob(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    """One token's log-probability as both APIs spell it: `{token, logprob, bytes}`."""
    raw = tokenizer.token_bytes(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


async def _client_disconnect(receive: Receive) -> None:
    """Return when the client closes the connection (the body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def error_message(exc: BaseException) -> str:
    """What a client is told about an error: a TunelabError's own message, else a generic one."""
    if isinstance(exc, TunelabError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


async def ndjson_frames(objects: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """Ollama streaming: one JSON object per line; an error ends the stream with `{"error": ...}`."""
    try:
        async for obj in objects:
            yield (_json(obj) + "\n").encode()
    except Exception as exc:
        if not isinstance(exc, TunelabError):
            log.exception("error while streaming")
        yield (_json({"error": error_message(exc)}) + "\n").encode()


async def sse_frames(objects: AsyncIterator[dict],
                     error_body: Callable[[BaseException], dict]) -> AsyncIterator[bytes]:
    """OpenAI streaming: `data: {json}` events, then `data: [DONE]`."""
    try:
        async for obj in objects:
            yield f"data: {_json(obj)}\n\n".encode()
    except Exception as exc:
        if not isinstance(exc, TunelabError):
            log.exception("error while streaming")
        yield f"data: {_json(error_body(exc))}\n\n".encode()
    yield b"data: [DONE]\n\n"


class StreamResponse(StreamingResponse):
    """A streaming response that runs `on_close` however the stream ends (done, error, disconnect)."""

    def __init__(self, frames: AsyncIterator[bytes], media_type: str, on_close: Callable[[], Any]):
        headers = {"Cache-Control": "no-cache"} if media_type == "text/event-stream" else None
        super().__init__(frames, media_type=media_type, headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
