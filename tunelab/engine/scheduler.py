"""Who runs next: admission, chunked prefill, decode, preemption. No tensors here.

Each step is either a prefill step (new prompts, possibly in chunks of at
most `max_prefill_tokens`) or a decode step (one token for every running
sequence). Prefill goes first so a new request joins the running batch at the
next step. When the KV pool runs dry during decode, the most recently admitted
sequence is preempted: its blocks are released and it waits to be recomputed
(its full blocks usually survive in the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tunelab.engine.block_allocator import BlockAllocator
from tunelab.engine.request import Sequence


@dataclass
class ScheduledStep:
    is_prefill: bool
    seqs: list[Sequence]
    num_new: list[int]  # tokens each sequence computes in this step


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_prefill_tokens: int):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep | None:
        """Pick the next step's sequences and how many tokens each computes."""
        step = self._schedule_prefill()
        return step if step is not None else self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledStep | None:
        budget = self.max_prefill_tokens
        seqs, num_new = [], []
        # Sequences admitted earlier whose prompt is still being computed in chunks.
        for seq in self.running:
            pending = len(seq.token_ids) - seq.num_computed
            if pending > 1 or (pending == 1 and seq.num_generated == 0):
                take = min(pending, budget)
                if take > 0:
                    seqs.append(seq)
                    num_new.append(take)
                    budget -= take
        admitted_prefixes: set[int] = set()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = self._first_block_hash(seq)
            if prefix is not None and prefix in admitted_prefixes:
                # Same prompt start as a sequence computed in this step: admit it next step,
                # when those blocks are in the prefix cache, instead of computing them twice.
                break
            allocation = self.allocator.allocate_prompt(seq.token_ids)
            if allocation is None:
                break
            self.waiting.popleft()
            seq.block_table, seq.num_computed = allocation
            seq.block_hashes = []
            if seq.num_cached_prompt_tokens == 0:
                seq.num_cached_prompt_tokens = seq.num_computed
            self.running.append(seq)
            if prefix is not None:
                admitted_prefixes.add(prefix)
            take = min(len(seq.token_ids) - seq.num_computed, budget)
            seqs.append(seq)
            num_new.append(take)
            budget -= take
        return ScheduledStep(True, seqs, num_new) if seqs else None

    def _first_block_hash(self, seq: Sequence) -> int | None:
        """Hash of the prompt's first block when it could be shared (a full block before the last token)."""
        bs = self.allocator.block_size
        if len(seq.token_ids) <= bs:
            return None
        return self.allocator.chain_hash(None, seq.token_ids[:bs])

    def _schedule_decode(self) -> ScheduledStep | None:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted to make room for an earlier sequence
            while not self.allocator.append_slot(seq.block_table, seq.num_computed):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(seq)
        if not scheduled:
            return None
        return ScheduledStep(False, scheduled, [1] * len(scheduled))

    def preempt(self, seq: Sequence) -> None:
        """Release a sequence's KV and put it back at the head of the queue to recompute."""
        self.running.remove(seq)
        self.allocator.release(seq.block_table)
        seq.num_computed = 0
        seq.block_hashes = []
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or cancelled sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.release(seq.block_table)
