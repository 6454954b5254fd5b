"""`tunelab bench`: load time, prefill and decode speed, memory and concurrency, next to other engines."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tunelab.benchmark import ENGINES, EngineResult, make_spec, run_benchmark, summary
from tunelab.cli import app, console
from tunelab.errors import InvalidOption
from tunelab.model.kv_cache import KV_CACHE_TYPES


@app.command()
def bench(
    model: str = typer.Argument(..., help="a model name from the store, or a path to a GGUF file or HF directory"),
    prompt_tokens: int = typer.Option(200, help="prompt length of the single-stream runs"),
    gen_tokens: int = typer.Option(128, help="tokens generated per run (greedy, EOS ignored)"),
    runs: int = typer.Option(5, help="measured runs per engine, after one warm-up run"),
    compare: list[str] = typer.Option([], help="also run llama.cpp and/or transformers (repeatable)"),
    dtype: str = typer.Option("auto", help="tunelab's weights: auto, float32, bfloat16, int8, int4"),
    num_thread: int = typer.Option(0, help="threads for every engine (0 = every core)"),
    kv_cache_type: str = typer.Option("auto", help="tunelab's KV cache: auto or q8_0 (llama.cpp's stays f16)"),
    shared_samples: int = typer.Option(16, help="samples of one prompt in the prefix-sharing run"),
    shared_prompt_tokens: int = typer.Option(300, help="prompt length of the prefix-sharing run"),
    json_out: Path = typer.Option(None, "--json", help="also write the raw results here"),
):
    """Measure a model: load time, TTFT, prefill and decode tok/s, peak RSS, concurrency 1/4/16, prefix sharing."""
    unknown = [engine for engine in compare if engine not in ENGINES[1:]]
    if unknown:
        raise InvalidOption(f"--compare {unknown[0]} is not an engine tunelab can run; use llama.cpp or transformers")
    if min(prompt_tokens, gen_tokens, runs) < 2:
        raise InvalidOption("--prompt-tokens, --gen-tokens and --runs must each be at least 2")
    if kv_cache_type not in KV_CACHE_TYPES:
        raise InvalidOption(f"--kv-cache-type {kv_cache_type} is not one of {', '.join(KV_CACHE_TYPES)}")
    spec = make_spec(model, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, runs=runs, dtype=dtype,
                     num_thread=num_thread, kv_cache_type=kv_cache_type, shared_samples=shared_samples,
                     shared_prompt_tokens=shared_prompt_tokens)
    with console.status("benchmarking") as status:
        results = run_benchmark(spec, tuple(dict.fromkeys(compare)),
                                on_start=lambda kind: status.update(f"running {kind} (one engine at a time)"))
    out = console if console.is_terminal else Console(width=150)  # a log or a pasted note has room for the tables
    out.print(single_stream_table(results, spec.prompt_tokens, spec.gen_tokens))
    out.print(concurrency_table(results["tunelab"]))
    out.print(prefix_sharing_table(results["tunelab"]))
    if json_out is not None:
        json_out.write_text(json.dumps({name: asdict(result) for name, result in results.items()}, indent=2))


def _spread(values: list[float], digits: int = 1) -> str:
    s = summary(values)
    return f"{s['min']:.{digits}f} / {s['median']:.{digits}f} / {s['max']:.{digits}f}"


def single_stream_table(results: dict[str, EngineResult], prompt_tokens: int, gen_tokens: int) -> Table:
    """One row per engine, then one ratio row (tunelab / engine) per compared engine."""
    table = Table(title=f"single stream: {prompt_tokens}-token prompt, {gen_tokens} tokens (min / median / max)")
    for column in ("engine", "load s", "TTFT s", "prefill tok/s", "decode tok/s", "peak RSS MiB",
                   "same tokens", "setup"):
        table.add_column(column, justify="left" if column in ("engine", "setup") else "right")
    ours = results["tunelab"]
    for name, result in results.items():
        table.add_row(name, f"{result.load_s:.2f}", _spread(result.ttft_s, 3), _spread(result.prefill_tps),
                      _spread(result.decode_tps), f"{result.peak_rss_mib:.0f}",
                      "-" if name == "tunelab" else f"{_agreeing_prefix(ours.tokens, result.tokens)}/{gen_tokens}",
                      result.detail)
    for name, result in results.items():
        if name == "tunelab":
            continue
        median = lambda values: summary(values)["median"]  # noqa: E731
        table.add_row(f"tunelab / {name}", f"{ours.load_s / result.load_s:.2f}x",
                      f"{median(ours.ttft_s) / median(result.ttft_s):.2f}x",
                      f"{median(ours.prefill_tps) / median(result.prefill_tps):.2f}x",
                      f"{median(ours.decode_tps) / median(result.decode_tps):.2f}x",
                      f"{ours.peak_rss_mib / result.peak_rss_mib:.2f}x", "", "medians", style="bold")
    return table


def concurrency_table(result: EngineResult) -> Table:
    """Aggregate tok/s with N requests in flight, against tunelab's own one-request decode."""
    table = Table(title="tunelab: requests in flight (distinct prompts)")
    for column in ("requests", "aggregate decode tok/s", "x batch-1 decode", "end-to-end tok/s"):
        table.add_column(column, justify="right")
    single = summary(result.decode_tps)["median"]
    for num, decode in result.aggregate_decode_tps.items():
        table.add_row(str(num), f"{decode:.1f}", f"{decode / single:.2f}x", f"{result.aggregate_e2e_tps[num]:.1f}")
    return table


def prefix_sharing_table(result: EngineResult) -> Table:
    """How much prompt work N samples of one prompt cost."""
    shared = result.shared_prefix
    table = Table(title="tunelab: samples of one prompt (prefix sharing)")
    for column in ("samples", "prompt tokens", "prefill tokens computed", "without sharing", "seconds"):
        table.add_column(column, justify="right")
    table.add_row(str(shared["samples"]), str(shared["prompt_tokens"]), str(shared["prefill_tokens_computed"]),
                  str(shared["unshared_prefill_tokens"]), f"{shared['seconds']:.1f}")
    return table


def _agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two engines share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count
