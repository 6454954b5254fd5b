"""Continuous batching behind the server: many clients at once, clients that vanish, model switches.

The server runs its models with one CPU thread, so a sequence decoded in a
batch does exactly the arithmetic it does alone: outputs must be identical.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import httpx
import ollama
import pytest

SMOLLM = "smollm2:135m"
QWEN_CODER = "qwen2.5-coder:0.5b"
TOPICS = ["cats", "rivers", "bread", "chess", "rain", "trains", "music", "stars",
          "apples", "boats", "snow", "clocks", "bees", "maps", "tea", "kites"]


def _options(i: int) -> dict:
    """Sixteen different option sets: greedy rows, and sampled rows with their own knobs and seeds."""
    if i % 4 == 0:
        return {"temperature": 0, "num_predict": 12}
    return {"temperature": 0.5 + 0.1 * i, "top_k": 10 + i, "top_p": 0.8 + 0.01 * i, "seed": 100 + i,
            "repeat_penalty": 1.0 + 0.02 * i, "num_predict": 6 + i}


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write one sentence about {TOPICS[i]}."}]


class _MaxRunning(threading.Thread):
    """Watches the engine while a test runs and records the most sequences it decoded together."""

    def __init__(self, read_state):
        super().__init__(daemon=True)
        self.read_state, self.most, self.done = read_state, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.most = max(self.most, self.read_state().get("running", 0))
            time.sleep(0.02)


def test_sixteen_simultaneous_streams_complete_and_equal_their_solo_runs(server, engine_state):
    async def stream(client: ollama.AsyncClient, i: int) -> tuple[str, int]:
        text, count = "", 0
        async for chunk in await client.chat(model=SMOLLM, messages=_messages(i), options=_options(i), stream=True):
            text += chunk.message.content
            count = chunk.eval_count or count
        return text, count

    async def all_at_once():
        client = ollama.AsyncClient(host=server)
        return await asyncio.gather(*(stream(client, i) for i in range(16)))

    ollama.Client(host=server).generate(model=SMOLLM, prompt="")  # load before the clock starts
    watcher = _MaxRunning(engine_state)
    watcher.start()
    together = asyncio.run(all_at_once())
    watcher.done.set()
    client = ollama.Client(host=server)
    alone = [client.chat(model=SMOLLM, messages=_messages(i), options=_options(i)) for i in range(16)]

    assert watcher.most > 1  # the requests really shared decode steps
    for i, ((text, count), solo) in enumerate(zip(together, alone)):
        assert count == solo.eval_count == _options(i)["num_predict"] or solo.done_reason == "stop"
        assert text == solo.message.content, f"request {i} ({_options(i)}) differs when batched"


_KILLABLE_CLIENT = """
import sys, ollama
for chunk in ollama.Client(host=sys.argv[1]).chat(model=sys.argv[2], stream=True,
        messages=[{"role": "user", "content": "Tell me a very long story."}],
        options={"temperature": 0, "num_predict": 4000}):
    print(chunk.message.content, flush=True)
"""


def test_killed_client_frees_its_sequence_and_others_are_unaffected(server, engine_state, poll):
    client = ollama.Client(host=server)
    others = [_messages(i) for i in range(3)]
    expected = [client.chat(model=SMOLLM, messages=m, options={"temperature": 0, "num_predict": 24}).message.content
                for m in others]

    doomed = subprocess.Popen([sys.executable, "-c", _KILLABLE_CLIENT, server, SMOLLM], stdout=subprocess.PIPE,
                              text=True)
    for _ in range(3):
        doomed.stdout.readline()  # it is streaming now
    results: list[str | None] = [None] * len(others)

    def run(i: int):
        results[i] = "".join(chunk.message.content for chunk in client.chat(
            model=SMOLLM, messages=others[i], options={"temperature": 0, "num_predict": 24}, stream=True))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(others))]
    for thread in threads:
        thread.start()
    poll(lambda: engine_state()["running"] >= 2)
    doomed.kill()
    doomed.wait()
    for thread in threads:
        thread.join()

    # Unless cancelled, the killed client's 4000-token request would keep decoding for minutes.
    state = poll(lambda: (s := engine_state())["running"] == 0 and s["waiting"] == 0 and s)
    assert state["free_blocks"] == state["total_blocks"] and state["active_requests"] == 0
    assert results == expected


def test_client_that_gives_up_on_a_non_streamed_reply_cancels_it(server, engine_state, poll):
    ollama.Client(host=server).generate(model=SMOLLM, prompt="")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/api/generate", timeout=3, json={
            "model": SMOLLM, "prompt": "Tell me a very long story.", "stream": False,
            "options": {"temperature": 0, "num_predict": 4000}})

    state = poll(lambda: (s := engine_state())["running"] == 0 and s["waiting"] == 0 and s)
    assert state["free_blocks"] == state["total_blocks"]


def test_request_for_another_model_waits_for_running_requests_then_evicts(server):
    client = ollama.Client(host=server)
    options = {"temperature": 0, "num_predict": 40}
    expected = client.chat(model=SMOLLM, messages=_messages(0), options=options).message.content
    finished: dict[str, float] = {}
    texts: list[str] = []

    def other_model():
        client.chat(model=QWEN_CODER, messages=_messages(1), options={"temperature": 0, "num_predict": 4})
        finished["other"] = time.monotonic()

    stream = client.chat(model=SMOLLM, messages=_messages(0), options=options, stream=True)
    texts.append(next(stream).message.content)
    switcher = threading.Thread(target=other_model)
    switcher.start()
    texts += [chunk.message.content for chunk in stream]
    finished["first"] = time.monotonic()
    switcher.join()

    assert "".join(texts) == expected  # the running request was not cut off by the switch
    assert finished["first"] < finished["other"]
    assert [m.model for m in client.ps().models] == [QWEN_CODER]
