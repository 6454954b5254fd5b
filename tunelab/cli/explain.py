"""`tunelab explain`: a table of what each sampling stage did to the next token's candidates."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from tunelab.cli import app, console
from tunelab.cli.run import parse_set_options
from tunelab.explain import ExplainedStep, explain_steps
from tunelab.generation import prepare_chat, prepare_completion
from tunelab.options import coerce_option
from tunelab.registry.store import Store
from tunelab.runtime import open_model

STAGE_TITLES = {"raw": "raw", "logit_bias": "bias", "penalties": "penalties", "dry": "DRY",
                "top_n_sigma": "top-nσ", "top_k": "top-k", "top_p": "top-p",
                "typical_p": "typical", "min_p": "min-p", "xtc": "XTC", "temperature": "temp", "mirostat": "mirostat"}


@app.command()
def explain(
    model: str,
    prompt: str,
    steps: int = typer.Option(1, "--steps", "-n", help="explain this many tokens in a row"),
    candidates: int = typer.Option(10, help="top candidates to show per step"),
    raw: bool = typer.Option(False, "--raw", help="send the prompt as is, without the chat template"),
    think: bool = typer.Option(None, "--think/--no-think"),
    temperature: float = typer.Option(None), top_k: int = typer.Option(None, "--top-k"),
    top_p: float = typer.Option(None, "--top-p"), min_p: float = typer.Option(None, "--min-p"),
    typical_p: float = typer.Option(None, "--typical-p"),
    repeat_penalty: float = typer.Option(None, "--repeat-penalty"),
    repeat_last_n: int = typer.Option(None, "--repeat-last-n"),
    presence_penalty: float = typer.Option(None, "--presence-penalty"),
    frequency_penalty: float = typer.Option(None, "--frequency-penalty"),
    seed: int = typer.Option(None),
    set_: list[str] = typer.Option([], "--set", "-o", help="any parameter as NAME=VALUE"),
):
    """Show, stage by stage, how the sampler turns the model's logits into the next token."""
    options = parse_set_options(set_)
    for name, value in locals().copy().items():
        if name in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
                    "presence_penalty", "frequency_penalty", "seed") and value is not None:
            options[name] = coerce_option(name, value)
    runtime = open_model(model, Store(), options)
    if raw:
        prepared = prepare_completion(runtime, prompt, raw=True, options=options)
    else:
        prepared = prepare_chat(runtime, [{"role": "user", "content": prompt}], options=options, think=think)
    effective = prepared.options
    console.print(f"[dim]temperature {effective['temperature']}  top_k {effective['top_k']}  top_p "
                  f"{effective['top_p']}  min_p {effective['min_p']}  repeat_penalty {effective['repeat_penalty']}"
                  f"  seed {prepared.request.params.seed}[/]")
    for number, step in enumerate(explain_steps(runtime, prepared, steps, candidates), 1):
        console.print(render_step(step, number))


def render_step(step: ExplainedStep, number: int) -> Table:
    """One step as a table: a row per candidate token, a column per stage."""
    trace = step.trace
    table = Table(title=f"token {number}: drew {escape_token(step.token_texts[trace.token_ids.index(trace.drawn_id)])}"
                        f" (p={trace.drawn_prob:.3f})", title_justify="left", header_style="bold")
    table.add_column("token")
    table.add_column("id", justify="right", style="dim")
    for name, alive in zip(trace.stage_names, trace.num_alive):
        table.add_column(f"{STAGE_TITLES.get(name, name)}\n[dim]{alive} left[/]", justify="right")
    for c, (token_id, text) in enumerate(zip(trace.token_ids, step.token_texts)):
        drawn = token_id == trace.drawn_id
        label = Text(("★ " if drawn else "  ") + escape_token(text), style="bold green" if drawn else "")
        cells = []
        dead = False
        for s in range(len(trace.stage_names)):
            if trace.removed[s][c]:
                dead = True
                cells.append(Text("✗ cut", style="red"))
            elif dead:
                cells.append(Text("·", style="dim"))
            else:
                p = trace.probs[s][c]
                cells.append(Text(f"{p:.3f}", style="bold" if drawn else ("dim" if p < 0.01 else "")))
        table.add_row(label, str(token_id), *cells)
    return table


def escape_token(text: str) -> str:
    """A token's text made visible: quotes around it, whitespace and control characters escaped."""
    return repr(text)
