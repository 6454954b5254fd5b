"""IncrementalDetokenizer: token ids in, text deltas out, never half a character.

A byte-level token can end inside a multi-byte UTF-8 character (a Chinese
character or an emoji is often two or three tokens). Each token's bytes go
through an incremental UTF-8 decoder, which holds an unfinished character until
its last byte arrives, so each step costs the length of one token, not a
re-decode of the whole sequence.
"""

from __future__ import annotations

import codecs

from tunelab.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text deltas that are always whole characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skipped_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        # errors="replace" matches Tokenizer.decode: invalid bytes become U+FFFD as soon as they are known invalid.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []

    def add(self, token_id: int) -> str:
        """Feed one token id; return the text it completes (may be "" while a character is unfinished)."""
        if token_id in self._skipped_ids:
            return ""
        return self._emit(self._utf8.decode(self._tokenizer.token_bytes(token_id)))

    def flush(self) -> str:
        """End the sequence: bytes of an unfinished character come out as U+FFFD."""
        return self._emit(self._utf8.decode(b"", final=True))

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def _emit(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta
