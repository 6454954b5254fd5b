"""Decode step time with the captured decode plan and without it, alternating in one process.

    python bench/captured_decode.py smollm2:135m --rows 1 16
    python bench/captured_decode.py qwen2.5-coder:0.5b --rows 1

For each row count, that many requests are prefilled, then decode steps run in
alternating blocks with `engine.runner.capture_decode` on and off, so machine
drift hits both sides alike. Prints the median ms per step of each and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

from rich.console import Console
from rich.table import Table

from tunelab.benchmark import _request, _tunelab_runtime, make_spec


def step_times(model: str, rows: int, blocks: int, steps: int) -> dict[bool, float]:
    """Median ms per decode step with capture on (True) and off (False)."""
    spec = make_spec(model)
    engine = _tunelab_runtime(spec, max_num_seqs=rows).engine
    for i in range(rows):
        engine.submit(_request(spec.window(i + 1, spec.prompt_tokens), 1_000_000))
    while engine.num_prefill_tokens_computed < rows * spec.prompt_tokens:
        engine.step()
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(blocks):
        for captured in (True, False):
            engine.runner.capture_decode = captured
            engine.step()  # a plan is captured on its first step
            started = time.perf_counter()
            for _ in range(steps):
                engine.step()
            times[captured].append((time.perf_counter() - started) / steps * 1e3)
    return {captured: statistics.median(values) for captured, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--blocks", type=int, default=6, help="alternations of the two modes")
    parser.add_argument("--steps", type=int, default=20, help="decode steps per block")
    args = parser.parse_args()
    table = Table(title=f"{args.model}: decode ms per step (median)")
    for column in ("rows", "captured", "eager", "eager / captured"):
        table.add_column(column, justify="right")
    for rows in args.rows:
        result = step_times(args.model, rows, args.blocks, args.steps)
        table.add_row(str(rows), f"{result[True]:.2f}", f"{result[False]:.2f}", f"{result[False] / result[True]:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
