"""Modelfiles: Ollama's recipe for a model, parsed and written back.

The syntax follows Ollama's parser (`parser/parser.go`): one `INSTRUCTION
value` per line, instruction names case-insensitive, `#` comments on their own
line. A value runs to the end of its line and may be quoted with `"` or `\"\"\"`;
a quoted value continues over line breaks until a line ends with its closing
quote. There are no escapes, so `format_modelfile` tries each quoting in turn
and keeps the first that reads back to the same value.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import InvalidOption, ModelfileError
from tunelab.options import DEPRECATED_OPTIONS, OPTION_SPECS, parse_option_text

log = logging.getLogger(__name__)

INSTRUCTIONS = ("from", "parameter", "template", "system", "adapter", "message", "license", "requires")
# Ollama-only instructions (speculative draft model, Go renderers and parsers): accepted and skipped.
IGNORED_INSTRUCTIONS = ("draft", "renderer", "parser")
MESSAGE_ROLES = ("system", "user", "assistant")

_EXAMPLES = {
    "from": "FROM qwen3:8b",
    "parameter": "PARAMETER temperature 0.1",
    "template": 'TEMPLATE """{{ .Prompt }}"""',
    "system": 'SYSTEM """You are a careful coding assistant."""',
    "adapter": "ADAPTER ./my-lora",
    "message": "MESSAGE user Hello",
    "license": 'LICENSE """Apache-2.0"""',
    "requires": "REQUIRES 0.14.0",
    "draft": "DRAFT qwen3:0.6b",
    "renderer": "RENDERER qwen3-coder",
    "parser": "PARSER qwen3-coder",
}
_TOKEN_END = re.compile(r"[ \t\r\n]|\Z")
_BLANKS = re.compile(r"[ \t]*")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_NEWLINE = re.compile(r"[\r\n]")
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+")
# golang.org/x/mod/semver, which Ollama uses: v1, v1.2 and v1.2.3[-pre][+build].
_SEMVER = re.compile(r"v?\d+(\.\d+(\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?)?)?")


@dataclass
class Modelfile:
    """What a Modelfile says. `parameters` holds typed values; list options (`stop`) are lists."""

    from_: str
    parameters: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    template: str | None = None
    adapters: list[str] = field(default_factory=list)
    messages: list[tuple[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    requires: str | None = None


def parse_modelfile(text: str) -> Modelfile:
    """Parse Modelfile text; raise ModelfileError naming the line and what was expected.

    Paths in FROM and ADAPTER are kept as written; the store resolves them.
    """
    text = text.removeprefix("\ufeff")
    modelfile = Modelfile(from_="")
    has_from = False
    for line, instruction, argument, value in _commands(text):
        if instruction == "from":
            if has_from:
                raise ModelfileError(f"line {line}: a second FROM; a Modelfile builds on exactly one model")
            if not value:
                raise _needs_value(line, instruction)
            modelfile.from_, has_from = value, True
        elif instruction == "parameter":
            _add_parameter(modelfile.parameters, argument, value, line)
        elif instruction in ("system", "template"):
            setattr(modelfile, instruction, value)
        elif instruction == "adapter":
            modelfile.adapters.append(value)
        elif instruction == "message":
            modelfile.messages.append((argument, value))
        elif instruction == "license":
            modelfile.license.append(value)
        elif instruction == "requires":
            if not _SEMVER.fullmatch(value):
                raise ModelfileError(f"line {line}: REQUIRES needs a version like 0.14.0, got {value!r}")
            modelfile.requires = value.removeprefix("v")
        else:
            log.warning("line %d: %s is an Ollama instruction tunelab ignores", line, instruction.upper())
    if not has_from:
        raise ModelfileError('no FROM line; add one naming a model, a .gguf file or a model directory, '
                             'e.g. "FROM qwen3:8b"')
    return modelfile


def format_modelfile(modelfile: Modelfile) -> str:
    """Write `modelfile` as text that `parse_modelfile` reads back to an equal Modelfile.

    Raises ModelfileError for a value no Modelfile quoting can hold.
    """
    lines = [_instruction_line("FROM", modelfile.from_)]
    lines += [_instruction_line("ADAPTER", path) for path in modelfile.adapters]
    if modelfile.template is not None:
        lines.append(_instruction_line("TEMPLATE", modelfile.template))
    if modelfile.system is not None:
        lines.append(_instruction_line("SYSTEM", modelfile.system))
    for name, value in modelfile.parameters.items():
        if name not in OPTION_SPECS:
            raise ModelfileError(f"cannot write PARAMETER {name!r}: not a known parameter")
        if value is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            lines += [_instruction_line(f"PARAMETER {name}", _option_text(item)) for item in values]
    for role, content in modelfile.messages:
        if role not in MESSAGE_ROLES:
            raise ModelfileError(f"cannot write MESSAGE role {role!r}: roles are {', '.join(MESSAGE_ROLES)}")
        lines.append(_instruction_line(f"MESSAGE {role}", content))
    lines += [_instruction_line("LICENSE", text) for text in modelfile.license]
    if modelfile.requires is not None:
        lines.append(_instruction_line("REQUIRES", modelfile.requires))
    return "\n".join(lines) + "\n"


def _commands(text: str):
    """Yield (line, instruction, argument, value); argument is a PARAMETER name or MESSAGE role."""
    i = 0
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            i = _line_end(text, i)
            continue
        line = len(_LINE_BREAK.findall(text, 0, i)) + 1
        token_end = _TOKEN_END.search(text, i).start()
        instruction = text[i:token_end].lower()
        if instruction not in INSTRUCTIONS + IGNORED_INSTRUCTIONS:
            expected = ", ".join(name.upper() for name in INSTRUCTIONS)
            raise ModelfileError(f"line {line}: unknown instruction {text[i:token_end]!r}; expected one of {expected}")
        i = _BLANKS.match(text, token_end).end()
        argument = None
        if instruction in ("parameter", "message"):
            argument, i = _read_argument(text, i, line, instruction)
        if i == len(text) or text[i] in "\r\n":
            raise _needs_value(line, instruction)
        value, i = _read_value(text, i)
        if value is None:
            raise ModelfileError(f"line {line}: {instruction.upper()} value opens a quote that never closes; "
                                 'end it with the same quote (" or """) at the end of a line')
        yield line, instruction, argument, value


def _read_argument(text: str, i: int, line: int, instruction: str) -> tuple[str, int]:
    """Read the PARAMETER name or MESSAGE role that precedes the value."""
    end = _TOKEN_END.search(text, i).start()
    argument = text[i:end]
    if not argument or end == len(text) or text[end] in "\r\n":
        raise _needs_value(line, instruction)
    if instruction == "parameter" and not _PARAMETER_NAME.fullmatch(argument):
        raise ModelfileError(f"line {line}: parameter name {argument!r} may only hold letters, digits and '_', "
                             f'e.g. "{_EXAMPLES["parameter"]}"')
    if instruction == "message" and argument not in MESSAGE_ROLES:
        raise ModelfileError(f"line {line}: MESSAGE role must be one of {', '.join(MESSAGE_ROLES)}, "
                             f"got {argument!r}")
    return argument, _BLANKS.match(text, end).end()


def _read_value(text: str, start: int) -> tuple[str | None, int]:
    """Read a value from `start`: it ends at the first line break (or the end) where it reads as complete.

    Returns (None, end of text) when a quote never closes.
    """
    end = start
    while True:
        end = _line_end(text, end)
        value = _unquote(text[start:end].strip())
        if value is not None or end == len(text):
            return value, end
        end += 1


def _unquote(raw: str) -> str | None:
    """Strip `\"\"\"` or `"` quotes; None if a quote opens but does not close at the end of `raw`."""
    if raw.startswith('"""'):
        return raw[3:-3] if len(raw) >= 6 and raw.endswith('"""') else None
    if raw.startswith('"'):
        return raw[1:-1] if len(raw) >= 2 and raw.endswith('"') else None
    return raw


def _line_end(text: str, i: int) -> int:
    newline = _NEWLINE.search(text, i)
    return newline.start() if newline else len(text)


def _needs_value(line: int, instruction: str) -> ModelfileError:
    what = {"parameter": "a name and a value", "message": "a role and a text"}.get(instruction, "a value")
    return ModelfileError(f'line {line}: {instruction.upper()} needs {what}, e.g. "{_EXAMPLES[instruction]}"')


def _add_parameter(parameters: dict[str, Any], name: str, text: str, line: int) -> None:
    if name in DEPRECATED_OPTIONS:
        log.warning("line %d: parameter %s is deprecated and ignored", line, name)
        return
    try:
        value = parse_option_text(name, text)
    except InvalidOption as exc:
        raise ModelfileError(f"line {line}: {exc}") from None
    if OPTION_SPECS[name].is_list:
        # Stop strings keep their own spaces and newlines ("\n\nUser:"), which the typed parse trims.
        parameters.setdefault(name, []).append(text)
    else:
        parameters[name] = value


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest text that parses back to the same float
    return str(value)


def _instruction_line(head: str, value: str) -> str:
    # One-line values read best bare or in "..."; """...""" holds every value any quoting can hold:
    # all but those with a line that ends in """ before a line break.
    candidates = [value, f'"{value}"'] if _NEWLINE.search(value) is None else []
    for candidate in candidates + [f'"""{value}"""']:
        if candidate and _read_value(candidate, 0) == (value, len(candidate)):
            return f"{head} {candidate}"
    raise ModelfileError(f'{head} value {value[:60]!r} cannot be written in a Modelfile: a line inside it ends with '
                         '""" and Modelfile quotes have no escapes; change that line')
