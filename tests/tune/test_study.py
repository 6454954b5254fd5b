"""Studies: search space, baselines, task split, knob probe, the search itself, caching, and the A/A control."""

import optuna
import pytest

from tunelab.errors import InvalidOption
from tunelab.options import OPTION_SPECS
from tunelab.tune.backends import ScriptedBackend
from tunelab.tune.generation_cache import GenerationCache
from tunelab.tune.report import analyse
from tunelab.tune.statistics import verdict
from tunelab.tune.study import (KNOBS, Config, Evaluator, Progress, SearchSpace, StudyResults, StudySettings,
                                TuningStudy, baselines, select_tasks)
from tunelab.tune.suites import DEFAULT_SYSTEM_PROMPT, load_suite

SMALL = dict(model="scripted", suite="builtin", trials=6, samples=2, tuning_tasks=4, held_out_tasks=6,
             confirm_top=2, confirm_samples=3, held_out_samples=2)


def make_study(tmp_path, backend=None, warnings=None, **overrides) -> TuningStudy:
    settings = StudySettings(**{**SMALL, **overrides})
    backend = backend or ScriptedBackend(load_suite("builtin"))
    return TuningStudy(settings, backend, GenerationCache(tmp_path / "generations.db"),
                       f"sqlite:///{tmp_path / 'study.db'}", "study",
                       on_warning=(warnings.append if warnings is not None else lambda text: None))


def test_search_space_reads_toml_then_flags(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text('[search]\ntemperature = [0.1, 0.9]\ntop_k = [5, 50]\nthink = ["off", "on"]\n'
                    'think_budget = 256\n[search.system]\nplain = ""\nterse = "Code only."\n')
    space = SearchSpace.load(path, ranges={"top_k": "1:10"})
    assert space.ranges == {"temperature": (0.1, 0.9), "top_k": (1, 10)}
    assert space.systems == {"plain": "", "terse": "Code only."}
    assert space.think == (False, True) and space.think_budget == 256
    assert SearchSpace.load(ranges={"min_p": "0.05"}).ranges == {"min_p": (0.05, 0.05)}  # one value fixes it
    assert SearchSpace.load(think="both").think == (False, True)
    assert set(SearchSpace.load().ranges) <= set(KNOBS)


@pytest.mark.parametrize("ranges, message", [
    ({"temperature": "0.9:0.1"}, "runs backwards"),
    ({"temperature": "warm"}, "write LOW:HIGH"),
    ({"top_p": "0:2"}, "top_p"),
    ({"min_p": "0:0.1:0.2"}, "write LOW:HIGH"),
])
def test_bad_ranges_raise_a_typed_error_naming_the_fix(ranges, message):
    with pytest.raises(InvalidOption, match=message):
        SearchSpace.load(ranges=ranges)


def test_unknown_toml_keys_and_thinking_words_are_refused(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text("[search]\ntemprature = [0, 1]\n")
    with pytest.raises(InvalidOption, match="unknown key\\(s\\) temprature"):
        SearchSpace.load(path)
    with pytest.raises(InvalidOption, match="use on, off, both or default"):
        SearchSpace.load(think="maybe")


def test_suggestions_stay_in_range_and_baselines_are_clipped_into_the_space():
    space = SearchSpace(ranges={"temperature": (0.0, 0.5), "top_k": (1, 40), "min_p": (0.05, 0.05)},
                        systems={"a": "A", "b": ""}, think=(False, True))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        config = space.suggest(study.ask())
        assert 0.0 <= config.knobs["temperature"] <= 0.5 and 1 <= config.knobs["top_k"] <= 40
        assert config.knobs["min_p"] == 0.05 and config.system in ("A", "") and config.think in (False, True)
    qwen = Config("qwen preset", {"temperature": 0.7, "top_k": 20}, "", True)
    assert space.point(qwen, qwen.knobs) == {"temperature": 0.5, "top_k": 20, "system": "b", "think": True}
    assert space.grid(3) == {"temperature": [0.0, 0.25, 0.5], "top_k": [1, 20, 40], "system": ["a", "b"],
                             "think": [False, True]}


def test_baselines_are_the_documented_presets():
    settings = StudySettings(model="m", suite="builtin", space=SearchSpace(think=(False, True)),
                             modelfile_baseline=Config("your modelfile", {"temperature": 0.1}, "S", None))
    configs = {config.name: config for config in baselines(settings, supports_thinking=True)}
    assert list(configs) == ["model defaults", "ollama defaults", "qwen preset", "qwen preset (thinking)",
                             "greedy", "your modelfile"]
    assert configs["model defaults"].knobs == {}
    assert configs["ollama defaults"].knobs == {name: OPTION_SPECS[name].default for name in KNOBS}
    assert configs["ollama defaults"].knobs["temperature"] == 0.8 and configs["ollama defaults"].knobs["top_k"] == 40
    assert (configs["qwen preset"].knobs["temperature"], configs["qwen preset"].knobs["top_p"]) == (0.7, 0.8)
    assert configs["qwen preset"].think is False and configs["qwen preset (thinking)"].think is True
    assert (configs["qwen preset (thinking)"].knobs["temperature"], configs["qwen preset (thinking)"].knobs["top_p"]) \
        == (0.6, 0.95)
    assert configs["greedy"].knobs == {"temperature": 0.0}
    assert configs["greedy"].system == DEFAULT_SYSTEM_PROMPT


def test_tuning_and_held_out_tasks_never_overlap_and_are_fixed_by_the_seed():
    settings = StudySettings(model="m", suite="all", tuning_tasks=24, held_out_tasks=100)
    tuning, held_out = select_tasks(settings)
    assert (len(tuning), len(held_out)) == (24, 100)
    assert not {t.id for t in tuning} & {t.id for t in held_out}
    assert [t.id for t in select_tasks(settings)[0]] == [t.id for t in tuning]
    other_seed = StudySettings(model="m", suite="all", tuning_tasks=24, held_out_tasks=100, seed=1)
    assert [t.id for t in select_tasks(other_seed)[0]] != [t.id for t in tuning]
    with pytest.raises(InvalidOption, match="lower --held-out-tasks"):
        select_tasks(StudySettings(model="m", suite="builtin", held_out_tasks=1000))


def test_study_runs_the_baselines_first_and_finishes_exactly_the_requested_trials(tmp_path):
    study = make_study(tmp_path)
    results = study.run()
    rows = sorted(results.trials, key=lambda t: t["number"])
    assert len(rows) == 6 and all(t["state"] == "COMPLETE" for t in rows)
    assert [t["baseline"] for t in rows[:4]] == ["model defaults", "ollama defaults", "qwen preset", "greedy"]
    assert rows[2]["config"]["knobs"]["temperature"] == 0.7
    assert all(t["baseline"] is None and t["config"]["name"] == f"trial {t['number']}" for t in rows[4:])
    assert [arm.config.name for arm in results.held_out][1:] == ["model defaults", "ollama defaults",
                                                                  "qwen preset", "greedy"]
    assert results.winner.config.name in {t["config"]["name"] for t in rows}
    assert results.winner.pass_at_1() == max(arm.pass_at_1() for arm in results.confirmed)
    assert all(len(scores) == 3 for scores in results.winner.scores.values())  # confirmation adds samples
    assert study.cache.generated_more_than_once() == []


def test_a_trial_scores_what_the_scripted_model_answers(tmp_path):
    backend = ScriptedBackend(load_suite("builtin"))
    results = make_study(tmp_path, backend).run()
    greedy = next(t for t in results.trials if t["baseline"] == "greedy")
    tuning = [t for t in load_suite("builtin") if t.id in results.tuning_tasks]
    # The scripted answer passes exactly when its draw is under the success chance; greedy has one draw per task.
    from tunelab.tune.backends import _unit
    expected = [float(_unit(f"draw:{t.id}:0:0") < backend.success_chance(t.id, {"temperature": 0.0})) for t in tuning]
    assert greedy["value"] == pytest.approx(sum(expected) / len(expected))


def test_knob_probe_drops_a_knob_the_backend_ignores(tmp_path):
    warnings = []
    backend = ScriptedBackend(load_suite("builtin"), ignored=("top_k",))
    study = make_study(tmp_path, backend, warnings)
    results = study.run()
    assert results.dropped_knobs == ["top_k"]
    assert warnings == ["top_k changed no output of scripted; it is not searched"]
    assert all("top_k" not in t["params"] for t in results.trials if t["baseline"] is None)


def test_rerun_draws_nothing_new_and_a_greedy_arm_is_one_generation_per_task(tmp_path):
    make_study(tmp_path).run()
    rerun = make_study(tmp_path)
    results = rerun.run()
    assert rerun.progress.generated == 0 and rerun.progress.cached > 0
    greedy = next(arm for arm in results.held_out if arm.config.name == "greedy")
    assert all(len(set(map(repr, scores))) == 1 for scores in greedy.scores.values())


def test_more_trials_extend_a_study_but_other_settings_are_refused(tmp_path):
    make_study(tmp_path).run()
    extended = make_study(tmp_path, trials=8)
    assert len(extended.run().trials) == 8
    with pytest.raises(InvalidOption, match="started with other settings \\(samples\\)"):
        make_study(tmp_path, samples=3)


def _held_out_arms(tmp_path, first: Config, second: Config, seeds: tuple[int, int], tasks: int, samples: int):
    """Evaluate two arms on held-out tasks through the study's evaluator, each with its own seeds."""
    suite = load_suite("builtin")
    backend, cache = ScriptedBackend(suite), GenerationCache(tmp_path / "generations.db")
    arms = []
    for config, seed in zip((first, second), seeds):
        settings = StudySettings(model="scripted", suite="builtin", held_out_tasks=tasks, seed=seeds[0])
        held_out = select_tasks(settings)[1]
        evaluator = Evaluator(backend, cache, StudySettings(model="scripted", suite="builtin", seed=seed), Progress())
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
