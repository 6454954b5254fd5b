"""JSON mode: constrain decoding so the reply is one JSON object (Ollama `format: "json"`,
OpenAI `response_format: {"type": "json_object"}`).

`JsonPrefix` is a character-level JSON recogniser whose states are immutable
tuples, so trying a candidate token is running its characters from the
current state. Each step the engine keeps only the candidates whose text keeps
the reply a valid prefix of a JSON object; the sampler then runs as usual over
them. Like llama.cpp's `json.gbnf`, the top-level value is an object, and the
reply ends when it closes.

Candidates are checked in order of their raw logits, `max_candidates` at a
time (widening to the whole vocabulary only when none of the best pass): the
sampling chain's own top-k/top-p would drop the rest anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Modes of the recogniser.
VALUE, OBJECT_FIRST, OBJECT_KEY, COLON, AFTER_VALUE, ARRAY_FIRST, STRING, NUMBER, LITERAL, DONE = range(10)
WHITESPACE = " \t\n\r"
_NUMBER_NEXT = {  # number sub-state -> {character class: next sub-state}
    "sign": {"0": "zero", "1-9": "int"},
    "zero": {".": "frac0", "e": "exp0"},
    "int": {"0-9": "int", ".": "frac0", "e": "exp0"},
    "frac0": {"0-9": "frac"},
    "frac": {"0-9": "frac", "e": "exp0"},
    "exp0": {"+-": "exp_sign", "0-9": "exp"},
    "exp_sign": {"0-9": "exp"},
    "exp": {"0-9": "exp"},
}
_NUMBER_ENDS = {"zero", "int", "frac", "exp"}

State = tuple  # (mode, stack of "{" / "[", detail)


def _char_class(ch: str) -> str:
    if ch == "0":
        return "0"
    if ch.isdigit() and ch.isascii():
        return "1-9"
    if ch in "eE":
        return "e"
    if ch in "+-":
        return "+-"
    return ch


class JsonPrefix:
    """Steps of a JSON-object recogniser; `None` means the text can no longer become JSON."""

    START: State = (VALUE, (), "top")

    def feed(self, state: State | None, text: str) -> State | None:
        """The state after `text`, or None if `text` breaks the JSON."""
        for ch in text:
            if state is None:
                return None
            state = self._step(state, ch)
        return state

    @staticmethod
    def is_complete(state: State | None) -> bool:
        return state is not None and state[0] == DONE

    def _step(self, state: State, ch: str) -> State | None:
        mode, stack, detail = state
        if mode == STRING:
            return self._string(stack, detail, ch)
        if mode == NUMBER:
            cls = _char_class(ch)
            nxt = _NUMBER_NEXT[detail].get(cls) or (_NUMBER_NEXT[detail].get("0-9") if cls in ("0", "1-9") else None)
            if nxt is not None:
                return (NUMBER, stack, nxt)
            if detail not in _NUMBER_ENDS:
                return None
            return self._step((AFTER_VALUE, stack, None), ch)
        if mode == LITERAL:
            if ch != detail[0]:
                return None
            return (LITERAL, stack, detail[1:]) if len(detail) > 1 else self._after_value(stack)
        if ch in WHITESPACE:
            return state
        if mode == DONE:
            return None
        if mode == VALUE:
            return self._value(stack, ch, top=detail == "top")
        if mode == ARRAY_FIRST:
            return self._close(stack, ch) if ch == "]" else self._value(stack, ch, top=False)
        if mode == OBJECT_FIRST:
            if ch == "}":
                return self._close(stack, ch)
            return (STRING, stack, ("key", "")) if ch == '"' else None
        if mode == OBJECT_KEY:
            return (STRING, stack, ("key", "")) if ch == '"' else None
        if mode == COLON:
            return (VALUE, stack, None) if ch == ":" else None
        if mode == AFTER_VALUE:
            if ch == ",":
                return (OBJECT_KEY, stack, None) if stack[-1] == "{" else (VALUE, stack, None)
            return self._close(stack, ch)
        return None

    def _value(self, stack: tuple, ch: str, top: bool) -> State | None:
        if ch == "{":
            return (OBJECT_FIRST, stack + ("{",), None)
        if top:
            return None  # the reply is one object
        if ch == "[":
            return (ARRAY_FIRST, stack + ("[",), None)
        if ch == '"':
            return (STRING, stack, ("value", ""))
        if ch == "-":
            return (NUMBER, stack, "sign")
        if ch.isascii() and ch.isdigit():
            return (NUMBER, stack, "zero" if ch == "0" else "int")
        for word in ("true", "false", "null"):
            if ch == word[0]:
                return (LITERAL, stack, word[1:])
        return None

    def _string(self, stack: tuple, detail: tuple, ch: str) -> State | None:
        role, escape = detail
        if escape == "\\":
            if ch == "u":
                return (STRING, stack, (role, "u"))
            return (STRING, stack, (role, "")) if ch in '"\\/bfnrt' else None
        if escape.startswith("u"):
            if ch not in "0123456789abcdefABCDEF":
                return None
            return (STRING, stack, (role, "" if len(escape) == 4 else escape + ch))
        if ch == '"':
            return (COLON, stack, None) if role == "key" else self._after_value(stack)
        if ch == "\\":
            return (STRING, stack, (role, "\\"))
        if ord(ch) < 0x20:
            return None  # control characters must be escaped
        return (STRING, stack, (role, ""))

    def _close(self, stack: tuple, ch: str) -> State | None:
        if not stack or ch != {"{": "}", "[": "]"}[stack[-1]]:
            return None
        return self._after_value(stack[:-1])

    @staticmethod
    def _after_value(stack: tuple) -> State:
        return (AFTER_VALUE, stack, None) if stack else (DONE, (), None)


class JsonConstraint:
    """One sequence's JSON mode: which candidates may come next, and whether the object is complete."""

    def __init__(self, token_texts: Sequence[str], max_candidates: int = 128):
        self.token_texts = token_texts
        self.max_candidates = max_candidates
        self.recogniser = JsonPrefix()
        self.state: State | None = JsonPrefix.START

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [V] with every candidate that would break the JSON set to -inf."""
        order = torch.argsort(logits, descending=True)
        for limit in (self.max_candidates, logits.shape[-1]):
            allowed = [i for i in order[:limit].tolist()
                       if self.token_texts[i] and self.recogniser.feed(self.state, self.token_texts[i]) is not None]
            if allowed:
                break
        masked = torch.full_like(logits, float("-inf"))
        if allowed:
            index = torch.tensor(allowed)
            masked[index] = logits[index]
        return masked

    def advance(self, token_id: int) -> None:
        self.state = self.recogniser.feed(self.state, self.token_texts[token_id])

    @property
    def is_complete(self) -> bool:
        return JsonPrefix.is_complete(self.state)
