"""Stop strings that may span token boundaries.

Text is released as soon as it can no longer turn into a stop string: the
longest tail of the pending text that is a prefix of some stop string is held
back until the next token settles it. A matched stop string, and everything
after it, is never shown.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop_strings: tuple[str, ...]):
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add new text; return (text safe to show, whether a stop string matched)."""
        if not self.stop_strings:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            released, self.pending = self.pending[:cut], ""
            return released, True
        hold = self._held_back_length()
        released = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return released, False

    def flush(self) -> str:
        """At the end of generation: release whatever was held back."""
        released, self.pending = self.pending, ""
        return released

    def _held_back_length(self) -> int:
        longest = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
