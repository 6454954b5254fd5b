"""The sampling chain end to end: draws, seeds, Mirostat, log-probabilities and the explain trace."""

import copy
import math

import pytest
import torch

from tunelab.errors import InvalidOption
from tunelab.sampling import Sampler, SamplerState, SamplingParams
from tunelab.sampling.sampler import draw

RAW = [0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02]


def logits_of(probs):
    return torch.tensor([math.log(p) for p in probs])


def sample(sampler, logits, params, histories, states):
    return sampler(logits, params, histories, states).token_ids.tolist()


def chi_square_p_value(counts, expected_probs):
    """Upper tail of the chi-square distribution (regularised upper incomplete gamma)."""
    total = sum(counts)
    stat = sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, expected_probs))
    dof = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_draws_follow_the_final_distribution():
    # top_k 5 keeps 0.30..0.08 (mass 0.88); top_p 0.9 then keeps four tokens, since
    # (0.30 + 0.25 + 0.15 + 0.10) / 0.88 = 0.909 >= 0.9; temperature 0.7 raises them to the power 1/0.7.
    params = [SamplingParams(top_k=5, top_p=0.9, temperature=0.7, seed=seed) for seed in range(400)]
    weights = [p ** (1 / 0.7) for p in RAW[:4]]
    expected = [w / sum(weights) for w in weights]
    sampler = Sampler()
    states = [SamplerState.new(p) for p in params]
    logits = logits_of(RAW).expand(len(params), -1)
    counts = [0] * len(RAW)
    for _ in range(10):  # 4000 draws: 400 seeds x 10 steps
        for token in sample(sampler, logits, params, [[]] * len(params), states):
            counts[token] += 1
    assert counts[4:] == [0, 0, 0, 0]
    assert chi_square_p_value(counts[:4], expected) > 1e-3
    # the test can tell distributions apart: the same counts reject the untempered one
    untempered = [p / sum(RAW[:4]) for p in RAW[:4]]
    assert chi_square_p_value(counts[:4], untempered) < 1e-6


def test_same_seed_gives_the_same_tokens_run_after_run():
    params = SamplingParams(top_k=0, top_p=1.0, temperature=1.0, seed=1234)
    logits = logits_of(RAW)[None]

    def generate(p):
        state = SamplerState.new(p)
        return [sample(Sampler(), logits, [p], [[]], [state])[0] for _ in range(40)]

    first = generate(params)
    assert generate(params) == first
    assert generate(params.with_seed(99)) != first
    assert len(set(first)) > 3  # really random, not stuck on one token


def test_unseeded_requests_get_a_fresh_seed():
    seeds = {SamplerState.new(SamplingParams()).seed for _ in range(5)}
    assert all(seed >= 0 for seed in seeds) and len(seeds) > 1


def test_greedy_takes_the_best_token_after_penalties_and_filters():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    sampler = Sampler()
    plain = SamplingParams(temperature=0, seed=1)
    penalised = SamplingParams(temperature=0, repeat_penalty=1.5, seed=1)
    history = [[0, 3]]
    assert sample(sampler, logits, [plain], history, [SamplerState.new(plain)]) == [0]
    assert sample(sampler, logits, [penalised], history, [SamplerState.new(penalised)]) == [1]  # 3 / 1.5 < 2.9


def test_greedy_ties_go_to_the_lowest_token_id_whatever_the_seed():
    logits = torch.tensor([[1.0, 5.0, 5.0, 2.0]])
    for seed in range(5):
        params = SamplingParams(temperature=0, seed=seed)
        assert sample(Sampler(), logits, [params], [[]], [SamplerState.new(params)]) == [1]


def test_penalty_window_includes_prompt_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    params = SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=3)
    state = SamplerState.new(params)
    assert sample(Sampler(), logits, [params], [[0, 2, 2]], [state]) == [1]  # token 0 from the prompt
    assert sample(Sampler(), logits, [params], [[0, 2, 2, 2]], [state]) == [0]  # out of the last 3


def test_logit_bias_can_force_or_ban_a_token():
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    forced = SamplingParams(temperature=0, logit_bias={2: 100})
    banned = SamplingParams(temperature=0, logit_bias={0: -100})
    tokens = sample(Sampler(), logits.expand(2, -1), [forced, banned], [[], []],
                    [SamplerState.new(forced), SamplerState.new(banned)])
    assert tokens == [2, 1]


def test_logit_bias_outside_the_vocabulary_is_rejected():
    params = SamplingParams(logit_bias={10: 1.0})
    with pytest.raises(InvalidOption, match="'logit_bias' names token 10, but the model's vocabulary has ids 0..3"):
        Sampler()(torch.zeros(1, 4), [params], [[]], [SamplerState.new(params)])


def test_xtc_at_probability_one_never_draws_the_top_choice():
    params = [SamplingParams(top_k=0, top_p=1.0, xtc_probability=1.0, xtc_threshold=0.2, seed=s) for s in range(50)]
    tokens = sample(Sampler(), logits_of(RAW).expand(50, -1), params, [[]] * 50, [SamplerState.new(p) for p in params])
    assert 0 not in tokens and 1 in tokens  # 0.30 is removed, 0.25 is the least likely top choice and stays


def test_mirostat_rows_skip_the_filter_stages():
    params = SamplingParams(mirostat=2, mirostat_tau=8.0, top_k=1, top_p=0.1, min_p=0.5, repeat_penalty=2.0, seed=3)
    trace = Sampler().explain(logits_of(RAW), params, [0, 0, 1], SamplerState.new(params))
    assert trace.stage_names == ["raw", "temperature", "mirostat"]


def test_mirostat_v2_moves_mu_toward_tau():
    params = SamplingParams(mirostat=2, mirostat_tau=3.0, mirostat_eta=0.5, temperature=1.0, seed=11)
    state = SamplerState.new(params)
    assert state.mirostat_mu == 6.0  # 2 * tau
    trace = Sampler().explain(logits_of(RAW), params, [], state)
    surprise = -math.log2(trace.drawn_prob)
    assert state.mirostat_mu == pytest.approx(6.0 - 0.5 * (surprise - 3.0))
    assert state.step == 1
    # mu = 6 bits keeps tokens with p >= 2^-6 = 0.0156: all eight raw tokens
    assert sum(p > 0 for p in trace.final_probs) == 8


def test_mirostat_v1_truncates_by_its_estimated_k():
    params = SamplingParams(mirostat=1, mirostat_tau=1.0, temperature=1.0, seed=5)
    zipf = [1 / i ** 2 for i in range(1, 9)]
    trace = Sampler().explain(logits_of([z / sum(zipf) for z in zipf]), params, [], SamplerState.new(params))
    # s_hat = 2, mu = 2 tau = 2: k = (2^2 / (1 - 1/8)) ** 0.5 = 2.14 -> two tokens
    assert [t for t, p in zip(trace.token_ids, trace.final_probs) if p > 0] == [0, 1]


def test_logprobs_are_the_models_own_distribution():
    logits = logits_of(RAW).expand(3, -1)
    params = [
        SamplingParams(temperature=0.5, repeat_penalty=1.3, logprobs=True, top_logprobs=2, seed=1),
        SamplingParams(temperature=0, logprobs=True, seed=2),
        SamplingParams(temperature=0, seed=3),
    ]
    result = Sampler()(logits, params, [[0], [0], [0]], [SamplerState.new(p) for p in params])
    raw = torch.log_softmax(logits[0], -1)
    assert result.logprobs.tolist() == raw[result.token_ids].tolist()
    assert result.top_logprobs[0] == [(0, raw[0].item()), (1, raw[1].item())]
    assert result.top_logprobs[1] is None and result.top_logprobs[2] is None
    plain = Sampler()(logits[:1], params[2:], [[0]], [SamplerState.new(params[2])])
    assert plain.logprobs is None and plain.top_logprobs is None


def test_explain_traces_each_stage_the_row_uses():
    params = SamplingParams(top_k=5, top_p=0.85, temperature=0.7, repeat_penalty=1.5, seed=8)
    trace = Sampler().explain(logits_of(RAW), params, [1, 1], SamplerState.new(params), num_candidates=8)
    assert trace.stage_names == ["raw", "penalties", "top_k", "top_p", "temperature"]
    assert trace.token_ids == [0, 1, 2, 3, 4, 5, 6, 7]
    assert trace.probs[0] == pytest.approx(RAW, abs=1e-6)
    # penalties: log 0.25 < 0 is multiplied by 1.5, so token 1's weight becomes 0.25^1.5 = 0.125
    weights = [0.30, 0.125, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02]
    assert trace.probs[1] == pytest.approx([w / sum(weights) for w in weights], abs=1e-6)
    removed = dict(zip(trace.stage_names, trace.removed))
    assert [t for t, r in enumerate(removed["top_k"]) if r] == [5, 6, 7]
    # top_p over 0.30, 0.15, 0.125, 0.10, 0.08 (mass 0.755): four reach 0.675 / 0.755 = 0.894 >= 0.85
    assert [t for t, r in enumerate(removed["top_p"]) if r] == [4]
    assert trace.num_alive == [8, 8, 5, 4, 4]
    tempered = [w ** (1 / 0.7) if t < 4 else 0.0 for t, w in enumerate(weights)]
    assert trace.final_probs == pytest.approx([w / sum(tempered) for w in tempered], abs=1e-6)
    assert trace.final_probs[trace.token_ids.index(trace.drawn_id)] == pytest.approx(trace.drawn_prob)


@pytest.mark.parametrize("params", [
    SamplingParams(seed=21),
    SamplingParams(top_k=0, top_p=0.8, min_p=0.1, typical_p=0.95, temperature=1.3, seed=22),
    SamplingParams(top_n_sigma=1.0, xtc_probability=0.7, xtc_threshold=0.1, seed=23),
    SamplingParams(mirostat=1, seed=24),
    SamplingParams(temperature=0, repeat_penalty=1.2, frequency_penalty=0.5, seed=25),
])
def test_explain_draws_exactly_what_the_sampler_draws(params):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=generator) * 3
    history = [7, 7, 9]
    explained_state, sampled_state = SamplerState.new(params), SamplerState.new(params)
    sampler = Sampler()
    for step in range(6):
        trace = sampler.explain(logits[step], params, history, explained_state, num_candidates=300)
        result = sampler(logits[step][None], [params], [history], [sampled_state])
        assert trace.drawn_id == result.token_ids.item()
        assert explained_state == sampled_state
        history = history + [trace.drawn_id]


def test_dry_needs_the_vocabulary_to_resolve_sequence_breakers():
    params = SamplingParams(dry_multiplier=1.0, temperature=0, top_k=0)
    token_texts = ["a", "b", "\n", "c"]
    history = [0, 1, 2, 0, 1]  # "a b" was followed by the breaker "\n", which DRY never penalises
    sampler = Sampler(token_texts=token_texts, encode=lambda text: [token_texts.index(text)])
    logits = torch.tensor([[0.0, 0.0, 0.5, 0.0]])
    assert sample(sampler, logits, [params], [history], [SamplerState.new(params)]) == [2]
    history = [0, 1, 3, 0, 1]  # now "a b" was followed by "c", which DRY penalises
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.5]])
    assert sample(sampler, logits, [params], [history], [SamplerState.new(params)]) == [0]
    with pytest.raises(ValueError, match="need the vocabulary"):
        Sampler()(logits, [params], [history], [SamplerState.new(params)])


def test_a_row_with_no_token_left_is_an_error():
    with pytest.raises(ValueError, match="no token left"):
        draw(torch.full((1, 4), float("-inf")), torch.tensor([0.5]))


def test_a_greedy_row_with_no_token_left_is_an_error_too():
    params = SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="no token left"):
        sample(Sampler(), torch.full((1, 4), float("-inf")), [params], [[]], [SamplerState.new(params)])


def test_inputs_must_have_one_entry_per_row():
    params = SamplingParams()
    with pytest.raises(ValueError, match="2 logit rows need as many params"):
        Sampler()(torch.zeros(2, 4), [params], [[]], [SamplerState.new(params)])


def test_sampler_leaves_its_inputs_untouched():
    logits = logits_of(RAW)[None]
    before = logits.clone()
    params = SamplingParams(repeat_penalty=1.5, logit_bias={3: 2.0}, seed=1)
    state = SamplerState.new(params)
    snapshot = copy.deepcopy(state)
    Sampler()(logits, [params], [[1, 2]], [state])
    assert torch.equal(logits, before)
    assert state.step == snapshot.step + 1
