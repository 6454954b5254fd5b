"""Whether a Qwen3 reply thinks, and how long it may think.

Qwen3 has two switches. The hard one is the template's `enable_thinking`: False
pre-fills an empty thought (`<think>\\n\\n</think>\\n\\n`), and the model cannot think
whatever the messages say. The soft ones are `/think` and `/no_think` written in a user
or system message. The official template leaves them in the text untouched; they work
because Qwen3 was trained to obey the most recent one, answering `/no_think` with an
empty thought of its own.

tunelab resolves both into one decision per request (`resolve_thinking`):
`think=False` is the hard switch; otherwise the latest soft switch decides; otherwise
thinking is on, Qwen3's default. The soft switch stays in the message, as the template
leaves it, and the decision is also passed to the template as `enable_thinking`. So
`/no_think` pre-fills the same empty thought the model would have written itself:
the reply is the one Qwen documents, but certain instead of learned, and the output
parser and the thinking budget know the mode before the first token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from tunelab.errors import InvalidOption

# Qwen's early-stopping text for a thinking budget (Qwen3 docs, "thinking budget").
EARLY_STOP_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution "
    "based on the thinking directly now.\n</think>\n\n"
)

# `/think` or `/no_think` as a word of its own: not part of a path such as `src/think`.
_SOFT_SWITCH = re.compile(r"(?<![\w/])/(no_think|think)\b")


def soft_switch(messages: Sequence[Mapping[str, Any]]) -> bool | None:
    """The latest `/think` (True) or `/no_think` (False) in a user or system message, or None."""
    for message in reversed(messages):
        if message.get("role") not in ("user", "system"):
            continue
        switches = _SOFT_SWITCH.findall(_text_of(message.get("content")))
        if switches:
            return switches[-1] == "think"
    return None


def resolve_thinking(think: bool | None, messages: Sequence[Mapping[str, Any]],
                     supports_thinking: bool = True) -> bool | None:
    """Whether the reply thinks: `think=False` always wins, then the latest soft switch, then on.

    Returns None for a template without a thinking switch (nothing to pass as
    `enable_thinking`); asking such a model to think is an error.
    """
    if not supports_thinking:
        if think:
            raise InvalidOption("think is set but this model's chat template has no thinking switch; "
                                "drop the think option or use a thinking model such as Qwen3")
        return None
    if think is False:
        return False
    switch = soft_switch(messages)
    return True if switch is None else switch


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or OpenAI-style parts `[{"type": "text", ...}]`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content
                         if isinstance(part, Mapping) and isinstance(part.get("text"), str))
    return ""


class TokenVocabulary(Protocol):
    """What the budget needs of a tokenizer (tunelab.tokenizer.Tokenizer fits)."""

    def encode(self, text: str) -> list[int]: ...
    def token_to_id(self, token: str) -> int | None: ...


class ThinkingBudget:
    """Caps one reply's thinking at `max_thinking_tokens`, then closes the thought Qwen's way.

    The engine calls `step` with every token it samples. Once the thought holds the full
    budget, the next sampled thinking token is replaced by the ids of `EARLY_STOP_TEXT`
    (ending in `</think>`), which the engine feeds in order; the model then writes its
    answer. After that, or after the model closes the thought itself, `step` does nothing.
    """

    def __init__(self, vocabulary: TokenVocabulary, max_thinking_tokens: int, starts_in_thinking: bool,
                 closing_text: str = EARLY_STOP_TEXT):
        if max_thinking_tokens < 0:
            raise InvalidOption(f"think_budget {max_thinking_tokens} is negative; "
                                "use 0 or more thinking tokens, or leave it unset for no limit")
        think_open, think_close = vocabulary.token_to_id("<think>"), vocabulary.token_to_id("</think>")
        if think_open is None or think_close is None:
            raise InvalidOption("think_budget is set but this model has no <think> and </think> tokens; "
                                "drop think_budget or use a thinking model such as Qwen3")
        self.closing_ids = list(vocabulary.encode(closing_text))
        if think_close not in self.closing_ids:
            raise InvalidOption(f"the thinking budget's closing text {closing_text!r} has no </think>; "
                                "end it with </think>")
        self.max_thinking_tokens = max_thinking_tokens
        self.num_thinking_tokens = 0
        self._think_open, self._think_close = think_open, think_close
        self._is_thinking = starts_in_thinking
        self._is_done = False

    def step(self, token_id: int) -> list[int]:
        """Ids to feed instead of the sampled `token_id`: empty to keep it, or the closing ids."""
        if self._is_done:
            return []
        if not self._is_thinking:
            self._is_thinking = token_id == self._think_open
            return []
        if token_id == self._think_close:
            self._is_done = True
            return []
        if self.num_thinking_tokens >= self.max_thinking_tokens:
            self._is_done = True
            return list(self.closing_ids)
        self.num_thinking_tokens += 1
        return []

    @property
    def is_done(self) -> bool:
        """True once the thought is closed, by the model or by the budget."""
        return self._is_done
