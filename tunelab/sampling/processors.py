"""The sampling stages: pure, batched transforms of logits [R, V], each row with its own parameters.

Each stage follows llama.cpp's `src/llama-sampling.cpp`. llama.cpp shrinks a candidate list; here a
removed token's logit becomes -inf instead, so a softmax over the row equals llama.cpp's softmax over
its candidates. Stages after top_k also run on `compact` rows (the survivors only, [R, C]), which is
how the sampler avoids 150k-wide work once top_k has cut a row down. A row whose parameter is at its
neutral value (top_k 0, top_p 1, ...) passes through unchanged. Where llama.cpp leaves the order of equal
logits to its sort, tunelab puts the lower token id first, so ties resolve the same on every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

NEG_INF = float("-inf")
_FIRST_WINDOW = 256  # sorted candidates tried before sorting more (llama.cpp's top-p does the same)
_DRY_MAX_BREAKER_CHARS = 40  # llama.cpp truncates longer breakers
_DRY_MAX_TAIL_TOKENS = 20
_FLOAT_MAX_LOG = 88.7228391  # ln(FLT_MAX): DRY clamps its exponent so the penalty stays finite
_MIROSTAT_M = 100  # tokens Mirostat v1 uses to estimate the Zipf exponent (common_sampler_init)

Histories = Sequence[Sequence[int]]
DryBreakers = Mapping[int, Sequence[tuple[int, ...]]]  # head token -> tails that complete a breaker


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over each row; a row with every token removed gives all zeros instead of NaN."""
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)  # [R, V]


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[Mapping[int, float]]) -> torch.Tensor:
    """Add each row's {token id: bias} to its logits (OpenAI `logit_bias`)."""
    rows = [r for r, bias in enumerate(biases) for _ in bias]
    cols = [t for bias in biases for t in bias]
    values = [v for bias in biases for v in bias.values()]
    out = logits.clone()
    out.index_put_((torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)),
                   torch.tensor(values, dtype=logits.dtype), accumulate=True)
    return out


def recent_window(history: Sequence[int], last_n: int) -> Sequence[int]:
    """The last `last_n` tokens of a history; 0 gives none and -1 the whole history."""
    return history if last_n < 0 else history[max(len(history) - last_n, 0):]


@dataclass(frozen=True)
class TokenCounts:
    """How often each token occurs in each row's penalty window, as sparse (row, token, count) triples."""

    rows: torch.Tensor  # [N]
    token_ids: torch.Tensor  # [N]
    counts: torch.Tensor  # [N], all > 0


def count_recent_tokens(histories: Histories, last_n: Sequence[int], vocab_size: int) -> TokenCounts:
    """Count the tokens among the last `last_n[r]` tokens of history r (prompt + output)."""
    keys = torch.cat([r * vocab_size + torch.as_tensor(recent_window(h, n), dtype=torch.long).reshape(-1)
                      for r, (h, n) in enumerate(zip(histories, last_n))])
    keys, counts = torch.unique(keys, return_counts=True)
    return TokenCounts(keys // vocab_size, keys % vocab_size, counts)


def apply_penalties(logits: torch.Tensor, seen: TokenCounts, repeat_penalty: torch.Tensor,
                    presence_penalty: torch.Tensor, frequency_penalty: torch.Tensor) -> torch.Tensor:
    """Penalise tokens seen in the window: repeat (x or / by the penalty), then presence and frequency.

    A negative logit is multiplied by `repeat_penalty`: dividing it would make a seen token more likely.
    Presence is subtracted once per seen token, frequency once per occurrence.
    """
    rows, ids = seen.rows, seen.token_ids
    values = logits[rows, ids]  # [N]
    rp = repeat_penalty[rows]
    values = torch.where(values <= 0, values * rp, values / rp)
    values = values - seen.counts * frequency_penalty[rows] - presence_penalty[rows]
    out = logits.clone()
    out[rows, ids] = values
    return out


def dry_breaker_sequences(breakers: Sequence[str], token_texts: Sequence[str],
                          encode: Callable[[str], list[int]]) -> dict[int, list[tuple[int, ...]]]:
    """Token sequences that spell each DRY sequence breaker, keyed by their first token.

    A token containing a breaker is a breaker on its own (empty tail). A token ending with the start
    of a breaker is the head of a sequence whose tail is the rest of the breaker, encoded
    (llama.cpp's get_overlapping_token_sequences).
    """
    sequences: dict[int, list[tuple[int, ...]]] = {}
    for breaker in breakers:
        breaker = breaker[:_DRY_MAX_BREAKER_CHARS]
        if not breaker:
            continue
        for token, text in enumerate(token_texts):
            if breaker in text:
                tails = [()]
            else:
                tails = []
                pos = text.find(breaker[0])
                while pos != -1:
                    if breaker.startswith(text[pos:]):
                        tails.append(tuple(encode(breaker[len(text) - pos:])[:_DRY_MAX_TAIL_TOKENS]))
                    pos = text.find(breaker[0], pos + 1)
            for tail in tails:
                known = sequences.setdefault(token, [])
                if tail not in known:
                    known.append(tail)
    return sequences


def _z_function(seq: Sequence[int]) -> list[int]:
    """z[k] = length of the longest common prefix of seq and seq[k:] (linear time)."""
    n = len(seq)
    z = [0] * n
    left = right = 0
    for k in range(1, n):
        if k < right:
            z[k] = min(right - k, z[k - left])
        while k + z[k] < n and seq[z[k]] == seq[k + z[k]]:
            z[k] += 1
        if k + z[k] > right:
            left, right = k, k + z[k]
    return z


def dry_penalties(window: Sequence[int], multiplier: float, base: float, allowed_length: int,
                  breakers: DryBreakers) -> dict[int, float]:
    """DRY's penalty for each token that would extend a repeat of the window's end, by token id.

    A token that would continue a repeated run of at least `allowed_length` tokens loses
    multiplier * base ** (run - allowed_length). Runs never reach back past the latest sequence
    breaker, and tokens that are breakers by themselves are never penalised.
    """
    window = list(window)
    n = len(window)
    if n <= allowed_length:
        return {}
    # The most recent breaker limits how far back a repeat may reach.
    rep_limit = n
    for i in range(n):  # i tokens back from the end
        longest = -1
        for tail in breakers.get(window[n - 1 - i], ()):
            if longest < len(tail) <= i and tuple(window[n - i:n - i + len(tail)]) == tail:
                longest = len(tail)
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed_length:
        return {}
    # On the reversed window, z[k] is how many tokens before position n-k match the window's end;
    # the token that followed that earlier run, reversed[k-1], would extend the repeat.
    reversed_window = window[::-1]
    z = _z_function(reversed_window)
    longest_run: dict[int, int] = {}
    for k in range(1, n):
        run = min(z[k], rep_limit)
        token = reversed_window[k - 1]
        if run >= allowed_length and run > longest_run.get(token, -1):
            longest_run[token] = run
    max_exponent = int(_FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else None
    penalties = {}
    for token, run in longest_run.items():
        if () in breakers.get(token, ()):
            continue
        exponent = run - allowed_length
        if max_exponent is not None:
            exponent = min(exponent, max_exponent)
        penalties[token] = float(multiplier * base**exponent)
    return penalties


def apply_dry(logits: torch.Tensor, histories: Histories, multiplier: Sequence[float], base: Sequence[float],
              allowed_length: Sequence[int], last_n: Sequence[int], breakers: Sequence[DryBreakers]) -> torch.Tensor:
    """DRY ("don't repeat yourself") over each row's last `last_n` history tokens; multiplier 0 is off.

    Suffix matching works on token histories, so this loops over the rows that use it.
    """
    out = logits.clone()
    for r, history in enumerate(histories):
        if multiplier[r] == 0 or last_n[r] == 0:
            continue
        window = recent_window(history, last_n[r])
        penalty = dry_penalties(window, multiplier[r], base[r], allowed_length[r], breakers[r])
        if penalty:
            ids = torch.tensor(list(penalty), dtype=torch.long)
            out[r, ids] -= torch.tensor(list(penalty.values()), dtype=logits.dtype)
    return out


def apply_top_n_sigma(logits: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Keep tokens whose logit is within n standard deviations of the row's best; n <= 0 is off.

    Mean and (population) deviation are taken over the tokens not yet removed.
    """
    finite = torch.isfinite(logits)  # [R, V]
    count = finite.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(finite, logits, 0.0).sum(-1, keepdim=True) / count  # [R, 1]
    std = (torch.where(finite, logits - mean, 0.0).square().sum(-1, keepdim=True) / count).sqrt()
    best = logits.max(-1, keepdim=True).values
    active = (n > 0)[:, None] & (logits.shape[-1] > 1)
    floor = torch.where(active, best - n[:, None] * std, NEG_INF)
    return logits.masked_fill(logits < floor, NEG_INF)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k highest logits (exactly k; equal logits at the cut go to the lower ids); k <= 0 is off."""
    vocab_size = logits.shape[-1]
    off = (top_k <= 0) | (top_k >= vocab_size)  # [R]
    if off.all():
        return logits
    k = torch.where(off, 1, top_k).long()[:, None]  # [R, 1]
    kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(-1, k - 1)  # [R, 1]
    keep = logits >= kth
    if (keep.sum(-1, keepdim=True) > k).any():  # ties at the cut: only the lowest ids fit
        above = logits > kth
        tied = keep & ~above
        keep = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    return torch.where(keep | off[:, None], logits, NEG_INF)


def compact(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's surviving tokens, in id order, to the front of a narrow tensor [R, C].

    Returns the narrow logits and the token id of every column (padding columns are -inf and map to
    token 0). C is the most survivors of any row, rounded up to 64, so a row's tokens sit in the same
    columns whatever else shares the batch.
    """
    alive = torch.isfinite(logits)  # [R, V]
    counts = alive.sum(-1)  # [R]
    width = _narrow_width(counts, logits.shape[-1])
    rows, ids = alive.nonzero(as_tuple=True)  # row-major, so ids ascend within a row
    cols = torch.arange(len(rows)) - (counts.cumsum(0) - counts)[rows]
    narrow = torch.full((logits.shape[0], width), NEG_INF, dtype=logits.dtype)
    narrow[rows, cols] = logits[rows, ids]
    column_ids = torch.zeros((logits.shape[0], width), dtype=torch.long)
    column_ids[rows, cols] = ids
    return narrow, column_ids


def _narrow_width(counts: torch.Tensor, vocab_size: int) -> int:
    """Columns of a narrow tensor for rows with `counts` survivors: the most, rounded up to 64, at most the vocabulary."""
    return min(vocab_size, -(-max(int(counts.max()), 1) // 64) * 64)


def top_k_compact(logits: torch.Tensor, top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`compact(apply_top_k(logits, top_k))` from one `topk` call, for rows that all have 0 < k < vocab.

    Where a row's k-th and (k+1)-th largest logits differ, its top k are exactly the k largest. Where they
    tie (common with bfloat16 logits), the tokens above the cut stay and the tied ones fill the rest
    lowest id first, found in one pass over that row alone.
    """
    vocab_size = logits.shape[-1]
    k = top_k.long()[:, None]  # [R, 1]
    values, ids = torch.topk(logits, int(k.max()) + 1, dim=-1)  # [R, k_max + 1], largest first
    kth = values.gather(-1, k - 1)  # [R, 1]
    alive = (torch.arange(values.shape[-1]) < k) & torch.isfinite(values)  # [R, k_max + 1]
    keys = torch.where(alive, ids, vocab_size)  # survivors' ids; vocab_size marks a dead column
    for row in (kth == values.gather(-1, k)).squeeze(-1).nonzero().flatten().tolist():
        cut = logits[row, :] == kth[row]
        above = (logits[row, :] > kth[row]).nonzero().flatten()
        tied = cut.nonzero().flatten()[: int(k[row]) - len(above)] if torch.isfinite(kth[row]) else above[:0]
        keys[row] = vocab_size
        keys[row, : len(above) + len(tied)] = torch.cat([above, tied])
    keys = keys.sort(dim=-1).values  # survivors in id order, dead columns last
    survives = keys < vocab_size
    width = _narrow_width(survives.sum(-1), vocab_size)
    columns = min(width, keys.shape[-1])
    narrow = torch.full((logits.shape[0], width), NEG_INF, dtype=logits.dtype)
    column_ids = torch.zeros((logits.shape[0], width), dtype=torch.long)
    column_ids[:, :columns] = torch.where(survives, keys, 0)[:, :columns]
    narrow[:, :columns] = torch.where(survives, logits.gather(-1, keys.clamp(max=vocab_size - 1)), NEG_INF)[:, :columns]
    return narrow, column_ids


def _sorted_window(keys: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest keys of each row and their token ids, largest first, equal keys by lower id."""
    values, ids = torch.topk(keys, n, dim=-1)  # [R, n]
    ids, by_id = ids.sort(dim=-1)
    values, by_value = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(-1, by_value)


def _keep_prefix(keys: torch.Tensor, probs: torch.Tensor, mass: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """Mask [R, V] of each row's shortest prefix, in descending `keys` order, whose probability reaches `mass`.

    The prefix ends at the first token where the running sum is >= mass (inclusive) or > mass;
    a row that never gets there keeps everything. Sorting 150k tokens is slow, so each row sorts a
    window of its best keys and widens it only while the cut might lie past the window's end.
    """
    num_rows, vocab_size = keys.shape
    keep = torch.ones(num_rows, vocab_size, dtype=torch.bool)
    num_finite = torch.isfinite(keys).sum(-1)  # [R]
    rows = torch.arange(num_rows)
    n = max(1, min(vocab_size, _FIRST_WINDOW, int(num_finite.max())))
    while len(rows):
        values, ids = _sorted_window(keys[rows], n)  # [r, n]
        running = probs[rows].gather(-1, ids).double().cumsum(-1)
        target = mass[rows, None].double()
        reached = running >= target if inclusive else running > target
        found = reached.any(-1)
        length = torch.where(found, reached.int().argmax(-1) + 1, n)  # first position that reaches the mass
        last_kept = values.gather(-1, (length - 1)[:, None]).squeeze(-1)
        done = (num_finite[rows] <= n) | (found & (last_kept > values[:, -1]))
        in_prefix = torch.arange(n) < length[:, None]
        keep[rows[done]] = torch.zeros(int(done.sum()), vocab_size, dtype=torch.bool).scatter(
            -1, ids[done], in_prefix[done]) | ~found[done, None]
        rows = rows[~done]
        n = min(vocab_size, n * 8)
    return keep


def _apply_prefix_filter(logits: torch.Tensor, mass: torch.Tensor, inclusive: bool,
                         make_keys: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    rows = (mass < 1).nonzero().squeeze(-1)
    if len(rows) == 0:
        return logits
    sub = logits[rows]
    probs = probabilities(sub)
    keep = _keep_prefix(make_keys(sub, probs), probs, mass[rows], inclusive)
    out = logits.clone()
    out[rows] = sub.masked_fill(~keep, NEG_INF)
    return out


def apply_typical(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is nearest the entropy, until their mass > p.

    p >= 1 is off.
    """
    def closeness_to_entropy(_, probs):
        entropy = torch.special.entr(probs).sum(-1, keepdim=True)  # [r, 1]
        return -(-probs.log() - entropy).abs()  # removed tokens: -inf

    return _apply_prefix_filter(logits, typical_p, inclusive=False, make_keys=closeness_to_entropy)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their mass is >= p (at least one); p >= 1 is off."""
    return _apply_prefix_filter(logits, top_p, inclusive=True, make_keys=lambda sub, _: sub)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the row's most likely one; 0 is off."""
    floor = logits.max(-1, keepdim=True).values + torch.log(min_p)[:, None]  # p_i >= p * p_max
    return logits.masked_fill(logits < floor, NEG_INF)


def apply_xtc(logits: torch.Tensor, probability: torch.Tensor, threshold: torch.Tensor,
              chance: torch.Tensor) -> torch.Tensor:
    """Exclude Top Choices: when chance <= probability, drop every token with p >= threshold but the least likely.

    Nothing happens with fewer than two such tokens, or when threshold > 0.5. `chance` is the row's
    uniform draw for this step.
    """
    active = (probability > 0) & (threshold <= 0.5) & (chance <= probability)  # [R]
    probs = probabilities(logits)
    top = (probs >= threshold[:, None]) & torch.isfinite(logits) & active[:, None]
    top &= (top.sum(-1) >= 2)[:, None]
    # The survivor is the least likely top token; among equals, the last in sorted order (highest id).
    least = torch.where(top, probs, float("inf")).min(-1, keepdim=True).values
    ids = torch.arange(logits.shape[-1])
    survivor = torch.where(top & (probs == least), ids, -1).max(-1, keepdim=True).values.clamp(min=0)
    top.scatter_(-1, survivor, False)
    return logits.masked_fill(top, NEG_INF)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide by the temperature; a temperature <= 0 keeps only the best token (the first, on ties)."""
    greedy = temperature <= 0  # [R]
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    if greedy.any():
        best = logits.argmax(-1, keepdim=True)  # [R, 1]
        only_best = torch.full_like(logits, NEG_INF).scatter(-1, best, logits.gather(-1, best))
        scaled = torch.where(greedy[:, None], only_best, scaled)
    return scaled


def apply_mirostat_v1(logits: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Mirostat 1: estimate the Zipf exponent from the top 100 tokens, then keep the k that target surprise mu."""
    vocab_size = logits.shape[-1]
    m = min(_MIROSTAT_M, vocab_size)
    top = probabilities(logits).topk(m, dim=-1).values.double()  # [R, m], most likely first
    num_candidates = torch.isfinite(logits).sum(-1, keepdim=True)
    i = torch.arange(m - 1, dtype=torch.float64)
    t = torch.log((i + 2) / (i + 1))  # [m-1]
    used = i < num_candidates - 1  # [R, m-1]
    b = torch.where(used, torch.log(top[:, :-1] / top[:, 1:]), 0.0)
    s_hat = (t * b).sum(-1) / torch.where(used, t * t, 0.0).sum(-1)  # [R]
    epsilon = s_hat - 1
    k = (epsilon * 2.0 ** mu.double() / (1 - float(vocab_size) ** -epsilon)) ** (1 / s_hat)
    k = torch.where(torch.isfinite(k), k, vocab_size).clamp(1, vocab_size).long()  # int(k), at least 1
    return apply_top_k(logits, k)


def apply_mirostat_v2(logits: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Mirostat 2: keep tokens whose surprise -log2 p is at most mu (the most likely always stays)."""
    probs = probabilities(logits)
    keep = -torch.log2(probs) <= mu[:, None]
    keep.scatter_(-1, probs.argmax(-1, keepdim=True), True)
    return logits.masked_fill(~keep, NEG_INF)
