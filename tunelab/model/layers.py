"""The building blocks of the transformer: RMSNorm, RoPE, attention and the SwiGLU MLP.

Module and parameter names are HF's (`self_attn.o_proj`, `q_norm`,
`mlp.down_proj`, ...), except that projections of the same input are fused
into one matmul (`qkv_proj`, `gate_up_proj`, as nano-vllm does);
`FUSED_PROJECTIONS` tells the loader where each checkpoint projection goes.
Projections stay plain `nn.Linear` modules so quantized layers can replace them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.kernels import decode_attention as native_attention
from tunelab.kernels import rms_norm as native_norm
from tunelab.model.attention_batch import AttentionBatch
from tunelab.model.config import ModelConfig
from tunelab.model.kv_cache import KVCache


# Checkpoint projection -> (fused projection, shard index); shards are stacked along the output rows.
FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise over the last dim and scale (accumulating in fp32 for 16-bit x).

        With `residual`, first add x to it, as the residual stream between two layers does, and
        return (normed, residual + x): for bfloat16 rows on a float32 stream (see `residual_stream`)
        one native call instead of two PyTorch ops.
        """
        if residual is None:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        if native_norm.supports(x.dtype) and self.weight.dtype == x.dtype and residual.dtype == torch.float32:
            return native_norm.add_rms_norm(x, residual, self.weight, self.eps)
        total = residual + x
        return F.rms_norm(total, (x.shape[-1],), self.weight, self.eps).to(x.dtype), total


def residual_stream(x: torch.Tensor) -> torch.Tensor:
    """The residual stream starting from embeddings x: float32 for bfloat16 x where the fused norm runs,
    so the 2N additions along it are not each rounded to bfloat16 (llama.cpp keeps it in float32 too)."""
    return x.float() if native_norm.supports(x.dtype) else x


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the cos/sin scale, as HF computes them for each rope type."""
    dim, base, scaling = config.head_dim, config.rope_theta, config.rope_scaling
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [D/2]
    inv_freq = 1.0 / pos_freqs
    if scaling is None:
        return inv_freq, 1.0
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor, 1.0
    if scaling["rope_type"] == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    return _yarn_inv_freq(pos_freqs, scaling, dim, base), _yarn_attention_factor(scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(is_medium, blended, scaled)


def _yarn_inv_freq(pos_freqs: torch.Tensor, scaling: dict, dim: int, base: float) -> torch.Tensor:
    """YaRN: dims that rotate fewer than `beta_slow` times over the original context are
    interpolated by `factor`, dims rotating more than `beta_fast` times are kept, a linear ramp between."""
    factor, context = scaling["factor"], scaling["original_max_position_embeddings"]

    def dim_for_rotations(num_rotations: float) -> float:
        return dim * math.log(context / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(scaling.get("beta_fast") or 32), dim_for_rotations(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # keep the ramp finite
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [D/2]
    return 1.0 / (factor * pos_freqs) * ramp + 1.0 / pos_freqs * (1 - ramp)


def _yarn_attention_factor(scaling: dict) -> float:
    """The YaRN cos/sin scale: given, or 0.1 * ln(factor) + 1 (optionally as an mscale ratio)."""
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)


class RotaryEmbedding(nn.Module):
    """cos/sin for NeoX-style (rotate_half) RoPE, computed in fp32 from each token's position."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", None, persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute `inv_freq` on `device`; a model built on `meta` calls this once its weights are in."""
        # On the CPU even inside a `meta` build: meta tensors run these few ops through PyTorch's Python
        # reference kernels, whose first use imports ~800 modules (~65 MiB resident for good).
        with torch.device("cpu"):
            inv_freq, self.attention_factor = rope_inv_freq(self.config)
        self.inv_freq = inv_freq if device is None else inv_freq.to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for positions [T], each [T, 1, head_dim] in `dtype`, for `apply_rope`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        cos, sin = freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
        # rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * [-1, +1]: fold the signs into sin once.
        return torch.cat((cos, cos), dim=-1)[:, None].to(dtype), torch.cat((-sin, sin), dim=-1)[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by RoPE: x * cos + rotate_half(x) * sin, with cos/sin from `RotaryEmbedding`."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Attention(nn.Module):
    """Grouped-query attention over a ragged batch, reading and writing the paged KV cache."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        hidden, q_size, kv_size = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(hidden, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, hidden, bias=False)
        # One [head_dim] weight shared by all heads of the layer.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; this layer's new keys and values go into `kv_cache`."""
        num_tokens, num_seqs, max_query = x.shape[0], batch.num_seqs, batch.max_query
        num_qk_heads = self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x)  # [T, (H + 2 * KV) * D]
        if batch.is_decode and native_attention.supports(self.head_dim, qkv.dtype, kv_cache.k.dtype):
            # One call for everything below, reading keys in place (the same arithmetic, in C).
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.q_norm else (None, None, 0.0)
            out = native_attention.decode_attention(
                qkv, self.num_heads, self.num_kv_heads, self.head_dim, cos, sin, *norms,
                kv_cache.k[self.layer_index], kv_cache.v[self.layer_index], batch.slot_mapping, batch.key_index,
                batch.positions, *kv_cache.scales(self.layer_index))
            return self.o_proj(out)  # [T, hidden]
        qk = qkv[:, :num_qk_heads * self.head_dim].view(num_tokens, num_qk_heads, self.head_dim)  # [T, H + KV, D]
        v = qkv[:, num_qk_heads * self.head_dim:].view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KV, D]
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        # Queries and keys rotate together: one RoPE pass per layer.
        q, k = apply_rope(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)  # [T, H, D], [T, KV, D]

        kv_cache.write(self.layer_index, batch.slot_mapping, k, v)
        keys, values = kv_cache.gather(self.layer_index, batch.key_index)  # [S, K, KV, D] each
        # Attention runs in float32 whatever the weights: oneDNN JIT-compiles a bfloat16 matmul for every
        # new shape and keeps it (~1.3 MiB per context length reached), where float32 goes to MKL.
        q, keys, values = q.float(), keys.float().transpose(1, 2), values.float().transpose(1, 2)  # [S, KV, K, D]

        if batch.is_decode:
            out = decode_attention(q, keys, values, batch.attn_bias)  # [S, H * D]
        else:
            # Scatter the flat queries into one padded row per sequence.
            queries = q.new_zeros(num_seqs * max_query, self.num_heads, self.head_dim)  # [S * Q, H, D]
            queries[batch.query_slots] = q
            queries = queries.view(num_seqs, max_query, self.num_heads, self.head_dim).transpose(1, 2)  # [S, H, Q, D]
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=batch.attn_mask, enable_gqa=True)
            out = out.transpose(1, 2).reshape(num_seqs * max_query, self.num_heads * self.head_dim)[batch.query_slots]
        return self.o_proj(out.to(x.dtype))  # [T, hidden]


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per sequence: q [S, H, D], keys and values [S, KV, K, D], additive mask [S, 1, 1, K] -> [S, H * D].

    Two batched matmuls with the query heads grouped by their KV head: SDPA's CPU
    flash kernel pads every single query to a tile and runs 4-10x slower here.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    grouped = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [S, KV, G, D]
    scores = torch.matmul(grouped * head_dim ** -0.5, keys.transpose(-1, -2))  # [S, KV, G, K]
    probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs, values).view(num_seqs, num_heads * head_dim)  # [S, KV, G, D] -> [S, H * D]


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        gate_up = self.gate_up_proj(x)  # [T, 2 * ff]
        fused = getattr(self.down_proj, "swiglu", None)  # a quantized layer's kernel takes silu(gate) * up itself
        out = fused(gate_up) if fused is not None else None
        if out is not None:
            return out
        gate, up = gate_up.chunk(2, dim=-1)  # [T, ff] each
        return self.down_proj(F.silu(gate) * up)
