"""Tool calls in Qwen's (Hermes) format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

A model's call is JSON between the two tags. A block that is not valid JSON, or
lacks a name, is not a call: the output parser hands it back as plain text, and
the reason is logged, so a malformed call never fails a request.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def new_tool_call_id() -> str:
    """A fresh OpenAI-style tool call id: `call_` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for; `id` is random, so equality ignores it."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_tool_call_id, compare=False)


def parse_tool_call(body: str) -> ToolCall | None:
    """The call written between `<tool_call>` and `</tool_call>`, or None (reason logged) if malformed.

    `arguments` may be an object or a string holding a JSON object; `parameters` is accepted as
    its alias, as SGLang does. A call without arguments gets an empty object.
    """
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return _reject(body, f"not valid JSON ({e})")
    if not isinstance(call, dict):
        return _reject(body, f"a JSON {type(call).__name__}, not an object")
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return _reject(body, 'no "name" string')
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return _reject(body, f'"arguments" is a string that is not valid JSON ({e})')
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return _reject(body, f'"arguments" is a JSON {type(arguments).__name__}, not an object')
    return ToolCall(name, arguments)


def could_be_bare_tool_call(answer: str) -> bool:
    """Whether an answer that starts like `answer` (leading whitespace removed) may still be a bare call."""
    return answer.startswith("{") or answer.startswith("```json") or "```json".startswith(answer)


def parse_bare_tool_call(answer: str) -> ToolCall | None:
    """A call written as the whole answer without `<tool_call>` tags, or None.

    Small models (qwen2.5-coder 0.5B among them) often answer a tool request with just
    `{"name": ..., "arguments": {...}}`, or that object in a ```json fence; Ollama accepts
    these too. Only an object with both a name and arguments counts, so an ordinary JSON
    answer that happens to have a "name" field stays text.
    """
    text = answer.strip()
    if text.startswith("```json") and text.endswith("```"):
        text = text[len("```json"):-3].strip()
    if not text.startswith("{"):
        return None
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not ({"arguments", "parameters"} & call.keys()):
        return None
    arguments = call.get("arguments", call.get("parameters"))
    if not isinstance(call.get("name"), str) or not isinstance(arguments, (dict, str)):
        return None
    return parse_tool_call(text)


def _reject(body: str, reason: str) -> None:
    logger.warning("tool call kept as text: %s: %.200r", reason, body)
    return None
