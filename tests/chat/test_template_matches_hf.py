"""Our chat rendering against transformers' apply_chat_template with Qwen's official templates.

The official Qwen3 template is not shipped with tunelab: it is read from the llama.cpp copy in
the llama-cpp-python 0.3.36 source distribution, downloaded once into $TUNELAB_TEST_CACHE
(default ~/.cache/tunelab-test).
"""

import copy
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tunelab.chat.template import ChatTemplate
from tunelab.errors import InvalidRequest, ModelFormatError
from real_models import real_model_path

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SDIST = "llama-cpp-python==0.3.36"
SDIST_TEMPLATES = "vendor/llama.cpp/models/templates/"
QWEN25_GGUF = real_model_path("qwen2.5-coder:0.5b")


def _official_template(name: str) -> str:
    cache = Path(os.environ.get("TUNELAB_TEST_CACHE", Path.home() / ".cache" / "tunelab-test"))
    target = cache / "llama-cpp-templates" / name
    if not target.is_file():
        sdist_dir = cache / "llama-cpp-sdist"
        archives = sorted(sdist_dir.glob("llama_cpp_python-0.3.36.tar.gz"))
        if not archives:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:",
                 "-d", str(sdist_dir)], capture_output=True, text=True, timeout=900)
            archives = sorted(sdist_dir.glob("llama_cpp_python-0.3.36.tar.gz"))
            if result.returncode != 0 or not archives:
                pytest.skip(f"cannot download {SDIST} for the official Qwen templates: {result.stderr[-300:]}")
        with tarfile.open(archives[0]) as archive:
            member = archive.getmember(f"llama_cpp_python-0.3.36/{SDIST_TEMPLATES}{name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    return target.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def official_qwen3() -> str:
    return _official_template("Qwen-Qwen3-0.6B.jinja")


def hf_render(template: str, messages, tools=None, add_generation_prompt=True, **kwargs) -> str:
    """transformers' own rendering, through a tokenizer object that carries `template`."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<|im_end|>": 0, "<|endoftext|>": 1, "<unk>": 2},
                                                               unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>", chat_template=template)
    return tokenizer.apply_chat_template(copy.deepcopy(messages), tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City, e.g. Zürich"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {
        "tz": {"type": "string", "enum": ["UTC", "CET"]}}}}}


def _call(name, arguments):
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": arguments}}


# (messages, tools, render kwargs): each a conversation the Qwen3 template treats specially.
CASES = {
    "single_user": ([{"role": "user", "content": "Hi"}], None, {}),
    "system_and_user": ([{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": "What is 2+2?"}], None, {}),
    "thinking_off": ([{"role": "user", "content": "Hi"}], None, {"enable_thinking": False}),
    "thinking_on": ([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}], None,
                    {"enable_thinking": True}),
    "soft_switches_stay_in_text": ([{"role": "system", "content": "Answer briefly. /no_think"},
                                    {"role": "user", "content": "Why is the sky blue? /think"},
                                    {"role": "assistant", "content": "<think>\nRayleigh.\n</think>\n\nScattering."},
                                    {"role": "user", "content": "And sunsets? /no_think"}], None, {}),
    "past_reasoning_in_content_dropped": ([
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nr1 line\n\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2 without thought"},
        {"role": "user", "content": "Q3"}], None, {}),
    "past_reasoning_field_dropped_current_kept": ([
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "old thought"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "\n\nA2", "reasoning_content": "\nnew thought\n"}],
        None, {"add_generation_prompt": False}),
    "final_assistant_gets_empty_thought": ([{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello!"}],
                                           None, {"add_generation_prompt": False}),
    "ends_with_user_no_generation_prompt": ([{"role": "user", "content": "Hi"}], None,
                                            {"add_generation_prompt": False}),
    "second_system_message": ([{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
                               {"role": "system", "content": "S2 (ü, 中文)"}, {"role": "user", "content": "U2"}],
                              None, {}),
    "tools_with_system": ([{"role": "system", "content": "You help with weather."},
                           {"role": "user", "content": "Weather in Zürich?"}], [WEATHER, TIME], {}),
    "tools_without_system_thinking_off": ([{"role": "user", "content": "Time?"}], [TIME],
                                          {"enable_thinking": False}),
    "agentic_turn_keeps_reasoning": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
         "tool_calls": [_call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "call_get_weather", "content": '{"temp": 21}'}], [WEATHER], {}),
    "parallel_calls_and_several_tool_results": ([
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "Let me check both.",
         "tool_calls": [_call("get_weather", {"city": "Paris"}), _call("get_time", {"tz": "CET"})]},
        {"role": "tool", "content": "21 °C"},
        {"role": "tool", "content": "14:05"},
        {"role": "assistant", "content": "<think>\nBoth known.\n</think>\n\nIt is 21 °C at 14:05."},
        {"role": "user", "content": "Thanks! And Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]},
        {"role": "tool", "content": "25 °C"}], [WEATHER, TIME], {}),
    "tool_response_typed_by_user_continues_turn": ([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "call it",
         "tool_calls": [_call("get_weather", {"city": "Oslo"})]},
        {"role": "user", "content": "<tool_response>\n-3 °C\n</tool_response>"}], [WEATHER], {}),
    "ollama_thinking_field": ([
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "thinking": "via thinking field"}],
        None, {"add_generation_prompt": False}),
}


@pytest.mark.parametrize("which", ["builtin", "official"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_render_is_byte_identical_to_transformers_with_official_qwen3(case, which, official_qwen3):
    messages, tools, kwargs = CASES[case]
    template = ChatTemplate.builtin_qwen3() if which == "builtin" else ChatTemplate(official_qwen3)
    expected = hf_render(official_qwen3, messages, tools, **kwargs)
    assert template.render(copy.deepcopy(messages), tools, **kwargs) == expected


def test_builtin_renders_null_content_as_empty_where_the_official_template_fails(official_qwen3):
    # OpenAI clients send `"content": null` beside tool_calls; Qwen's April-2025 template
    # cannot render a missing content, its newer revision renders it empty, as ours does.
    messages, tools, _ = CASES["agentic_turn_keeps_reasoning"]
    with_null = copy.deepcopy(messages)
    with_null[1]["content"] = None
    assert ChatTemplate.builtin_qwen3().render(with_null, tools) == hf_render(official_qwen3, messages, tools)
    with pytest.raises(InvalidRequest, match="content"):
        ChatTemplate(official_qwen3).render(with_null, tools)


def test_render_leaves_callers_messages_untouched():
    messages = [{"role": "user", "content": "Q"},
                {"role": "assistant", "content": None, "thinking": "t",
                 "tool_calls": [_call("get_time", '{"tz": "UTC"}')]}]
    before = copy.deepcopy(messages)
    ChatTemplate.builtin_qwen3().render(messages, add_generation_prompt=False)
    assert messages == before


@pytest.mark.parametrize("which", ["builtin", "official"])
def test_json_string_arguments_render_as_the_object_they_encode(which, official_qwen3):
    as_object = [{"role": "user", "content": "Weather?"},
                 {"role": "assistant", "content": "", "tool_calls": [
                     _call("get_weather", {"city": "Zürich", "unit": "C"}), _call("get_time", {})]},
                 {"role": "tool", "content": "ok"}, {"role": "tool", "content": "ok"}]
    as_string = copy.deepcopy(as_object)
    for call in as_string[1]["tool_calls"]:  # compact, ASCII-escaped: not how tojson would write it
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"], separators=(",", ":"))
    template = ChatTemplate.builtin_qwen3() if which == "builtin" else ChatTemplate(official_qwen3)
    rendered = template.render(as_string, [WEATHER, TIME])
    assert rendered == hf_render(official_qwen3, as_object, [WEATHER, TIME])
    assert '"arguments": {"city": "Zürich", "unit": "C"}' in rendered


@pytest.fixture(scope="module")
def qwen25_template() -> str:
    """The template embedded in a real Qwen2.5 GGUF, read the way tunelab loads models."""
    from tunelab.weights.gguf_file import GGUFFile

    return GGUFFile(QWEN25_GGUF).chat_template


@pytest.mark.parametrize("case", ["single_user", "system_and_user", "tools_with_system",
                                  "parallel_calls_and_several_tool_results"])
def test_qwen25_gguf_template_renders_like_transformers(case, qwen25_template):
    source = qwen25_template
    messages, tools, _ = CASES[case]
    template = ChatTemplate(source, eos_token="<|im_end|>")
    assert template.render(copy.deepcopy(messages), tools) == hf_render(source, messages, tools)
    assert template.supports_tools and not template.supports_thinking


def test_qwen25_template_decodes_string_arguments_it_would_double_encode(qwen25_template):
    source = qwen25_template
    call = {"role": "assistant", "content": "", "tool_calls": [_call("get_time", '{"tz": "UTC"}')]}
    rendered = ChatTemplate(source).render([{"role": "user", "content": "Time?"}, call], [TIME])
    assert '{"name": "get_time", "arguments": {"tz": "UTC"}}' in rendered


def test_capabilities_and_open_thought_detection(official_qwen3):
    hybrid = ChatTemplate(official_qwen3)
    assert hybrid.supports_thinking and hybrid.supports_tools
    chat = [{"role": "user", "content": "Hi"}]
    assert not hybrid.starts_in_thinking(chat)
    assert not hybrid.starts_in_thinking(chat, enable_thinking=False)
    # Qwen3-Thinking-2507 opens the thought in the generation prompt itself.
    thinking_2507 = ChatTemplate(official_qwen3.replace("{{- '<|im_start|>assistant\\n' }}",
                                                        "{{- '<|im_start|>assistant\\n<think>\\n' }}"))
    assert thinking_2507.render(chat).endswith("<|im_start|>assistant\n<think>\n")
    assert thinking_2507.starts_in_thinking(chat)
    # A `<think>` the user typed is part of the conversation, not of the generation prompt.
    assert not hybrid.starts_in_thinking([{"role": "user", "content": "What does <think> do?"}])


def test_template_exception_becomes_invalid_request_with_its_message():
    template = ChatTemplate("{% if messages[-1].role != 'user' %}{{ raise_exception('last message must be user') }}"
                            "{% endif %}{{ messages[-1].content }}")
    assert template.render([{"role": "user", "content": "x"}]) == "x"
    with pytest.raises(InvalidRequest, match="last message must be user"):
        template.render([{"role": "assistant", "content": "x"}])


def test_bad_input_raises_typed_errors(official_qwen3):
    builtin = ChatTemplate.builtin_qwen3()
    with pytest.raises(InvalidRequest, match="non-empty list"):
        builtin.render([])
    with pytest.raises(InvalidRequest, match=r"messages\[0\]"):
        builtin.render([{"content": "no role"}])
    with pytest.raises(InvalidRequest, match='unknown message role "developer"'):
        builtin.render([{"role": "developer", "content": "x"}])
    bad_arguments = {"role": "assistant", "content": "", "tool_calls": [_call("get_time", "{tz: UTC")]}
    with pytest.raises(InvalidRequest, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
        builtin.render([{"role": "user", "content": "x"}, bad_arguments])
    with pytest.raises(InvalidRequest, match="may not set namespace attribute '_x'"):
        ChatTemplate("{% set ns = namespace(_x=1) %}{{ ns }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ModelFormatError, match="does not compile"):
        ChatTemplate("{% if %}")


def test_environment_matches_transformers_filters_and_globals():
    source = ("{{ messages[0].content | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2) }}|"
              "{{ {'x': 'é'} | tojson(ensure_ascii=true, separators=(',', ':')) }}|"
              "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.role }}{% endfor %}|"
              "{% generation %}{{ bos_token }}{% endgeneration %}|{{ strftime_now('%Y') | length }}|"
              "{% set ns = namespace(n=0) %}"
              "{% for k in dict.fromkeys(['a', 'b']) %}{% set ns.n = ns.n + 1 %}{% endfor %}"
              "{{ ns.n }}{{ dict(x=1) | tojson }}")
    messages = [{"role": "user", "content": "<b>é</b>"}, {"role": "assistant", "content": "x"}]
    ours = ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(messages, add_generation_prompt=False)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     chat_template=source)
    assert ours == tokenizer.apply_chat_template(messages, tokenize=False)
    assert ours.startswith('"<b>é</b>"|{\n  "b": 1,')
