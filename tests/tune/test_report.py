"""The report: recommendation rules, failure rates, JSON, markdown/HTML with plots, Modelfile and aider entry."""

import json

import pytest
import yaml
from rich.console import Console

from tunelab.generation import prepare_chat
from tunelab.registry.modelfile import parse_modelfile
from tunelab.registry.store import Store
from tunelab.runtime import open_model
from tunelab.tune.report import (SCHEMA_VERSION, aider_settings, analyse, failure_rates, modelfile_text, print_report,
                                 results_json, tuned_name, write_report)
from tunelab.tune.scoring import Score
from tunelab.tune.statistics import wilson_interval
from tunelab.tune.evaluation import ArmResult
from tunelab.tune.search_space import Config
from tunelab.tune.study import StudyResults, StudySettings

TUNED = Config("trial 7", {"temperature": 0.2, "top_p": 0.85, "top_k": 30}, "Be brief.", None)
QWEN = Config("qwen preset", {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}, "", None)


def score(task_id: str, outcome: str = "passed", runaway=False, loop=False, off_script="", tokens=10) -> Score:
    return Score(task_id, outcome, "", runaway, loop, False, off_script, tokens, 0.5)


def arm(config: Config, passes: list[list[bool]], params_hash: str | None = None) -> ArmResult:
    scores = {f"t{i}": [score(f"t{i}", "passed" if p else "assertion_failure") for p in row]
              for i, row in enumerate(passes)}
    return ArmResult(config, params_hash or config.name, scores)


def results(held_out: list[ArmResult]) -> StudyResults:
    trials = [{"number": n, "state": "COMPLETE", "value": v, "params": {"temperature": t, "top_p": 0.9},
               "config": {"name": f"trial {n}", "knobs": {"temperature": t}}, "mean_tokens": 100.0 + 10 * n,
               "mean_latency_s": 1.0 + n, "failures": {}, "worker": "w", "baseline": None if n else "greedy"}
              for n, (v, t) in enumerate([(0.5, 0.0), (0.625, 0.4), (0.25, 1.1)])]
    winner = ArmResult(TUNED, "w", held_out[0].scores)
    return StudyResults(StudySettings(model="qwen2.5-coder:0.5b", suite="all"), "study", ["a", "b"],
                        list(held_out[0].scores), [], trials, [winner], winner, held_out, 8192, 120.0, 48, 4800)


def test_a_significant_win_over_the_vendor_preset_is_recommended():
    report = analyse(results([arm(TUNED, [[True] * 4] * 30), arm(QWEN, [[True, False] * 2] * 30)]))
    assert report.comparisons[0].verdict == "better"
    assert report.comparisons[0].difference.estimate == pytest.approx(0.5)
    assert report.recommended.knobs == TUNED.knobs and report.recommended.system == "Be brief."
    assert "beats Qwen's preset on held-out tasks by +50.0 points" in report.reason


def test_an_interval_crossing_zero_is_inconclusive_and_keeps_the_vendor_preset():
    report = analyse(results([arm(TUNED, [[True, False]] * 10 + [[True, True]] * 2 + [[False, False]]),
                              arm(QWEN, [[True, False]] * 13)]))
    difference = report.comparisons[0].difference
    assert difference.low < 0 < difference.high and report.comparisons[0].verdict == "inconclusive"
    assert report.recommended == QWEN
    assert "not significantly better than Qwen's preset" in report.reason and "inconclusive" in report.reason


def test_a_winner_that_is_the_vendor_preset_is_said_so():
    same = arm(QWEN, [[True, False]] * 5, params_hash="h")
    report = analyse(results([ArmResult(Config("winner (qwen preset)", QWEN.knobs), "h", same.scores), same]))
    assert report.comparisons[0].same_config and report.recommended == QWEN
    assert "is Qwen's preset itself" in report.reason


def test_failure_rates_count_each_type_with_wilson_intervals():
    scores = ([score("t0")] * 4 + [score("t1", "syntax_error")] * 2 + [score("t2", "no_code_block", runaway=True,
              loop=True)] * 3 + [score("t3", "passed", off_script="中")])
    rates = failure_rates(ArmResult(QWEN, "h", {"all": scores}))
    counts = {name: rate.count for name, rate in rates.items()}
    assert counts == {"syntax_error": 2, "no_code_block": 3, "runaway": 3, "repetition_loop": 3, "off_script": 1,
                      "degenerate": 4}
    assert all(rate.total == 10 for rate in rates.values())
    assert rates["runaway"].interval == wilson_interval(3, 10)


def test_results_json_is_versioned_and_round_trips():
    report = analyse(results([arm(TUNED, [[True] * 4] * 8), arm(QWEN, [[False] * 4] * 8)]))
    data = json.loads(json.dumps(results_json(report, "tunelab tune m")))
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert data["command"] == "tunelab tune m" and data["settings"]["model"] == "qwen2.5-coder:0.5b"
    assert [a["name"] for a in data["held_out"]] == ["trial 7", "qwen preset"]
    assert data["held_out"][0]["pass_at_1"] == 1.0 and data["held_out"][0]["generations"] == 32
    assert data["comparisons"][0]["verdict"] == "better" and data["comparisons"][0]["estimate"] == 1.0
    assert data["throughput"]["generations_per_s"] == pytest.approx(48 / 120.0)


def test_written_report_has_tables_plots_modelfile_and_aider_entry(tmp_path):
    report = analyse(results([arm(TUNED, [[True, False]] * 10), arm(QWEN, [[False, True]] * 10)]))
    paths = write_report(report, tmp_path, "qwen2.5-coder:0.5b", "tunelab tune qwen2.5-coder:0.5b")
    markdown = paths["markdown"].read_text()
    assert "| qwen preset | 50.0 | +0.0 | [" in markdown and "inconclusive" in markdown
    assert "Command: tunelab tune qwen2.5-coder:0.5b" in markdown
    assert "The winner (trial 7) does not significantly beat qwen preset on held-out tasks: +0.0 points" in markdown
    for name in ("score_by_parameter", "pareto_mean_tokens", "pareto_mean_latency_s", "failures_by_configuration"):
        assert f"![{name}]({name}.png)" in markdown
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 4 and "<td>inconclusive</td>" in page
    assert parse_modelfile(paths["modelfile"].read_text()).parameters == QWEN.knobs
    assert yaml.safe_load(paths["aider"].read_text())[0]["name"] == "ollama_chat/qwen2.5-coder:0.5b-tuned"


def test_terminal_report_shows_every_arm_and_the_recommendation():
    console = Console(record=True, width=160)
    print_report(console, analyse(results([arm(TUNED, [[True] * 2] * 6), arm(QWEN, [[True, False]] * 6)])))
    text = console.export_text()
    assert "trial 7" in text and "qwen preset" in text and "+50.0 [" in text
    assert "Recommendation: tuned (trial 7)" in text and "because the winner (trial 7) beats" in text
    assert "The winner (trial 7) beats qwen preset on held-out tasks: +50.0 points (95% CI" in text


def test_aider_entry_carries_the_knobs_and_num_ctx():
    entry = yaml.safe_load(aider_settings(TUNED, "qwen2.5-coder:0.5b-tuned", 8192))
    assert entry == [{"name": "ollama_chat/qwen2.5-coder:0.5b-tuned", "use_temperature": 0.2,
                      "extra_params": {"top_p": 0.85, "top_k": 30, "num_ctx": 8192}}]
    assert tuned_name("qwen2.5-coder:0.5b") == "qwen2.5-coder:0.5b-tuned" and tuned_name("m") == "m:latest-tuned"


def test_recommended_modelfile_creates_a_model_that_runs_with_its_parameters(tunelab_home, smollm2_path):
    store = Store(tunelab_home)
    store.register_gguf("smollm2:135m", smollm2_path)
    config = Config("tuned", {"temperature": 0.25, "top_p": 0.85, "top_k": 30, "repeat_penalty": 1.1},
                    "You write Python.", None)
    record = store.create("smollm2-tuned", parse_modelfile(modelfile_text(config, "smollm2:135m")))
    assert record.parameters == config.knobs and record.system == "You write Python."
    runtime = open_model("smollm2-tuned", store)
    try:
        params = prepare_chat(runtime, [{"role": "user", "content": "hi"}]).request.params
        assert (params.temperature, params.top_p, params.top_k, params.repeat_penalty) == (0.25, 0.85, 30, 1.1)
        assert "You write Python." in prepare_chat(runtime, [{"role": "user", "content": "hi"}]).prompt
    finally:
        runtime.close()
