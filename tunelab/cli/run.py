"""`tunelab run`: answer one prompt, or chat in a REPL with Ollama's slash commands."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

import typer

from tunelab.chat.output_parser import ContentDelta, ThinkingDelta, ToolCall
from tunelab.cli import app, console, err_console
from tunelab.errors import InvalidOption, TunelabError
from tunelab.generation import Reply, prepare_chat
from tunelab.options import LOAD_TIME_OPTIONS, OPTION_SPECS, coerce_option, parse_option_text
from tunelab.registry.modelfile import Modelfile
from tunelab.registry.store import Store
from tunelab.runtime import ModelRuntime, open_model

REPL_HELP = """Available commands:
  /set parameter NAME VALUE   set a parameter (e.g. /set parameter temperature 0.2)
  /set system "TEXT"          set the system prompt
  /set think | /set nothink   turn thinking on or off
  /show parameters            show the effective parameters
  /show system                show the system prompt
  /save NAME                  save this session (parameters, system, messages) as a new model
  /clear                      forget the conversation
  /bye                        exit
Use \"\"\" to begin and end a multi-line message."""


def parse_set_options(pairs: list[str]) -> dict[str, Any]:
    """`NAME=VALUE` pairs from `--set` into typed options (stop may repeat)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise InvalidOption(f"--set takes NAME=VALUE, got {pair!r}; e.g. --set temperature=0.2")
        name = name.strip()
        parsed = parse_option_text(name, value)
        if OPTION_SPECS[name].is_list:
            options[name] = tuple(options.get(name, ())) + (parsed,)
        else:
            options[name] = parsed
    return options


@app.command()
def run(
    model: str = typer.Argument(..., help="a model name from `tunelab list`, a pullable name, or a GGUF/HF path"),
    prompt: str = typer.Argument(None, help="answer this prompt and exit; omit for an interactive chat"),
    think: bool = typer.Option(None, "--think/--no-think", help="let a thinking model reason first (default: on)"),
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="do not print the model's reasoning"),
    verbose: bool = typer.Option(False, "--verbose", help="print token counts and speeds after each answer"),
    temperature: float = typer.Option(None, help="sampling temperature (0 = greedy)"),
    seed: int = typer.Option(None, help="random seed, for reproducible answers"),
    num_predict: int = typer.Option(None, "--num-predict", help="max tokens to generate"),
    num_ctx: int = typer.Option(None, "--num-ctx", help="context window in tokens"),
    dtype: str = typer.Option(None, help="auto, float32, bfloat16, int8, int4"),
    set_: list[str] = typer.Option([], "--set", "-o", help="any parameter as NAME=VALUE (repeatable)"),
):
    """Run a model: answer PROMPT (streamed), or open a chat."""
    options = parse_set_options(set_)
    for name, value in (("temperature", temperature), ("seed", seed), ("num_predict", num_predict),
                        ("num_ctx", num_ctx), ("dtype", dtype)):
        if value is not None:
            options[name] = coerce_option(name, value)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    with console.status(f"loading {model}…", spinner="dots") if sys.stderr.isatty() else _nothing():
        runtime = open_model(model, Store(), options)
    session = ChatSession(runtime, options, think, hide_thinking, verbose)
    if prompt is not None:
        session.ask(prompt)
    else:
        session.repl()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class ChatSession:
    """One conversation with a loaded model, printed as it streams."""

    def __init__(self, runtime: ModelRuntime, options: dict[str, Any], think: bool | None,
                 hide_thinking: bool, verbose: bool):
        self.runtime = runtime
        self.options = {k: v for k, v in options.items() if k not in LOAD_TIME_OPTIONS}
        self.load_options = {k: v for k, v in options.items() if k in LOAD_TIME_OPTIONS}
        self.think = think
        self.hide_thinking = hide_thinking
        self.verbose = verbose
        self.system: str | None = None
        self.messages: list[dict[str, Any]] = []

    def ask(self, text: str) -> Reply:
        """Send one user message, stream the answer, and keep both in the conversation."""
        self.messages.append({"role": "user", "content": text})
        prepared = prepare_chat(self.runtime, self.messages, options=self.options, think=self.think,
                                system=self.system)
        reply = Reply()
        parser = prepared.parser()
        engine = self.runtime.engine
        events = engine.generate(prepared.request)
        in_thinking = False
        try:
            for event in events:
                if event.token_id is not None:
                    reply.token_ids.append(event.token_id)
                for item in parser.feed(event.text):
                    reply.add([item])
                    in_thinking = self._print(item, in_thinking)
                if event.finish_reason is not None:
                    reply.finish_reason = event.finish_reason
                    reply.num_prompt_tokens = event.num_prompt_tokens
            for item in parser.finish():
                reply.add([item])
                in_thinking = self._print(item, in_thinking)
        except KeyboardInterrupt:
            events.close()
            console.print("\n[dim](stopped)[/]")
        console.print()
        self.messages.append({"role": "assistant", "content": reply.content})
        if self.verbose:
            self._print_stats(reply, prepared)
        return reply

    def _print(self, item, in_thinking: bool) -> bool:
        if isinstance(item, ThinkingDelta):
            if not self.hide_thinking:
                if not in_thinking:
                    console.print("[dim italic]Thinking…[/]")
                console.print(item.text, style="dim", end="", markup=False, highlight=False, soft_wrap=True)
            return True
        if in_thinking and not self.hide_thinking:
            console.print("\n[dim italic]…done thinking.[/]\n")
        if isinstance(item, ContentDelta):
            console.print(item.text, end="", markup=False, highlight=False, soft_wrap=True)
        elif isinstance(item, ToolCall):
            call = json.dumps({"name": item.name, "arguments": item.arguments}, ensure_ascii=False)
            console.print(f"\n[bold cyan]tool call[/] {call}", highlight=False)
        return False

    def _print_stats(self, reply: Reply, prepared) -> None:
        err_console.print(f"[dim]prompt tokens: {reply.num_prompt_tokens}  generated: {len(reply.token_ids)}  "
                          f"finish: {reply.finish_reason.value if reply.finish_reason else '-'}[/]")

    # ---- the REPL --------------------------------------------------------------------------

    def repl(self) -> None:
        """Read messages and slash commands until /bye or end of input."""
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        console.print(f"[dim]Chatting with {self.runtime.name}. /? for help, /bye to exit.[/]")
        while True:
            try:
                text = self._read_message()
            except (EOFError, KeyboardInterrupt):
                console.print()
                return
            if text is None:
                continue
            if text.startswith("/"):
                try:
                    if self._command(text) is False:
                        return
                except TunelabError as exc:
                    err_console.print(f"[red]Error:[/] {exc}")
                continue
            try:
                self.ask(text)
            except TunelabError as exc:
                self.messages.pop()
                err_console.print(f"[red]Error:[/] {exc}")

    def _read_message(self) -> str | None:
        line = input(">>> ")
        if line.strip().startswith('"""'):
            lines = [line.strip()[3:]]
            while not lines[-1].rstrip().endswith('"""'):
                lines.append(input("... "))
            lines[-1] = lines[-1].rstrip()[:-3]
            return "\n".join(lines).strip("\n") or None
        return line.strip() or None

    def _command(self, text: str) -> bool | None:
        words = text.split(maxsplit=2)
        head = words[0]
        if head in ("/bye", "/exit"):
            return False
        if head in ("/?", "/help"):
            console.print(REPL_HELP, markup=False)
        elif head == "/clear":
            self.messages.clear()
            console.print("Cleared session context")
        elif head == "/set" and len(words) >= 2:
            self._set(words[1], words[2] if len(words) > 2 else "")
        elif head == "/show" and len(words) >= 2:
            self._show(words[1])
        elif head == "/save" and len(words) == 2:
            self._save(words[1])
        else:
            err_console.print(f"Unknown command '{text}'. Type /? for help")
        return None

    def _set(self, what: str, rest: str) -> None:
        if what == "parameter":
            name, _, value = rest.partition(" ")
            if not value:
                raise InvalidOption("usage: /set parameter NAME VALUE")
            if name == "stop":
                self.options["stop"] = tuple(shlex.split(value))
            else:
                self.options[name] = parse_option_text(name, value)
            console.print(f"Set parameter '{name}' to '{value}'")
        elif what == "system":
            self.system = rest.strip().strip('"')
            console.print("Set system message.")
        elif what == "think":
            self.think = True
            console.print("Set 'think' mode.")
        elif what == "nothink":
            self.think = False
            console.print("Set 'nothink' mode.")
        else:
            err_console.print(f"Unknown setting '{what}'. Type /? for help")

    def _show(self, what: str) -> None:
        if what == "parameters":
            effective = self.runtime.options(self.options)
            shown = dict(self.runtime.parameters) | self.options
            for name in sorted(shown):
                console.print(f"{name:<24} {effective[name]}", markup=False, highlight=False)
        elif what == "system":
            console.print(self.system or self.runtime.system or "", markup=False, highlight=False)
        else:
            err_console.print("Use /show parameters or /show system")

    def _save(self, name: str) -> None:
        source = self.runtime.record.name if self.runtime.record else str(self.runtime.path)
        parameters = dict(self.runtime.parameters) | self.options | self.load_options
        if self.think is not None:
            parameters["think"] = self.think
        messages = [(m["role"], m["content"]) for m in self.runtime.messages + self.messages]
        modelfile = Modelfile(from_=source, parameters=parameters, system=self.system or self.runtime.system,
                              messages=messages)
        record = Store().create(name, modelfile)
        console.print(f"Created new model '{record.name}'")
