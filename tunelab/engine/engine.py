"""Engine: submit requests, step the batch, stream token events, cancel.

One engine serves one loaded model. Every step runs one batched forward pass
over the scheduled sequences and one batched sampler call over the rows that
need a token, each row with its own parameters and seed. The engine can be
stepped by hand (tests, the CLI) or by its own background thread (the
server), in which case `submit` returns a handle whose events arrive on a
queue as they are produced.
"""

from __future__ import annotations

import os
import queue
import threading
import collections.abc
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tunelab.detokenizer import IncrementalDetokenizer
from tunelab.engine.block_allocator import BlockAllocator
from tunelab.engine.request import FinishReason, Request, Sequence, TokenEvent
from tunelab.engine.runner import ModelRunner
from tunelab.engine.scheduler import Scheduler
from tunelab.engine.stop_conditions import StopStringMatcher
from tunelab.errors import PromptTooLong
from tunelab.model.kv_cache import KVCache
from tunelab.sampling.json_format import JsonConstraint
from tunelab.sampling.sampler import Sampler, SamplerState


@dataclass
class EngineConfig:
    num_ctx: int = 4096  # max tokens (prompt + output) per sequence
    max_num_seqs: int = 16  # rows decoded together
    num_batch: int = 512  # prompt tokens per prefill step
    kv_cache_tokens: int | None = None  # KV pool size; default: enough for max_num_seqs short chats
    block_size: int = 16
    num_thread: int = 0  # 0 = every core
    kv_cache_type: str = "auto"  # auto: the model's compute type; q8_0: 8-bit (model/kv_cache.py)


class RequestHandle:
    """A submitted request: iterate it for its events (when the engine runs in the background)."""

    def __init__(self, request: Request):
        self.request = request
        self.events: queue.Queue[TokenEvent] = queue.Queue()

    @property
    def request_id(self) -> int:
        return self.request.request_id

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self.events.get()
            yield event
            if event.finish_reason is not None:
                return


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        cfg = self.config
        torch.set_num_threads(cfg.num_thread or os.cpu_count() or 1)
        mc = model.config
        kv_tokens = cfg.kv_cache_tokens or max(cfg.num_ctx, 1024 * cfg.max_num_seqs)
        num_blocks = -(-kv_tokens // cfg.block_size)
        dtype = next(model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        self.kv_cache = KVCache(mc.num_layers, num_blocks, cfg.block_size, mc.num_kv_heads, mc.head_dim, dtype,
                                cfg.kv_cache_type)
        self.allocator = BlockAllocator(num_blocks, cfg.block_size)
        self.scheduler = Scheduler(self.allocator, cfg.max_num_seqs, cfg.num_batch)
        self.runner = ModelRunner(model, self.kv_cache)
        self.sampler = Sampler(_LazyTokenTexts(tokenizer), lambda text: tokenizer.encode(text, add_bos=False))
        self._handles: dict[int, RequestHandle] = {}
        self._sequences: dict[int, Sequence] = {}
        self._cancelled: set[int] = set()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.num_prefill_tokens_computed = 0  # for benchmarks: how much prompt work was really done

    # ---- submitting -------------------------------------------------------------------------

    def submit(self, request: Request) -> RequestHandle:
        """Queue a request; it joins the running batch at the next step."""
        num_prompt = len(request.prompt_ids)
        if num_prompt == 0:
            raise PromptTooLong("the prompt is empty; give at least one token of input")
        if num_prompt >= self.config.num_ctx:
            raise PromptTooLong(
                f"the prompt has {num_prompt} tokens but the context window (num_ctx) is "
                f"{self.config.num_ctx}; shorten the prompt or raise num_ctx"
            )
        if self.allocator.blocks_needed(self.config.num_ctx) > self.allocator.num_blocks:
            raise PromptTooLong(
                f"num_ctx {self.config.num_ctx} is larger than the KV cache ({self.allocator.num_blocks} blocks)"
            )
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        seq = Sequence(
            request=request,
            sampler_state=SamplerState.new(request.params),
            detokenizer=detokenizer,
            token_ids=list(request.prompt_ids),
            num_prompt_tokens=num_prompt,
            stop_matcher=StopStringMatcher(request.stop_strings),
            json_constraint=JsonConstraint(self.tokenizer.token_texts) if request.json_mode else None,
        )
        handle = RequestHandle(request)
        with self._lock:
            self._handles[request.request_id] = handle
            self._sequences[request.request_id] = seq
            self.scheduler.add(seq)
            self._lock.notify_all()
        return handle

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step boundary and free its KV blocks."""
        with self._lock:
            if request_id in self._sequences:
                self._cancelled.add(request_id)
                self._lock.notify_all()

    def generate(self, request: Request) -> Iterator[TokenEvent]:
        """Submit and yield the request's events; steps the engine itself when no background thread runs."""
        handle = self.submit(request)
        if self._thread is not None:
            yield from handle
            return
        try:
            while True:
                self.step()
                while not handle.events.empty():
                    event = handle.events.get()
                    yield event
                    if event.finish_reason is not None:
                        return
        finally:
            if request.request_id in self._sequences:
                self.cancel(request.request_id)
                self.step()

    # ---- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Run steps on a background thread while there is work."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="tunelab-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.scheduler.has_work() and not self._cancelled:
                    self._lock.wait()
                if self._stopping:
                    return
            self.step()

    def stats(self) -> dict:
        """Engine state, for `/api/ps` and tests: running and waiting requests, free KV blocks."""
        with self._lock:
            return {
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "free_blocks": self.allocator.num_free,
                "total_blocks": self.allocator.num_blocks,
                "num_prefill_tokens_computed": self.num_prefill_tokens_computed,
            }

    def step(self) -> list[TokenEvent]:
        """Run one scheduled forward pass and sample; returns (and dispatches) the events it made."""
        events: list[TokenEvent] = []
        with self._lock:
            for request_id in list(self._cancelled):
                seq = self._sequences.get(request_id)
                if seq is not None:
                    events.append(self._finish(seq, FinishReason.CANCELLED, ""))
            self._cancelled.clear()
            step = self.scheduler.schedule()
        if step is not None:
            logits = self.runner.forward(step.seqs, step.num_new)  # [S, vocab]
            if step.is_prefill:
                self.num_prefill_tokens_computed += sum(step.num_new)
            ready_rows = []
            for row, (seq, n) in enumerate(zip(step.seqs, step.num_new)):
                seq.num_computed += n
                self.allocator.register_full_blocks(seq.block_table, seq.token_ids, seq.num_computed,
                                                    seq.block_hashes)
                if seq.num_computed == len(seq.token_ids):
                    ready_rows.append(row)
            if ready_rows:
                events.extend(self._sample(step.seqs, ready_rows, logits))
        for event in events:
            handle = self._handles.get(event.request_id)
            if handle is not None:
                handle.events.put(event)
                if event.finish_reason is not None:
                    del self._handles[event.request_id]
        return events

    def _sample(self, seqs: list[Sequence], rows: list[int], logits: torch.Tensor) -> list[TokenEvent]:
        chosen = [seqs[r] for r in rows]
        constrained = [i for i, seq in enumerate(chosen) if seq.json_constraint is not None and not seq.forced_ids]
        # A copy only for a subset of rows or for JSON masks written into it: at 16 rows it is 3 MB.
        if len(rows) < len(seqs) or constrained:
            logits = logits[rows]
        for i in constrained:
            logits[i] = chosen[i].json_constraint.mask(logits[i])
        result = self.sampler(
            logits,
            [s.request.params for s in chosen],
            [s.token_ids for s in chosen],
            [s.sampler_state for s in chosen],
        )
        events = []
        token_ids = result.token_ids.tolist()
        with self._lock:
            for i, seq in enumerate(chosen):
                if seq.request_id not in self._sequences:
                    continue  # cancelled meanwhile
                token = token_ids[i]
                logprob = None if result.logprobs is None else float(result.logprobs[i])
                top = None if result.top_logprobs is None else result.top_logprobs[i]
                if seq.forced_ids:
                    token, logprob, top = seq.forced_ids.pop(0), None, None
                elif seq.request.think_budget is not None:
                    seq.forced_ids = list(seq.request.think_budget.step(token))
                    if seq.forced_ids:
                        # The budget ran out: the closing text replaces this token.
                        token, logprob, top = seq.forced_ids.pop(0), None, None
                events.append(self._append_token(seq, token, logprob, top))
        return events

    def _append_token(self, seq: Sequence, token: int, logprob, top) -> TokenEvent:
        seq.token_ids.append(token)
        if token in seq.request.stop_token_ids and not seq.forced_ids:
            return self._finish(seq, FinishReason.STOP, seq.stop_matcher.flush(), token, logprob, top)
        text, matched = seq.stop_matcher.feed(seq.detokenizer.add(token))
        if seq.json_constraint is not None:
            seq.json_constraint.advance(token)
            matched = matched or seq.json_constraint.is_complete  # the object is closed: the reply is done
        if matched:
            # After a stop string nothing is held back; after a closed JSON object the tail is released.
            return self._finish(seq, FinishReason.STOP, text + seq.stop_matcher.flush(), token, logprob, top)
        if seq.num_generated >= seq.request.max_new_tokens or len(seq.token_ids) >= self.config.num_ctx:
            tail = seq.stop_matcher.feed(seq.detokenizer.flush())[0] + seq.stop_matcher.flush()
            return self._finish(seq, FinishReason.LENGTH, text + tail, token, logprob, top)
        return self._event(seq, token, text, logprob, top, None)

    def _finish(self, seq: Sequence, reason: FinishReason, text: str, token: int | None = None,
                logprob=None, top=None) -> TokenEvent:
        seq.finished = reason
        self.scheduler.remove(seq)
        del self._sequences[seq.request_id]
        return self._event(seq, token, text, logprob, top, reason)

    @staticmethod
    def _event(seq: Sequence, token, text, logprob, top, reason) -> TokenEvent:
        return TokenEvent(
            request_id=seq.request_id, token_id=token, text=text, logprob=logprob, top_logprobs=top,
            finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_generated, num_cached_tokens=seq.num_cached_prompt_tokens,
        )


class _LazyTokenTexts(collections.abc.Sequence):
    """The vocabulary's token texts, built on first use (only DRY needs them)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return self.tokenizer.vocab_size

    def __getitem__(self, index):
        return self.tokenizer.token_texts[index]
