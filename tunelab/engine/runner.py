"""Sequences -> tensors -> Transformer -> logits. The only engine file that touches tensors."""

from __future__ import annotations

import torch

from tunelab.engine.request import Sequence
from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.decode_plan import DecodePlan
from tunelab.model.kv_cache import KVCache

MAX_PLANS = 4  # decode plans kept, by batch size: each holds [rows, vocab] logits and a few activations


class ModelRunner:
    def __init__(self, model, kv_cache: KVCache, capture_decode: bool = True):
        self.model = model
        self.kv_cache = kv_cache
        self.capture_decode = capture_decode  # replay decode steps as captured kernel lists where they can be
        self._plans: dict[int, DecodePlan | None] = {}  # by number of sequences, least recently used first

    def _plan(self, rows: int) -> DecodePlan | None:
        if rows in self._plans:
            self._plans[rows] = self._plans.pop(rows)  # most recently used last
        else:
            if len(self._plans) >= MAX_PLANS:
                del self._plans[next(iter(self._plans))]
            self._plans[rows] = DecodePlan.capture(self.model, self.kv_cache, rows)
        return self._plans[rows]

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], num_new: list[int]) -> torch.Tensor:
        """Compute the next `num_new[i]` tokens of each sequence; logits of each one's last: [S, vocab]."""
        ids, slices = [], []
        for seq, n in zip(seqs, num_new):
            ids.extend(seq.token_ids[seq.num_computed:seq.num_computed + n])
            slices.append(SequenceSlice(seq.num_computed, n, seq.block_table))
        batch = AttentionBatch.build(slices, self.kv_cache.block_size)
        input_ids = torch.tensor(ids, dtype=torch.long)  # [T]
        plan = self._plan(len(seqs)) if self.capture_decode and batch.is_decode else None
        if plan is not None:
            return plan.run(input_ids, batch)
        return self.model(input_ids, batch, self.kv_cache)
