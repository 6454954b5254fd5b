"""Evaluating configurations: draw answers through a backend, judge them, and keep everything in the cache.

The `Evaluator` submits every (task, sample) job of one or more configurations
at once, so the backend sees them together (with the local engine: as rows of
one batch). A generation already in the cache, or already in flight, is never
drawn again; an answer text already judged for the same task is not run again.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from tunelab.tune.backends import Backend, GenerationJob
from tunelab.tune.generation_cache import GenerationCache, GenerationKey
from tunelab.tune.scoring import Score, score_generation
from tunelab.tune.search_space import Config
from tunelab.tune.suites import Task, build_prompt


@dataclass
class ArmResult:
    """One configuration's scores on a set of tasks: task id -> one Score per sample."""

    config: Config
    params_hash: str
    scores: dict[str, list[Score]]

    def outcomes(self) -> dict[str, list[bool]]:
        """Task id -> whether each sample passed."""
        return {task_id: [score.passed for score in scores] for task_id, scores in self.scores.items()}

    def all_scores(self) -> list[Score]:
        """Every sample's score, task by task."""
        return [score for scores in self.scores.values() for score in scores]

    def pass_at_1(self) -> float:
        """Mean over tasks of the fraction of samples that passed."""
        return sum(sum(o) / len(o) for o in self.outcomes().values()) / max(1, len(self.scores))

    def mean_tokens(self) -> float:
        """Mean generated tokens per sample."""
        scores = self.all_scores()
        return sum(score.tokens for score in scores) / max(1, len(scores))

    def mean_latency_s(self) -> float:
        """Mean seconds per generation, as the backend measured it."""
        scores = self.all_scores()
        return sum(score.latency_s for score in scores) / max(1, len(scores))


@dataclass
class Progress:
    """What a running study has done, for a live view; updated from many threads."""

    stage: str = "starting"
    trials_done: int = 0
    trials_total: int = 0
    best: str = ""
    generated: int = 0  # drawn from the backend in this process
    cached: int = 0  # found in the cache
    tokens: int = 0
    planned: int = 0  # generations (drawn or cached) the whole study needs
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, tokens: int | None) -> None:
        """One generation finished: drawn (`tokens` given) or found in the cache (None)."""
        with self._lock:
            if tokens is None:
                self.cached += 1
            else:
                self.generated += 1
                self.tokens += tokens

    def generations_per_s(self) -> float:
        """Generations drawn per second of this process's wall time."""
        return self.generated / max(1e-9, time.monotonic() - self.started)

    def eta_s(self) -> float | None:
        """Seconds left at the current rate, if there is a rate and work left."""
        rate = self.generations_per_s()
        remaining = self.planned - self.generated - self.cached
        return remaining / rate if rate > 0 and remaining > 0 else None


class Evaluator:
    """Draws and scores generations for configurations through a backend, in parallel and via the cache.

    Jobs for a task's samples (and for every configuration in `evaluate_many`) are submitted together,
    so the backend sees them at once; a generation already in the cache or in flight is never drawn again.
    """

    def __init__(self, backend: Backend, cache: GenerationCache, *, seed: int, num_predict: int,
                 think_budget: int = -1, stop_after_code: bool = False, progress: Progress | None = None):
        self.backend, self.cache = backend, cache
        self.seed, self.num_predict, self.think_budget, self.stop_after_code = (seed, num_predict, think_budget,
                                                                                stop_after_code)
        self.progress = progress or Progress()
        # A few spare threads keep the backend busy while others run answers in the sandbox.
        self._pool = ThreadPoolExecutor(backend.max_in_flight + 4, thread_name_prefix="tunelab-generate")
        self._pending: dict[GenerationKey, Future] = {}
        self._lock = threading.RLock()  # a future that is already done runs its callback while we hold it

    def params_hash(self, config: Config, num_predict: int | None = None) -> str:
        """Hash of everything besides task, sample and seed that decides a generation."""
        think_budget = self.think_budget if config.think is not False else -1
        described = {"backend": self.backend.identity, "knobs": self.backend.effective_knobs(config.knobs),
                     "system": config.system, "think": config.think, "think_budget": think_budget,
                     "num_predict": num_predict or self.num_predict, "stop_after_code": self.stop_after_code}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]

    def evaluate(self, config: Config, tasks: list[Task], samples: int) -> ArmResult:
        """Score `samples` answers per task under `config`."""
        return self.evaluate_many([config], tasks, samples)[0]

    def evaluate_many(self, configs: list[Config], tasks: list[Task], samples: int) -> list[ArmResult]:
        """Score several configurations at once, so their generations share the backend's batch."""
        submitted = [(config, self._submit(config, tasks, samples, judge=True)) for config in configs]
        return [ArmResult(config, self.params_hash(config),
                          {task_id: [future.result() for future in futures] for task_id, futures in jobs.items()})
                for config, jobs in submitted]

    def texts(self, configs: list[Config], tasks: list[Task], samples: int, num_predict: int) -> list[list[str]]:
        """Unjudged answer texts of each configuration (drawn together), for the knob probe."""
        submitted = [self._submit(config, tasks, samples, judge=False, num_predict=num_predict) for config in configs]
        return [[future.result() for futures in jobs.values() for future in futures] for jobs in submitted]

    def cancel(self) -> None:
        """Stop all work: queued jobs are dropped, generations in flight are cancelled."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.backend.cancel_all()

    def close(self) -> None:
        """Wait for the worker threads to finish."""
        self._pool.shutdown(wait=True)

    def distinct_generations(self, configs: list[Config], tasks: list[Task], samples: int) -> int:
        """How many different generations scoring `configs` takes (equal settings and greedy samples coincide)."""
        return len({key for config in configs for keys in self._keys(config, tasks, samples).values() for key in keys})

    def _keys(self, config: Config, tasks: list[Task], samples: int,
              num_predict: int | None = None) -> dict[str, list[GenerationKey]]:
        """The cache key of each sample of each task under `config`."""
        params_hash = self.params_hash(config, num_predict)
        # Greedy decoding ignores the seed, so every sample of a greedy arm is the same generation.
        if self.backend.effective_knobs(config.knobs).get("temperature", 1.0) <= 0:
            return {task.id: [GenerationKey(params_hash, task.id, 0, 0)] * samples for task in tasks}
        return {task.id: [GenerationKey(params_hash, task.id, sample, _seed(self.seed, task.id, sample))
                          for sample in range(samples)] for task in tasks}

    def _submit(self, config: Config, tasks: list[Task], samples: int, judge: bool,
                num_predict: int | None = None) -> dict[str, list[Future]]:
        keys = self._keys(config, tasks, samples, num_predict)
        jobs: dict[str, list[Future]] = {}
        for task in tasks:
            prompt = build_prompt(task, None, self.stop_after_code)
            jobs[task.id] = []
            for key in keys[task.id]:
                options = {**config.knobs, "seed": key.seed, "num_predict": num_predict or self.num_predict,
                           "stop": list(prompt.stop)}
                if config.think is not False and self.think_budget >= 0:
                    options["think_budget"] = self.think_budget
                job = GenerationJob(key, prompt.messages, config.system, options, config.think)
                with self._lock:
                    future = self._pending.get((key, judge))
                    if future is None:
                        future = self._pool.submit(self._run, job, task, judge)
                        self._pending[(key, judge)] = future
                        future.add_done_callback(lambda _, k=(key, judge): self._forget(k))
                jobs[task.id].append(future)
        return jobs

    def _forget(self, key) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def _run(self, job: GenerationJob, task: Task, judge: bool) -> Score | str:
        cached = self.cache.get(job.key)
        if cached is not None and (cached.score is not None or not judge):
            self.progress.count(None)
            return cached.score if judge else cached.generation.text
        if cached is None:
            result = self.backend.generate(job)
            self.cache.put_generation(job.key, result.generation, result.finish_reason)
            self.progress.count(result.generation.tokens)
            generation = result.generation
        else:
            generation = cached.generation
        if not judge:
            return generation.text
        score = self.cache.known_verdict(task.id, generation) or score_generation(task, generation)
        self.cache.put_score(job.key, score)
        return score


def failure_types(score: Score) -> list[str]:
    """What went wrong with one generation: its outcome unless it passed, plus each degeneration flag."""
    found = [] if score.passed else [score.outcome]
    found += [name for name in ("runaway", "repetition_loop", "unclosed_think") if getattr(score, name)]
    return found + (["off_script"] if score.off_script else [])


def _seed(study_seed: int, task_id: str, sample: int) -> int:
    """The seed of one sample: the same for every configuration, so arms are compared on equal draws."""
    return int.from_bytes(hashlib.sha256(f"{study_seed}:{task_id}:{sample}".encode()).digest()[:4], "big") >> 1
