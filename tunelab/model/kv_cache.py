"""KVCache: keys and values of many sequences, addressed by flat slot.

The cache is a pool of fixed-size blocks; a sequence owns a list of blocks
(its block table, kept by the engine's block allocator), and slot
`block * block_size + offset` holds one token's keys and values for every
layer. Keys are stored after QK-norm and RoPE, so cached tokens never need
recomputing.
"""

from __future__ import annotations

import mmap

import torch


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose pages the OS maps only when first written, 4 KiB at a time.

    An anonymous map reads as zeros and costs no resident memory until written, so an unused
    part of a big KV pool is free (torch.zeros writes every page). Transparent huge pages are
    refused for it: each layer's first keys would otherwise pin a whole 2 MiB page, ~120 MiB of
    a small model's pool after one 200-token prompt.
    """
    num_bytes = max(torch.Size(shape).numel() * dtype.itemsize, 1)
    pages = mmap.mmap(-1, num_bytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps the map alive


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k, self.v = lazy_zeros(shape, dtype), lazy_zeros(shape, dtype)  # [L, slots, kv_heads, head_dim]

    @classmethod
    def for_tokens(cls, config, num_tokens: int, block_size: int = 16, dtype=torch.float32) -> "KVCache":
        """A cache big enough for `num_tokens` tokens of a model with `config`."""
        num_blocks = -(-num_tokens // block_size)
        return cls(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' keys and values ([T, kv_heads, head_dim]) at `slots` ([T])."""
        self.k[layer].index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v.dtype))

    def gather(self, layer: int, key_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values for `key_index` ([S, K]): two [S, K, kv_heads, head_dim] tensors."""
        return self.k[layer][key_index], self.v[layer][key_index]
