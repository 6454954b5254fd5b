"""Request bodies of the OpenAI-compatible API, as pydantic models, and how they map to tunelab options.

Unknown fields are ignored (clients send many), known ones are type-checked.
A field the request leaves out is left out of the options, so the model's
Modelfile value stands (Ollama's OpenAI layer instead injects temperature 1.0
and top_p 1.0). Beyond OpenAI's fields, the extras Qwen's and vLLM's users
send are honoured: `top_k`, `min_p`, `repetition_penalty`,
`chat_template_kwargs.enable_thinking`, `thinking_budget`, plus tunelab's
`options` (any Ollama option, `num_ctx` included) and `keep_alive`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunelab.chat.tool_calls import TOOL_CALL_OPEN
from tunelab.errors import InvalidRequest
from tunelab.options import validate_options

# reasoning_effort values that turn thinking on (Ollama's mapping: none = off, the rest = on).
THINKING_EFFORTS = ("minimal", "low", "medium", "high", "max", "xhigh", "ultra")


class OpenAIBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(OpenAIBody):
    include_usage: bool = False


class ResponseFormat(OpenAIBody):
    type: str
    json_schema: dict[str, Any] | None = None


class ToolCallFunction(OpenAIBody):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(OpenAIBody):
    id: str | None = None
    type: str = "function"
    function: ToolCallFunction


class ChatMessage(OpenAIBody):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: text content, `developer` as `system`, reasoning kept."""
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": _text(self.content)}
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function",
                                      "function": {"name": call.function.name, "arguments": call.function.arguments}}
                                     for call in self.tool_calls]
        if self.reasoning_content or self.reasoning:
            message["reasoning_content"] = self.reasoning_content or self.reasoning
        if self.name:
            message["name"] = self.name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if not isinstance(content, list):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(f"message content part of type {part.get('type')!r} is not supported; "
                                 "send text parts ({\"type\": \"text\", \"text\": ...})")
        texts.append(part["text"])
    return "".join(texts)


class SamplingBody(OpenAIBody):
    """Fields both completion endpoints share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = 1
    logit_bias: dict[str, float] | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None

    def tunelab_options(self) -> dict[str, Any]:
        """Only the options the request sets, under tunelab's names; explicit fields win over `options`."""
        if self.n != 1:
            raise InvalidRequest(f"n must be 1 (got {self.n}); send one request per completion")
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                 "repeat_penalty": self.repetition_penalty, "frequency_penalty": self.frequency_penalty,
                 "presence_penalty": self.presence_penalty, "seed": self.seed, "stop": self.stop,
                 "num_predict": self.max_tokens}
        options = validate_options(self.options, ignore_unknown=True)
        return options | validate_options({k: v for k, v in given.items() if v is not None})

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    reasoning: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = Field(default=None, ge=0)

    def tunelab_options(self) -> dict[str, Any]:
        options = super().tunelab_options()
        if self.max_completion_tokens is not None:
            options["num_predict"] = self.max_completion_tokens
        if self.thinking_budget is not None:
            options["think_budget"] = self.thinking_budget
        return options

    def think_switch(self) -> bool | None:
        """`chat_template_kwargs.enable_thinking`, else `reasoning.effort` / `reasoning_effort`, else unset."""
        kwargs = self.chat_template_kwargs or {}
        if "enable_thinking" in kwargs:
            if not isinstance(kwargs["enable_thinking"], bool):
                raise InvalidRequest("chat_template_kwargs.enable_thinking must be true or false")
            return kwargs["enable_thinking"]
        effort = (self.reasoning or {}).get("effort") or self.reasoning_effort
        if effort is None:
            return None
        if effort == "none":
            return False
        if effort in THINKING_EFFORTS:
            return True
        raise InvalidRequest(f"invalid reasoning_effort {effort!r}; use none or one of {', '.join(THINKING_EFFORTS)}")

    def tools_to_render(self) -> list[dict[str, Any]] | None:
        """The tools, unless `tool_choice` is "none"."""
        return None if self.tool_choice == "none" else self.tools

    def tool_prefill(self) -> str:
        """How the reply must start for `tool_choice`: a forced call opens the tool call in the prompt.

        "required" opens a call and lets the model name the tool (or names the only one offered);
        `{"type": "function", "function": {"name": ...}}` opens a call of that tool.
        """
        choice = self.tool_choice
        if choice in (None, "auto", "none"):
            return ""
        names = [tool.get("function", {}).get("name") for tool in self.tools or []]
        if choice == "required":
            if not names:
                raise InvalidRequest('tool_choice "required" needs tools; send tools or drop tool_choice')
            name = names[0] if len(names) == 1 else None
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
            if name not in names:
                raise InvalidRequest(f"tool_choice names function {name!r}, which is not among the tools "
                                     f"({', '.join(map(str, names)) or 'none'})")
        else:
            raise InvalidRequest(f'tool_choice {choice!r} is not "none", "auto", "required" or '
                                 '{"type": "function", "function": {"name": ...}}')
        if name is None:
            return f'{TOOL_CALL_OPEN}\n{{"name": "'
        return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '

    def sampling_extras(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs, "top_logprobs": self.top_logprobs or 0,
                "logit_bias": self.logit_bias or {}}


class CompletionRequest(SamplingBody):
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise InvalidRequest(f"prompt must be one string (got a list of {len(self.prompt)}); "
                                 "send one request per prompt")
        return self.prompt[0]

    def sampling_extras(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs is not None, "top_logprobs": self.logprobs or 0,
                "logit_bias": self.logit_bias or {}}
