"""Which model is in memory: load on first use, share while busy, switch when asked, unload when idle.

One model is resident at a time (a laptop holds one model's weights and KV
cache, not several). Its engine batches every request for it. The rules:

- A request for the resident model joins it at once, unless a request for
  another model is already waiting (then it queues behind that switch, so a
  busy model cannot starve the next one).
- Models made from the same weights (`create` FROM another model with a new
  SYSTEM, TEMPLATE or PARAMETERs) share the resident weights and engine; each
  request still gets its own model's settings. Only the weights, adapters and
  load-time options (`num_ctx`, `num_batch`, `num_thread`, `dtype`, ...)
  decide whether a reload is needed, as in Ollama.
- A request that needs other weights or load-time options **waits** until the
  resident model's in-flight requests finish, then **evicts** it and loads its
  own. Running requests are never cut off by a switch.
- A model with no request in flight is unloaded `keep_alive` after its last
  request ended (default 5 minutes, or `TUNELAB_KEEP_ALIVE`): 0 unloads at once,
  a negative value keeps it loaded until the server stops. The latest request's
  `keep_alive` wins, as in Ollama.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from tunelab.errors import InvalidRequest, TunelabError
from tunelab.options import LOAD_TIME_OPTIONS, resolve_options, validate_options
from tunelab.registry.store import ModelRecord, Store
from tunelab.runtime import ModelRuntime, chat_template_for, open_model

log = logging.getLogger(__name__)

DEFAULT_KEEP_ALIVE_SECONDS = 300.0
FOREVER = math.inf

_GO_DURATION = re.compile(r"([+-]?)((?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+")
_GO_UNIT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to keep a model loaded: a number of seconds or a Go duration ("10m", "1h30m").

    None means "not given"; a negative value means forever (`math.inf`).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequest(f"keep_alive must be a duration like \"5m\" or a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d+)?", value.strip()):
        seconds = float(value)
    elif isinstance(value, str) and _GO_DURATION.fullmatch(value.strip()):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        seconds = sign * sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _GO_UNIT.findall(text))
    else:
        raise InvalidRequest(f"keep_alive must be a duration like \"5m\", \"1h\" or a number of seconds, "
                             f"got {value!r}")
    if not math.isfinite(seconds) and seconds > 0:
        return FOREVER
    return FOREVER if seconds < 0 else seconds


def default_keep_alive() -> float:
    """`TUNELAB_KEEP_ALIVE` (like `OLLAMA_KEEP_ALIVE`), else 5 minutes."""
    configured = parse_keep_alive(os.environ.get("TUNELAB_KEEP_ALIVE") or None)
    return DEFAULT_KEEP_ALIVE_SECONDS if configured is None else configured


@dataclass(eq=False)
class LoadedModel:
    """The resident model: its runtime, what it was loaded with, and who is using it."""

    runtime: ModelRuntime
    record: ModelRecord
    load_key: tuple
    load_seconds: float
    num_active: int = 0
    keep_alive: float = DEFAULT_KEEP_ALIVE_SECONDS
    expires_at: datetime | None = None  # wall clock, for /api/ps; None while busy or kept forever
    _expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


@dataclass
class Lease:
    """One request's use of the resident model.

    `runtime` is the resident weights and engine with the requested model's own settings;
    `load_seconds` is how long this request waited for a load.
    """

    model: LoadedModel
    runtime: ModelRuntime
    load_seconds: float


class ModelManager:
    """Loads, shares, switches and unloads models for the server (see the module docstring for the rules)."""

    def __init__(self, store: Store, *, max_num_seqs: int = 16, keep_alive: float | None = None):
        self.store = store
        self.max_num_seqs = max_num_seqs
        self.default_keep_alive = default_keep_alive() if keep_alive is None else keep_alive
        self.loaded: LoadedModel | None = None
        self._changed = asyncio.Condition()
        self._num_switch_waiters = 0

    async def acquire(self, name: str, options: dict[str, Any] | None = None) -> Lease:
        """Load `name` if needed and count this request as using it; `release` the lease when done."""
        record = await asyncio.to_thread(self.store.resolve, name)
        load_options = {k: v for k, v in (options or {}).items() if k in LOAD_TIME_OPTIONS}
        resolved = resolve_options(record.parameters, load_options)
        load_key = (str(record.weights_path), tuple(map(str, record.adapters)),
                    tuple(sorted((k, v) for k, v in resolved.items() if k in LOAD_TIME_OPTIONS)))
        waited_for_switch = False
        async with self._changed:
            try:
                while True:
                    current = self.loaded
                    if current is not None and current.load_key == load_key and (
                            waited_for_switch or self._num_switch_waiters == 0):
                        return self._lease(current, record, 0.0)
                    if current is not None and current.load_key != load_key and current.num_active > 0:
                        if not waited_for_switch:
                            waited_for_switch = True
                            self._num_switch_waiters += 1
                        await self._changed.wait()
                        continue
                    if current is not None and current.load_key == load_key:
                        await self._changed.wait()  # a switch to another model is queued first
                        continue
                    if current is not None:
                        await self._unload_locked()
                    started = time.perf_counter()
                    runtime = await asyncio.to_thread(
                        open_model, record.name, self.store, load_options, max_num_seqs=self.max_num_seqs,
                        pull_missing=False, quiet=True, start_engine=True)
                    self.loaded = LoadedModel(runtime, record, load_key, time.perf_counter() - started,
                                              keep_alive=self.default_keep_alive)
                    log.info("loaded %s in %.1fs", record.name, self.loaded.load_seconds)
                    return self._lease(self.loaded, record, self.loaded.load_seconds)
            finally:
                if waited_for_switch:
                    self._num_switch_waiters -= 1
                self._changed.notify_all()

    def release(self, lease: Lease, keep_alive: float | None = None) -> None:
        """End one request's use; the model's unload timer starts when nobody uses it.

        Synchronous, so it also runs from a cancelled task (a client that went away).
        """
        model = lease.model
        model.num_active -= 1
        if keep_alive is not None:
            model.keep_alive = keep_alive
        if model.num_active == 0 and model is self.loaded:
            self._schedule_expiry(model)
        asyncio.get_running_loop().create_task(self._notify())

    async def unload(self, name: str | None = None) -> bool:
        """Unload the resident model (if it is `name`) once idle; True if something was unloaded."""
        async with self._changed:
            current = self.loaded
            if current is None or (name is not None and not self._is_named(current, name)):
                return False
            while self.loaded is current and current.num_active > 0:
                await self._changed.wait()
            if self.loaded is not current:
                return False
            await self._unload_locked()
            self._changed.notify_all()
            return True

    def is_loaded(self, name: str) -> bool:
        """True if the resident model is `name`."""
        return self.loaded is not None and self._is_named(self.loaded, name)

    async def close(self) -> None:
        """Stop the resident model's engine (server shutdown)."""
        async with self._changed:
            if self.loaded is not None:
                await self._unload_locked()

    # ---- internals ----------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _lease(self, model: LoadedModel, record: ModelRecord, load_seconds: float) -> Lease:
        model.num_active += 1
        model.expires_at = None
        if model._expiry is not None:
            model._expiry.cancel()
            model._expiry = None
        return Lease(model, _with_settings(model.runtime, record), load_seconds)

    def _schedule_expiry(self, model: LoadedModel) -> None:
        if model.keep_alive == FOREVER:
            model.expires_at = None
            return
        model.expires_at = datetime.now(timezone.utc) + timedelta(seconds=model.keep_alive)
        loop = asyncio.get_running_loop()
        model._expiry = loop.call_later(model.keep_alive, lambda: asyncio.ensure_future(self._expire(model)))

    async def _expire(self, model: LoadedModel) -> None:
        async with self._changed:
            if self.loaded is model and model.num_active == 0:
                await self._unload_locked()
                self._changed.notify_all()

    async def _unload_locked(self) -> None:
        model, self.loaded = self.loaded, None
        if model._expiry is not None:
            model._expiry.cancel()
        await asyncio.to_thread(model.runtime.close)
        gc.collect()  # the weights and KV cache are large; give them back before the next load

    def _is_named(self, model: LoadedModel, name: str) -> bool:
        try:
            return self.store.resolve(name).weights_path == model.record.weights_path
        except TunelabError:  # an unknown or malformed name is simply not the loaded one
            return False


def _with_settings(runtime: ModelRuntime, record: ModelRecord) -> ModelRuntime:
    """The resident runtime as the model `record` configures it (its SYSTEM, TEMPLATE, PARAMETERs, MESSAGEs)."""
    if runtime.record is not None and record.digest == runtime.record.digest:
        return runtime
    return replace(runtime, name=record.name, record=record, parameters=validate_options(record.parameters),
                   system=record.system, template=chat_template_for(record, runtime.tokenizer),
                   messages=[{"role": role, "content": content} for role, content in record.messages])
