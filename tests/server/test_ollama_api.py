"""The Ollama API of a real `tunelab serve`, driven with the official `ollama` client."""

from __future__ import annotations

import json
import os

import httpx
import ollama
import pytest

SMOLLM = "smollm2:135m"
QWEN_CODER = "qwen2.5-coder:0.5b"
GREEDY = {"temperature": 0, "num_predict": 8}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server)


def test_generate_stream_chunks_join_to_the_non_streamed_reply(client):
    chunks = list(client.generate(model=SMOLLM, prompt="Name a fruit.", options=GREEDY, stream=True))
    whole = client.generate(model=SMOLLM, prompt="Name a fruit.", options=GREEDY)

    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c.response for c in chunks) == whole.response != ""
    final = chunks[-1]
    assert final.response == "" and final.done_reason == "length" and final.eval_count == 8
    assert final.prompt_eval_count > 0 and final.total_duration >= final.eval_duration > 0
    assert whole.eval_count == 8 and whole.done_reason == "length"


def test_chat_stream_and_non_stream_agree_and_report_metrics(client):
    messages = [{"role": "user", "content": "Say hello."}]
    chunks = list(client.chat(model=SMOLLM, messages=messages, options=GREEDY, stream=True))
    whole = client.chat(model=SMOLLM, messages=messages, options=GREEDY)

    assert "".join(c.message.content for c in chunks) == whole.message.content != ""
    assert whole.message.role == "assistant" and whole.message.thinking is None
    assert chunks[-1].done and chunks[-1].eval_count == whole.eval_count == 8
    assert whole.prompt_eval_duration > 0 and whole.load_duration >= 0


def test_generate_templates_the_prompt_unless_raw(client):
    templated = client.generate(model=SMOLLM, prompt="The capital of France is", options=GREEDY)
    raw = client.generate(model=SMOLLM, prompt="The capital of France is", raw=True, options=GREEDY)
    chat = client.chat(model=SMOLLM, messages=[{"role": "user", "content": "The capital of France is"}],
                       options=GREEDY)

    assert templated.response == chat.message.content
    assert raw.response != templated.response
    assert "Paris" in raw.response


def test_system_field_overrides_the_model_system_prompt(client):
    plain = client.generate(model=SMOLLM, prompt="Who are you?", options=GREEDY)
    pirate = client.generate(model=SMOLLM, prompt="Who are you?", system="You are a pirate. Say arr.",
                             options=GREEDY)
    as_chat = client.chat(model=SMOLLM, options=GREEDY, messages=[
        {"role": "system", "content": "You are a pirate. Say arr."}, {"role": "user", "content": "Who are you?"}])

    assert pirate.response == as_chat.message.content != plain.response


def test_created_model_is_listed_and_its_parameters_apply(client):
    client.create(model="smol-greedy", from_=SMOLLM, parameters={"temperature": 0, "num_predict": 5},
                  system="You answer in one word.")
    names = [m.model for m in client.list().models]
    shown = client.show("smol-greedy")
    from_model = client.chat(model="smol-greedy", messages=[{"role": "user", "content": "Colour of the sky?"}])
    explicit = client.chat(model=SMOLLM, options={"temperature": 0, "num_predict": 5}, messages=[
        {"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of the sky?"}])
    shorter = client.chat(model="smol-greedy", messages=[{"role": "user", "content": "Colour of the sky?"}],
                          options={"num_predict": 2})

    assert "smol-greedy:latest" in names and SMOLLM in names
    assert "temperature" in shown.parameters and "PARAMETER num_predict 5" in shown.modelfile
    assert from_model.eval_count == 5 and from_model.message.content == explicit.message.content
    assert shorter.eval_count == 2 and from_model.message.content.startswith(shorter.message.content)


def test_create_from_uploaded_blob_files(client, server):
    path = "/work/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(path):
        pytest.skip(f"{path} is not on disk")
    digest = client.create_blob(path)
    assert httpx.head(f"{server}/api/blobs/{digest}").status_code == 200
    client.create(model="smol-files", files={"smol.gguf": digest}, system="Answer in French.")
    shown = client.show("smol-files")

    assert "smol-files:latest" in [m.model for m in client.list().models]
    assert "SYSTEM Answer in French." in shown.modelfile and shown.details.family == "llama"
    assert client.chat(model="smol-files", messages=[{"role": "user", "content": "hi"}], options=GREEDY).done


def test_show_reports_details_template_and_capabilities(client):
    smol = client.show(SMOLLM)
    coder = client.show(QWEN_CODER)

    assert smol.details.family == "llama" and smol.details.quantization_level == "Q4_1"
    assert smol.capabilities == ["completion"]
    assert "tools" in coder.capabilities and "thinking" not in coder.capabilities
    assert "<tool_call>" in coder.template
    assert smol.modelinfo["general.architecture"] == "llama"
    assert smol.modelinfo["tokenizer.ggml.tokens"] == []  # big arrays only with verbose
    assert httpx.post(client._client.base_url.join("/api/show"), json={"name": SMOLLM}).status_code == 200


def test_thinking_goes_to_its_own_field_and_think_false_turns_it_off(client, thinking_model):
    question = [{"role": "user", "content": "Is 7 prime?"}]
    thinking = client.chat(model=thinking_model, messages=question, think=True, options=GREEDY)
    streamed = list(client.chat(model=thinking_model, messages=question, think=True, options=GREEDY, stream=True))
    off = client.chat(model=thinking_model, messages=question, think=False, options=GREEDY)
    # The same prompt sent raw: what the model writes after the opened <think>.
    raw = client.generate(model=thinking_model, raw=True, options=GREEDY,
                          prompt="<|im_start|>user\nIs 7 prime?<|im_end|>\n<|im_start|>assistant\n<think>\n")

    assert thinking.message.thinking == raw.response.strip("\n") != ""
    assert thinking.message.content == ""
    assert "".join(c.message.thinking or "" for c in streamed) == thinking.message.thinking
    assert off.message.thinking is None and off.message.content != ""
    assert "thinking" in client.show(thinking_model).capabilities
    generated = client.generate(model=thinking_model, prompt="Is 7 prime?", think=True, options=GREEDY)
    assert generated.thinking == thinking.message.thinking and generated.response == ""


def test_tool_result_round_trip_reaches_the_model(client):
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    result = json.dumps({"temperature_c": 22, "sky": "sunny"})
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_name": "get_weather", "content": result}]
    reply = client.chat(model=QWEN_CODER, messages=messages, tools=[WEATHER_TOOL],
                        options={"temperature": 0, "num_predict": 24})
    without_result = client.chat(model=QWEN_CODER, messages=messages[:2], tools=[WEATHER_TOOL],
                                 options={"temperature": 0, "num_predict": 24})
    # The Qwen template puts a tool result in a user turn inside <tool_response>.
    rendered = client.show(QWEN_CODER).template
    raw_prompt_reply = client.generate(model=QWEN_CODER, raw=True, options={"temperature": 0, "num_predict": 24},
                                       prompt=_qwen_prompt(rendered, messages))

    assert reply.done_reason in ("stop", "length") and reply.message.content
    assert reply.message.content == raw_prompt_reply.response
    assert reply.message.content != without_result.message.content


def _qwen_prompt(template: str, messages: list[dict]) -> str:
    """The Qwen2.5 prompt for `messages` with the weather tool, rendered by jinja2 as transformers does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False, **kw)
    return env.from_string(template).render(messages=messages, tools=[WEATHER_TOOL], add_generation_prompt=True)


def test_logprobs_cover_every_generated_token(client):
    reply = client.chat(model=SMOLLM, messages=[{"role": "user", "content": "Say hi."}], options=GREEDY,
                        logprobs=True, top_logprobs=3)

    assert len(reply.logprobs) == 8
    assert "".join(entry.token for entry in reply.logprobs).startswith(reply.message.content)
    for entry in reply.logprobs:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(max(top.logprob for top in entry.top_logprobs))  # greedy


def test_empty_prompt_loads_and_keep_alive_zero_unloads(client, server, poll):
    loaded = client.generate(model=SMOLLM, prompt="")
    assert loaded.done_reason == "load"
    assert [m.model for m in client.ps().models] == [SMOLLM]

    unloaded = client.generate(model=SMOLLM, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    poll(lambda: client.ps().models == [])

    client.chat(model=SMOLLM, messages=[{"role": "user", "content": "hi"}], options=GREEDY, keep_alive=0)
    poll(lambda: client.ps().models == [])
    client.chat(model=SMOLLM, messages=[{"role": "user", "content": "hi"}], options=GREEDY, keep_alive="1h")
    assert client.ps().models[0].expires_at is not None


def test_copy_delete_and_pull_from_the_stored_weights(client):
    client.copy(SMOLLM, "smol-copy")
    assert "smol-copy:latest" in [m.model for m in client.list().models]
    client.delete("smol-copy")
    assert "smol-copy:latest" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as missing:
        client.delete("smol-copy")
    assert missing.value.status_code == 404

    # smollm2:135m's weights are stored already (the test store holds the pulled file), so no download.
    statuses = [p.status for p in client.pull(SMOLLM, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert any(s.startswith("using existing layer") for s in statuses)
    with pytest.raises(ollama.ResponseError) as unknown:
        client.pull("no-such-model:1b")
    assert unknown.value.status_code == 404


def test_version_and_root(server):
    assert httpx.get(server + "/api/version").json()["version"]
    assert httpx.get(server + "/").text == "Ollama is running"
