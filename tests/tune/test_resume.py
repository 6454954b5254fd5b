"""Resuming `tunelab tune` after SIGINT and after SIGKILL, through the real command with the scripted backend.

After the rerun the study must hold exactly the requested number of finished
trials, the generation cache must show no generation drawn twice, and every
baseline must score exactly what it scores in an uninterrupted run.
"""

import json
import signal
import subprocess
import sys
import time

import optuna
import pytest

from tunelab.tune.generation_cache import GenerationCache

TRIALS = 8
ARGS = ["tune", "scripted", "--suite", "builtin", "--backend", "scripted:delay=0.25", "--trials", str(TRIALS),
        "--samples", "2", "--tuning-tasks", "4", "--held-out-tasks", "4", "--confirm-top", "2",
        "--confirm-samples", "3", "--held-out-samples", "2"]
STUDY = "scripted builtin seed 0"


def start(out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunelab", *ARGS, "--out", str(out)], cwd=out.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def wait_for_generations(out, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "generations.db").exists() and GenerationCache(out / "generations.db").count() >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"the study never reached {count} generations")


def wait_for_complete_trials(out, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if trial_states(out).count("COMPLETE") >= count:
                return
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"the study never finished {count} trials")


def trial_states(out) -> list[str]:
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")
    return [trial.state.name for trial in study.get_trials(deepcopy=False)]


def baseline_scores(out) -> dict[str, object]:
    results = json.loads((out / "results.json").read_text())
    tuning = {t["baseline"]: t["value"] for t in results["trials"] if t["baseline"]}
    held_out = {arm["name"]: arm["outcomes"] for arm in results["held_out"] if not arm["name"].startswith("winner")}
    return {"tuning": tuning, "held_out": held_out}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "study"
    out.mkdir()
    finish(start(out))
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_an_interrupted_study_resumes_to_the_same_baselines(tmp_path, uninterrupted, signum):
    out = tmp_path / "study"
    out.mkdir()
    process = start(out)
    wait_for_generations(out, 40)  # past the knob probe, in the middle of the screen
    wait_for_complete_trials(out, 5)  # the 4 baselines and a searched point: the rerun must not propose it again
    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == (130 if signum == signal.SIGINT else -signal.SIGKILL), output
    states = trial_states(out)
    assert states.count("COMPLETE") < TRIALS
    if signum == signal.SIGINT:
        assert "RUNNING" not in states and "rerun the same command to resume" in output
    else:
        assert "RUNNING" in states  # killed mid-trial: the rerun must recover these

    finish(start(out))

    states = trial_states(out)
    assert states.count("COMPLETE") == TRIALS and "RUNNING" not in states and "WAITING" not in states
    cache = GenerationCache(out / "generations.db")
    assert cache.generated_more_than_once() == []
    assert baseline_scores(out) == baseline_scores(uninterrupted)
    searched = [json.dumps(t["config"]["knobs"], sort_keys=True)
                for t in json.loads((out / "results.json").read_text())["trials"] if not t["baseline"]]
    assert len(set(searched)) == len(searched)  # the rerun proposed new points, not the first run's again
    if signum == signal.SIGINT:  # both runs recorded their work: the report counts every generation once
        assert json.loads((out / "results.json").read_text())["throughput"]["generated"] == cache.count()


def test_an_uninterrupted_rerun_draws_no_new_generation(tmp_path, uninterrupted):
    before = GenerationCache(uninterrupted / "generations.db").count()
    finish(start(uninterrupted))
    cache = GenerationCache(uninterrupted / "generations.db")
    assert cache.count() == before and cache.generated_more_than_once() == []
    assert json.loads((uninterrupted / "results.json").read_text())["throughput"]["generated"] == before
    assert trial_states(uninterrupted).count("COMPLETE") == TRIALS
