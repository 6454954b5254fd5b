"""Statistics for comparing configurations: paired bootstrap on pass@1, Wilson intervals on rates.

A difference between two configurations is only claimed when its 95 % interval
excludes zero; otherwise the verdict is "inconclusive".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from tunelab.errors import InvalidRequest

_CHUNK = 1000  # bootstrap resamples drawn at once, to bound memory on large suites


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval."""

    estimate: float
    low: float
    high: float


def pass_at_1_difference(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]],
                         confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Interval:
    """Paired bootstrap interval of pass@1(a) - pass@1(b) over the same tasks.

    Each argument maps a task id to that task's per-sample outcomes (1/True = passed). Tasks are
    resampled with replacement, keeping each task's two arms together; a task counts by its mean.
    """
    if a.keys() != b.keys():
        only_a, only_b = len(a.keys() - b.keys()), len(b.keys() - a.keys())
        raise InvalidRequest(f"the configurations were scored on different tasks ({only_a} only in the first, "
                             f"{only_b} only in the second); compare runs over the same tasks")
    if not a or any(len(a[t]) == 0 or len(b[t]) == 0 for t in a):
        raise InvalidRequest("every task needs at least one sample in both configurations; score them first")
    per_task = np.array([np.mean(a[t]) - np.mean(b[t]) for t in sorted(a)], dtype=np.float64)  # [T]
    rng = np.random.default_rng(seed)
    means = np.concatenate([
        per_task[rng.integers(0, len(per_task), size=(min(_CHUNK, resamples - done), len(per_task)))].mean(axis=1)
        for done in range(0, resamples, _CHUNK)
    ])  # [resamples]
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(per_task.mean()), float(low), float(high))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a rate of `successes` in `n` trials (n = 0 gives the whole [0, 1])."""
    if not 0 <= successes <= n:
        raise InvalidRequest(f"a rate needs 0 <= count <= trials, got {successes} of {n}")
    if n == 0:
        return Interval(0.0, 0.0, 1.0)
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2)
    p = successes / n
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else center - half_width  # exact ends, free of rounding
    high = 1.0 if successes == n else center + half_width
    return Interval(p, low, high)


def verdict(difference: Interval) -> str:
    """"better" or "worse" when the interval excludes zero, else "inconclusive"."""
    if difference.low > 0:
        return "better"
    if difference.high < 0:
        return "worse"
    return "inconclusive"
