"""SamplingParams: one request's sampling knobs, validated, under Ollama's names and defaults.

Every knob Ollama or llama.cpp documents is here and does what llama.cpp does. Ollama has shipped
three samplers (spec ollama-llamacpp.md §5.5); where they disagree tunelab follows llama.cpp, the
engine behind Ollama >= 0.30:

- order: logit_bias, penalties, dry, top_n_sigma, top_k, typical_p, top_p, min_p, xtc, temperature,
  then the draw; Mirostat rows run only logit_bias, temperature and Mirostat.
- top_k, typical_p, top_p, min_p and xtc see untempered (but penalised) logits; temperature only
  reweights the survivors. The Go sampler of Ollama 0.7.1-0.29 filtered tempered probabilities.
- temperature <= 0 is greedy over the penalised, filtered logits (not argmax of the raw logits).
- repeat/presence/frequency penalties count the last `repeat_last_n` tokens of prompt + output,
  as llama-server does; the Go sampler ignored them altogether.
- top_p keeps tokens until the running mass is >= top_p; typical_p until it is > typical_p.
- repeat_last_n = -1 (and dry_penalty_last_n = -1) means the whole context, as Ollama documents,
  rather than "off" (old llamarunner) or an error (current llama-server schema).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from tunelab.errors import InvalidOption
from tunelab.options import OPTION_SPECS, coerce_option

# The knobs that come from the option catalog (Modelfile PARAMETERs and request options).
OPTION_FIELDS = (
    "temperature", "top_k", "top_p", "min_p", "typical_p",
    "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty",
    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers",
    "top_n_sigma", "xtc_probability", "xtc_threshold",
    "mirostat", "mirostat_tau", "mirostat_eta",
    "seed", "num_predict", "stop",
)
# The knobs only the OpenAI API has.
OPENAI_FIELDS = ("logit_bias", "logprobs", "top_logprobs")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, which Ollama keeps
MAX_LOGIT_BIAS = 100.0  # OpenAI's range is [-100, 100]


def _default(name: str) -> Any:
    return OPTION_SPECS[name].default


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; built validated, so a bad value never reaches the sampler.

    Defaults are the option catalog's (current Ollama). `seed = -1` asks for a fresh random seed,
    fixed once at submit time with `with_seed()`.
    """

    temperature: float = _default("temperature")
    top_k: int = _default("top_k")
    top_p: float = _default("top_p")
    min_p: float = _default("min_p")
    typical_p: float = _default("typical_p")
    repeat_penalty: float = _default("repeat_penalty")
    repeat_last_n: int = _default("repeat_last_n")
    presence_penalty: float = _default("presence_penalty")
    frequency_penalty: float = _default("frequency_penalty")
    dry_multiplier: float = _default("dry_multiplier")
    dry_base: float = _default("dry_base")
    dry_allowed_length: int = _default("dry_allowed_length")
    dry_penalty_last_n: int = _default("dry_penalty_last_n")
    dry_sequence_breakers: tuple[str, ...] = _default("dry_sequence_breakers")
    top_n_sigma: float = _default("top_n_sigma")
    xtc_probability: float = _default("xtc_probability")
    xtc_threshold: float = _default("xtc_threshold")
    mirostat: int = _default("mirostat")
    mirostat_tau: float = _default("mirostat_tau")
    mirostat_eta: float = _default("mirostat_eta")
    seed: int = _default("seed")
    num_predict: int = _default("num_predict")
    stop: tuple[str, ...] = _default("stop")
    logit_bias: dict[int, float] = field(default_factory=dict, hash=False)
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        for name in OPTION_FIELDS:
            value = getattr(self, name)
            if value is None:
                raise InvalidOption(f"parameter '{name}' must have a value; leave it out to use the default")
            object.__setattr__(self, name, coerce_option(name, value))
        object.__setattr__(self, "logit_bias", _checked_logit_bias(self.logit_bias))
        if not isinstance(self.logprobs, bool):
            raise InvalidOption(f"parameter 'logprobs' must be true or false, got {self.logprobs!r}")
        top = self.top_logprobs
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidOption(f"parameter 'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}")
        if top > 0 and not self.logprobs:
            raise InvalidOption("parameter 'top_logprobs' needs 'logprobs' set to true")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **openai_extras: Any) -> SamplingParams:
        """Build from `tunelab.options.resolve_options(...)` output plus OpenAI-only fields.

        Entries of `options` that are not sampling knobs (num_ctx, think, ...) are ignored.
        """
        unknown = sorted(set(openai_extras) - set(OPENAI_FIELDS))
        if unknown:
            raise InvalidOption(f"unknown sampling field '{unknown[0]}'; known extras are: {', '.join(OPENAI_FIELDS)}")
        values = {name: options[name] for name in OPTION_FIELDS if options.get(name) is not None}
        values.update({name: value for name, value in openai_extras.items() if value is not None})
        return cls(**values)

    @property
    def is_greedy(self) -> bool:
        """True when the row always takes the most likely surviving token (temperature <= 0)."""
        return self.temperature <= 0

    def with_seed(self, seed: int | None = None) -> SamplingParams:
        """A copy with a concrete seed: `seed` if given, else this one, else a fresh random one.

        Call it at submit time so a "random" request still has a seed to report and to rerun with.
        """
        if seed is None:
            if self.seed >= 0:
                return self
            seed = secrets.randbelow(2**31)
        return replace(self, seed=seed)


def _checked_logit_bias(bias: Any) -> dict[int, float]:
    if not isinstance(bias, Mapping):
        raise InvalidOption(f"parameter 'logit_bias' must map token ids to numbers, got {bias!r}")
    checked: dict[int, float] = {}
    for key, value in bias.items():
        try:
            # JSON object keys arrive as strings ("50256": -100).
            token = int(key) if isinstance(key, (int, str)) and not isinstance(key, bool) else None
        except ValueError:
            token = None
        if token is None or token < 0:
            raise InvalidOption(f"parameter 'logit_bias' has key {key!r}; keys must be non-negative token ids")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or abs(value) > MAX_LOGIT_BIAS:
            raise InvalidOption(
                f"parameter 'logit_bias' for token {token} must be a number in "
                f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {value!r}"
            )
        checked[token] = float(value)
    return checked
