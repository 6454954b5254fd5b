"""The HTTP server: FastAPI app factory, error mapping, and `serve`.

Both APIs share one `ModelManager` (which model is loaded) and one engine per
loaded model. Every error a user can cause is answered with a 4xx and a
message naming the input and the fix: Ollama's `{"error": "..."}` on the
native API, OpenAI's `{"error": {"message", "type", "param", "code"}}` under
`/v1`. A 500 means a bug in tunelab, never a bad request.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from tunelab.errors import InvalidRequest, TunelabError
from tunelab.registry.store import Store
from tunelab.server import ollama_api, openai_api
from tunelab.server.model_manager import ModelManager

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434


def create_app(store: Store | None = None, *, max_num_seqs: int = 16, keep_alive: float | None = None) -> FastAPI:
    """The server app over `store` (default: `$TUNELAB_HOME`); models load on first use."""
    store = store or Store()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.manager = ModelManager(store, max_num_seqs=max_num_seqs, keep_alive=keep_alive)
        yield
        await app.state.manager.close()

    app = FastAPI(title="tunelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.add_middleware(_JSONBodies)
    app.include_router(ollama_api.router)
    app.include_router(openai_api.router)
    app.add_exception_handler(TunelabError, _tunelab_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    return app


class _JSONBodies:
    """Read every API body as JSON whatever its Content-Type, as Ollama does (`curl -d` sends form encoding)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/api/blobs/"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


def _error_response(request: Request, status: int, message: str, param: str | None = None) -> JSONResponse:
    if request.url.path.startswith("/v1/"):
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status)


async def _tunelab_error(request: Request, exc: TunelabError) -> JSONResponse:
    return _error_response(request, exc.http_status, str(exc))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that is not JSON, misses a field, or has a field of the wrong type: 400 naming it."""
    error = exc.errors()[0]
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    field = ".".join(location)
    if error.get("type") == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        message = f"the request body is not valid JSON ({reason}); send a JSON object"
    elif error.get("type") == "missing" and not location:
        message = "missing request body; send a JSON object"
    elif not location:
        message = "the request body must be a JSON object"
    elif error.get("type") == "missing":
        message = f"field '{field}' is required"
    else:
        message = f"field '{field}': {error.get('msg', 'invalid value')}"
    return _error_response(request, 400, message, field or None)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error_response(request, exc.status_code, str(exc.detail))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return _error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}")


def parse_host(value: str | None) -> tuple[str, int]:
    """`TUNELAB_HOST` like `OLLAMA_HOST`: `host[:port]`, optionally with `http://`; default 127.0.0.1:11434."""
    text = (value or "").strip().removeprefix("http://").removeprefix("https://").rstrip("/")
    if not text:
        return DEFAULT_HOST, DEFAULT_PORT
    if text.startswith("["):  # [::1]:11434
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise InvalidRequest(f"TUNELAB_HOST {value!r} has port {port_text!r}; use host:port, "
                             "e.g. 127.0.0.1:11434") from None
    return host or DEFAULT_HOST, port


def serve(host: str | None = None, port: int | None = None, store: Store | None = None) -> None:
    """Run the server until interrupted; host and port default to `TUNELAB_HOST` (then 127.0.0.1:11434)."""
    env_host, env_port = parse_host(os.environ.get("TUNELAB_HOST"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(store), host=host or env_host, port=port or env_port, log_level="info")


if __name__ == "__main__":
    serve()
