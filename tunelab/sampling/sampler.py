"""Sampler: llama.cpp's sampling chain over a batch of rows, each with its own parameters and seed.

One call takes the logits of every running sequence and returns one token per row. The chain is

    logit_bias -> penalties -> dry -> top_n_sigma -> top_k -> typical -> top_p -> min_p -> xtc
    -> temperature -> draw

and a Mirostat row runs logit_bias -> temperature -> mirostat -> draw (common_sampler_init). A stage
runs only when some row switches it on. Randomness is counter-based: a row's random numbers come
from (seed, step) alone, so its tokens never depend on which other rows share the batch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from tunelab.errors import InvalidOption
from tunelab.sampling import processors as P
from tunelab.sampling.params import SamplingParams

# A Mirostat row skips every filter stage (llama.cpp builds it a chain of temperature + mirostat).
_FILTERS_OFF = dict(repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, dry_multiplier=0.0,
                    top_n_sigma=-1.0, top_k=0, typical_p=1.0, top_p=1.0, min_p=0.0, xtc_probability=0.0)

NO_TOKEN_LEFT = "a row has no token left to sample: every logit is -inf or NaN"

Record = Callable[[str, torch.Tensor, torch.Tensor | None], None]  # stage name, logits, column ids


@dataclass
class SamplerState:
    """What one sequence's sampling carries from one step to the next; the engine keeps one per sequence."""

    seed: int
    step: int = 0  # tokens drawn so far; with the seed it fixes this step's random numbers
    mirostat_mu: float = 0.0  # Mirostat's surprise bound, 2 * tau at the start (llama.cpp)

    @classmethod
    def new(cls, params: SamplingParams) -> SamplerState:
        """The state before the first token; a seed of -1 becomes a fresh random one."""
        return cls(seed=params.with_seed().seed, mirostat_mu=2.0 * params.mirostat_tau)

    def advance(self, params: SamplingParams, drawn_prob: float) -> None:
        """Move past a drawn token; Mirostat steers mu toward its target surprise tau."""
        if params.mirostat and not params.is_greedy:
            surprise = -math.log2(drawn_prob)
            self.mirostat_mu -= params.mirostat_eta * (surprise - params.mirostat_tau)
        self.step += 1


@dataclass
class SampleResult:
    """One token per row, with the log-probabilities a caller asked for.

    Log-probabilities are those of the model's own distribution (a log-softmax of the raw logits,
    before bias, penalties, filters and temperature), as OpenAI-compatible servers report them and
    as llama-server's `n_probs` does by default. `StageTrace` shows the final distribution instead.
    """

    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor | None = None  # [R] float32, when any row set `logprobs`
    top_logprobs: list[list[tuple[int, float]] | None] | None = None  # per row, best first, when any row asked


@dataclass
class StageTrace:
    """One sampling step of one row, stage by stage, for `tunelab explain`.

    Stages are "raw" and then each stage the row's parameters switch on, in chain order (for a
    Mirostat row: raw, logit_bias, temperature, mirostat).
    """

    stage_names: list[str]
    token_ids: list[int]  # candidates shown: raw top-N, then final top-N, then the drawn token
    probs: list[list[float]]  # probs[s][c]: probability of candidate c after stage s
    removed: list[list[bool]]  # removed[s][c]: stage s took candidate c out
    num_alive: list[int]  # tokens of the whole vocabulary still possible after each stage
    drawn_id: int
    drawn_prob: float  # under the final distribution

    @property
    def final_probs(self) -> list[float]:
        """Each candidate's probability in the distribution the token was drawn from."""
        return self.probs[-1]


def _uniform(seed: int, step: int, stream: str) -> float:
    """A number in [0, 1) fixed by (seed, step, stream) alone: a counter-based draw, no generator state."""
    digest = hashlib.blake2b(f"{seed}/{step}/{stream}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / 2.0**53


def draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row from softmax(logits), walking tokens in id order.

    A row with a single token left (greedy) returns it whatever its uniform.
    """
    weights = torch.exp(logits - logits.max(-1, keepdim=True).values).nan_to_num(0.0)  # [R, V]
    cdf = weights.double().cumsum(-1)
    if (cdf[:, -1] == 0).any():
        raise ValueError(NO_TOKEN_LEFT)
    target = uniforms.double()[:, None] * cdf[:, -1:]  # [R, 1]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


class Sampler:
    """Picks the next token for every row of a batch, each row under its own `SamplingParams`.

    `token_texts` (each token id's text) and `encode` are needed only to turn DRY's sequence
    breakers into token sequences; without them a row with DRY on and breakers set is an error.
    """

    def __init__(self, token_texts: Sequence[str] | None = None, encode: Callable[[str], list[int]] | None = None):
        self.token_texts = token_texts
        self.encode = encode
        self._breakers: dict[tuple[str, ...], dict[int, list[tuple[int, ...]]]] = {}

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]],
                 states: Sequence[SamplerState]) -> SampleResult:
        """Sample one token per row of `logits` [R, V] and advance each row's state.

        `histories[r]` is row r's prompt + generated ids, the window the penalties and DRY look at.
        """
        if not len(params) == len(histories) == len(states) == logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows need as many params, histories and states, got "
                             f"{len(params)}, {len(histories)}, {len(states)}")
        raw = logits.float()
        token_ids, _ = self._step(raw, params, histories, states, record=None)
        result = SampleResult(token_ids=token_ids)
        if any(p.logprobs for p in params):
            logprobs = torch.log_softmax(raw, dim=-1)  # [R, V]
            result.logprobs = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
            num_top = max(p.top_logprobs for p in params)
            if num_top:
                values, ids = logprobs.topk(num_top, dim=-1)  # [R, K]
                result.top_logprobs = [
                    list(zip(ids[r, :p.top_logprobs].tolist(), values[r, :p.top_logprobs].tolist()))
                    if p.top_logprobs else None
                    for r, p in enumerate(params)
                ]
        return result

    def explain(self, logits: torch.Tensor, params: SamplingParams, history: Sequence[int], state: SamplerState,
                num_candidates: int = 10) -> StageTrace:
        """Take one sampling step for one row (`logits` [V]) and record every stage it ran.

        The draw and the state update are exactly those of `__call__` for this row, so a loop of
        `explain` calls generates what the engine would.
        """
        vocab_size = logits.shape[-1]
        stages: list[tuple[str, torch.Tensor]] = []

        def record(name: str, x: torch.Tensor, column_ids: torch.Tensor | None) -> None:
            if column_ids is not None:  # spread a narrowed row back over the vocabulary
                alive = torch.isfinite(x[0])
                row = torch.full((vocab_size,), P.NEG_INF).index_put((column_ids[0][alive],), x[0][alive])
                x = row[None]
            stages.append((name, x[0]))

        token_ids, final_probs = self._step(logits.float()[None], [params], [history], [state], record)
        drawn = int(token_ids[0])
        probs = [P.probabilities(x[None])[0] for _, x in stages]  # per stage [V]
        n = min(num_candidates, vocab_size)
        candidates = list(dict.fromkeys(probs[0].topk(n).indices.tolist() + probs[-1].topk(n).indices.tolist()
                                        + [drawn]))
        ids = torch.tensor(candidates)
        alive = [torch.isfinite(x) for _, x in stages]
        removed = [torch.zeros(len(ids), dtype=torch.bool)] + [
            (before & ~after)[ids] for before, after in zip(alive, alive[1:])]
        return StageTrace(
            stage_names=[name for name, _ in stages],
            token_ids=candidates,
            probs=[p[ids].tolist() for p in probs],
            removed=[r.tolist() for r in removed],
            num_alive=[int(a.sum()) for a in alive],
            drawn_id=drawn,
            drawn_prob=float(final_probs[0]),
        )

    def _step(self, logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]],
              states: Sequence[SamplerState], record: Record | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the chain, draw, advance the states; returns the tokens and their final probabilities."""
        num_rows, vocab_size = logits.shape
        chain_params = [replace(p, **_FILTERS_OFF) if p.mirostat else p for p in params]
        token_ids = torch.zeros(num_rows, dtype=torch.long)
        drawn_probs = torch.zeros(num_rows)
        # Rows that top_k cuts down continue on a narrow tensor of their candidates, the others on
        # the whole vocabulary. Grouping by each row's own top_k keeps a row's arithmetic, to the
        # last bit, independent of what else is in the batch.
        uses_top_k = [0 < p.top_k < vocab_size for p in chain_params]
        for group in ([r for r in range(num_rows) if uses_top_k[r]], [r for r in range(num_rows) if not uses_top_k[r]]):
            if not group:
                continue
            # A group of greedy rows needs no temperature stage and no draw: the best survivor, by argmax
            # (the first on ties, as the temperature stage picks it), with probability 1.
            greedy = record is None and all(params[r].is_greedy for r in group)
            rows = logits if len(group) == num_rows else logits[group]  # the stages never write their input
            final, column_ids = self._run_chain(
                rows, [chain_params[r] for r in group], [histories[r] for r in group],
                [states[r] for r in group], record or (lambda name, x, column_ids: None), stop_before_temperature=greedy)
            if greedy:
                best = final.max(-1, keepdim=True)  # [G, 1]
                if not torch.isfinite(best.values).all():
                    raise ValueError(NO_TOKEN_LEFT)
                columns, probs = best.indices, torch.ones(len(group))
            else:
                columns = draw(final, torch.tensor([_uniform(states[r].seed, states[r].step, "draw") for r in group],
                                                   dtype=torch.float64))[:, None]  # [G, 1]
                probs = P.probabilities(final).gather(-1, columns).squeeze(-1)
            token_ids[group] = (columns if column_ids is None else column_ids.gather(-1, columns)).squeeze(-1)
            drawn_probs[group] = probs
        for p, s, prob in zip(params, states, drawn_probs.tolist()):
            s.advance(p, prob)
        return token_ids, drawn_probs

    def _run_chain(self, logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]],
                   states: Sequence[SamplerState], record: Record, stop_before_temperature: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply every stage some row uses (up to temperature when `stop_before_temperature`); returns the
        final logits and, once narrowed, each column's token id."""
        vocab_size = logits.shape[-1]
        column_ids = None

        def column(name: str, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype)  # [R]

        record("raw", logits, None)
        if any(p.logit_bias for p in params):
            for p in params:
                bad = [t for t in p.logit_bias if t >= vocab_size]
                if bad:
                    raise InvalidOption(f"parameter 'logit_bias' names token {bad[0]}, but the model's vocabulary "
                                        f"has ids 0..{vocab_size - 1}")
            logits = P.apply_logit_bias(logits, [p.logit_bias for p in params])
            record("logit_bias", logits, None)
        if any(_uses_penalties(p) for p in params):
            windows = [p.repeat_last_n if _uses_penalties(p) else 0 for p in params]
            seen = P.count_recent_tokens(histories, windows, vocab_size)
            logits = P.apply_penalties(logits, seen, column("repeat_penalty"), column("presence_penalty"),
                                       column("frequency_penalty"))
            record("penalties", logits, None)
        if any(_uses_dry(p) for p in params):
            logits = P.apply_dry(
                logits, histories, [p.dry_multiplier if _uses_dry(p) else 0.0 for p in params],
                [p.dry_base for p in params], [p.dry_allowed_length for p in params],
                [p.dry_penalty_last_n for p in params],
                [self._dry_breakers(p.dry_sequence_breakers) if _uses_dry(p) else {} for p in params])
            record("dry", logits, None)
        if any(p.top_n_sigma > 0 for p in params):
            logits = P.apply_top_n_sigma(logits, column("top_n_sigma"))
            record("top_n_sigma", logits, None)
        if any(0 < p.top_k < vocab_size for p in params):
            # The later stages need only the survivors: when every row cuts, they move to a narrow tensor.
            if all(0 < p.top_k < vocab_size for p in params):
                logits, column_ids = P.top_k_compact(logits, column("top_k", torch.long))
            else:
                logits = P.apply_top_k(logits, column("top_k", torch.long))
            record("top_k", logits, column_ids)
        if any(p.typical_p < 1 for p in params):
            logits = P.apply_typical(logits, column("typical_p"))
            record("typical_p", logits, column_ids)
        if any(p.top_p < 1 for p in params):
            logits = P.apply_top_p(logits, column("top_p"))
            record("top_p", logits, column_ids)
        if any(p.min_p > 0 for p in params):
            logits = P.apply_min_p(logits, column("min_p"))
            record("min_p", logits, column_ids)
        if any(p.xtc_probability > 0 and p.xtc_threshold <= 0.5 for p in params):
            chance = torch.tensor([_uniform(s.seed, s.step, "xtc") for s in states])
            logits = P.apply_xtc(logits, column("xtc_probability"), column("xtc_threshold"), chance)
            record("xtc", logits, column_ids)
        if stop_before_temperature:
            return logits, column_ids
        if any(p.temperature != 1 for p in params):
            logits = P.apply_temperature(logits, column("temperature"))
            record("temperature", logits, column_ids)
        # A greedy Mirostat row has one token left after temperature; Mirostat would only divide by zero.
        mirostat_rows = {v: [r for r, p in enumerate(params) if p.mirostat == v and not p.is_greedy] for v in (1, 2)}
        if mirostat_rows[1] or mirostat_rows[2]:
            logits = logits.clone()
            for version, apply in ((1, P.apply_mirostat_v1), (2, P.apply_mirostat_v2)):
                rows = mirostat_rows[version]
                if rows:
                    mu = torch.tensor([states[r].mirostat_mu for r in rows])
                    logits[rows] = apply(logits[rows], mu)
            record("mirostat", logits, column_ids)
        return logits, column_ids

    def _dry_breakers(self, breakers: tuple[str, ...]) -> dict[int, list[tuple[int, ...]]]:
        if not breakers:
            return {}
        if breakers not in self._breakers:
            if self.token_texts is None or self.encode is None:
                raise ValueError("DRY sequence breakers need the vocabulary: build the Sampler with "
                                 "token_texts and encode")
            self._breakers[breakers] = P.dry_breaker_sequences(breakers, self.token_texts, self.encode)
        return self._breakers[breakers]


def _uses_penalties(p: SamplingParams) -> bool:
    return p.repeat_last_n != 0 and (p.repeat_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0)


def _uses_dry(p: SamplingParams) -> bool:
    return p.dry_multiplier > 0 and p.dry_penalty_last_n != 0
