"""Qwen3-MoE's sparse feed-forward: a softmax router over E SwiGLU experts, top-k per token.

The experts' weights are stacked into one [E, ...] parameter per projection
(`experts.gate_proj`, `experts.up_proj`, `experts.down_proj`), the layout GGUF
files already use; HF checkpoints are stacked while loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.model.config import ModelConfig


class StackedExperts(nn.Module):
    """E SwiGLU experts with weights stacked on a leading expert dim."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))  # [E, ff, H]
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))  # [E, ff, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # [E, H, ff]

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], expert_ids and weights [T, k] -> sum over k of weight * expert(x), [T, H].

        Only experts that received a token run; each runs once on all of its tokens.
        """
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.flatten()  # [T * k]
        order = flat_ids.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        flat_weights = weights.flatten()  # [T * k]
        out = torch.zeros_like(x)  # [T, H]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            assignments = order[start:start + count]  # [n]
            start += count
            tokens = assignments // top_k  # [n]
            h = x[tokens]  # [n, H]
            h = F.silu(F.linear(h, self.gate_proj[expert])) * F.linear(h, self.up_proj[expert])  # [n, ff]
            h = F.linear(h, self.down_proj[expert])  # [n, H]
            out.index_add_(0, tokens, h * flat_weights[assignments, None])
        return out


class SparseMoE(nn.Module):
    """Router (`gate`) + stacked experts; softmax over all experts in fp32, then top-k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = StackedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [T, E]
        weights, expert_ids = probs.topk(self.top_k, dim=-1)  # [T, k] each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(x, expert_ids, weights.to(x.dtype))
