"""Where a study's generations come from: tunelab's engine, any OpenAI-compatible server, or a script.

A backend turns one `GenerationJob` (chat messages, sampling options, seed)
into one answer. `generate` blocks and is thread-safe: the study calls it from
a pool of threads, so with the local engine the jobs in flight run as rows of
one continuously batched decode, each row with its own parameters and seed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from tunelab.engine.request import FinishReason
from tunelab.errors import InvalidOption
from tunelab.generation import collect, prepare_chat
from tunelab.options import OPTION_SPECS, resolve_options
from tunelab.runtime import ModelRuntime, resolve_dtype
from tunelab.sampling.params import OPTION_FIELDS
from tunelab.tune.generation_cache import GenerationKey
from tunelab.tune.scoring import Generation
from tunelab.tune.suites import Task

# Every option that changes which token a row picks (seed, length and stop strings travel per job).
SAMPLING_OPTIONS = tuple(name for name in OPTION_FIELDS if name not in ("seed", "num_predict", "stop"))


class Cancelled(Exception):
    """A generation stopped because the study is shutting down; it must not be cached."""


@dataclass(frozen=True)
class GenerationJob:
    """One generation to draw: the chat, the system prompt ("" for none), the options and thinking switch."""

    key: GenerationKey
    messages: list[dict[str, str]]
    system: str
    options: dict[str, Any]  # sampling knobs plus num_predict, seed and stop
    think: bool | None


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation and why it stopped ("stop" or "length")."""

    generation: Generation
    finish_reason: str


class Backend(Protocol):
    """What the study needs from a source of generations."""

    identity: str  # names the model and the server, so cached generations are never mixed up
    max_in_flight: int  # generations worth running at once
    num_ctx: int
    supports_thinking: bool

    def effective_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """The settings a generation really runs with, so equal behaviour hashes equal."""

    def generate(self, job: GenerationJob) -> GenerationResult:
        """Draw one answer; raises Cancelled once `cancel_all` was called."""

    def cancel_all(self) -> None:
        """Stop every generation in flight and refuse new ones."""


class LocalEngineBackend:
    """Generations from tunelab's own engine: every job in flight is a row of its batched decode."""

    def __init__(self, runtime: ModelRuntime):
        self.runtime = runtime
        weights = runtime.record.digest if runtime.record else str(runtime.path.resolve())
        # How the weights are held (bfloat16, int8, ...) changes tokens, so it is part of the identity.
        self.identity = f"local:{weights}:{resolve_dtype(runtime.load_options['dtype'])}"
        self.max_in_flight = runtime.engine.config.max_num_seqs
        self.num_ctx = runtime.load_options["num_ctx"]
        self.supports_thinking = runtime.template.supports_thinking
        self._in_flight: set[int] = set()
        self._lock = threading.Lock()
        self._cancelled = False

    def effective_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """Defaults <- the model's PARAMETERs <- `knobs`, for every sampling option."""
        resolved = self.runtime.options(knobs)
        return {name: _plain(resolved[name]) for name in SAMPLING_OPTIONS}

    def generate(self, job: GenerationJob) -> GenerationResult:
        """Submit the job to the engine and wait for its reply."""
        prepared = prepare_chat(self.runtime, job.messages, options=job.options, think=job.think, system=job.system)
        started = time.perf_counter()
        with self._lock:
            if self._cancelled:
                raise Cancelled
            handle = self.runtime.engine.submit(prepared.request)
            self._in_flight.add(handle.request_id)
        try:
            reply = collect(prepared, handle)
        finally:
            with self._lock:
                self._in_flight.discard(handle.request_id)
        if reply.finish_reason is FinishReason.CANCELLED:
            raise Cancelled
        text = reply.content
        if reply.thinking or reply.thinking_unclosed:
            text = f"<think>{reply.thinking}" + ("" if reply.thinking_unclosed else "</think>") + text
        generation = Generation(text, reply.num_generated_tokens, reply.finish_reason is FinishReason.LENGTH,
                                time.perf_counter() - started)
        return GenerationResult(generation, reply.finish_reason.value)

    def cancel_all(self) -> None:
        """Cancel the engine requests in flight; later jobs raise Cancelled."""
        with self._lock:
            self._cancelled = True
            for request_id in self._in_flight:
                self.runtime.engine.cancel(request_id)


class OpenAIEndpointBackend:
    """Generations from an OpenAI-compatible `/v1/chat/completions` (vLLM, SGLang, Ollama, `tunelab serve`).

    Knobs the OpenAI API lacks go as the extra fields vLLM and SGLang read (`top_k`, `min_p`,
    `repetition_penalty`); a server that ignores one is caught by the study's knob probe.
    """

    _FIELDS = {"temperature": "temperature", "top_p": "top_p", "presence_penalty": "presence_penalty",
               "frequency_penalty": "frequency_penalty", "top_k": "top_k", "min_p": "min_p",
               "repeat_penalty": "repetition_penalty"}

    def __init__(self, url: str, model: str, api_key: str | None = None, max_in_flight: int = 16,
                 num_ctx: int = OPTION_SPECS["num_ctx"].default, timeout_s: float = 600.0):
        base = url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.model = model
        self.identity = f"openai:{base}:{model}"
        self.max_in_flight = max_in_flight
        self.num_ctx = num_ctx
        self.supports_thinking = True  # sent as chat_template_kwargs; servers without the switch ignore it
        self._cancelled = False

    def effective_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """The knobs as sent: what an unset knob means is the server's business."""
        return {name: _plain(value) for name, value in sorted(knobs.items())}

    def generate(self, job: GenerationJob) -> GenerationResult:
        """POST one chat completion and read its answer, reasoning, token count and finish reason."""
        if self._cancelled:
            raise Cancelled
        options = job.options
        body: dict[str, Any] = {
            "model": self.model,
            "messages": ([{"role": "system", "content": job.system}] if job.system else []) + job.messages,
            "seed": options["seed"], "stream": False,
        }
        if options.get("num_predict", -1) > 0:
            body["max_tokens"] = options["num_predict"]
        if options.get("stop"):
            body["stop"] = list(options["stop"])
        body.update({self._FIELDS[name]: value for name, value in options.items() if name in self._FIELDS})
        if job.think is not None:
            body["chat_template_kwargs"] = {"enable_thinking": job.think}
        started = time.perf_counter()
        try:
            response = self._client.post("/chat/completions", json=body)
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: the client was closed by cancel_all
            if self._cancelled:
                raise Cancelled from None
            raise InvalidOption(f"cannot reach the endpoint {self._client.base_url} ({exc}); "
                                "start the server or fix --endpoint") from None
        if response.status_code != 200:
            raise InvalidOption(f"the endpoint {self._client.base_url} answered {response.status_code}: "
                                f"{response.text[:200]}; check --endpoint and the model name")
        data = response.json()
        choice = data["choices"][0]
        message = choice.get("message") or {}
        reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
        text = (f"<think>{reasoning}</think>" if reasoning else "") + (message.get("content") or "")
        tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
        finish_reason = "length" if choice.get("finish_reason") == "length" else "stop"
        generation = Generation(text, tokens, finish_reason == "length", time.perf_counter() - started)
        return GenerationResult(generation, finish_reason)

    def cancel_all(self) -> None:
        """Close the HTTP client: requests in flight fail and are reported as cancelled."""
        self._cancelled = True
        self._client.close()


class ScriptedBackend:
    """A deterministic stand-in for a model, for running studies end to end without weights.

    Whether an answer passes is drawn from a hash of (task, sample, seed) against a success chance that
    depends on the task and on the knobs (best near temperature 0.3, worse with heavy truncation or
    penalties). A pass is the task's reference solution; a failure is broken code, prose without code,
    or a runaway loop. Knobs listed in `ignored` change nothing, like a knob an engine silently drops.
    Every answer names its settings in one prose line, so settings that matter always change the text.
    """

    identity = "scripted"
    num_ctx = OPTION_SPECS["num_ctx"].default
    supports_thinking = False

    def __init__(self, tasks: list[Task], delay_s: float = 0.0, ignored: tuple[str, ...] = (),
                 max_in_flight: int = 8):
        self.tasks = {task.id: task for task in tasks}
        self.delay_s = delay_s
        self.ignored = frozenset(ignored)
        self.max_in_flight = max_in_flight
        self._cancelled = threading.Event()

    def effective_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """Option defaults <- `knobs`, like a model without PARAMETERs."""
        resolved = resolve_options(knobs)
        return {name: _plain(resolved[name]) for name in SAMPLING_OPTIONS}

    def passes(self, key: GenerationKey, knobs: dict[str, Any]) -> bool:
        """Whether the answer for `key` under `knobs` is the reference solution."""
        return _unit(f"draw:{key.task_id}:{key.sample}:{key.seed}") < self.success_chance(key.task_id, knobs)

    def success_chance(self, task_id: str, knobs: dict[str, Any]) -> float:
        """The chance that an answer to `task_id` under `knobs` passes (an ignored knob keeps its default)."""
        resolved, defaults = self.effective_knobs(knobs), resolve_options({})
        k = {name: defaults[name] if name in self.ignored else value for name, value in resolved.items()}
        chance = 0.2 + 0.6 * _unit(f"task:{task_id}")
        chance -= 0.6 * abs(k["temperature"] - 0.3)
        chance -= 0.8 * max(0.0, 0.5 - k["top_p"]) + 0.8 * min(0.5, k["min_p"]) + 0.2 * (k["top_k"] == 1)
        chance -= 0.8 * (k["repeat_penalty"] - 1.0)
        chance -= 0.2 * abs(k["presence_penalty"]) + 0.2 * abs(k["frequency_penalty"])
        return min(0.98, max(0.02, chance))

    def generate(self, job: GenerationJob) -> GenerationResult:
        """Sleep `delay_s` (interruptible), then write the scripted answer."""
        if self._cancelled.wait(self.delay_s):
            raise Cancelled
        task = self.tasks[job.key.task_id]
        knobs = {name: job.options[name] for name in SAMPLING_OPTIONS if name in job.options}
        honoured = {name: value for name, value in self.effective_knobs(knobs).items() if name not in self.ignored}
        settings_line = f"Settings {hashlib.sha256(repr(sorted(honoured.items())).encode()).hexdigest()[:12]}."
        failure = _unit(f"failure:{job.key.task_id}:{job.key.sample}:{job.key.seed}")
        hit_limit = False
        if self.passes(job.key, knobs):
            text = f"{settings_line}\n```python\n{task.reference.strip()}\n```\n"
        elif failure < 0.4:
            text = f"{settings_line}\n```python\ndef {task.entry_point}(:\n    pass\n```\n"
        elif failure < 0.7:
            text = f"{settings_line}\nI would write a function called {task.entry_point}."
        else:
            text, hit_limit = settings_line + "\n" + "and then " * 60, True
        tokens = len(text.split())
        return GenerationResult(Generation(text, tokens, hit_limit, self.delay_s), "length" if hit_limit else "stop")

    def cancel_all(self) -> None:
        """Wake every sleeping generation and refuse new ones."""
        self._cancelled.set()


def parse_scripted_spec(spec: str, tasks: list[Task]) -> ScriptedBackend:
    """A ScriptedBackend from `scripted[:delay=SECONDS][,ignore=KNOB/KNOB]`, the test hook of `tunelab tune`."""
    _, _, rest = spec.partition(":")
    delay, ignored = 0.0, ()
    for item in filter(None, rest.split(",")):
        name, _, value = item.partition("=")
        if name == "delay" and value.replace(".", "", 1).isdigit():
            delay = float(value)
        elif name == "ignore":
            ignored = tuple(filter(None, value.split("/")))
        else:
            raise InvalidOption(f"unknown scripted backend setting {name!r} in {spec!r}; "
                                "use scripted:delay=SECONDS,ignore=KNOB/KNOB")
    return ScriptedBackend(tasks, delay, ignored)


def _unit(text: str) -> float:
    """A uniform number in [0, 1) fixed by `text`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _plain(value: Any) -> Any:
    """JSON-ready: tuples (stop strings, DRY breakers) become lists."""
    return list(value) if isinstance(value, tuple) else value
