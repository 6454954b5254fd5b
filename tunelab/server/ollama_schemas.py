"""Request bodies of the Ollama REST API, as pydantic models.

Types are strict (a string where a number belongs is a 400 naming the field);
unknown fields are ignored, as Ollama ignores them. Field names and meanings
follow Ollama's `api/types.go`; the deprecated `name` is accepted wherever
current clients still send it instead of `model`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import InvalidRequest

THINK_LEVELS = ("low", "medium", "high", "max")


class OllamaBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class ToolCallFunction(OllamaBody):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCall(OllamaBody):
    id: str | None = None
    function: ToolCallFunction


class Message(OllamaBody):
    role: str
    content: str | None = None
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (roles lower-cased, tool calls in OpenAI shape)."""
        message: dict[str, Any] = {"role": self.role.lower(), "content": self.content or ""}
        if self.thinking:
            message["thinking"] = self.thinking
        if self.tool_calls:
            message["tool_calls"] = [{"type": "function", "id": call.id,
                                      "function": {"name": call.function.name, "arguments": call.function.arguments}}
                                     for call in self.tool_calls]
        if self.tool_name:
            message["name"] = self.tool_name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


class GenerationBody(OllamaBody):
    """Fields `/api/generate` and `/api/chat` share."""

    model: str
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: float | str | None = None
    think: bool | str | None = None
    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def think_switch(self) -> bool | None:
        """`think` as tunelab's switch: a level means on; None leaves the model's default."""
        if self.think is None or isinstance(self.think, bool):
            return self.think
        if self.think in THINK_LEVELS:
            return True
        raise InvalidRequest(f"invalid think value {self.think!r}; use true, false or one of "
                             f"{', '.join(THINK_LEVELS)}")

    def sampling_extras(self) -> dict[str, Any]:
        """Log-probability fields for the sampler (asking for top_logprobs implies logprobs)."""
        return {"logprobs": self.logprobs or self.top_logprobs > 0, "top_logprobs": self.top_logprobs}


class GenerateRequest(GenerationBody):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class ChatRequest(GenerationBody):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class ModelRequest(OllamaBody):
    """A request naming one model, as `model` or the deprecated `name`."""

    model: str | None = None
    name: str | None = None

    @property
    def target(self) -> str:
        target = self.model or self.name
        if not target:
            raise InvalidRequest("field 'model' is required: name the model, e.g. {\"model\": \"qwen3:8b\"}")
        return target


class ShowRequest(ModelRequest):
    verbose: bool = False


class DeleteRequest(ModelRequest):
    pass


class PullRequest(ModelRequest):
    stream: bool = True
    insecure: bool | None = None


class CopyRequest(OllamaBody):
    source: str
    destination: str


class CreateRequest(ModelRequest):
    from_: str | None = Field(default=None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[Message] | None = None
    quantize: str | None = None
    quantization: str | None = None  # deprecated spelling of quantize
    modelfile: str | None = None  # deprecated: the whole Modelfile as text
    stream: bool = True
