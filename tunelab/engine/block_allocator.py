"""KV block ownership and prefix reuse, in plain Python.

The KV cache is a pool of `num_blocks` blocks of `block_size` token slots.
Each sequence owns a list of blocks. A block that is full of tokens gets a
hash chained from its predecessor's (hash(prev_hash, tokens)), so two
sequences whose prompts start alike share those blocks by reference count,
and a freed block keeps its contents (and its hash) until the pool needs it
again: later requests with the same prefix skip recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: dict[int, int] = {}  # block -> hash of the tokens it holds (full blocks only)
        self.hash_to_block: dict[int, int] = {}
        # Free blocks, least recently freed first; freed blocks that hold a hash are reused last.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @staticmethod
    def chain_hash(prev_hash: int | None, tokens: list[int]) -> int:
        return hash((prev_hash, tuple(tokens)))

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self, block: int | None = None) -> int:
        if block is None:
            block, _ = self.free.popitem(last=False)
            old = self.block_hash.pop(block, None)
            if old is not None and self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
        else:
            self.free.pop(block, None)
        self.ref_counts[block] += 1
        return block

    def allocate_prompt(self, token_ids: list[int]) -> tuple[list[int], int] | None:
        """Blocks for a new sequence's prompt, reusing cached full blocks of its prefix.

        Returns (block_table, num_cached_tokens), or None when the pool is too
        small right now. The block holding the last prompt token is never
        shared, so every prompt computes at least one token (for its logits)
        and never writes into a block another sequence reads.
        """
        bs = self.block_size
        reusable = (len(token_ids) - 1) // bs  # full blocks strictly before the last token
        table, prev = [], None
        for i in range(reusable):
            h = self.chain_hash(prev, token_ids[i * bs:(i + 1) * bs])
            block = self.hash_to_block.get(h)
            if block is None:
                break
            table.append(block)
            prev = h
        num_cached = len(table) * bs
        num_new_blocks = self.blocks_needed(len(token_ids)) - len(table)
        # Cached blocks sitting in the free list must not be counted as free for the new ones.
        cached_free = sum(1 for b in table if self.ref_counts[b] == 0)
        if num_new_blocks > self.num_free - cached_free:
            return None
        table = [self._take(b) for b in table]
        table += [self._take() for _ in range(num_new_blocks)]
        return table, num_cached

    def append_slot(self, block_table: list[int], num_tokens: int) -> bool:
        """Make room for token number `num_tokens` (0-based count before it); False if out of blocks."""
        if num_tokens < len(block_table) * self.block_size:
            return True
        if not self.free:
            return False
        block_table.append(self._take())
        return True

    def register_full_blocks(self, block_table: list[int], token_ids: list[int], num_computed: int,
                             hashes: list[int]) -> None:
        """Hash the blocks that became full of computed tokens since the last call, for later reuse.

        `hashes` is the sequence's running list of its full blocks' hashes; it is extended in place.
        """
        bs = self.block_size
        for i in range(len(hashes), num_computed // bs):
            h = self.chain_hash(hashes[-1] if hashes else None, token_ids[i * bs:(i + 1) * bs])
            block = block_table[i]
            if h not in self.hash_to_block and block not in self.block_hash:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
            hashes.append(h)

    def release(self, block_table: list[int]) -> None:
        """Drop a sequence's references; unreferenced blocks return to the pool, hashed ones last."""
        for block in reversed(block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if block not in self.block_hash:
                    self.free.move_to_end(block, last=False)  # blocks holding no reusable prefix go first
        block_table.clear()
