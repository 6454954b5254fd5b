"""Split a Qwen3 reply into thinking, answer text and tool calls, while it streams.

The rules, the same for `OutputParser` (streaming) and `parse_output` (whole text):

- A thought runs from `<think>` to `</think>`. It opens at the first `<think>` outside a
  tool call, or at the very start when the prompt already opened it (`starts_in_thinking`;
  then a `<think>` the model repeats before any thinking text is dropped, and a lone
  `</think>` closes it). There is one thought per reply; later tags are plain text.
- Text before `<think>` is answer text, not lost. A thought that never closes (the reply
  was cut off) is all thinking and reported as `thinking_unclosed`, as current vLLM and
  SGLang do.
- `<tool_call>{json}</tool_call>` blocks in the answer become `ToolCall`s; a block whose
  JSON is malformed stays answer text (see tool_calls.py). An unclosed last block is
  still parsed, as vLLM's hermes parser does. A reply with no such block whose whole
  answer is one bare `{"name": ..., "arguments": ...}` object is a call too; while an
  answer could still be one, the streaming parser holds it back.
- Newlines the template puts around tags are not text: thinking and answer lose leading and
  trailing newlines (Qwen's own parsing does `.strip("\n")`), and newlines just before a
  `<think>` or `<tool_call>` are dropped.

Tags may arrive cut into pieces; the streaming parser holds back only a suffix that could
still become a tag that matters in its current state.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from tunelab.chat.tool_calls import (TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, could_be_bare_tool_call,
                                     parse_bare_tool_call, parse_tool_call)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

__all__ = ["ContentDelta", "Event", "OutputParser", "ParsedOutput", "ThinkingDelta", "ToolCall", "parse_output"]


@dataclass(frozen=True)
class ThinkingDelta:
    """More of the model's reasoning."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """More of the answer shown to the user."""

    text: str


Event = ThinkingDelta | ContentDelta | ToolCall


@dataclass
class ParsedOutput:
    """A whole reply, split: what `OutputParser`'s events add up to."""

    thinking: str
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    thinking_unclosed: bool = False


class _Mode(enum.Enum):
    THINKING = "thinking"
    CONTENT = "content"
    TOOL_CALL = "tool_call"


class _NewlineTrim:
    """Drops a channel's leading newlines and holds trailing ones until more text follows."""

    def __init__(self):
        self.is_started = False
        self.pending = ""

    def push(self, text: str) -> str:
        """The part of `text` that can be shown now."""
        body = text.rstrip("\n")
        if not body:
            self.pending += text
            return ""
        shown = self.pending + body if self.is_started else body.lstrip("\n")
        self.pending = text[len(body):]
        self.is_started = True
        return shown

    def cut(self) -> None:
        """A tag or the end follows: held newlines were layout, not text."""
        self.pending = ""


class OutputParser:
    """Streaming state machine: `feed` text deltas, then `finish`; both return events."""

    def __init__(self, starts_in_thinking: bool = False, parse_tools: bool = True):
        self.parse_tools = parse_tools
        self.thinking_unclosed = False  # set by finish()
        self._mode = _Mode.THINKING if starts_in_thinking else _Mode.CONTENT
        self._may_drop_repeated_open = starts_in_thinking
        self._has_thought = starts_in_thinking
        self._thinking = _NewlineTrim()
        self._content = _NewlineTrim()
        self._call_body = ""
        self._held_answer: str | None = "" if parse_tools else None  # None: cannot be a bare call
        self._buffer = ""
        self._events: list[Event] = []

    def feed(self, text: str) -> list[Event]:
        """Events made certain by `text`; a possible partial tag at its end is held back."""
        self._buffer += text
        while True:
            tags = self._tags()
            found = [(i, tag) for tag in tags if (i := self._buffer.find(tag)) >= 0]
            if not found:
                break
            i, tag = min(found)
            self._text(self._buffer[:i])
            self._buffer = self._buffer[i + len(tag):]
            self._tag(tag)
        held = _partial_tag_length(self._buffer, self._tags())
        self._text(self._buffer[:len(self._buffer) - held])
        self._buffer = self._buffer[len(self._buffer) - held:]
        return self._take_events()

    def finish(self) -> list[Event]:
        """Flush what was held back; an unclosed call is parsed, an unclosed thought is
        reported in `thinking_unclosed`."""
        self._text(self._buffer)
        self._buffer = ""
        if self._mode is _Mode.TOOL_CALL:
            call = parse_tool_call(self._call_body)
            if call is not None:
                self._events.append(call)
            else:
                self._emit_content(TOOL_CALL_OPEN + self._call_body)
        if self._held_answer:
            held, self._held_answer = self._held_answer, None
            call = parse_bare_tool_call(held)
            if call is not None:
                self._events.append(call)
            else:
                self._emit_content(held)
        self.thinking_unclosed = self._mode is _Mode.THINKING
        self._thinking.cut()
        self._content.cut()
        return self._take_events()

    def _tags(self) -> tuple[str, ...]:
        """The tags that would change state now; every other tag is plain text."""
        if self._mode is _Mode.THINKING:
            return (THINK_CLOSE, THINK_OPEN) if self._may_drop_repeated_open else (THINK_CLOSE,)
        if self._mode is _Mode.TOOL_CALL:
            return (TOOL_CALL_CLOSE,)
        return (THINK_OPEN,) * (not self._has_thought) + (TOOL_CALL_OPEN,) * self.parse_tools

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._mode is _Mode.THINKING:
            self._may_drop_repeated_open &= not text.strip("\n")
            shown = self._thinking.push(text)
            if shown:
                self._events.append(ThinkingDelta(shown))
        elif self._mode is _Mode.CONTENT:
            self._emit_content(text)
        else:
            self._call_body += text

    def _tag(self, tag: str) -> None:
        if tag == THINK_OPEN and self._mode is _Mode.THINKING:
            if not self._may_drop_repeated_open:  # thinking text came first: the tag is just text
                self._text(tag)
            self._may_drop_repeated_open = False
        elif tag == THINK_OPEN:
            self._release_held_answer(keep_waiting=True)
            self._content.cut()
            self._mode, self._has_thought = _Mode.THINKING, True
        elif tag == THINK_CLOSE:
            self._thinking.cut()
            self._mode, self._may_drop_repeated_open = _Mode.CONTENT, False
        elif tag == TOOL_CALL_OPEN:
            self._release_held_answer(keep_waiting=False)
            self._content.cut()
            self._mode, self._call_body = _Mode.TOOL_CALL, ""
        else:
            call = parse_tool_call(self._call_body)
            if call is not None:
                self._events.append(call)
            else:
                self._emit_content(TOOL_CALL_OPEN + self._call_body + TOOL_CALL_CLOSE)
            self._mode = _Mode.CONTENT

    def _emit_content(self, text: str) -> None:
        if self._held_answer is not None:
            held = self._held_answer + text
            if not held.strip() or could_be_bare_tool_call(held.lstrip()):
                self._held_answer = held
                return
            self._held_answer, text = None, held
        shown = self._content.push(text)
        if shown:
            self._events.append(ContentDelta(shown))

    def _release_held_answer(self, keep_waiting: bool) -> None:
        """A tag arrived: held text is answer text after all (blank text may still precede a bare call)."""
        held = self._held_answer
        if held is None:
            return
        self._held_answer = None
        if held:
            self._emit_content(held)
        if keep_waiting and not held.strip():
            self._held_answer = ""

    def _take_events(self) -> list[Event]:
        events, self._events = _merge_deltas(self._events), []
        return events


def _partial_tag_length(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    for n in range(min(len(text), max(map(len, tags), default=1) - 1), 0, -1):
        if any(tag.startswith(text[-n:]) for tag in tags):
            return n
    return 0


def _merge_deltas(events: list[Event]) -> list[Event]:
    merged: list[Event] = []
    for event in events:
        if merged and type(event) is type(merged[-1]) and not isinstance(event, ToolCall):
            merged[-1] = type(event)(merged[-1].text + event.text)
        else:
            merged.append(event)
    return merged


_TAG = re.compile("(" + "|".join(map(re.escape, (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE))) + ")")


def parse_output(text: str, starts_in_thinking: bool = False, parse_tools: bool = True) -> ParsedOutput:
    """Split a whole reply at once, by the same rules as `OutputParser`."""
    mode = _Mode.THINKING if starts_in_thinking else _Mode.CONTENT
    has_thought = starts_in_thinking
    may_drop_repeated_open = starts_in_thinking
    thinking = ""
    content_runs = [""]  # answer text between structural tags; each loses its trailing newlines
    call_body = ""
    calls: list[ToolCall] = []
    saw_tool_tag = False
    for i, piece in enumerate(_TAG.split(text)):
        is_tag = i % 2 == 1
        if mode is _Mode.THINKING:
            if piece == THINK_CLOSE:
                mode = _Mode.CONTENT
            elif piece == THINK_OPEN and may_drop_repeated_open and not thinking.strip("\n"):
                may_drop_repeated_open = False
            else:
                thinking += piece
        elif mode is _Mode.TOOL_CALL:
            if piece == TOOL_CALL_CLOSE:
                call = parse_tool_call(call_body)
                if call is not None:
                    calls.append(call)
                else:
                    content_runs[-1] += TOOL_CALL_OPEN + call_body + TOOL_CALL_CLOSE
                mode = _Mode.CONTENT
            else:
                call_body += piece
        elif is_tag and piece == THINK_OPEN and not has_thought:
            mode, has_thought = _Mode.THINKING, True
            content_runs.append("")
        elif is_tag and piece == TOOL_CALL_OPEN and parse_tools:
            mode, call_body, saw_tool_tag = _Mode.TOOL_CALL, "", True
            content_runs.append("")
        else:
            content_runs[-1] += piece
    if mode is _Mode.TOOL_CALL:
        call = parse_tool_call(call_body)
        if call is not None:
            calls.append(call)
        else:
            content_runs[-1] += TOOL_CALL_OPEN + call_body
    content = "".join(run.rstrip("\n") for run in content_runs).lstrip("\n")
    bare = parse_bare_tool_call(content) if parse_tools and not calls and not saw_tool_tag else None
    if bare is not None:
        calls, content = [bare], ""
    return ParsedOutput(thinking.strip("\n"), content, calls, thinking_unclosed=mode is _Mode.THINKING)
