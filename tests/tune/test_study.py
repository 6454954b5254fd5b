"""Studies: the task split, baselines first, exact trial counts, the knob probe, caching and reruns."""

import pytest

from tunelab.errors import InvalidOption
from tunelab.tune.backends import ScriptedBackend
from tunelab.tune.generation_cache import GenerationCache, GenerationKey
from tunelab.tune.study import StudySettings, TuningStudy, select_tasks
from tunelab.tune.suites import load_suite

SMALL = dict(model="scripted", suite="builtin", trials=6, samples=2, tuning_tasks=4, held_out_tasks=6,
             confirm_top=2, confirm_samples=3, held_out_samples=2)


def make_study(tmp_path, backend=None, warnings=None, timeout_s=None, **overrides) -> TuningStudy:
    settings = StudySettings(**{**SMALL, **overrides})
    backend = backend or ScriptedBackend(load_suite("builtin"))
    return TuningStudy(settings, backend, GenerationCache(tmp_path / "generations.db"),
                       f"sqlite:///{tmp_path / 'study.db'}", "study", timeout_s=timeout_s,
                       on_warning=(warnings.append if warnings is not None else lambda text: None))


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
    expected = [backend.passes(GenerationKey("", t.id, 0, 0), {"temperature": 0.0}) for t in tuning]
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


def test_timeout_stops_starting_trials_and_the_rerun_continues(tmp_path):
    with pytest.raises(InvalidOption, match="no trial finished before --timeout ran out"):
        make_study(tmp_path, timeout_s=1e-9).run()
    assert len(make_study(tmp_path).run().trials) == 6
