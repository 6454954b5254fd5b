"""Tiny random Qwen2 and Qwen3 checkpoints whose every projection fits the int8 and int4 kernels."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_qwen(family: str, path: Path, seed: int = 1, head_dim: int | None = None) -> None:
    """A 2-layer Qwen2 (q/k/v biases, GQA) or Qwen3 (per-head q/k norms) saved as an HF checkpoint at `path`,
    with biases and norm weights drawn away from their defaults so that they matter. Heads are 16 wide
    (Qwen2: 4 on 2 KV heads) and 32 (Qwen3), or `head_dim` (Qwen2's then fill the hidden size of 64)."""
    import transformers

    torch.manual_seed(seed)
    heads = 64 // (head_dim or 16) if family == "qwen2" else 4
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
                  num_key_value_heads=max(1, heads // 2), max_position_embeddings=256, initializer_range=0.2,
                  tie_word_embeddings=False)
    if family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=head_dim or 32, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.5 if "norm" in name else 0.0, 0.5)
    model.save_pretrained(path)
