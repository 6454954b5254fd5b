"""Decode step time with the bfloat16 KV cache (auto) and the 8-bit one (q8_0), alternating in one process.

    python bench/kv_cache_types.py smollm2:135m --context 200 3000 --rows 1 16
    python bench/kv_cache_types.py qwen2.5-coder:0.5b --context 3000 --rows 1

For each context length and row count, one engine per cache type is loaded and that many requests of
`context` prompt tokens are prefilled on each; then decode steps run in alternating blocks on the two
engines, so machine drift hits both alike. Prints the median ms per step of each, the ratio, and the
memory the KV pool holds per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from rich.console import Console
from rich.table import Table

from tunelab.benchmark import _request, _tunelab_runtime, make_spec

TYPES = ("auto", "q8_0")


def pool_bytes_per_token(engine) -> float:
    cache = engine.kv_cache
    return cache.nbytes / (cache.num_blocks * cache.block_size)


def step_times(model: str, context: int, rows: int, blocks: int, steps: int) -> dict[str, tuple[float, float]]:
    """Per cache type: (median ms per decode step, KV bytes per token)."""
    spec = make_spec(model)
    prompt = spec.token_ids * (context // len(spec.token_ids) + 2)  # the bench's text, repeated
    engines = {}
    for kind in TYPES:
        kind_spec = dataclasses.replace(spec, kv_cache_type=kind, token_ids=prompt, prompt_tokens=context)
        engine = _tunelab_runtime(kind_spec, max_num_seqs=rows).engine
        for i in range(rows):  # enough new tokens for every block: the requests never finish here
            engine.submit(_request(kind_spec.window(i + 1, context), 1_000_000))
        while engine.num_prefill_tokens_computed < rows * context:
            engine.step()
        engine.step()  # the plan for this batch size is captured on its first step
        engines[kind] = engine
    times: dict[str, list[float]] = {kind: [] for kind in TYPES}
    for _ in range(blocks):
        for kind, engine in engines.items():
            started = time.perf_counter()
            for _ in range(steps):
                engine.step()
            times[kind].append((time.perf_counter() - started) / steps * 1e3)
    return {kind: (statistics.median(times[kind]), pool_bytes_per_token(engines[kind])) for kind in TYPES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--context", type=int, nargs="+", default=[200, 3000], help="prompt tokens per request")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--blocks", type=int, default=5, help="alternations of the two engines")
    parser.add_argument("--steps", type=int, default=10, help="decode steps per block")
    args = parser.parse_args()
    table = Table(title=f"{args.model}: decode ms per step (median), KV cache auto vs q8_0")
    for column in ("context", "rows", "auto ms", "q8_0 ms", "auto / q8_0", "KV bytes/token auto", "q8_0"):
        table.add_column(column, justify="right")
    for context in args.context:
        for rows in args.rows:
            result = step_times(args.model, context, rows, args.blocks, args.steps)
            (auto_ms, auto_bytes), (q8_ms, q8_bytes) = result["auto"], result["q8_0"]
            table.add_row(str(context), str(rows), f"{auto_ms:.2f}", f"{q8_ms:.2f}", f"{auto_ms / q8_ms:.2f}x",
                          f"{auto_bytes:,.0f}", f"{q8_bytes:,.0f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
