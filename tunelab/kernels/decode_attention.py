"""One decode step of attention straight from the paged KV cache, through `decode_attention.c`.

It replaces, for a batch of single new tokens, the ~25 PyTorch ops of `Attention.forward` between
the qkv and output projections: per-head norm, RoPE, the cache write, the key gather, both
matmuls and the softmax. At batch 1 those ops cost more than the attention arithmetic itself,
and the gather copied every cached key of every row at every step.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tunelab.kernels import build

_NEEDS = frozenset({"avx512f"})


@functools.cache
def _function():
    library = build.load("decode_attention", _NEEDS, libraries=("mvec",))
    if library is None:
        return None
    function = library.tunelab_decode_attention
    function.restype = ctypes.c_int
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, size, size, size, size, pointer, pointer, pointer, pointer, ctypes.c_float,
                         pointer, pointer, pointer, pointer, size, pointer, size, pointer, pointer, pointer]
    return function


def supports(head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """Whether the kernel runs here and takes this layer's shapes and dtypes (a cache of bfloat16, or int8:
    q8_0 codes)."""
    return (head_dim % 16 == 0 and head_dim <= 256 and dtype == torch.bfloat16
            and (cache_dtype == torch.bfloat16 or (cache_dtype == torch.int8 and head_dim % 32 == 0))
            and _function() is not None)


def decode_attention(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                     cos: torch.Tensor, sin: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                     eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     key_index: torch.Tensor, positions: torch.Tensor, k_scales: torch.Tensor | None = None,
                     v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [S, (H + 2 KV) * D] bfloat16 of one new token per sequence -> attention output [S, H * D] bfloat16.

    cos, sin: [S, ..., D] bfloat16 (sin sign-folded, as `RotaryEmbedding` gives them); q_norm, k_norm:
    [D] per-head RMSNorm weights (bfloat16) or None; k_cache, v_cache: this layer's [slots, KV, D] bfloat16, into
    which the new keys and values are written at `slots` [S]; key_index [S, K]: each sequence's cache
    slots in order; positions [S]: sequence s sees keys 0..positions[s]. A q8_0 cache (`KVCache`) gives
    int8 k_cache and v_cache and their fp16 k_scales, v_scales [slots, KV, D / 32].
    """
    num_seqs = qkv.shape[0]
    for cache, scales in ((k_cache, k_scales), (v_cache, v_scales)):  # the kernel reads each by its scales
        if (cache.dtype, scales is None) not in ((torch.bfloat16, True), (torch.int8, False)):
            raise ValueError(f"the decode attention kernel reads a bfloat16 cache, or an int8 one with its scales; "
                             f"got {cache.dtype} {'without' if scales is None else 'with'} scales")
    tensors = [t.contiguous() for t in (qkv, cos, sin, slots, key_index, positions)]
    qkv, cos, sin, slots, key_index, positions = tensors
    norms = [None if w is None else w.to(torch.bfloat16).contiguous() for w in (q_norm, k_norm)]  # as the model holds them
    out = torch.empty(num_seqs, num_heads * head_dim, dtype=torch.bfloat16)
    status = _function()(
        qkv.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(),
        *(None if w is None else w.data_ptr() for w in norms), eps, k_cache.data_ptr(), v_cache.data_ptr(),
        slots.data_ptr(), key_index.data_ptr(), key_index.shape[1], positions.data_ptr(), k_cache.shape[0], out.data_ptr(),
        *(None if t is None else t.data_ptr() for t in (k_scales, v_scales)))
    if status != 0:
        raise RuntimeError(f"the decode attention kernel refused its input ({num_seqs} sequences, "
                           f"{num_heads}/{num_kv_heads} heads of {head_dim}, {key_index.shape[1]} keys)")
    return out


def address() -> int:
    """The kernel's entry point, for `call_list` (where the kernel runs)."""
    return build.address(_function())
