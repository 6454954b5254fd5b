"""Evaluation through the cache, and the A/A control: equal settings under two names are never told apart."""

from tunelab.tune.backends import ScriptedBackend
from tunelab.tune.evaluation import Evaluator
from tunelab.tune.generation_cache import GenerationCache
from tunelab.tune.report import analyse
from tunelab.tune.search_space import Config
from tunelab.tune.statistics import verdict
from tunelab.tune.study import StudyResults, StudySettings, select_tasks
from tunelab.tune.suites import load_suite


def _held_out_arms(tmp_path, first: Config, second: Config, seeds: tuple[int, int], tasks: int, samples: int):
    """Evaluate two arms on held-out tasks through the study's evaluator, each with its own seeds."""
    suite = load_suite("builtin")
    backend, cache = ScriptedBackend(suite), GenerationCache(tmp_path / "generations.db")
    arms = []
    for config, seed in zip((first, second), seeds):
        settings = StudySettings(model="scripted", suite="builtin", held_out_tasks=tasks, seed=seeds[0])
        held_out = select_tasks(settings)[1]
        evaluator = Evaluator(backend, cache, seed=seed, num_predict=256)
        arms.append(evaluator.evaluate(config, held_out, samples))
        evaluator.close()
    return arms


def _results(arms) -> StudyResults:
    return StudyResults(StudySettings(model="scripted", suite="builtin"), "s", [], list(arms[0].scores), [], [], [],
                        arms[0], arms, 4096, 1.0, 0, 0)


def test_a_a_control_is_reported_inconclusive(tmp_path):
    """The same configuration under two names, with independent draws: no significant difference, 19+ of 20."""
    config = {"temperature": 0.5, "top_p": 0.9}
    verdicts = []
    for repeat in range(20):
        arms = _held_out_arms(tmp_path, Config("winner (trial 3)", config), Config("qwen preset", config),
                              (2 * repeat + 1, 2 * repeat + 2), tasks=25, samples=4)
        report = analyse(_results(arms))
        verdicts.append(report.comparisons[0].verdict)
        assert report.recommended.name == "qwen preset"
    assert verdicts.count("inconclusive") >= 19


def test_a_real_gain_is_reported_better_and_recommended(tmp_path):
    good, bad = {"temperature": 0.3}, {"temperature": 1.2}
    arms = _held_out_arms(tmp_path, Config("winner (trial 7)", good), Config("qwen preset", bad), (5, 5),
                          tasks=25, samples=4)
    report = analyse(_results(arms))
    assert verdict(report.comparisons[0].difference) == "better"
    assert report.recommended.knobs == good and "beats Qwen's preset" in report.reason


def test_equal_settings_and_greedy_samples_are_planned_once(tmp_path):
    suite = load_suite("builtin")
    evaluator = Evaluator(ScriptedBackend(suite), GenerationCache(tmp_path / "generations.db"), seed=0, num_predict=256)
    tasks = suite[:10]
    sampled, greedy = Config("winner (trial 3)", {"temperature": 0.5}), Config("greedy", {"temperature": 0.0})
    same_as_winner = Config("qwen preset", {"temperature": 0.5})
    # 4 samples of each task, shared by the two equal arms, plus 1 greedy answer per task.
    assert evaluator.distinct_generations([sampled, greedy, same_as_winner], tasks, samples=4) == 10 * 4 + 10
    evaluator.evaluate_many([sampled, greedy, same_as_winner], tasks, samples=4)
    assert evaluator.cache.count() == 10 * 4 + 10  # and drawing them draws exactly those
    evaluator.close()
