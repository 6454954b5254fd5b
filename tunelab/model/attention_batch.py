"""AttentionBatch: where the tokens of one forward pass sit.

A forward pass runs a ragged batch: several sequences, each contributing some
new tokens (a whole prompt, a chunk of one, or a single decode token) on top of
what it already has in the KV cache. The batch is flattened to `T` tokens. This
object carries, explicitly, everything attention needs to find each token's
sequence, position and cache slot; it is built once per step and shared by all
layers (nano-vllm keeps the same facts in a module global; we pass them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceSlice:
    """One sequence's part in a forward pass."""

    num_cached: int  # tokens of this sequence already in the KV cache
    num_new: int  # tokens of this sequence computed in this pass
    block_table: list[int]  # KV blocks owned by this sequence, in order


@dataclass(frozen=True)
class AttentionBatch:
    positions: torch.Tensor  # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] flat KV-cache slot each new token is written to
    query_slots: torch.Tensor  # [T] index of each new token in the padded [S * max_query] layout
    key_index: torch.Tensor  # [S, max_context] flat KV-cache slot of each key, per sequence
    query_positions: torch.Tensor  # [S, max_query] position of each query, padding included
    num_new: torch.Tensor  # [S] real queries of each sequence
    logits_indices: torch.Tensor  # [R] flat token rows whose logits the model returns
    num_seqs: int
    max_query: int

    # The masks are built on first use: the native decode attention needs neither, and for a
    # decode step they are [S, 1, 1, K] tensors built anew at every step.
    @functools.cached_property
    def attn_mask(self) -> torch.Tensor:
        """[S, 1, max_query, max_context] True where a query may see a key."""
        is_real = torch.arange(self.max_query) < self.num_new[:, None]  # [S, Q]: False for padding queries
        # Causal: the i-th new token (position num_cached + i) sees keys 0..num_cached + i.
        key_pos = torch.arange(self.key_index.shape[1])  # [K]
        mask = (key_pos <= self.query_positions[:, :, None]) & is_real[:, :, None]  # [S, Q, K]
        mask[:, :, 0] |= ~is_real  # padding queries see key 0 so their (discarded) softmax stays finite
        return mask[:, None]

    @functools.cached_property
    def attn_bias(self) -> torch.Tensor:
        """attn_mask as 0 / -inf, float32, to add to attention scores."""
        return torch.zeros(self.attn_mask.shape).masked_fill_(~self.attn_mask, float("-inf"))

    @property
    def is_decode(self) -> bool:
        """One new token per sequence: the flat tokens are already one row per sequence, in order."""
        return self.max_query == 1

    @classmethod
    def build(cls, slices: list[SequenceSlice], block_size: int, all_logits: bool = False) -> "AttentionBatch":
        """Build the batch description from plain integers, with a fixed number of tensor ops for any batch.

        Logits are returned for the last new token of every sequence, or for
        every new token when `all_logits` is set (oracle tests, `explain`).
        """
        for s, sl in enumerate(slices):
            if len(sl.block_table) * block_size < sl.num_cached + sl.num_new:
                raise ValueError(f"sequence {s} needs {sl.num_cached + sl.num_new} slots "
                                 f"but owns {len(sl.block_table)} blocks")
        num_seqs = len(slices)
        max_query = max(sl.num_new for sl in slices)
        max_context = max(sl.num_cached + sl.num_new for sl in slices)
        max_blocks = -(-max_context // block_size)
        num_cached = torch.tensor([sl.num_cached for sl in slices])  # [S]
        num_new = torch.tensor([sl.num_new for sl in slices])  # [S]
        tables = torch.tensor([(sl.block_table + [sl.block_table[-1]] * max_blocks)[:max_blocks] for sl in slices])

        # Keys past a sequence's context point at its own last block; the mask hides them.
        key_pos = torch.arange(max_context)  # [K]
        key_index = tables[:, key_pos // block_size] * block_size + key_pos % block_size  # [S, K]
        query_offset = torch.arange(max_query)  # [Q]
        query_pos = num_cached[:, None] + query_offset  # [S, Q]
        is_real = query_offset < num_new[:, None]  # [S, Q]: False for padding queries
        positions = query_pos[is_real]  # [T], sequence by sequence
        slot_mapping = key_index.gather(1, query_pos.clamp(max=max_context - 1))[is_real]  # [T]
        query_slots = (torch.arange(num_seqs)[:, None] * max_query + query_offset)[is_real]  # [T]
        ends = num_new.cumsum(0)  # [S]
        logits_indices = torch.arange(int(ends[-1])) if all_logits else ends - 1
        return cls(
            positions=positions,
            slot_mapping=slot_mapping,
            query_slots=query_slots,
            key_index=key_index,
            query_positions=query_pos,
            num_new=num_new,
            logits_indices=logits_indices,
            num_seqs=num_seqs,
            max_query=max_query,
        )
