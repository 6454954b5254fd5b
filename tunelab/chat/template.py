"""Chat templates: render a conversation into the prompt text a model was trained on.

A model's own Jinja template (GGUF `tokenizer.chat_template`, or `chat_template.jinja` /
`tokenizer_config.json` in an HF directory) is rendered the way transformers'
`apply_chat_template` renders it: the same sandboxed environment, filters, globals and
input clean-up, so the prompt is byte-identical. `ChatTemplate.builtin_qwen3()` is the
fallback for Qwen3 models that carry no template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from importlib import resources
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunelab.errors import InvalidRequest, ModelFormatError

# Names a message's reasoning arrives under (OpenAI-style, Ollama's `thinking`, vLLM's `reasoning`);
# templates read the first. transformers copies whichever is set to `reasoning_content` and `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# What a template can raise on a conversation it does not accept; all are the request's fault.
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text for training masks; renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, closing a sandbox escape (as transformers does)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set namespace attribute {name!r}")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` without exposing the dict type itself (as transformers does)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; HF templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=_TemplateDict())
    return env


_ENV = _make_environment()


class ChatTemplate:
    """A compiled chat template and what it can do (thinking switch, tools)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        try:
            self._template = _ENV.from_string(source)
            variables = jinja2.meta.find_undeclared_variables(_ENV.parse(source))
        except jinja2.TemplateSyntaxError as e:
            raise ModelFormatError(f"chat template does not compile (line {e.lineno}: {e.message}); "
                                   "fix the template or remove it to use tunelab's built-in one") from e
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.supports_thinking = "enable_thinking" in variables
        self.supports_tools = "tools" in variables

    @classmethod
    def builtin_qwen3(cls) -> ChatTemplate:
        """tunelab's Qwen3 hybrid-thinking template (templates/qwen3.jinja)."""
        source = resources.files("tunelab.chat").joinpath("templates/qwen3.jinja").read_text(encoding="utf-8")
        return cls(source, eos_token="<|im_end|>")

    def render(self, messages: list[Mapping[str, Any]], tools: list[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True, enable_thinking: bool | None = None, **extra: Any) -> str:
        """The prompt text for `messages`; `enable_thinking=None` leaves the template's default.

        Keys set to None are dropped, reasoning is copied under each name templates read, and
        tool-call `arguments` sent as JSON strings become objects, as transformers and vLLM do.
        """
        variables = dict(extra)
        if self.bos_token:
            variables.setdefault("bos_token", self.bos_token)
        if self.eos_token:
            variables.setdefault("eos_token", self.eos_token)
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        try:
            return self._template.render(messages=_clean_messages(messages), tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except _RENDER_ERRORS as e:
            raise InvalidRequest(f"the chat template rejected the conversation: {e}; "
                                 "fix the messages the template names") from e

    def starts_in_thinking(self, messages: list[Mapping[str, Any]], tools: list[Mapping[str, Any]] | None = None,
                           enable_thinking: bool | None = None, **extra: Any) -> bool:
        """True when the generation prompt leaves a `<think>` open, so the reply begins inside the thought."""
        with_prompt = self.render(messages, tools, True, enable_thinking, **extra)
        without = self.render(messages, tools, False, enable_thinking, **extra)
        generation_prompt = with_prompt[len(without):] if with_prompt.startswith(without) else with_prompt
        return generation_prompt.rfind("<think>") > generation_prompt.rfind("</think>")


def _clean_messages(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` shaped as transformers hands them to templates."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list; send at least one message")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}] is not an object with a string role; "
                                 'send messages like {"role": "user", "content": "..."}')
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_decoded_call(call, f"messages[{i}].tool_calls[{j}]")
                                     for j, call in enumerate(message["tool_calls"])]
        cleaned.append(message)
    return cleaned


def _decoded_call(call: Any, where: str) -> Any:
    """A tool call whose JSON-string `arguments` (top level or under `function`) is decoded."""
    if not isinstance(call, Mapping):
        return call
    call = dict(call)
    if isinstance(call.get("function"), Mapping):
        call["function"] = _decoded_call(call["function"], f"{where}.function")
    elif isinstance(call.get("arguments"), str):
        try:
            call["arguments"] = json.loads(call["arguments"])
        except json.JSONDecodeError as e:
            raise InvalidRequest(
                f"{where}.arguments is not valid JSON ({e}); send the arguments as a JSON object") from e
    return call
