"""Sequences -> tensors -> Transformer -> logits. The only engine file that touches tensors."""

from __future__ import annotations

import torch

from tunelab.engine.request import Sequence
from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.kv_cache import KVCache


class ModelRunner:
    def __init__(self, model, kv_cache: KVCache):
        self.model = model
        self.kv_cache = kv_cache

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], num_new: list[int]) -> torch.Tensor:
        """Compute the next `num_new[i]` tokens of each sequence; logits of each one's last: [S, vocab]."""
        ids, slices = [], []
        for seq, n in zip(seqs, num_new):
            ids.extend(seq.token_ids[seq.num_computed:seq.num_computed + n])
            slices.append(SequenceSlice(seq.num_computed, n, seq.block_table))
        batch = AttentionBatch.build(slices, self.kv_cache.block_size)
        input_ids = torch.tensor(ids, dtype=torch.long)  # [T]
        return self.model(input_ids, batch, self.kv_cache)
