"""From a conversation or a prompt to an engine request, and from token events to a reply.

Every front end (the CLI, both HTTP APIs, the tuner) builds its requests here,
so options, system prompts, MESSAGE seeds, thinking and the thinking budget
mean the same thing everywhere:

    effective options = defaults <- Modelfile PARAMETERs <- request options
    messages          = [SYSTEM] + MESSAGE seeds + the caller's messages
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tunelab.chat.output_parser import ContentDelta, OutputParser, ThinkingDelta, ToolCall
from tunelab.chat.template import ChatTemplate
from tunelab.chat.thinking import ThinkingBudget, resolve_thinking
from tunelab.engine.request import FinishReason, Request, TokenEvent
from tunelab.errors import InvalidOption, InvalidRequest, ModelFormatError
from tunelab.runtime import ModelRuntime
from tunelab.sampling.params import SamplingParams


@dataclass
class PreparedRequest:
    """A request ready for the engine, with what its reply parser needs to know."""

    request: Request
    prompt: str
    options: dict[str, Any]
    thinking: bool | None  # None: the template has no thinking switch
    starts_in_thinking: bool
    parse_tools: bool
    prefill: str = ""  # the start of the reply, written into the prompt (e.g. an opened tool call)

    def parser(self) -> OutputParser:
        """A fresh parser for this reply, already past the prefill (whose own text is not re-emitted)."""
        parser = OutputParser(starts_in_thinking=self.starts_in_thinking, parse_tools=self.parse_tools)
        parser.feed(self.prefill)
        return parser


def conversation(runtime: ModelRuntime, messages: list[dict[str, Any]], system: str | None = None) -> list[dict]:
    """The caller's messages behind the model's SYSTEM (unless they bring one) and MESSAGE seeds."""
    messages = list(messages)
    has_system = bool(messages) and messages[0].get("role") == "system"
    lead: list[dict[str, Any]] = []
    system = system if system is not None else runtime.system
    if system and not has_system:
        lead.append({"role": "system", "content": system})
    elif has_system:
        lead.append(messages.pop(0))
    return lead + list(runtime.messages) + messages


def prepare_chat(runtime: ModelRuntime, messages: list[dict[str, Any]], *, options: dict[str, Any] | None = None,
                 tools: list[dict[str, Any]] | None = None, think: bool | None = None,
                 system: str | None = None, sampling_extras: dict[str, Any] | None = None,
                 template: str | None = None, prefill: str = "", json_mode: bool = False) -> PreparedRequest:
    """Render a chat with the model's template (or `template`, a Jinja override) and build its engine request.

    `prefill` is appended after the generation prompt: the reply continues from it. `json_mode`
    constrains the reply to one JSON object; a thinking model then answers without thinking.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise InvalidRequest("messages must be a list of objects with a 'role' and a 'content'")
    opts = runtime.options(options)
    full = conversation(runtime, messages, system)
    template = runtime.template if template is None else request_template(runtime, template)
    if tools and not template.supports_tools:
        raise InvalidRequest(f"model {runtime.name!r} does not support tools (its chat template has none); "
                             "leave tools out or use a model such as qwen2.5-coder")
    if json_mode:
        think = False if template.supports_thinking else None
    thinking = resolve_thinking(think if think is not None else opts["think"], full, template.supports_thinking)
    prompt = template.render(full, tools=tools or None, add_generation_prompt=True, enable_thinking=thinking)
    starts_in_thinking = _opens_thought(prompt)
    prepared = _prepare(runtime, prompt + prefill, opts, thinking, starts_in_thinking, parse_tools=bool(tools),
                        sampling_extras=sampling_extras, json_mode=json_mode)
    prepared.prefill = prefill
    return prepared


def prepare_completion(runtime: ModelRuntime, prompt: str, *, system: str | None = None, raw: bool = False,
                       options: dict[str, Any] | None = None, think: bool | None = None,
                       sampling_extras: dict[str, Any] | None = None, template: str | None = None,
                       json_mode: bool = False) -> PreparedRequest:
    """A plain prompt: templated as one user turn (Ollama `/api/generate`), or sent as is when `raw`."""
    if raw:
        opts = runtime.options(options)
        return _prepare(runtime, prompt, opts, None, False, parse_tools=False, sampling_extras=sampling_extras,
                        json_mode=json_mode)
    return prepare_chat(runtime, [{"role": "user", "content": prompt}], options=options, think=think,
                        system=system, sampling_extras=sampling_extras, template=template, json_mode=json_mode)


def request_template(runtime: ModelRuntime, source: str) -> ChatTemplate:
    """A template sent with one request (Ollama's `template` field), compiled; it must be Jinja."""
    if "{{ ." in source or "{{- ." in source:
        raise InvalidRequest("template is an Ollama Go template; tunelab renders Jinja chat templates "
                             "(as in tokenizer_config.json): send a Jinja template or leave template out")
    try:
        return ChatTemplate(source, runtime.template.bos_token, runtime.template.eos_token)
    except ModelFormatError as e:
        raise InvalidRequest(f"template does not compile: {e}") from None


def _opens_thought(prompt: str) -> bool:
    return prompt.rfind("<think>") > prompt.rfind("</think>")


def _prepare(runtime: ModelRuntime, prompt: str, opts: dict[str, Any], thinking: bool | None,
             starts_in_thinking: bool, parse_tools: bool, sampling_extras: dict[str, Any] | None,
             json_mode: bool = False) -> PreparedRequest:
    tokenizer = runtime.tokenizer
    prompt_ids = tokenizer.encode(prompt)
    params = SamplingParams.from_options(opts, **(sampling_extras or {})).with_seed()
    num_ctx = runtime.engine.config.num_ctx
    room = num_ctx - len(prompt_ids)
    max_new = room if params.num_predict < 0 else min(params.num_predict, room)
    budget = None
    if opts["think_budget"] >= 0 and thinking is not False:
        if thinking is None:
            raise InvalidOption("think_budget is set but this model's chat template has no thinking switch; "
                                "drop think_budget or use a thinking model such as Qwen3")
        budget = ThinkingBudget(tokenizer, opts["think_budget"], starts_in_thinking)
    request = Request(prompt_ids=prompt_ids, params=params, max_new_tokens=max(max_new, 0),
                      stop_strings=tuple(params.stop), stop_token_ids=frozenset(tokenizer.stop_token_ids),
                      think_budget=budget, json_mode=json_mode)
    return PreparedRequest(request, prompt, opts, thinking, starts_in_thinking, parse_tools)


@dataclass
class Reply:
    """A finished reply, split into thinking, answer and tool calls, with counts and timings."""

    thinking: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    thinking_unclosed: bool = False
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float | None, list | None]] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    first_token_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)

    def add(self, events: Iterable[Any]) -> None:
        """Fold parser events into the reply."""
        for event in events:
            if isinstance(event, ThinkingDelta):
                self.thinking += event.text
            elif isinstance(event, ContentDelta):
                self.content += event.text
            elif isinstance(event, ToolCall):
                self.tool_calls.append(event)


def collect(prepared: PreparedRequest, events: Iterable[TokenEvent]) -> Reply:
    """Drain a request's events into a `Reply`."""
    parser = prepared.parser()
    reply = Reply()
    started = time.perf_counter()
    for event in events:
        if event.token_id is not None:
            if not reply.token_ids:
                reply.first_token_seconds = time.perf_counter() - started
            reply.token_ids.append(event.token_id)
            reply.logprobs.append((event.token_id, event.logprob, event.top_logprobs))
        reply.add(parser.feed(event.text))
        if event.finish_reason is not None:
            reply.finish_reason = event.finish_reason
            reply.num_prompt_tokens = event.num_prompt_tokens
            reply.num_cached_tokens = event.num_cached_tokens
    reply.add(parser.finish())
    reply.thinking_unclosed = parser.thinking_unclosed
    reply.total_seconds = time.perf_counter() - started
    return reply
