"""`tunelab serve`: the Ollama- and OpenAI-compatible HTTP server."""

from __future__ import annotations

import typer

from tunelab.cli import app


@app.command()
def serve(
    host: str = typer.Option(None, help="address[:port] to bind (default: $TUNELAB_HOST or 127.0.0.1:11434)"),
):
    """Serve the local models over Ollama's and OpenAI's HTTP APIs."""
    from tunelab.server.app import serve as run_server

    address, _, port = (host or "").partition(":")
    run_server(host=address or None, port=int(port) if port else None)
