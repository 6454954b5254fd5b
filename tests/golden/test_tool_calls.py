"""Tool calls end to end on qwen2.5-coder:0.5b: the tool is rendered, called, parsed, and its result used."""

from __future__ import annotations

import json

import pytest

from tunelab.generation import collect, prepare_chat
from tunelab.registry.store import Store
from tunelab.runtime import open_model

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def runtime(qwen_coder_path, tmp_path_factory):
    rt = open_model(str(qwen_coder_path), Store(tmp_path_factory.mktemp("home")))
    yield rt
    rt.close()


def test_weather_question_becomes_a_parsed_call_and_the_result_is_used(runtime):
    messages = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
    prepared = prepare_chat(runtime, messages, tools=[WEATHER_TOOL], options={"temperature": 0, "num_predict": 96})
    assert "get_current_weather" in prepared.prompt and "<tools>" in prepared.prompt
    reply = collect(prepared, runtime.engine.generate(prepared.request))
    assert reply.tool_calls, f"the model answered in text instead of calling the tool: {reply.content!r}"
    call = reply.tool_calls[0]
    assert call.name == "get_current_weather"
    assert isinstance(call.arguments, dict) and "paris" in json.dumps(call.arguments).lower()
    assert "<tool_call>" not in reply.content

    messages += [
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": call.id, "type": "function",
                         "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 31, "sky": "sunny"})},
    ]
    follow_up = prepare_chat(runtime, messages, tools=[WEATHER_TOOL], options={"temperature": 0, "num_predict": 64})
    assert "<tool_response>" in follow_up.prompt
    answer = collect(follow_up, runtime.engine.generate(follow_up.request))
    assert "31" in answer.content, answer.content
