"""Options: the Ollama-named knobs, their single source of defaults, and layering.

An option is anything a Modelfile `PARAMETER` line or an API request's
`options` may set. Load-time options (`num_ctx`, `num_thread`, `dtype`, `kv_cache_type`) decide
how a model is loaded; the rest apply per request. Effective options are always
built the same way, by `resolve_options`:

    DEFAULTS  <-  the model's Modelfile PARAMETERs  <-  the request's options

Defaults follow current Ollama (`api/types.go` DefaultOptions, repeat_penalty
1.0 since v0.32.10) and, for knobs Ollama does not send, llama.cpp's
`common_params_sampling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from tunelab.errors import InvalidOption


@dataclass(frozen=True)
class OptionSpec:
    """One knob: its type, default, whether it is load-time, and its valid range."""

    name: str
    type: type
    default: Any
    help: str
    is_load_time: bool = False
    is_list: bool = False  # `stop`: repeatable in a Modelfile, a list in JSON
    check: Callable[[Any], bool] | None = None
    valid: str = ""  # the valid range, as said in error messages


def _spec(name, type_, default, help, *, load=False, is_list=False, check=None, valid=""):
    return OptionSpec(name, type_, default, help, load, is_list, check, valid)


_ANY_SEED = "-1 (random) or a non-negative integer"

OPTION_SPECS: dict[str, OptionSpec] = {
    s.name: s
    for s in [
        # Load-time: changing one means loading the model again.
        _spec("num_ctx", int, 4096, "context window in tokens (prompt + answer)", load=True,
              check=lambda v: v >= 16, valid=">= 16"),
        _spec("num_batch", int, 512, "prompt tokens processed per forward pass", load=True,
              check=lambda v: v >= 1, valid=">= 1"),
        _spec("num_thread", int, 0, "CPU threads (0 = every core)", load=True,
              check=lambda v: v >= 0, valid=">= 0"),
        _spec("num_gpu", int, -1, "layers on the GPU (-1 auto, 0 CPU only)", load=True,
              check=lambda v: v >= -1, valid=">= -1"),
        _spec("main_gpu", int, 0, "GPU index to use", load=True, check=lambda v: v >= 0, valid=">= 0"),
        _spec("use_mmap", bool, True, "map weight files instead of reading them", load=True),
        _spec("dtype", str, "auto", "weight/compute type: auto, float32, bfloat16, int8, int4", load=True,
              check=lambda v: v in ("auto", "float32", "bfloat16", "float16", "int8", "int4"),
              valid="one of auto, float32, bfloat16, float16, int8, int4"),
        _spec("kv_cache_type", str, "auto", "KV cache: auto (the compute type) or q8_0 (8-bit: half the memory)",
              load=True, check=lambda v: v in ("auto", "q8_0"), valid="auto or q8_0"),
        # Per request: length and stopping.
        _spec("num_predict", int, -1, "max tokens to generate (-1 = until a stop or the context is full)",
              check=lambda v: v >= -1, valid="-1 (no limit) or >= 0"),
        _spec("num_keep", int, 4, "prompt tokens kept on a context shift", check=lambda v: v >= -1, valid=">= -1"),
        _spec("stop", str, (), "stop string (repeatable)", is_list=True),
        _spec("seed", int, -1, "random seed; -1 draws a fresh one per request",
              check=lambda v: v >= -1, valid=_ANY_SEED),
        # Sampling, in llama.cpp's chain order.
        _spec("repeat_penalty", float, 1.0, "penalise tokens seen in the last repeat_last_n tokens",
              check=lambda v: v > 0, valid="> 0 (1.0 = off)"),
        _spec("repeat_last_n", int, 64, "penalty window (0 = off, -1 = whole context)",
              check=lambda v: v >= -1, valid="-1, 0 or a positive integer"),
        _spec("presence_penalty", float, 0.0, "subtract once from every token in the window",
              check=lambda v: -2.0 <= v <= 2.0, valid="[-2, 2]"),
        _spec("frequency_penalty", float, 0.0, "subtract per occurrence in the window",
              check=lambda v: -2.0 <= v <= 2.0, valid="[-2, 2]"),
        _spec("dry_multiplier", float, 0.0, "DRY repetition penalty strength (0 = off)",
              check=lambda v: v >= 0, valid=">= 0"),
        _spec("dry_base", float, 1.75, "DRY penalty growth base", check=lambda v: v >= 1, valid=">= 1"),
        _spec("dry_allowed_length", int, 2, "repeats up to this length are not penalised by DRY",
              check=lambda v: v >= 0, valid=">= 0"),
        _spec("dry_penalty_last_n", int, 64, "DRY window (0 = off, -1 = whole context)",
              check=lambda v: v >= -1, valid="-1, 0 or a positive integer"),
        _spec("dry_sequence_breakers", str, ("\n", ":", '"', "*"), "strings that end a DRY match",
              is_list=True),
        _spec("top_n_sigma", float, -1.0, "keep logits within n standard deviations of the max (<= 0 = off)"),
        _spec("top_k", int, 40, "keep the k most likely tokens (0 = off)", check=lambda v: v >= 0, valid=">= 0"),
        _spec("typical_p", float, 1.0, "locally typical sampling mass (1.0 = off)",
              check=lambda v: 0 < v <= 1, valid="(0, 1]"),
        _spec("top_p", float, 0.9, "keep the smallest set of tokens reaching this mass (1.0 = off)",
              check=lambda v: 0 < v <= 1, valid="(0, 1]"),
        _spec("min_p", float, 0.0, "drop tokens below min_p times the top probability (0 = off)",
              check=lambda v: 0 <= v <= 1, valid="[0, 1]"),
        _spec("xtc_probability", float, 0.0, "chance per step to exclude the top choices (0 = off)",
              check=lambda v: 0 <= v <= 1, valid="[0, 1]"),
        _spec("xtc_threshold", float, 0.1, "XTC: tokens at or above this probability are top choices",
              check=lambda v: 0 <= v <= 1, valid="[0, 1]"),
        _spec("temperature", float, 0.8, "divide logits by this (<= 0 = greedy)",
              check=lambda v: v >= 0, valid=">= 0 (0 = greedy)"),
        _spec("mirostat", int, 0, "Mirostat sampling: 0 off, 1 v1, 2 v2", check=lambda v: v in (0, 1, 2),
              valid="0, 1 or 2"),
        _spec("mirostat_tau", float, 5.0, "Mirostat target surprise", check=lambda v: v > 0, valid="> 0"),
        _spec("mirostat_eta", float, 0.1, "Mirostat learning rate", check=lambda v: v > 0, valid="> 0"),
        # Qwen3 hybrid thinking.
        _spec("think", bool, None, "let a thinking model reason before answering (unset = model default)"),
        _spec("think_budget", int, -1, "max thinking tokens before the thought is closed (-1 = no limit)",
              check=lambda v: v >= -1, valid="-1 (no limit) or >= 0"),
    ]
}

# Accepted in a Modelfile with a warning and otherwise ignored, as Ollama does.
DEPRECATED_OPTIONS = frozenset(
    {"penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock", "tfs_z", "numa"}
)

LOAD_TIME_OPTIONS = frozenset(name for name, spec in OPTION_SPECS.items() if spec.is_load_time)


def _spec_for(name: str) -> OptionSpec:
    spec = OPTION_SPECS.get(name)
    if spec is None:
        known = ", ".join(sorted(OPTION_SPECS))
        raise InvalidOption(f"unknown parameter '{name}'; known parameters are: {known}")
    return spec


def _check_range(spec: OptionSpec, value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidOption(f"parameter '{spec.name}' must be a finite number, got {value}")
    if spec.check is not None and value is not None and not spec.check(value):
        raise InvalidOption(f"parameter '{spec.name}' must be {spec.valid}, got {value!r}")
    return value


def parse_option_text(name: str, text: str) -> Any:
    """Parse one Modelfile `PARAMETER name value` value from its text.

    For list options (`stop`) this returns one element; the caller accumulates.
    """
    spec = _spec_for(name)
    text = text.strip()
    try:
        if spec.type is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError
            value: Any = lowered in ("true", "1")
        elif spec.type is int:
            value = int(text)
        elif spec.type is float:
            value = float(text)
        else:
            value = text
    except ValueError:
        kind = {bool: "bool", int: "int", float: "float"}.get(spec.type, "string")
        raise InvalidOption(f"invalid {kind} value {text!r} for parameter '{name}'") from None
    if spec.is_list:
        return value
    return _check_range(spec, value)


def coerce_option(name: str, value: Any) -> Any:
    """Validate one option value given as JSON (an API request or a stored manifest)."""
    spec = _spec_for(name)
    if value is None:
        return None
    if spec.is_list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InvalidOption(f"option '{name}' must be a string or a list of strings")
        return tuple(value)
    if spec.type is bool:
        if not isinstance(value, bool):
            raise InvalidOption(f"option '{name}' must be of type boolean, got {value!r}")
    elif spec.type is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise InvalidOption(f"option '{name}' must be of type integer, got {value!r}")
        value = int(value)
    elif spec.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidOption(f"option '{name}' must be of type number, got {value!r}")
        value = float(value)
    elif not isinstance(value, str):
        raise InvalidOption(f"option '{name}' must be of type string, got {value!r}")
    return _check_range(spec, value)


def validate_options(options: dict[str, Any] | None, *, ignore_unknown: bool = False) -> dict[str, Any]:
    """Coerce and check every entry of an options dict; drop None values.

    API requests ignore unknown keys (as Ollama does); Modelfiles reject them.
    """
    out: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if name not in OPTION_SPECS:
            if ignore_unknown or name in DEPRECATED_OPTIONS:
                continue
            _spec_for(name)
        coerced = coerce_option(name, value)
        if coerced is not None:
            out[name] = coerced
    return out


def default_options() -> dict[str, Any]:
    """Every option at its default value."""
    return {name: spec.default for name, spec in OPTION_SPECS.items()}


def resolve_options(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Layer option dicts over the defaults; later layers win, None values are skipped.

    Typical call: `resolve_options(model_parameters, request_options)`.
    """
    resolved = default_options()
    for layer in layers:
        for name, value in validate_options(layer).items():
            resolved[name] = value
    return resolved
