"""Each sampling stage on a small vocabulary, against hand-computed expectations.

Rows are given as probabilities and turned into logits with log(p), so an expectation reads as
"these tokens survive, renormalised". Cases marked "llama.cpp" are the ones in llama.cpp's
tests/test-sampling.cpp, which tunelab's stages must reproduce.
"""

import math

import pytest
import torch

from tunelab.sampling import processors as P

INF = float("inf")


def logits_of(*rows):
    return torch.tensor([[math.log(p) if p > 0 else -INF for p in row] for row in rows])


def probs_after(logits):
    return P.probabilities(logits).tolist()


def renormalised(probs, keep):
    total = sum(probs[i] for i in keep)
    return [probs[i] / total if i in keep else 0.0 for i in range(len(probs))]


def col(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


FOUR = [0.1, 0.2, 0.3, 0.4]

# ---- logit_bias ----------------------------------------------------------------------------------


def test_logit_bias_adds_each_rows_own_biases():
    logits = torch.zeros(2, 4)
    out = P.apply_logit_bias(logits, [{1: 2.5, 3: -100.0}, {}])
    assert out.tolist() == [[0.0, 2.5, 0.0, -100.0], [0.0, 0.0, 0.0, 0.0]]
    assert logits.abs().sum() == 0  # pure: the input is untouched


# ---- penalty window and counts -------------------------------------------------------------------


def _dense(counts, num_rows, vocab_size):
    dense = torch.zeros(num_rows, vocab_size, dtype=torch.long)
    dense[counts.rows, counts.token_ids] = counts.counts
    return dense.tolist()


def test_penalty_window_counts_last_n_tokens_and_whole_history_for_minus_one():
    history = [5, 1, 1, 2, 3, 1]
    counts = P.count_recent_tokens([history, history, history, history], [3, 0, -1, 100], vocab_size=6)
    assert _dense(counts, 4, 6) == [
        [0, 1, 1, 1, 0, 0],  # last 3: 2, 3, 1
        [0, 0, 0, 0, 0, 0],  # 0 = off
        [0, 3, 1, 1, 0, 1],  # -1 = the whole context
        [0, 3, 1, 1, 0, 1],  # a window longer than the history holds all of it
    ]


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 0.0, 3.0, -1.0]])
    seen = P.count_recent_tokens([[0, 1, 2]], [64], vocab_size=5)
    out = P.apply_penalties(logits, seen, col(2.0), col(0.0), col(0.0))
    # seen: 2 / 2 = 1, -2 * 2 = -4 (dividing would raise it to -1), 0 stays 0; unseen tokens untouched
    assert out.tolist() == [[1.0, -4.0, 0.0, 3.0, -1.0]]


def test_presence_counts_once_and_frequency_counts_every_occurrence():
    logits = torch.zeros(2, 4)
    history = [1, 1, 1, 2]
    seen = P.count_recent_tokens([history, history], [64, 64], vocab_size=4)
    out = P.apply_penalties(logits, seen, col(1.0, 1.0), col(0.5, 0.0), col(0.0, 0.5))
    assert out.tolist() == [
        [0.0, -0.5, -0.5, 0.0],  # presence: once per seen token
        [0.0, -1.5, -0.5, 0.0],  # frequency: 3 and 1 occurrences
    ]


@pytest.mark.parametrize("history, rp, freq, pres, expected", [
    # llama.cpp: five equal tokens, repeat penalty 50 all but removes the seen ones
    ([0], 50.0, 0.0, 0.0, [0, 0.25, 0.25, 0.25, 0.25]),
    ([0, 1, 2], 50.0, 0.0, 0.0, [0, 0, 0, 0.5, 0.5]),
    ([0, 1, 2, 0, 0], 50.0, 0.0, 0.0, [0, 0, 0, 0.5, 0.5]),
    ([0], 1.0, 5.0, 5.0, [0.000011, 0.249997, 0.249997, 0.249997, 0.249997]),
    ([0, 1, 2], 1.0, 5.0, 5.0, [0.000023, 0.000023, 0.000023, 0.499966, 0.499966]),
    ([0, 1, 2, 0, 0], 1.0, 5.0, 5.0, [0.000000, 0.000023, 0.000023, 0.499977, 0.499977]),
])
def test_penalties_match_llama_cpp(history, rp, freq, pres, expected):
    seen = P.count_recent_tokens([history], [5], vocab_size=5)
    out = P.apply_penalties(logits_of([0.2] * 5), seen, col(rp), col(pres), col(freq))
    assert probs_after(out)[0] == pytest.approx(expected, abs=1e-5)


# ---- DRY -----------------------------------------------------------------------------------------


def test_dry_penalises_tokens_that_would_extend_a_repeat():
    # a b c c b c y a b c: the end "a b c" occurred before, followed by c (run 3);
    # "b c" was followed by y (run 2); "c" by b (run 1, under allowed_length 2).
    a, b, c, y = 1, 2, 3, 4
    penalties = P.dry_penalties([a, b, c, c, b, c, y, a, b, c], multiplier=1.0, base=2.0, allowed_length=2,
                                breakers={})
    assert penalties == {c: 2.0, y: 1.0}  # multiplier * base ** (run - allowed_length)


def test_dry_allowed_length_sets_the_shortest_penalised_run():
    window = [0, 1, 2, 7, 0, 1, 2, 9, 0, 1]  # the end "0 1" was followed by 2, twice
    assert P.dry_penalties(window, 1.0, 2.0, 2, breakers={}) == {2: 1.0}
    assert P.dry_penalties(window, 1.0, 2.0, 3, breakers={}) == {}


def test_dry_runs_do_not_reach_back_past_the_latest_sequence_breaker():
    x = 8
    window = [5, x, 0, 1, 7, 5, x, 0, 1]  # the end "5 x 0 1" repeats: 7 would make the run 5 long
    assert P.dry_penalties(window, 1.0, 2.0, 2, breakers={}) == {7: 4.0}
    assert P.dry_penalties(window, 1.0, 2.0, 2, breakers={x: [()]}) == {7: 1.0}  # run cut to "0 1"
    assert P.dry_penalties(window, 1.0, 2.0, 3, breakers={x: [()]}) == {}
    # a two-token breaker "8 9" cuts the run only where both tokens appear
    window = [5, 8, 9, 0, 1, 7, 5, 8, 9, 0, 1]
    assert P.dry_penalties(window, 1.0, 2.0, 2, breakers={8: [(9,)]}) == {7: 1.0}
    assert P.dry_penalties(window, 1.0, 2.0, 2, breakers={8: [(4,)]}) == {7: 8.0}


def test_dry_never_penalises_a_single_token_breaker():
    window = [5, 0, 1, 9, 5, 0, 1]  # 9 would extend the run "5 0 1"
    assert P.dry_penalties(window, 1.0, 2.0, 2, breakers={}) == {9: 2.0}
    assert P.dry_penalties(window, 1.0, 2.0, 2, breakers={9: [()]}) == {}


@pytest.mark.parametrize("history, expected, multiplier, allowed, last_n, breakers", [
    # llama.cpp's cases (base 1.1)
    ([0, 1], [0.25] * 4, 1.0, 2, 4, {}),
    ([0, 1, 2, 0, 1], [0.296923, 0.296923, 0.109232, 0.296923], 1.0, 2, 5, {}),
    ([0, 1, 3, 4, 0, 1], [0.2] * 5, 1.0, 2, 6, {3: [()]}),  # 3 is a single-token breaker: exempt
    ([0, 1, 2, 0, 1], [0.241818, 0.241818, 0.032727, 0.241818, 0.241818], 2.0, 2, 5, {}),
    ([0, 1, 2, 3, 4, 0, 1], [0.2] * 5, 1.0, 4, 7, {}),
])
def test_dry_matches_llama_cpp(history, expected, multiplier, allowed, last_n, breakers):
    logits = logits_of([1 / len(expected)] * len(expected))
    out = P.apply_dry(logits, [history], [multiplier], [1.1], [allowed], [last_n], [breakers])
    assert probs_after(out)[0] == pytest.approx(expected, abs=1e-5)


def test_dry_window_zero_is_off_and_minus_one_is_whole_history():
    history = [0, 1, 2, 5, 5, 5, 5, 5, 0, 1]
    logits = torch.zeros(3, 6)
    out = P.apply_dry(logits, [history] * 3, [1.0] * 3, [2.0] * 3, [2] * 3, [0, 4, -1], [{}] * 3)
    assert out[0].tolist() == [0.0] * 6
    assert out[1, 2] == 0.0  # the earlier "0 1" is outside the last 4 tokens
    assert out[2, 2] == -1.0


def test_dry_exponent_is_clamped_so_the_penalty_stays_finite():
    penalty = P.dry_penalties([3] * 400, multiplier=1.0, base=10.0, allowed_length=0, breakers={})
    assert math.isfinite(penalty[3]) and penalty[3] == 10.0 ** int(88.7228391 / math.log(10.0))


def test_dry_breaker_sequences_map_head_tokens_to_the_rest_of_the_breaker():
    token_texts = ["a", "\n", "x\nb", "ab:", ":", "::", "q:", "c"]
    encode = {":": [4], "::": [5]}.__getitem__
    sequences = P.dry_breaker_sequences(["\n", "::"], token_texts, encode)
    assert sequences == {
        1: [()], 2: [()],  # contain "\n"
        3: [(4,)], 4: [(4,)], 6: [(4,)],  # end with ":" and need one more ":"
        5: [()],  # contains "::"
    }


# ---- top_n_sigma ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n, expected", [
    (1.0, [0, 0, 0.3 / 0.7, 0.4 / 0.7]),  # llama.cpp
    (3.0, FOUR),
    (0.0, FOUR),  # <= 0 is off
])
def test_top_n_sigma_matches_llama_cpp(n, expected):
    assert probs_after(P.apply_top_n_sigma(logits_of(FOUR), col(n)))[0] == pytest.approx(expected, abs=1e-6)


def test_top_n_sigma_statistics_ignore_removed_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -INF, -INF]])
    # mean 1.5, population std sqrt(1.25) = 1.118; keep logits >= 3 - 1.118
    assert torch.isfinite(P.apply_top_n_sigma(logits, col(1.0))).tolist() == [[False, False, True, True, False, False]]


# ---- top_k ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, expected", [
    (1, [0, 0, 0, 1]),  # llama.cpp
    (3, [0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]),
    (4, FOUR),
    (0, FOUR),  # 0 is off
    (50, FOUR),  # larger than the vocabulary: keeps everything
])
def test_top_k_matches_llama_cpp(k, expected):
    assert probs_after(P.apply_top_k(logits_of(FOUR), col(k, dtype=torch.long)))[0] == pytest.approx(expected)


def test_top_k_keeps_exactly_k_and_breaks_ties_toward_lower_ids():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0]])
    kept = torch.isfinite(P.apply_top_k(logits, col(3, dtype=torch.long)))
    assert kept.tolist() == [[False, True, True, True, False, False]]


def test_top_k_gives_each_row_its_own_k_and_skips_removed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [-INF, 1.0, -INF, 2.0], [4.0, 3.0, 2.0, 1.0]])
    kept = torch.isfinite(P.apply_top_k(logits, col(2, 3, 0, dtype=torch.long)))
    assert kept.tolist() == [[True, True, False, False], [False, True, False, True], [True] * 4]


def test_compact_moves_survivors_in_id_order_to_the_front():
    logits = torch.full((2, 200), -INF)
    logits[0, [150, 3, 40]] = torch.tensor([1.0, 2.0, 3.0])
    logits[1, 7] = 5.0
    narrow, ids = P.compact(logits)
    assert narrow.shape == (2, 64)  # the widest row, rounded up to 64 columns
    assert ids[0, :3].tolist() == [3, 40, 150] and narrow[0, :3].tolist() == [2.0, 3.0, 1.0]
    assert ids[1, 0] == 7 and narrow[1, 0] == 5.0
    assert torch.isinf(narrow[0, 3:]).all() and torch.isinf(narrow[1, 1:]).all()


@pytest.mark.parametrize("seed", range(30))
def test_top_k_compact_is_top_k_then_compact(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 300, generator=generator).mul(3).round(decimals=seed % 3)  # coarser: more ties
    logits[logits < -6] = -INF  # tokens an earlier stage removed
    top_k = torch.randint(1, 80, (5,), generator=generator)
    top_k[4] = 299
    fast, slow = P.top_k_compact(logits, top_k), P.compact(P.apply_top_k(logits, top_k))
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_top_k_compact_fills_a_tie_at_the_cut_with_the_lowest_ids():
    narrow, ids = P.top_k_compact(torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0]]), col(3, dtype=torch.long))
    assert ids[0, :3].tolist() == [1, 2, 3] and narrow[0, :3].tolist() == [3.0, 2.0, 3.0]
    assert narrow.shape == (1, 6) and torch.isinf(narrow[0, 3:]).all()  # never wider than the vocabulary
    narrow, ids = P.top_k_compact(torch.tensor([[1.0, 2.0, -INF, -INF]]), col(3, dtype=torch.long))
    assert ids[0, :2].tolist() == [0, 1] and torch.isinf(narrow[0, 2:]).all()  # fewer finite tokens than k


# ---- typical -------------------------------------------------------------------------------------


@pytest.mark.parametrize("probs, p, expected", [
    ([0.97, 0.01, 0.01, 0.01], 0.5, [1, 0, 0, 0]),  # llama.cpp
    ([0.4, 0.2, 0.2, 0.2], 0.5, [0, 1 / 3, 1 / 3, 1 / 3]),  # llama.cpp: the top token is not typical
    ([0.4, 0.2, 0.2, 0.2], 1.0, [0.4, 0.2, 0.2, 0.2]),  # 1 is off
])
def test_typical_matches_llama_cpp(probs, p, expected):
    assert probs_after(P.apply_typical(logits_of(probs), col(p)))[0] == pytest.approx(expected, abs=1e-6)


def test_typical_stops_once_mass_strictly_exceeds_p():
    # four equal tokens: entropy ln 4, all equally typical, taken in id order;
    # mass 0.5 after two is not > 0.5, so a third is kept
    kept = torch.isfinite(P.apply_typical(torch.zeros(1, 4), col(0.5)))
    assert kept.tolist() == [[True, True, True, False]]


# ---- top_p ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("p, expected", [
    (0.0, [0, 0, 0, 1]),  # llama.cpp: always at least one token
    (0.7, [0, 0, 0.3 / 0.7, 0.4 / 0.7]),
    (0.8, [0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]),
    (1.0, FOUR),
])
def test_top_p_matches_llama_cpp(p, expected):
    assert probs_after(P.apply_top_p(logits_of(FOUR), col(p)))[0] == pytest.approx(expected, abs=1e-6)


def test_top_p_keeps_the_smallest_prefix_reaching_p_inclusive_with_ties_by_id():
    logits = torch.zeros(2, 4)  # four tokens at exactly 0.25
    kept = torch.isfinite(P.apply_top_p(logits, col(0.5, 0.51)))
    assert kept.tolist() == [[True, True, False, False], [True, True, True, False]]


def test_top_p_looks_past_its_first_sorted_window():
    # 1000 equal tokens: p = 0.9 needs 900, far more than the first window of sorted candidates
    kept = torch.isfinite(P.apply_top_p(torch.zeros(1, 1000), col(0.9)))
    assert kept.sum() == 900 and kept[0, :900].all()


def test_top_p_ignores_removed_tokens():
    logits = torch.tensor([[0.0, -INF, 0.0, -INF]])
    kept = torch.isfinite(P.apply_top_p(logits, col(0.5)))
    assert kept.tolist() == [[True, False, False, False]]


# ---- min_p ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("p, kept", [
    (0.0, [1, 1, 1, 1]), (0.24, [1, 1, 1, 1]), (0.26, [0, 1, 1, 1]), (0.49, [0, 1, 1, 1]),  # llama.cpp
    (0.51, [0, 0, 1, 1]), (0.74, [0, 0, 1, 1]), (0.76, [0, 0, 0, 1]), (1.0, [0, 0, 0, 1]),
])
def test_min_p_keeps_tokens_at_least_p_times_the_best(p, kept):
    out = P.apply_min_p(logits_of(FOUR), col(p))
    assert probs_after(out)[0] == pytest.approx(renormalised(FOUR, [i for i, k in enumerate(kept) if k]), abs=1e-6)


# ---- xtc -----------------------------------------------------------------------------------------

DESCENDING = [0.4, 0.3, 0.2, 0.1]


@pytest.mark.parametrize("threshold, survivors", [
    (0.09, [3]),  # llama.cpp: every token is a top choice; only the least likely stays
    (0.19, [2, 3]),
    (0.29, [1, 2, 3]),
    (0.39, [0, 1, 2, 3]),  # a single top choice is never removed
    (0.6, [0, 1, 2, 3]),  # threshold > 0.5: off
])
def test_xtc_removes_all_top_choices_but_the_least_likely(threshold, survivors):
    out = P.apply_xtc(logits_of(DESCENDING), col(0.99), col(threshold), chance=col(0.5))
    assert torch.isfinite(out)[0].nonzero().squeeze(-1).tolist() == survivors


def test_xtc_acts_only_when_the_rows_chance_is_at_most_its_probability():
    logits = logits_of(DESCENDING, DESCENDING)
    out = P.apply_xtc(logits, col(0.5, 0.5), col(0.19, 0.19), chance=col(0.5, 0.51))
    assert torch.isfinite(out).tolist() == [[False, False, True, True], [True] * 4]


def test_xtc_keeps_the_highest_id_among_equally_likely_top_choices():
    out = P.apply_xtc(torch.tensor([[1.0, 1.0, 1.0, -3.0]]), col(1.0), col(0.1), chance=col(0.0))
    assert torch.isfinite(out).tolist() == [[False, False, True, True]]


# ---- temperature ---------------------------------------------------------------------------------


def test_temperature_divides_logits_per_row():
    logits = torch.tensor([[2.0, -4.0], [2.0, -4.0], [2.0, -4.0]])
    assert P.apply_temperature(logits, col(0.5, 1.0, 2.0)).tolist() == [[4.0, -8.0], [2.0, -4.0], [1.0, -2.0]]


def test_temperature_zero_keeps_only_the_first_best_token():
    assert probs_after(P.apply_temperature(logits_of(FOUR), col(0.0)))[0] == [0, 0, 0, 1]  # llama.cpp
    tied = P.apply_temperature(torch.tensor([[1.0, 3.0, 3.0]]), col(0.0))
    assert torch.isfinite(tied).tolist() == [[False, True, False]]


# ---- mirostat ------------------------------------------------------------------------------------


def test_mirostat_v1_keeps_k_from_the_estimated_zipf_exponent():
    # p_i ~ 1 / i^2 gives s_hat = 2 exactly; k = (1 * 2^mu / (1 - 8^-1)) ** (1/2) = sqrt(16 * 8/7) = 4.28 -> 4
    logits = torch.log(torch.tensor([[1 / i**2 for i in range(1, 9)]]))
    kept = torch.isfinite(P.apply_mirostat_v1(logits, col(4.0)))
    assert kept.tolist() == [[True] * 4 + [False] * 4]


def test_mirostat_v2_keeps_tokens_with_surprise_at_most_mu():
    logits = logits_of([0.5, 0.25, 0.125, 0.125])  # surprises 1, 2, 3, 3 bits
    assert torch.isfinite(P.apply_mirostat_v2(logits, col(2.5))).tolist() == [[True, True, False, False]]
    assert torch.isfinite(P.apply_mirostat_v2(logits, col(0.5))).tolist() == [[True, False, False, False]]


# ---- rows with nothing left ----------------------------------------------------------------------

STAGES = {
    "top_n_sigma": lambda x: P.apply_top_n_sigma(x, col(1.0, 2.0)),
    "top_k": lambda x: P.apply_top_k(x, col(2, 3, dtype=torch.long)),
    "typical": lambda x: P.apply_typical(x, col(0.5, 0.9)),
    "top_p": lambda x: P.apply_top_p(x, col(0.5, 0.9)),
    "min_p": lambda x: P.apply_min_p(x, col(0.5, 0.1)),
    "xtc": lambda x: P.apply_xtc(x, col(1.0, 1.0), col(0.1, 0.1), col(0.0, 0.0)),
    "temperature": lambda x: P.apply_temperature(x, col(0.0, 0.5)),
    "mirostat_v1": lambda x: P.apply_mirostat_v1(x, col(1.0, 1.0)),
    "mirostat_v2": lambda x: P.apply_mirostat_v2(x, col(1.0, 1.0)),
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_fully_masked_row_stays_masked_without_nan(stage):
    logits = torch.full((2, 5), -INF)
    out = STAGES[stage](logits)
    assert torch.isneginf(out).all()
    assert P.probabilities(out).tolist() == [[0.0] * 5] * 2


@pytest.mark.parametrize("stage", STAGES)
def test_a_row_with_one_token_left_keeps_it(stage):
    logits = torch.full((2, 5), -INF)
    logits[:, 3] = -7.0
    assert torch.isfinite(STAGES[stage](logits)).nonzero()[:, 1].tolist() == [3, 3]
