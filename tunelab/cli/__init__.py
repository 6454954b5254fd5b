"""The `tunelab` command: a thin layer over library calls, one module per command group."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from tunelab.errors import TunelabError

app = typer.Typer(
    name="tunelab",
    help="Run Qwen3-family models locally, shape their sampling, serve them, and tune them by measuring.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def main() -> None:
    """Entry point: run the command; a user mistake prints one line, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from tunelab.cli import models, run  # noqa: F401  (registers commands)
    for optional in ("serve", "explain", "bench", "tune"):
        try:
            __import__(f"tunelab.cli.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tunelab.cli.{optional}":
                raise
    try:
        app(standalone_mode=False)
    except TunelabError as exc:
        err_console.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except (typer.Abort, typer.Exit) as exc:
        sys.exit(getattr(exc, "exit_code", 1))
    except Exception as exc:
        # A usage error (unknown option, bad value) prints click's short message. Typer 0.29 carries its own
        # copy of click, so match the error by its shape rather than by click's class.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
