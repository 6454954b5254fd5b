"""The OpenAI-compatible API of a real `tunelab serve`, driven with the official `openai` client."""

from __future__ import annotations

import json

import ollama
import openai
import pytest

SMOLLM = "smollm2:135m"
QWEN_CODER = "qwen2.5-coder:0.5b"
HELLO = [{"role": "user", "content": "Say hello."}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def native(server) -> ollama.Client:
    return ollama.Client(host=server)


NEAR_TIE = pytest.mark.xfail(strict=False, reason=(
    "tunelab's float32 matmuls are not batch-invariant: MKL's GEMM rounds a row differently for "
    "different row counts, so a second identical request that reuses the first one's cached prefix "
    "(a shorter prefill chunk) can differ in the last bit and flip SmolLM2's exactly tied greedy "
    "tokens; passes when this file runs alone"))


@NEAR_TIE
def test_chat_stream_and_non_stream_agree_with_usage(client):
    whole = client.chat.completions.create(model=SMOLLM, messages=HELLO, temperature=0, max_tokens=8)
    chunks = list(client.chat.completions.create(model=SMOLLM, messages=HELLO, temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))

    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert whole.usage.completion_tokens == 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


@NEAR_TIE
def test_chat_matches_the_ollama_api_for_the_same_request(client, native):
    opened = client.chat.completions.create(model=SMOLLM, messages=HELLO, temperature=0, max_tokens=8,
                                            extra_body={"repetition_penalty": 1.5})
    ollama_reply = native.chat(model=SMOLLM, messages=HELLO,
                               options={"temperature": 0, "num_predict": 8, "repeat_penalty": 1.5})
    plain = native.chat(model=SMOLLM, messages=HELLO, options={"temperature": 0, "num_predict": 8})

    assert opened.choices[0].message.content == ollama_reply.message.content != plain.message.content


def test_omitted_fields_keep_the_modelfile_values(client, native):
    native.create(model="smol-cold", from_=SMOLLM, parameters={"temperature": 0, "num_predict": 6})
    first = client.chat.completions.create(model="smol-cold", messages=HELLO, seed=1)
    second = client.chat.completions.create(model="smol-cold", messages=HELLO, seed=2)
    greedy = client.chat.completions.create(model=SMOLLM, messages=HELLO, temperature=0, max_tokens=6)
    overridden = client.chat.completions.create(model="smol-cold", messages=HELLO, max_completion_tokens=3)

    assert first.usage.completion_tokens == 6
    assert first.choices[0].message.content == second.choices[0].message.content == greedy.choices[0].message.content
    assert overridden.usage.completion_tokens == 3


def test_seed_reproduces_a_sampled_reply_and_stop_ends_it(client):
    def sample(seed, **extra):
        return client.chat.completions.create(model=SMOLLM, messages=HELLO, temperature=1.0, max_tokens=12,
                                              seed=seed, **extra).choices[0]

    assert sample(7).message.content == sample(7).message.content
    greedy = client.chat.completions.create(model=SMOLLM, messages=HELLO, temperature=0, max_tokens=12)
    text = greedy.choices[0].message.content
    stop_word = text.split()[2]
    stopped = client.chat.completions.create(model=SMOLLM, messages=HELLO, temperature=0, max_tokens=12,
                                             stop=[stop_word]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stop_word not in stopped.message.content and text.startswith(stopped.message.content)


def test_qwen_extras_top_k_and_min_p_keep_only_the_most_likely_tokens(client):
    def gaps(**extra) -> list[float]:
        """How far below the most likely token each sampled token was (0 = a most likely one)."""
        reply = client.chat.completions.create(model=SMOLLM, messages=HELLO, temperature=1.5, max_tokens=8, seed=3,
                                               logprobs=True, top_logprobs=1, extra_body=extra)
        return [e.top_logprobs[0].logprob - e.logprob for e in reply.choices[0].logprobs.content]

    assert max(gaps()) > 0  # at temperature 1.5 less likely tokens get drawn...
    assert gaps(top_k=1, some_unknown_field={"x": 1}) == [0.0] * 8  # ...but not when one candidate is kept
    assert gaps(min_p=1.0) == [0.0] * 8


def test_logprobs_and_top_logprobs(client):
    reply = client.chat.completions.create(model=SMOLLM, messages=HELLO, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content

    assert len(content) == 6
    assert "".join(entry.token for entry in content).startswith(reply.choices[0].message.content)
    assert all(len(entry.top_logprobs) == 2 for entry in content)
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) for entry in content)


def test_completions_continue_raw_text(client, native):
    prompt = "The capital of France is"
    completion = client.completions.create(model=SMOLLM, prompt=prompt, temperature=0, max_tokens=6, logprobs=2)
    streamed = list(client.completions.create(model=SMOLLM, prompt=prompt, temperature=0, max_tokens=6,
                                              stream=True))
    raw = native.generate(model=SMOLLM, prompt=prompt, raw=True, options={"temperature": 0, "num_predict": 6})

    choice = completion.choices[0]
    assert choice.text == raw.response == "".join(c.choices[0].text for c in streamed if c.choices)
    assert "Paris" in choice.text and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == 6 and "".join(choice.logprobs.tokens) == choice.text
    assert completion.usage.completion_tokens == 6


def test_model_listing_matches_the_ollama_tags(client, native):
    ids = {m.id for m in client.models.list().data}
    tags = {m.model for m in native.list().models}

    assert ids == tags and SMOLLM in ids
    assert client.models.retrieve(SMOLLM).owned_by == "library"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model:1b")


def test_reasoning_content_and_enable_thinking_switch(client, thinking_model):
    question = [{"role": "user", "content": "Is 7 prime?"}]
    thinking = client.chat.completions.create(model=thinking_model, messages=question, temperature=0, max_tokens=8)
    streamed = list(client.chat.completions.create(model=thinking_model, messages=question, temperature=0,
                                                   max_tokens=8, stream=True))
    off = client.chat.completions.create(model=thinking_model, messages=question, temperature=0, max_tokens=8,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    effort_none = client.chat.completions.create(model=thinking_model, messages=question, temperature=0,
                                                 max_tokens=8, reasoning_effort="none")

    message = thinking.choices[0].message.model_dump()
    assert message["reasoning_content"] and message["reasoning"] == message["reasoning_content"]
    deltas = [c.choices[0].delta.model_dump() for c in streamed if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == message["reasoning_content"]
    for reply in (off, effort_none):
        assert "reasoning_content" not in reply.choices[0].message.model_dump()
        assert reply.choices[0].message.content
    assert off.choices[0].message.content == effort_none.choices[0].message.content


def test_thinking_budget_field_reaches_the_engine(client, thinking_model):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=thinking_model, messages=HELLO, max_tokens=8,
                                       extra_body={"thinking_budget": 4})
    # SmolLM2 has no <think> token, so the budget cannot be enforced: the request is refused, not ignored.
    assert "think_budget" in str(error.value) and "<think>" in str(error.value)


def test_tool_call_round_trip_streamed_and_not(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=QWEN_CODER, messages=messages, tools=[WEATHER_TOOL],
                                           tool_choice="required", temperature=0, max_tokens=40)
    streamed = list(client.chat.completions.create(model=QWEN_CODER, messages=messages, tools=[WEATHER_TOOL],
                                                   tool_choice="required", temperature=0, max_tokens=40,
                                                   stream=True))

    choice = first.choices[0]
    call = choice.message.tool_calls[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    deltas = [c.choices[0].delta for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].tool_calls[0].id and deltas[0].tool_calls[0].function.name == "get_weather"
    assert "".join(d.tool_calls[0].function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 22})}]
    answer = client.chat.completions.create(model=QWEN_CODER, messages=messages, tools=[WEATHER_TOOL],
                                            temperature=0, max_tokens=24)
    without_result = client.chat.completions.create(model=QWEN_CODER, messages=messages[:2], tools=[WEATHER_TOOL],
                                                    temperature=0, max_tokens=24)
    assert answer.choices[0].message.content
    assert answer.choices[0].message.content != without_result.choices[0].message.content


def test_named_tool_choice_forces_that_function(client):
    reply = client.chat.completions.create(
        model=QWEN_CODER, messages=[{"role": "user", "content": "Paris, please."}], tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=40)

    assert [call.function.name for call in reply.choices[0].message.tool_calls] == ["get_weather"]
