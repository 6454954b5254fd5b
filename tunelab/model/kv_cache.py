"""KVCache: keys and values of many sequences, addressed by flat slot.

The cache is a pool of fixed-size blocks; a sequence owns a list of blocks
(its block table, kept by the engine's block allocator), and slot
`block * block_size + offset` holds one token's keys and values for every
layer. Keys are stored after QK-norm and RoPE, so cached tokens never need
recomputing.

They are kept in the model's compute type, or with `kv_cache_type` q8_0 as
GGML's Q8_0 keeps them (what Ollama's OLLAMA_KV_CACHE_TYPE=q8_0 and
llama.cpp's --cache-type-k/v q8_0 do): per 32 values of a head, int8 codes
and one fp16 scale, `value = code * scale`, in 34 bytes instead of 64. That
halves the cache's memory and what a decode step reads from it.
"""

from __future__ import annotations

import mmap

import torch

from tunelab.errors import InvalidOption


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


KV_CACHE_TYPES = ("auto", "q8_0")  # auto: the model's compute type
Q8_0_BLOCK = 32


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (D % 32 == 0) -> int8 codes [..., D] and fp16 scales [..., D / 32], as GGML's Q8_0:
    scale = max|x| / 127 per 32 values, code = round(x / scale). decode_attention.c writes new tokens
    with the same float32 steps, to the same bits."""
    blocks = x.float().unflatten(-1, (-1, Q8_0_BLOCK))  # [..., D / 32, 32]
    # A scale fp16 cannot hold would zero the block: clamp it (|x| above ~8e6 is not a key or value).
    scales = (blocks.abs().amax(-1) / 127).clamp(max=65504).half()  # [..., D / 32]
    steps = scales.float().unsqueeze(-1)
    codes = torch.where(steps > 0, blocks / steps, 0.0).round_().clamp_(-127, 127)
    return codes.to(torch.int8).flatten(-2), scales


def dequantize_q8_0(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`quantize_q8_0`'s values in float32: code * scale."""
    return (codes.float().unflatten(-1, (-1, Q8_0_BLOCK)) * scales.float().unsqueeze(-1)).flatten(-2)


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, kv_cache_type: str = "auto"):
        if kv_cache_type not in KV_CACHE_TYPES:
            raise ValueError(f"kv_cache_type '{kv_cache_type}' is not one of {', '.join(KV_CACHE_TYPES)}")
        if not dtype.is_floating_point:
            raise ValueError(f"a KV cache computes in a floating-point type, not {dtype}; for 8-bit storage "
                             "use kv_cache_type q8_0")
        if kv_cache_type == "q8_0" and head_dim % Q8_0_BLOCK != 0:  # a load option the user gave: say which
            raise InvalidOption(f"kv_cache_type q8_0 needs a head size divisible by {Q8_0_BLOCK}, this model's is "
                             f"{head_dim}; use kv_cache_type auto")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype, self.kv_cache_type = dtype, kv_cache_type  # what a cache like this one is made with
        self.quantized = kv_cache_type == "q8_0"
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        storage = torch.int8 if self.quantized else dtype
        self.k, self.v = lazy_zeros(shape, storage), lazy_zeros(shape, storage)  # [L, slots, kv_heads, head_dim]
        self.k_scales = self.v_scales = None  # q8_0: [L, slots, kv_heads, head_dim / 32] fp16
        if self.quantized:
            scale_shape = shape[:-1] + (head_dim // Q8_0_BLOCK,)
            self.k_scales = lazy_zeros(scale_shape, torch.float16)
            self.v_scales = lazy_zeros(scale_shape, torch.float16)

    @classmethod
    def for_tokens(cls, config, num_tokens: int, block_size: int = 16, dtype=torch.float32,
                   kv_cache_type: str = "auto") -> "KVCache":
        """A cache big enough for `num_tokens` tokens of a model with `config`."""
        num_blocks = -(-num_tokens // block_size)
        return cls(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype,
                   kv_cache_type)

    @property
    def nbytes(self) -> int:
        """The pool's size in bytes: codes or values, and q8_0's scales."""
        tensors = (self.k, self.v, self.k_scales, self.v_scales)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This layer's q8_0 key and value scales [slots, kv_heads, head_dim / 32], or (None, None)."""
        if not self.quantized:
            return None, None
        return self.k_scales[layer], self.v_scales[layer]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' keys and values ([T, kv_heads, head_dim]) at `slots` ([T])."""
        if not self.quantized:
            self.k[layer].index_copy_(0, slots, k.to(self.k.dtype))
            self.v[layer].index_copy_(0, slots, v.to(self.v.dtype))
            return
        for x, codes, scales in ((k, self.k, self.k_scales), (v, self.v, self.v_scales)):
            new_codes, new_scales = quantize_q8_0(x)
            codes[layer].index_copy_(0, slots, new_codes)
            scales[layer].index_copy_(0, slots, new_scales)

    def gather(self, layer: int, key_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values for `key_index` ([S, K]): two [S, K, kv_heads, head_dim] tensors (q8_0: float32)."""
        if not self.quantized:
            return self.k[layer][key_index], self.v[layer][key_index]
        return (dequantize_q8_0(self.k[layer][key_index], self.k_scales[layer][key_index]),
                dequantize_q8_0(self.v[layer][key_index], self.v_scales[layer][key_index]))
