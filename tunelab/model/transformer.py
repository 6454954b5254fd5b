"""Transformer: one decoder-only model for every supported family.

embed -> N x (attention + feed-forward, each pre-normed with a residual) -> norm -> lm_head.
Family differences are flags on `ModelConfig` (q/k/v bias, QK-norm, MoE layers);
submodule names follow HF (`model.layers.3.self_attn.q_proj`) so checkpoints
load by name.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.model.attention_batch import AttentionBatch
from tunelab.model.config import ModelConfig
from tunelab.model.kv_cache import KVCache
from tunelab.model.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding, residual_stream
from tunelab.model.moe import SparseMoE


class DecoderLayer(nn.Module):
    """One block: pre-normed attention and pre-normed feed-forward (dense or MoE), each with a residual."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_index):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                batch: AttentionBatch, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) [T, hidden] each -> this layer's output and the residual stream before it.

        The residual add is left to the next norm, which fuses it (vLLM passes the residual the same
        way); the first layer gets residual None and x as the stream itself.
        """
        if residual is None:
            residual, x = residual_stream(x), self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, batch, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Transformer(nn.Module):
    """The whole model: token ids of a ragged batch in, next-token logits out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # The table's values come from the checkpoint: no random init, which on `meta` would run through
        # PyTorch's Python reference kernels and import ~800 modules (~65 MiB resident for good).
        embed_tokens = nn.Embedding.from_pretrained(torch.empty(config.vocab_size, config.hidden_size))
        self.model = nn.ModuleDict(dict(
            embed_tokens=embed_tokens,
            layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)

    def setup_buffers(self, device: torch.device | str = "cpu") -> None:
        """Materialise the non-persistent buffers (RoPE frequencies) after building on `meta`."""
        self.rotary.reset_buffers(device)

    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:
        """Run the new tokens input_ids [T] of a ragged batch; float32 logits [len(batch.logits_indices), vocab]."""
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary(batch.positions, x.dtype)  # [T, 1, head_dim] each, shared by all layers
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, batch, kv_cache)
        rows = batch.logits_indices  # the last layer's add is fused into the final norm too
        x = self.model.norm(x[rows]) if residual is None else self.model.norm(x[rows], residual[rows])[0]  # [R, hidden]
        return self.lm_head(x).float()  # [R, vocab]
