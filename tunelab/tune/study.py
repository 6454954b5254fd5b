"""Tuning studies: the Optuna search, its storage and workers, and the stages from knob probe to held-out.

A study runs in four stages, and each resumes after an interruption because
every trial lives in Optuna's storage and every generation in the cache:

1. probe: each searched knob must change some output; one that does not is dropped;
2. screen: Optuna proposes settings (TPE by default); the baselines are enqueued first;
3. confirm: the best few trials run again with more samples; the best of them is the winner;
4. held out: the winner and every baseline run on tasks the search never saw.

Several processes (`tunelab tune --worker`, any machine) may screen one study
when its storage is a database server; the process that started the study
waits for their trials, then confirms and evaluates.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, Trial, TrialState

from tunelab.errors import InvalidOption
from tunelab.tune.backends import Backend
from tunelab.tune.evaluation import ArmResult, Evaluator, Progress, failure_types
from tunelab.tune.generation_cache import GenerationCache
from tunelab.tune.search_space import Config, SearchSpace, baselines
from tunelab.tune.suites import Task, load_suite, split

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # tunelab reports progress itself

# The probe samples at temperature 1 with no truncation or penalty, then sets one knob to a value
# that must change what is drawn if the engine honours it.
PROBE_NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0,
                 "presence_penalty": 0.0, "frequency_penalty": 0.0}
PROBE_STRONG = {"temperature": 0.0, "top_p": 0.05, "top_k": 1, "min_p": 0.5, "repeat_penalty": 2.0,
                "presence_penalty": 2.0, "frequency_penalty": 2.0}
PROBE_TOKENS = 48
SAMPLERS = ("tpe", "random", "grid")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_S, GRACE_S = 10, 60  # a worker silent for GRACE_S has died; its trial is run again


class StudyInterrupted(Exception):
    """The study stopped on request; its unfinished trials were handed back, so a rerun resumes it."""


@dataclass
class StudySettings:
    """What a study measures and how; stored with the study so workers and reruns measure the same."""

    model: str
    suite: str
    space: SearchSpace = field(default_factory=SearchSpace)
    trials: int = 16
    samples: int = 2
    confirm_top: int = 3
    confirm_samples: int = 4
    held_out_samples: int = 4
    tuning_tasks: int = 24  # 0 = every tuning task
    held_out_tasks: int = 100  # 0 = every held-out task
    held_out_fraction: float = 0.5
    seed: int = 0
    num_predict: int = 384
    sampler: str = "tpe"
    grid_points: int = 3
    stop_after_code: bool = False
    modelfile_baseline: Config | None = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise InvalidOption(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        for name in ("trials", "samples", "confirm_samples", "held_out_samples", "num_predict"):
            if getattr(self, name) < 1:
                raise InvalidOption(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.confirm_samples < self.samples:
            raise InvalidOption(f"--confirm-samples ({self.confirm_samples}) must be at least --samples "
                                f"({self.samples}): confirmation adds samples, it never drops them")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON, as stored in the study's user attributes."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudySettings:
        """The settings `to_json` wrote."""
        baseline = data.get("modelfile_baseline")
        return cls(**{**data, "space": SearchSpace.from_json(data["space"]),
                      "modelfile_baseline": Config.from_json(baseline) if baseline else None})

    def identity(self) -> dict[str, Any]:
        """The settings that must match for a rerun to resume a study (the trial budget may grow)."""
        return {name: value for name, value in self.to_json().items() if name != "trials"}


def select_tasks(settings: StudySettings) -> tuple[list[Task], list[Task]]:
    """The tuning and held-out tasks: a seeded split of the suite, each side cut to its requested size."""
    tuning, held_out = split(load_suite(settings.suite), settings.held_out_fraction, settings.seed)
    return (_take(tuning, settings.tuning_tasks, settings.seed, "tuning"),
            _take(held_out, settings.held_out_tasks, settings.seed, "held-out"))


@dataclass
class StudyResults:
    """What a finished study measured, for the report."""

    settings: StudySettings
    study_name: str
    tuning_tasks: list[str]
    held_out_tasks: list[str]
    dropped_knobs: list[str]
    trials: list[dict[str, Any]]  # one row per finished trial
    confirmed: list[ArmResult]
    winner: ArmResult  # its confirmation on the tuning tasks
    held_out: list[ArmResult]  # the winner first, then every baseline
    num_ctx: int
    wall_s: float  # every run of the study's own process, interrupted ones included
    generated: int  # drawn by every process that worked on the study
    tokens: int


class TuningStudy:
    """One study bound to its storage, backend and cache; `run` does every stage, `--worker` only screens."""

    def __init__(self, settings: StudySettings, backend: Backend, cache: GenerationCache, storage: str,
                 study_name: str, *, worker: bool = False, parallel_trials: int = 2,
                 timeout_s: float | None = None, progress: Progress | None = None,
                 on_warning: Callable[[str], None] = log.warning):
        self.backend, self.cache, self.worker = backend, cache, worker
        self.parallel_trials = parallel_trials
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self.progress = progress or Progress()
        self.on_warning = on_warning
        self._stop = threading.Event()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        with _quiet_optuna():
            self.storage = optuna.storages.RDBStorage(
                storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=_requeue,
                engine_kwargs={"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {})
        self.settings = self._open(settings, study_name)
        self.tuning, self.held_out = select_tasks(self.settings)
        self.evaluator = Evaluator(backend, cache, seed=self.settings.seed, num_predict=self.settings.num_predict,
                                   think_budget=self.settings.space.think_budget,
                                   stop_after_code=self.settings.stop_after_code, progress=self.progress)

    def run(self) -> StudyResults | None:
        """Probe, screen, confirm and evaluate on held-out tasks (a worker only screens); safe to rerun.

        Raises StudyInterrupted once `stop` was called, after handing unfinished trials back to the study.
        """
        started = time.monotonic()
        try:
            dropped = self.probe()
            self.search()
            if self.worker:
                return None
            confirmed = self.confirm()
            winner = max(confirmed, key=lambda arm: (arm.pass_at_1(), -arm.mean_tokens()))
            held_out = self.evaluate_held_out(winner.config)
        except Exception:
            self.evaluator.cancel()
            if self._stop.is_set():
                raise StudyInterrupted from None
            raise
        finally:
            self.evaluator.close()
            self._record_run(started)
        self.progress.stage = "done"
        runs = [value for key, value in self.study.user_attrs.items() if key.startswith("run ")]
        return StudyResults(self.settings, self.study.study_name, [t.id for t in self.tuning],
                            [t.id for t in self.held_out], dropped, self.trial_rows(), confirmed, winner, held_out,
                            self.backend.num_ctx, sum(run["wall_s"] for run in runs if not run["worker"]),
                            sum(run["generated"] for run in runs), sum(run["tokens"] for run in runs))

    def _record_run(self, started: float) -> None:
        """Keep this process's time and work with the study, so a resumed study reports its totals."""
        self.study.set_user_attr(f"run {self.worker_id} {time.time():.0f}", {
            "worker": self.worker, "wall_s": time.monotonic() - started, "generated": self.progress.generated,
            "tokens": self.progress.tokens})

    @property
    def is_stopping(self) -> bool:
        """Whether `stop` was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask a running study to stop: no new trial starts, work in flight is cancelled. Safe in a signal handler."""
        self._stop.set()
        # Cancelling takes locks the interrupted thread may hold, so it runs on a thread of its own.
        threading.Thread(target=self.evaluator.cancel, daemon=True).start()

    # ---- stage 1: knob probe ----------------------------------------------------------------

    def probe(self) -> list[str]:
        """Drop every searched knob whose strong setting changes none of a few probe answers."""
        attrs = self.study.user_attrs
        if "dropped_knobs" in attrs:
            dropped = attrs["dropped_knobs"]
        else:
            self.progress.stage = "probing knobs"
            space = self.settings.space
            system, think = next(iter(space.systems.values())), space.think[0]
            probes = [PROBE_NEUTRAL] + [{**PROBE_NEUTRAL, name: PROBE_STRONG[name]} for name in space.searched]
            neutral, *changed = self.evaluator.texts([Config("probe", knobs, system, think) for knobs in probes],
                                                     self.tuning[:2], 2, PROBE_TOKENS)
            dropped = [name for name, texts in zip(space.searched, changed) if texts == neutral]
            self.study.set_user_attr("dropped_knobs", dropped)
        for name in dropped:
            self.on_warning(f"{name} changed no output of {self.backend.identity}; it is not searched")
        self.space = self.settings.space.without(dropped)
        return dropped

    # ---- stage 2: screen --------------------------------------------------------------------

    def search(self) -> None:
        """Run trials until the study has `trials` finished ones (or the time budget is spent)."""
        self.progress.stage = "screening"
        while True:
            self._run_trials()
            finished = self._count(FINISHED)
            if self.worker or finished >= self.settings.trials or self._out_of_time():
                return
            if not self._count((TrialState.RUNNING, TrialState.WAITING)):
                return
            if self._stop.wait(1.0):  # other workers' trials are running: wait, and rerun any that go stale
                raise StudyInterrupted

    def _run_trials(self) -> None:
        """Keep `parallel_trials` trials in flight until none can start; a failed or stopped trial is handed back."""
        in_flight: dict[Future, Trial] = {}
        error: BaseException | None = None
        with ThreadPoolExecutor(self.parallel_trials, thread_name_prefix="tunelab-trial") as pool:
            while True:
                while len(in_flight) < self.parallel_trials and not self._stop.is_set() and not self._out_of_time():
                    trial = self._start_trial()
                    if trial is None:
                        break
                    in_flight[pool.submit(self._evaluate_trial, trial)] = trial
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    trial = in_flight.pop(future)
                    if future.exception() is None:
                        self._finish_trial(trial, future.result())
                        continue
                    self._give_back(trial)
                    if not self._stop.is_set():
                        error = future.exception()
                        self.stop()
        if error is not None:
            raise error
        if self._stop.is_set():
            raise StudyInterrupted

    def _start_trial(self) -> Trial | None:
        """Ask for a trial unless the budget is used; of two workers racing for the last slot, the later yields."""
        with _quiet_optuna():
            optuna.storages.fail_stale_trials(self.study)
        if self._count(FINISHED + (TrialState.RUNNING,)) >= self.settings.trials:
            return None
        with _quiet_optuna():
            trial = self.study.ask()
        trials = self.study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
        running = sorted((t for t in trials if t.state == TrialState.RUNNING),
                         key=lambda t: (t.datetime_start, t.number))
        position = len(trials) - len(running) + [t.number for t in running].index(trial.number)
        if position >= self.settings.trials:
            self._give_back(trial)
            return None
        return trial

    def _evaluate_trial(self, trial: Trial) -> ArmResult:
        with get_heartbeat_thread(trial._trial_id, self.study._storage):
            config = self.space.suggest(trial)
            if "config" in trial.user_attrs:  # an enqueued baseline
                config = Config.from_json(trial.user_attrs["config"])
            else:
                trial.set_user_attr("config", asdict(config))
            trial.set_user_attr("worker", self.worker_id)
            return self.evaluator.evaluate(config, self.tuning, self.settings.samples)

    def _finish_trial(self, trial: Trial, arm: ArmResult) -> None:
        try:
            trial.set_user_attr("params_hash", arm.params_hash)
            trial.set_user_attr("mean_tokens", arm.mean_tokens())
            trial.set_user_attr("mean_latency_s", arm.mean_latency_s())
            trial.set_user_attr("failures", _failure_counts(arm))
            self.study.tell(trial, arm.pass_at_1())
        except optuna.exceptions.UpdateFinishedTrialError:
            # Its heartbeat stalled long enough for the trial to be declared dead and queued again;
            # the copy finds every generation in the cache.
            log.warning("trial %d was taken over after a stalled heartbeat", trial.number)
            return
        self._show_progress()

    def _show_progress(self) -> None:
        self.progress.trials_done = self._count(FINISHED)
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            best = max(complete, key=lambda t: t.value)
            self.progress.best = f"{best.user_attrs['config']['name']}: {best.value:.3f}"

    def _give_back(self, trial: Trial) -> None:
        """Fail a trial this process will not finish and queue its configuration again."""
        self.study.tell(trial, state=TrialState.FAIL)
        _requeue(self.study, self.study.get_trials(deepcopy=False)[trial.number])

    # ---- stages 3 and 4 ---------------------------------------------------------------------

    def confirm(self) -> list[ArmResult]:
        """Measure the best `confirm_top` distinct configurations again with `confirm_samples` samples."""
        self.progress.stage = "confirming"
        ranked = sorted(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                        key=lambda t: (-t.value, t.number))
        if not ranked:
            raise InvalidOption("no trial finished before --timeout ran out; raise --timeout, "
                                "or rerun to continue the study")
        configs: dict[str, Config] = {}
        for trial in ranked:
            if len(configs) < self.settings.confirm_top:
                configs.setdefault(trial.user_attrs["params_hash"], Config.from_json(trial.user_attrs["config"]))
        return self.evaluator.evaluate_many(list(configs.values()), self.tuning, self.settings.confirm_samples)

    def evaluate_held_out(self, winner: Config) -> list[ArmResult]:
        """The winner and every baseline on the held-out tasks, with `held_out_samples` samples each."""
        self.progress.stage = "held-out evaluation"
        arms = [replace(winner, name=f"winner ({winner.name})")] + self.baselines
        # Now the winner is known the plan is exact: a winner that is a baseline, and greedy samples, coincide.
        self.progress.planned = (self.progress.generated + self.progress.cached
                                 + self.evaluator.distinct_generations(arms, self.held_out, self.settings.held_out_samples))
        return self.evaluator.evaluate_many(arms, self.held_out, self.settings.held_out_samples)

    def trial_rows(self) -> list[dict[str, Any]]:
        """Every finished trial: number, configuration, score, tokens, latency, failures, worker."""
        return [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                 **{key: t.user_attrs.get(key) for key in ("config", "mean_tokens", "mean_latency_s", "failures",
                                                           "worker", "baseline")}}
                for t in self.study.get_trials(deepcopy=False, states=FINISHED)]

    # ---- the study in storage ---------------------------------------------------------------

    def _open(self, settings: StudySettings, study_name: str) -> StudySettings:
        """Create the study (storing its settings and enqueuing the baselines) or load and check it."""
        if self.worker:
            try:
                self.study = optuna.load_study(study_name=study_name, storage=self.storage,
                                               sampler=optuna.samplers.RandomSampler())
            except KeyError:
                raise InvalidOption(f"no study named {study_name!r} in the storage; start it with `tunelab tune` "
                                    "(without --worker) first, or pass its --study-name") from None
            stored = StudySettings.from_json(self.study.user_attrs["settings"])
            self.study.sampler = _make_sampler(stored, seed=None)  # workers must not all propose the same points
            self.baselines = baselines(stored.space, self.backend.supports_thinking, stored.modelfile_baseline)
            return replace(stored, trials=self.study.user_attrs["trials"])
        self.study = optuna.create_study(study_name=study_name, storage=self.storage, direction="maximize",
                                         sampler=_make_sampler(settings, settings.seed), load_if_exists=True)
        attrs = self.study.user_attrs
        self.baselines = baselines(settings.space, self.backend.supports_thinking, settings.modelfile_baseline)
        if "settings" in attrs:
            stored = StudySettings.from_json(attrs["settings"])
            if stored.identity() != settings.identity():
                differ = sorted(k for k, v in settings.identity().items() if stored.identity()[k] != v)
                raise InvalidOption(f"study {study_name!r} was started with other settings ({', '.join(differ)}); "
                                    "rerun with the same flags, or pass a new --study-name or --out")
            # A fresh process would replay the sampler's random stream from the start and propose the
            # points it already measured; continue from a stream of its own instead.
            self.study.sampler = _make_sampler(stored, settings.seed + len(self.study.trials))
            if self.storage.url.startswith("sqlite"):
                # One process owns a SQLite study; with a database server, other workers may be running,
                # so their dead trials are found through heartbeats instead.
                self._recover_orphans()
        else:
            self.study.set_user_attr("settings", settings.to_json())
            effective = self.backend.effective_knobs
            space = settings.space
            for config in self.baselines:
                self.study.enqueue_trial(space.point(config, effective(config.knobs)),
                                         user_attrs={"baseline": config.name, "config": asdict(config)})
        self.study.set_user_attr("trials", settings.trials)
        self.progress.trials_total = settings.trials
        self._show_progress()
        self.progress.planned = _planned_generations(settings, len(self.baselines))
        return settings

    def _recover_orphans(self) -> None:
        """Trials left RUNNING by a killed run (one process owns a SQLite study): fail and queue them again."""
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(trial.number, state=TrialState.FAIL)
            _requeue(self.study, self.study.get_trials(deepcopy=False)[trial.number])

    def _count(self, states: tuple[TrialState, ...]) -> int:
        return len(self.study.get_trials(deepcopy=False, states=states))

    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


@contextmanager
def _quiet_optuna():
    """Silence Optuna's notes on heartbeats: experimental, and meant for Study.optimize (we drive ask/tell)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        yield


def _requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a failed trial's configuration again: a baseline keeps its name, a proposal its parameters."""
    params = trial.system_attrs.get("fixed_params") or trial.params
    if not params and "baseline" not in trial.user_attrs:
        return  # failed before Optuna proposed anything: nothing to rerun
    user_attrs = {key: trial.user_attrs[key] for key in ("baseline", "config") if "baseline" in trial.user_attrs}
    study.enqueue_trial(params, user_attrs=user_attrs)


def _make_sampler(settings: StudySettings, seed: int | None) -> optuna.samplers.BaseSampler:
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "grid":
        return optuna.samplers.GridSampler(settings.space.grid(settings.grid_points), seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _failure_counts(arm: ArmResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for score in arm.all_scores():
        for name in failure_types(score):
            counts[name] = counts.get(name, 0) + 1
    return counts


def _planned_generations(settings: StudySettings, num_baselines: int) -> int:
    tuning, held_out = settings.tuning_tasks or 50, settings.held_out_tasks or 100
    return (settings.trials * tuning * settings.samples + settings.confirm_top * tuning * settings.confirm_samples
            + (1 + num_baselines) * held_out * settings.held_out_samples)


def _take(tasks: list[Task], count: int, seed: int, side: str) -> list[Task]:
    if count == 0:
        return tasks
    if count > len(tasks):
        raise InvalidOption(f"the suite has only {len(tasks)} {side} tasks, fewer than the {count} asked for; "
                            f"lower --{side}-tasks or choose a larger --suite")
    ranked = sorted(tasks, key=lambda t: hashlib.sha256(f"{seed}:pick:{t.id}".encode()).digest())[:count]
    chosen = {t.id for t in ranked}
    return [t for t in tasks if t.id in chosen]
