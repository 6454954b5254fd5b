"""Statistics: Wilson intervals by hand, the paired bootstrap, and an A/A control."""

import numpy as np
import pytest

from tunelab.errors import InvalidRequest
from tunelab.tune.statistics import Interval, pass_at_1_difference, verdict, wilson_interval


@pytest.mark.parametrize("successes, n, low, high", [
    (0, 10, 0.0, 0.277533),  # roots of (p_hat - p)^2 = z^2 p (1 - p) / n, z = 1.959964
    (5, 10, 0.236593, 0.763407),
    (10, 10, 0.722467, 1.0),
    (1, 20, 0.008881, 0.236131),
    (50, 100, 0.403832, 0.596168),
])
def test_wilson_interval_hand_values(successes, n, low, high):
    interval = wilson_interval(successes, n)
    assert interval.estimate == successes / n
    assert (interval.low, interval.high) == (pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6))


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == Interval(0.0, 0.0, 1.0)
    assert wilson_interval(3, 10, confidence=0.99).high > wilson_interval(3, 10).high
    with pytest.raises(InvalidRequest, match="0 <= count <= trials"):
        wilson_interval(11, 10)


def test_verdict_reads_the_interval():
    assert verdict(Interval(0.05, 0.01, 0.09)) == "better"
    assert verdict(Interval(-0.05, -0.09, -0.01)) == "worse"
    assert verdict(Interval(0.02, -0.01, 0.05)) == "inconclusive"
    assert verdict(Interval(0.0, 0.0, 0.0)) == "inconclusive"


def test_paired_difference_of_identical_runs_is_exactly_zero():
    runs = {"t1": [1, 0, 1], "t2": [0, 0, 0], "t3": [1, 1, 1]}
    assert pass_at_1_difference(runs, dict(runs)) == Interval(0.0, 0.0, 0.0)


def test_paired_difference_estimate_is_the_mean_of_per_task_differences():
    a = {"t1": [1, 1], "t2": [1, 0], "t3": [0, 0], "t4": [True, True]}
    b = {"t1": [0, 0], "t2": [0, 0], "t3": [0, 1], "t4": [True, False]}
    interval = pass_at_1_difference(a, b)
    assert interval.estimate == pytest.approx((1.0 + 0.5 - 0.5 + 0.5) / 4)
    assert -0.5 <= interval.low <= interval.estimate <= interval.high <= 1.0
    assert pass_at_1_difference(a, b) == interval  # seeded


def test_a_uniform_gain_is_better_and_a_uniform_loss_worse():
    a = {f"t{i}": [1, 1, 1, 1] for i in range(20)}
    b = {f"t{i}": [1, 0, 1, 0] for i in range(20)}
    assert verdict(pass_at_1_difference(a, b)) == "better"
    assert verdict(pass_at_1_difference(b, a)) == "worse"


def test_paired_difference_needs_the_same_tasks_with_samples():
    with pytest.raises(InvalidRequest, match="different tasks \\(1 only in the first, 0 only in the second\\)"):
        pass_at_1_difference({"t1": [1], "t2": [0]}, {"t1": [1]})
    with pytest.raises(InvalidRequest, match="at least one sample"):
        pass_at_1_difference({"t1": []}, {"t1": [1]})


class ScriptedBackend:
    """A model stand-in: each task has a fixed chance to be solved under a configuration, and each
    configuration name draws its own samples, as two arms of a study would."""

    def __init__(self, num_tasks: int, seed: int):
        self.solve_rate = np.random.default_rng(seed).uniform(0.0, 1.0, size=num_tasks)  # [T]

    def outcomes(self, config_name: str, samples: int, repeat: int, gain: float = 0.0) -> dict[str, list[bool]]:
        rng = np.random.default_rng([repeat, *config_name.encode()])
        rate = np.clip(self.solve_rate + gain, 0.0, 1.0)
        draws = rng.random((len(rate), samples)) < rate[:, None]  # [T, S]
        return {f"task{t}": list(row) for t, row in enumerate(draws)}


def _verdicts(backend, repeats, gain=0.0, samples=4):
    return [verdict(pass_at_1_difference(backend.outcomes("tuned", samples, r, gain),
                                         backend.outcomes("baseline", samples, r),
                                         resamples=2000, seed=r))
            for r in range(repeats)]


def test_a_a_control_is_inconclusive():
    # The same configuration under two names (goal 1c: no significant difference in >= 95% of 20 repeats).
    backend = ScriptedBackend(num_tasks=100, seed=0)
    assert _verdicts(backend, repeats=20).count("inconclusive") >= 19


def test_a_a_false_alarm_rate_is_close_to_the_nominal_five_percent():
    backend = ScriptedBackend(num_tasks=100, seed=1)
    verdicts = _verdicts(backend, repeats=400)
    assert 0.93 <= verdicts.count("inconclusive") / len(verdicts) <= 0.97


def test_a_real_gain_is_detected():
    backend = ScriptedBackend(num_tasks=100, seed=2)
    assert _verdicts(backend, repeats=20, gain=0.15).count("better") >= 19
