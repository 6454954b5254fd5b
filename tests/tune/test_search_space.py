"""Search space: TOML and flags, bad input, suggestions inside the ranges, baselines clipped in, the presets."""

import optuna
import pytest

from tunelab.errors import InvalidOption
from tunelab.options import OPTION_SPECS
from tunelab.tune.search_space import KNOBS, Config, SearchSpace, baselines
from tunelab.tune.suites import DEFAULT_SYSTEM_PROMPT


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
    modelfile = Config("your modelfile", {"temperature": 0.1}, "S", None)
    configs = {config.name: config for config in baselines(SearchSpace(think=(False, True)), True, modelfile)}
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
