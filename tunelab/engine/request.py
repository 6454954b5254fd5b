"""Request, its per-sequence state, and the events the engine emits."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count(1)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-turn token or a stop string
    LENGTH = "length"  # num_predict reached or the context is full
    CANCELLED = "cancelled"  # the client went away


@dataclass
class Request:
    """What a caller asks the engine for: a prompt in token ids and how to continue it."""

    prompt_ids: list[int]
    params: Any  # tunelab.sampling.SamplingParams, resolved and seeded
    max_new_tokens: int  # already bounded by num_ctx
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    think_budget: Any = None  # tunelab.chat.thinking.ThinkingBudget, or None
    json_mode: bool = False  # the reply must be one JSON object (Ollama format "json")
    request_id: int = field(default_factory=lambda: next(_ids))


@dataclass
class TokenEvent:
    """One step of one request's output: a token (or none, when finishing) and its text."""

    request_id: int
    token_id: int | None
    text: str  # new text made visible by this step (stop strings never appear in it)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass
class Sequence:
    """The engine's state for one running request."""

    request: Request
    sampler_state: Any
    detokenizer: Any
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached_prompt_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks
    stop_matcher: Any = None  # tunelab.engine.stop_conditions.StopStringMatcher
    json_constraint: Any = None  # tunelab.sampling.json_format.JsonConstraint, in JSON mode
    forced_ids: list[int] = field(default_factory=list)  # tokens to feed instead of sampling
    finished: FinishReason | None = None

    @property
    def request_id(self) -> int:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
