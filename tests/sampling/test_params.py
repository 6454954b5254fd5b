"""SamplingParams: defaults from the option catalog, building from resolved options, and validation."""

import dataclasses

import pytest

from tunelab.errors import InvalidOption
from tunelab.options import default_options, resolve_options
from tunelab.sampling.params import OPTION_FIELDS, SamplingParams


def test_defaults_are_the_option_catalogs():
    params = SamplingParams()
    defaults = default_options()
    assert {name: getattr(params, name) for name in OPTION_FIELDS} == {name: defaults[name] for name in OPTION_FIELDS}
    assert (params.temperature, params.top_k, params.top_p, params.repeat_penalty) == (0.8, 40, 0.9, 1.0)
    assert params.logit_bias == {} and params.logprobs is False and params.top_logprobs == 0


def test_from_options_takes_modelfile_and_request_layers():
    options = resolve_options({"temperature": 0.6, "top_k": 20, "num_ctx": 8192}, {"top_p": 0.95, "stop": "<|im_end|>"})
    params = SamplingParams.from_options(options, logit_bias={"42": -100}, logprobs=True, top_logprobs=3)
    assert (params.temperature, params.top_k, params.top_p, params.stop) == (0.6, 20, 0.95, ("<|im_end|>",))
    assert params.logit_bias == {42: -100.0}  # JSON object keys arrive as strings
    assert (params.logprobs, params.top_logprobs) == (True, 3)


def test_from_options_rejects_unknown_extras():
    with pytest.raises(InvalidOption, match="unknown sampling field 'best_of'"):
        SamplingParams.from_options(default_options(), best_of=2)


def test_is_greedy_means_temperature_at_most_zero():
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy


def test_with_seed_fixes_a_random_seed_once():
    unseeded = SamplingParams()
    assert unseeded.seed == -1
    seeded = unseeded.with_seed()
    assert seeded.seed >= 0 and seeded.with_seed() is seeded
    assert unseeded.with_seed(1234).seed == 1234
    assert dataclasses.replace(seeded, seed=-1) == unseeded


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.0


def test_whole_numbers_given_as_floats_become_ints():
    params = SamplingParams(top_k=40.0, temperature=1)
    assert params.top_k == 40 and isinstance(params.top_k, int) and isinstance(params.temperature, float)


@pytest.mark.parametrize("field, value, message", [
    ("top_k", -1, "'top_k' must be >= 0, got -1"),
    ("top_p", 0.0, "'top_p' must be (0, 1], got 0.0"),
    ("top_p", 1.5, "'top_p' must be (0, 1], got 1.5"),
    ("min_p", 1.2, "'min_p' must be [0, 1]"),
    ("typical_p", 0.0, "'typical_p' must be (0, 1]"),
    ("temperature", -0.5, "'temperature' must be >= 0 (0 = greedy)"),
    ("repeat_penalty", 0.0, "'repeat_penalty' must be > 0 (1.0 = off)"),
    ("repeat_last_n", -2, "'repeat_last_n' must be -1, 0 or a positive integer"),
    ("presence_penalty", 2.5, "'presence_penalty' must be [-2, 2]"),
    ("frequency_penalty", -3.0, "'frequency_penalty' must be [-2, 2]"),
    ("dry_multiplier", -1.0, "'dry_multiplier' must be >= 0"),
    ("dry_base", 0.5, "'dry_base' must be >= 1"),
    ("dry_allowed_length", -1, "'dry_allowed_length' must be >= 0"),
    ("dry_penalty_last_n", -5, "'dry_penalty_last_n' must be -1, 0 or a positive integer"),
    ("xtc_probability", 1.5, "'xtc_probability' must be [0, 1]"),
    ("xtc_threshold", -0.1, "'xtc_threshold' must be [0, 1]"),
    ("mirostat", 3, "'mirostat' must be 0, 1 or 2"),
    ("mirostat_tau", 0.0, "'mirostat_tau' must be > 0"),
    ("mirostat_eta", -0.1, "'mirostat_eta' must be > 0"),
    ("seed", -2, "'seed' must be -1 (random) or a non-negative integer"),
    ("num_predict", -2, "'num_predict' must be -1 (no limit) or >= 0"),
    ("top_k", 1.5, "'top_k' must be of type integer"),
    ("temperature", "hot", "'temperature' must be of type number"),
    ("temperature", float("nan"), "'temperature' must be a finite number"),
    ("temperature", None, "'temperature' must have a value"),
    ("top_logprobs", 21, "'top_logprobs' must be an integer in [0, 20], got 21"),
    ("logprobs", "yes", "'logprobs' must be true or false"),
    ("logit_bias", {5: 150}, "'logit_bias' for token 5 must be a number in [-100, 100], got 150"),
    ("logit_bias", {"abc": 1}, "'logit_bias' has key 'abc'; keys must be non-negative token ids"),
    ("logit_bias", {-3: 1}, "'logit_bias' has key -3"),
    ("logit_bias", [1, 2], "'logit_bias' must map token ids to numbers"),
])
def test_bad_values_name_the_parameter_and_its_valid_range(field, value, message):
    with pytest.raises(InvalidOption) as error:
        SamplingParams(**{field: value})
    assert message in str(error.value)


def test_top_logprobs_needs_logprobs():
    with pytest.raises(InvalidOption, match="'top_logprobs' needs 'logprobs' set to true"):
        SamplingParams(top_logprobs=5)
    assert SamplingParams(logprobs=True, top_logprobs=20).top_logprobs == 20
