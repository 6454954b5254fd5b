"""A real `tunelab serve` subprocess on a free loopback port, over a temporary store.

The store holds `smollm2:135m` (fast; most tests) and `qwen2.5-coder:0.5b`
(tool calls), pulled once into the shared test cache store and reused between
runs. Both run in float32 with `num_thread 1`, so batched and one-at-a-time
greedy decoding do the same float operations and give the same tokens (bf16
and int8 kernels pick different blockings for different batch sizes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tunelab.errors import TunelabError
from tunelab.registry.sources import pull
from tunelab.registry.store import Store

SMOLLM = "smollm2:135m"
QWEN_CODER = "qwen2.5-coder:0.5b"
CACHE_HOME = Path(os.environ.get("TUNELAB_TEST_CACHE", Path.home() / ".cache" / "tunelab-test")) / "home"
TEST_PARAMETERS = {"num_thread": 1, "dtype": "float32"}

# A Qwen3-style thinking switch over SmolLM2's ChatML: with thinking on, the prompt opens
# the thought (as Qwen3-Thinking's template does), so the reply starts inside it.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)


def _weights(name: str) -> Path:
    """The GGUF of `name`, pulled into the cache store on first use."""
    cache = Store(CACHE_HOME)
    try:
        return cache.resolve(name).weights_path
    except TunelabError:
        pass
    try:
        return pull(cache, name).weights_path
    except TunelabError as exc:
        pytest.skip(f"{name} is not in the test cache and cannot be pulled here: {exc}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server_home(tmp_path_factory) -> Path:
    """A store with the test models, registered with one CPU thread each."""
    home = tmp_path_factory.mktemp("serve-home")
    store = Store(home)
    for name in (SMOLLM, QWEN_CODER):
        digest = store.add_blob_from_file(_weights(name), link=True)
        store.register_gguf(name, digest, TEST_PARAMETERS)
    return home


def start_server(home: Path, log_path: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """Start `python -m tunelab.server.app` on a free port and wait until it answers."""
    port = _free_port()
    environment = os.environ | {"TUNELAB_HOME": str(home), "TUNELAB_HOST": f"127.0.0.1:{port}",
                                "OMP_NUM_THREADS": "1", "TUNELAB_KEEP_ALIVE": "10m"} | env
    log = open(log_path, "ab")
    process = subprocess.Popen([sys.executable, "-m", "tunelab.server.app"], env=environment,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"tunelab serve exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/api/version", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    stop_server(process)
    raise RuntimeError(f"tunelab serve did not answer on {url}; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def server(server_home, tmp_path_factory) -> str:
    """Base URL of a running server shared by the session's tests."""
    process, url = start_server(server_home, tmp_path_factory.mktemp("serve-log") / "server.log")
    yield url
    stop_server(process)


@pytest.fixture(scope="session")
def thinking_model(server) -> str:
    """SmolLM2 under a thinking-switch template: a model the server treats as able to think."""
    import ollama

    ollama.Client(host=server).create(model="smol-thinker", from_=SMOLLM, template=THINKING_TEMPLATE)
    return "smol-thinker"


@pytest.fixture(scope="session")
def engine_state(server):
    """Reads the loaded model's engine state from `/api/ps` (running, waiting, free and total KV blocks)."""

    def read() -> dict:
        models = httpx.get(server + "/api/ps").json()["models"]
        return models[0]["engine"] if models else {}

    return read


@pytest.fixture(scope="session")
def poll():
    """Polls a predicate until it holds (a liveness bound, not a speed check); returns its value."""

    def wait_until(predicate, timeout: float = 120.0, interval: float = 0.1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            time.sleep(interval)
        raise AssertionError(f"condition not met within {timeout}s")

    return wait_until
