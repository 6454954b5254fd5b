"""Bad requests get the right 4xx with a message naming the problem, and the server keeps serving."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest

SMOLLM = "smollm2:135m"
CHAT = {"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}], "stream": False,
        "options": {"temperature": 0, "num_predict": 4}}
OPENAI_CHAT = {"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

CASES = [
    # (method, path, body or raw text, status, words the message must contain)
    ("POST", "/api/chat", '{"model": "smollm2:135m", "messages": [', 400, ["not valid JSON"]),
    ("POST", "/v1/chat/completions", "{not json", 400, ["not valid JSON"]),
    ("POST", "/api/chat", "", 400, ["body"]),
    ("POST", "/api/chat", CHAT | {"messages": "hi"}, 400, ["messages"]),
    ("POST", "/api/chat", CHAT | {"messages": [{"role": "user", "content": 5}]}, 400, ["messages.0.content"]),
    ("POST", "/api/chat", CHAT | {"options": {"temperature": "hot"}}, 400, ["temperature"]),
    ("POST", "/api/generate", {"model": SMOLLM, "prompt": "x", "options": {"num_predict": -5}}, 400,
     ["num_predict"]),
    ("POST", "/api/chat", CHAT | {"think": "sometimes"}, 400, ["think"]),
    ("POST", "/api/chat", CHAT | {"keep_alive": "soon"}, 400, ["keep_alive"]),
    ("POST", "/api/chat", CHAT | {"think": True}, 400, ["think"]),
    ("POST", "/api/chat", CHAT | {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, ["tools"]),
    ("POST", "/api/chat", CHAT | {"format": "xml"}, 400, ["format"]),
    ("POST", "/api/generate", {"model": SMOLLM, "prompt": "x", "raw": True, "system": "s"}, 400, ["raw"]),
    ("POST", "/api/chat", {"messages": []}, 400, ["model"]),
    ("POST", "/api/chat", CHAT | {"model": "no-such-model:1b"}, 404, ["no-such-model"]),
    ("POST", "/api/chat", CHAT | {"model": "bad name!"}, 400, ["name"]),
    ("POST", "/api/show", {"model": "no-such-model:1b"}, 404, ["no-such-model"]),
    ("POST", "/api/copy", {"source": "no-such-model:1b", "destination": "x"}, 404, ["no-such-model"]),
    ("POST", "/api/create", {"model": "x", "from": "/no/such/file.gguf"}, 400, ["/no/such/file.gguf"]),
    ("POST", "/api/blobs/sha256:" + "0" * 64, "not the content of that digest", 400, ["digest"]),
    ("POST", "/v1/chat/completions", OPENAI_CHAT | {"temperature": "hot"}, 400, ["temperature"]),
    ("POST", "/v1/chat/completions", OPENAI_CHAT | {"max_tokens": -1}, 400, ["max_tokens"]),
    ("POST", "/v1/chat/completions", OPENAI_CHAT | {"messages": []}, 400, ["messages"]),
    ("POST", "/v1/chat/completions", OPENAI_CHAT | {"n": 2}, 400, ["n must be 1"]),
    ("POST", "/v1/chat/completions", OPENAI_CHAT | {"reasoning_effort": "lots"}, 400, ["reasoning_effort"]),
    ("POST", "/v1/chat/completions", OPENAI_CHAT | {"top_logprobs": 2}, 400, ["logprobs"]),
    ("POST", "/v1/chat/completions", OPENAI_CHAT | {"model": "no-such-model:1b"}, 404, ["no-such-model"]),
    ("POST", "/v1/completions", {"model": SMOLLM, "prompt": ["a", "b"]}, 400, ["prompt"]),
]


@pytest.mark.parametrize("method, path, body, status, words", CASES,
                         ids=[f"{path}-{i}" for i, (_, path, *_) in enumerate(CASES)])
def test_bad_request_gets_a_4xx_naming_the_problem(server, method, path, body, status, words):
    content = body if isinstance(body, str) else None
    response = httpx.request(method, server + path, content=content, json=None if content is not None else body,
                             timeout=60)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    message = error["message"] if path.startswith("/v1/") else error
    for word in words:
        assert word in message, message
    if path.startswith("/v1/"):
        assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_prompt_longer_than_the_context_is_refused_on_both_apis(server):
    long_prompt = "word " * 5000  # more tokens than smollm2's num_ctx of 4096
    native = httpx.post(server + "/api/generate", json={"model": SMOLLM, "prompt": long_prompt, "stream": False},
                        timeout=60)
    with pytest.raises(openai.BadRequestError) as opened:
        openai.OpenAI(base_url=server + "/v1", api_key="unused").chat.completions.create(
            model=SMOLLM, messages=[{"role": "user", "content": long_prompt}])

    assert native.status_code == 400 and "num_ctx" in native.json()["error"]
    assert "num_ctx" in str(opened.value)


def test_error_status_reaches_the_official_clients(server):
    with pytest.raises(ollama.ResponseError) as missing:
        ollama.Client(host=server).chat(model="no-such-model:1b", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.error


def test_server_keeps_serving_after_bad_requests(server):
    for method, path, body, *_ in CASES:
        httpx.request(method, server + path, content=body if isinstance(body, str) else None,
                      json=None if isinstance(body, str) else body, timeout=60)
    reply = httpx.post(server + "/api/chat", json=CHAT, timeout=60)

    assert reply.status_code == 200 and reply.json()["done"] is True
    assert httpx.get(server + "/api/ps").json()["models"][0]["engine"]["running"] == 0
