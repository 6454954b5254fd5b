"""AttentionBatch: where the tokens of one forward pass sit.

A forward pass runs a ragged batch: several sequences, each contributing some
new tokens (a whole prompt, a chunk of one, or a single decode token) on top of
what it already has in the KV cache. The batch is flattened to `T` tokens. This
object carries, explicitly, everything attention needs to find each token's
sequence, position and cache slot; it is built once per step and shared by all
layers (nano-vllm keeps the same facts in a module global; we pass them).
"""

from __future__ import annotations

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
    attn_mask: torch.Tensor  # [S, 1, max_query, max_context] True where a query may see a key
    logits_indices: torch.Tensor  # [R] flat token rows whose logits the model returns
    num_seqs: int
    max_query: int

    @classmethod
    def build(cls, slices: list[SequenceSlice], block_size: int, all_logits: bool = False) -> "AttentionBatch":
        """Build the batch description from plain integers.

        Logits are returned for the last new token of every sequence, or for
        every new token when `all_logits` is set (oracle tests, `explain`).
        """
        num_seqs = len(slices)
        max_query = max(s.num_new for s in slices)
        max_context = max(s.num_cached + s.num_new for s in slices)
        positions, slots, query_slots, logits_rows = [], [], [], []
        key_index = torch.zeros(num_seqs, max_context, dtype=torch.long)
        attn_mask = torch.zeros(num_seqs, 1, max_query, max_context, dtype=torch.bool)
        row = 0
        for s, sl in enumerate(slices):
            context = sl.num_cached + sl.num_new
            if len(sl.block_table) * block_size < context:
                raise ValueError(f"sequence {s} needs {context} slots but owns {len(sl.block_table)} blocks")
            table = torch.tensor(sl.block_table, dtype=torch.long)
            key_pos = torch.arange(context)
            key_index[s, :context] = table[key_pos // block_size] * block_size + key_pos % block_size
            new_pos = torch.arange(sl.num_cached, context)
            positions.append(new_pos)
            slots.append(key_index[s, sl.num_cached:context])
            query_slots.append(s * max_query + torch.arange(sl.num_new))
            # Causal: the i-th new token (position num_cached + i) sees keys 0..num_cached + i.
            attn_mask[s, 0, : sl.num_new, :context] = key_pos[None, :] <= new_pos[:, None]
            # Padding queries see key 0 so their (discarded) softmax stays finite.
            attn_mask[s, 0, sl.num_new :, 0] = True
            if all_logits:
                logits_rows.extend(range(row, row + sl.num_new))
            else:
                logits_rows.append(row + sl.num_new - 1)
            row += sl.num_new
        return cls(
            positions=torch.cat(positions),
            slot_mapping=torch.cat(slots),
            query_slots=torch.cat(query_slots),
            key_index=key_index,
            attn_mask=attn_mask,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long),
            num_seqs=num_seqs,
            max_query=max_query,
        )
