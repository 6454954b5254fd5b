"""How fast the tuner draws and judges answers on this machine, by rows in flight.

    python bench/tune_throughput.py qwen2.5-coder:0.5b --tasks 8 --samples 2 --rows 4 8 16

Each row count runs the same configuration on the same tuning tasks through the
study's evaluator (a fresh cache each time), so the numbers are what a study's
screen would see: generations/s, tokens/s, and the share of answers that passed.
Use it to choose `tunelab tune --rows` and to estimate a study's wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunelab.runtime import open_model
from tunelab.tune.backends import LocalEngineBackend
from tunelab.tune.evaluation import Evaluator
from tunelab.tune.generation_cache import GenerationCache
from tunelab.tune.search_space import QWEN_PRESETS, Config
from tunelab.tune.study import StudySettings, select_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--suite", default="all")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--num-predict", type=int, default=256)
    parser.add_argument("--num-thread", type=int, default=0)
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()

    tasks = select_tasks(StudySettings(model=args.model, suite=args.suite, tuning_tasks=args.tasks,
                                       held_out_tasks=0))[0]
    config = Config("qwen preset", QWEN_PRESETS[False])
    table = Table(title=f"{args.model}: {len(tasks)} tasks x {args.samples} samples, num_predict {args.num_predict}")
    for column in ("rows", "generations/s", "tokens/s", "mean tokens", "pass@1", "wall s"):
        table.add_column(column, justify="right")
    for rows in args.rows:
        runtime = open_model(args.model, options={"num_thread": args.num_thread}, max_num_seqs=rows,
                             start_engine=True, quiet=True)
        with tempfile.TemporaryDirectory() as directory:
            evaluator = Evaluator(LocalEngineBackend(runtime), GenerationCache(Path(directory) / "g.db"), seed=0,
                                  num_predict=args.num_predict)
            started = time.perf_counter()
            arm = evaluator.evaluate(config, tasks, args.samples)
            wall = time.perf_counter() - started
            evaluator.close()
        runtime.close()
        progress = evaluator.progress
        table.add_row(str(rows), f"{progress.generated / wall:.2f}", f"{progress.tokens / wall:.1f}",
                      f"{arm.mean_tokens():.0f}", f"{arm.pass_at_1():.2f}", f"{wall:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
