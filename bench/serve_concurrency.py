"""Throughput and time to first token of `tunelab serve` at concurrency 1, 4 and 16.

Starts a server on a free loopback port over `$TUNELAB_HOME` (or uses `--url`),
loads the model, then at each concurrency level fires that many streaming
`/api/chat` requests at once (distinct prompts, seeded sampling, a fixed
`num_predict`) and reports aggregate generated tokens per second and time to
first token (min / median / max), with ratios against concurrency 1.

    python bench/serve_concurrency.py                       # qwen2.5-coder:0.5b, 1/4/16, 64 tokens
    python bench/serve_concurrency.py --levels 1,2 --num-predict 8 --model smollm2:135m   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import ollama
from rich.console import Console
from rich.table import Table

TOPICS = ["a linked list", "binary search", "a hash map", "quicksort", "a trie", "an LRU cache", "a heap",
          "Dijkstra's algorithm", "a ring buffer", "a bloom filter", "merge sort", "a stack", "a queue",
          "a union-find", "a B-tree", "a skip list"]


@dataclass
class Level:
    concurrency: int
    num_tokens: int
    seconds: float
    first_token_seconds: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds


async def _one(client: ollama.AsyncClient, model: str, index: int, num_predict: int) -> tuple[int, float]:
    """Stream one request; returns (generated tokens, seconds to the first token)."""
    started = time.perf_counter()
    first = None
    count = 0
    messages = [{"role": "user", "content": f"Explain {TOPICS[index % len(TOPICS)]} in Python."}]
    options = {"temperature": 0.7, "seed": index, "num_predict": num_predict}
    async for chunk in await client.chat(model=model, messages=messages, options=options, stream=True):
        if first is None and (chunk.message.content or chunk.message.thinking):
            first = time.perf_counter() - started
        count = chunk.eval_count or count
    return count, first if first is not None else time.perf_counter() - started


async def _level(url: str, model: str, concurrency: int, num_predict: int) -> Level:
    client = ollama.AsyncClient(host=url)
    started = time.perf_counter()
    results = await asyncio.gather(*(_one(client, model, i, num_predict) for i in range(concurrency)))
    seconds = time.perf_counter() - started
    return Level(concurrency, sum(n for n, _ in results), seconds, [t for _, t in results])


def _start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"TUNELAB_HOST": f"127.0.0.1:{port}"}
    process = subprocess.Popen([sys.executable, "-m", "tunelab.server.app"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/api/version", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the server did not answer on {url}")


def _report(levels: list[Level], model: str, num_predict: int) -> None:
    table = Table(title=f"tunelab serve, {model}, {num_predict} tokens per request")
    for column in ("conc", "tokens", "wall s", "tok/s", "tok/s ÷ c1", "TTFT min", "TTFT med", "TTFT max",
                   "TTFT med ÷ c1"):
        table.add_column(column, justify="right")
    base = levels[0]
    for level in levels:
        ttft = level.first_token_seconds
        table.add_row(str(level.concurrency), str(level.num_tokens), f"{level.seconds:.2f}",
                      f"{level.tokens_per_second:.1f}", f"{level.tokens_per_second / base.tokens_per_second:.2f}",
                      f"{min(ttft):.3f}", f"{statistics.median(ttft):.3f}", f"{max(ttft):.3f}",
                      f"{statistics.median(ttft) / statistics.median(base.first_token_seconds):.2f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder:0.5b")
    parser.add_argument("--levels", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--num-predict", type=int, default=64)
    parser.add_argument("--url", help="an already running server (default: start one over $TUNELAB_HOME)")
    args = parser.parse_args()
    process, url = (None, args.url) if args.url else _start_server()
    try:
        ollama.Client(host=url).generate(model=args.model, prompt="")  # load outside the measurements
        levels = [asyncio.run(_level(url, args.model, int(c), args.num_predict)) for c in args.levels.split(",")]
        _report(levels, args.model, args.num_predict)
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            process.wait()


if __name__ == "__main__":
    main()
