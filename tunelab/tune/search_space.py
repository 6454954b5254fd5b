"""What a study can vary: the knobs and their ranges, SYSTEM prompt variants, thinking, and the baselines.

A `Config` is one point: knob values (absent knobs keep the model's own),
a system prompt and a thinking switch. A `SearchSpace` says which knobs are
searched over which ranges; it comes from defaults, a TOML `[search]` table
and flags. `baselines` are the configurations every study measures.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optuna.trial import Trial

from tunelab.errors import InvalidOption
from tunelab.options import OPTION_SPECS, coerce_option
from tunelab.tune.suites import DEFAULT_SYSTEM_PROMPT

KNOBS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
DEFAULT_RANGES = {"temperature": (0.0, 1.2), "top_p": (0.5, 1.0), "top_k": (1, 100), "min_p": (0.0, 0.2),
                  "repeat_penalty": (1.0, 1.3)}
OLLAMA_DEFAULTS = {name: OPTION_SPECS[name].default for name in KNOBS}
_NO_PENALTIES = {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
QWEN_PRESETS = {  # specs/qwen3.md §5.1, keyed by thinking on
    False: {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0, **_NO_PENALTIES},
    True: {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0, **_NO_PENALTIES},
}


@dataclass(frozen=True)
class Config:
    """Everything a study varies for one arm; knobs left out keep the model's own values."""

    name: str
    knobs: dict[str, Any] = field(default_factory=dict)
    system: str = ""  # "" = no system prompt
    think: bool | None = None  # None = the model's default

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Config:
        """The configuration `dataclasses.asdict` wrote."""
        return cls(**data)


@dataclass
class SearchSpace:
    """Ranges of the searched knobs, the SYSTEM prompt variants, and the thinking choices."""

    ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_RANGES))
    systems: dict[str, str] = field(default_factory=lambda: {"default": DEFAULT_SYSTEM_PROMPT})
    think: tuple[bool | None, ...] = (None,)
    think_budget: int = -1  # max thinking tokens when thinking is on (-1 = no limit)

    @classmethod
    def load(cls, toml_path: Path | None = None, ranges: dict[str, str] | None = None,
             systems: dict[str, str] | None = None, think: str | None = None,
             think_budget: int | None = None) -> SearchSpace:
        """Defaults, then a TOML file's `[search]` table, then flags (`ranges` as "LOW:HIGH" strings).

        Naming any knob (in the file or as a flag) searches exactly the knobs named.
        """
        space, searched = cls(), {}
        if toml_path is not None:
            try:
                table = tomllib.loads(Path(toml_path).read_text(encoding="utf-8")).get("search", {})
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise InvalidOption(f"cannot read search space {toml_path}: {exc}; "
                                    "give a TOML file with a [search] table") from None
            searched = {name: _range(name, value) for name, value in table.items() if name in KNOBS}
            space.systems = dict(table.get("system", space.systems))
            if "think" in table:
                space.think = _think_choices(table["think"])
            space.think_budget = int(table.get("think_budget", space.think_budget))
            unknown = set(table) - set(KNOBS) - {"system", "think", "think_budget"}
            if unknown:
                raise InvalidOption(f"unknown key(s) {', '.join(sorted(unknown))} in [search] of {toml_path}; "
                                    f"use {', '.join(KNOBS)}, system, think, think_budget")
        searched.update({name: _range(name, text) for name, text in (ranges or {}).items()})
        if searched:  # naming any knob means searching exactly the knobs named
            space.ranges = searched
        if systems:
            space.systems = dict(systems)
        if think is not None:
            space.think = _think_choices(think)
        if think_budget is not None:
            space.think_budget = think_budget
        return space

    @property
    def searched(self) -> list[str]:
        """The knobs Optuna varies (a range whose ends are equal fixes its knob instead)."""
        return [name for name, (low, high) in self.ranges.items() if low < high]

    def suggest(self, trial: Trial) -> Config:
        """The configuration Optuna proposes for `trial` (or the one enqueued for it)."""
        knobs: dict[str, Any] = {}
        for name, (low, high) in self.ranges.items():
            if low == high:
                knobs[name] = low
            elif name == "top_k":
                knobs[name] = trial.suggest_int(name, int(low), int(high))
            else:
                knobs[name] = trial.suggest_float(name, low, high)
        names = list(self.systems)
        system = trial.suggest_categorical("system", names) if len(names) > 1 else names[0]
        think = trial.suggest_categorical("think", list(self.think)) if len(self.think) > 1 else self.think[0]
        return Config(f"trial {trial.number}", knobs, self.systems[system], think)

    def point(self, config: Config, effective: dict[str, Any]) -> dict[str, Any]:
        """Where a baseline stands in the space, as Optuna parameters (clipped into the ranges)."""
        params: dict[str, Any] = {}
        for name in self.searched:
            low, high = self.ranges[name]
            value = min(max(effective.get(name, OPTION_SPECS[name].default), low), high)
            params[name] = int(value) if name == "top_k" else float(value)
        if len(self.systems) > 1:
            matching = [name for name, text in self.systems.items() if text == config.system]
            params["system"] = (matching or list(self.systems))[0]
        if len(self.think) > 1:
            params["think"] = config.think if config.think in self.think else self.think[0]
        return params

    def grid(self, points: int) -> dict[str, list[Any]]:
        """The grid GridSampler walks: `points` evenly spaced values per knob, every categorical choice."""
        grid: dict[str, list[Any]] = {}
        for name in self.searched:
            low, high = self.ranges[name]
            values = [low + (high - low) * i / (points - 1) for i in range(points)] if points > 1 else [low]
            grid[name] = sorted({round(v) for v in values}) if name == "top_k" else values
        if len(self.systems) > 1:
            grid["system"] = list(self.systems)
        if len(self.think) > 1:
            grid["think"] = list(self.think)
        return grid

    def without(self, knobs: list[str]) -> SearchSpace:
        """The same space with `knobs` no longer searched."""
        return replace(self, ranges={n: r for n, r in self.ranges.items() if n not in knobs})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchSpace:
        """The space `dataclasses.asdict` wrote (JSON turns its tuples into lists)."""
        return cls(ranges={n: tuple(r) for n, r in data["ranges"].items()}, systems=data["systems"],
                   think=tuple(data["think"]), think_budget=data["think_budget"])


def baselines(space: SearchSpace, supports_thinking: bool, modelfile: Config | None = None) -> list[Config]:
    """The configurations every study measures: model and Ollama defaults, Qwen's preset, greedy, the user's."""
    system, think = next(iter(space.systems.values())), space.think[0]
    configs = [Config("model defaults", {}, system, think),
               Config("ollama defaults", dict(OLLAMA_DEFAULTS), system, think)]
    for mode in space.think:
        thinking = supports_thinking if mode is None else mode
        name = "qwen preset" + (" (thinking)" if thinking and len(space.think) > 1 else "")
        configs.append(Config(name, dict(QWEN_PRESETS[bool(thinking)]), system, mode))
    configs.append(Config("greedy", {"temperature": 0.0}, system, think))
    if modelfile is not None:
        configs.append(modelfile)
    return configs


def _range(name: str, value: Any) -> tuple[float, float]:
    """A knob's range from "LOW:HIGH" (or one value, to fix it), or a TOML [low, high] pair."""
    parts = value.split(":") if isinstance(value, str) else list(value) if isinstance(value, list) else [value]
    try:
        low, high = (parts * 2)[:2] if len(parts) == 1 else parts
        low, high = coerce_option(name, float(low)), coerce_option(name, float(high))
    except (ValueError, TypeError, InvalidOption) as exc:
        raise InvalidOption(f"bad range {value!r} for {name} ({exc}); write LOW:HIGH, e.g. 0.1:0.9") from None
    if low > high:
        raise InvalidOption(f"range {value!r} for {name} runs backwards; write LOW:HIGH with LOW <= HIGH")
    return (int(low), int(high)) if name == "top_k" else (low, high)


def _think_choices(value: Any) -> tuple[bool | None, ...]:
    words = value if isinstance(value, list) else str(value).split(",")
    table = {"on": True, "true": True, "off": False, "false": False, "default": None, "both": None}
    choices = []
    for word in words:
        key = str(word).strip().lower()
        if key not in table:
            raise InvalidOption(f"unknown thinking choice {word!r}; use on, off, both or default")
        choices.extend([False, True] if key == "both" else [table[key]])
    return tuple(dict.fromkeys(choices))
