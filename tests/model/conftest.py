"""Tiny random HF models, one per behaviour we must reproduce, saved as safetensors directories.

`transformers` is the oracle: each case is built with its own config class,
saved with `save_pretrained`, and handed to the tests together with the live
HF model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.kv_cache import KVCache

transformers = pytest.importorskip("transformers")

# Small enough to run in milliseconds; head_dim (12 or 16) differs from hidden / heads (8).
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
            # Wider than HF's 0.02 so logits spread over several units and a 1e-4 match means something.
            initializer_range=0.15, bos_token_id=1, eos_token_id=[2, 3])
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16, num_hidden_layers=3)


@dataclass(frozen=True)
class Case:
    config_class: str
    model_class: str
    settings: dict
    max_shard_size: str | None = None
    legacy_rope_keys: bool = False  # rewrite config.json as released checkpoints spell rope (rope_theta/rope_scaling)


CASES = {
    "llama_tied_llama3_rope": Case("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "qwen2_tied": Case("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_untied_linear_rope": Case("Qwen2Config", "Qwen2ForCausalLM", dict(
        tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen3_tied": Case("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=12)),
    "qwen3_untied_yarn_sharded": Case("Qwen3Config", "Qwen3ForCausalLM", dict(
        tie_word_embeddings=False, head_dim=16, rope_theta=1e6, max_position_embeddings=64,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
        max_shard_size="16KB", legacy_rope_keys=True),
    "qwen3_moe_topk_renormalised": Case("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        MOE, tie_word_embeddings=False, norm_topk_prob=True, mlp_only_layers=[1]), max_shard_size="16KB"),
    "qwen3_moe_sparse_step_2": Case("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        MOE, tie_word_embeddings=True, norm_topk_prob=False, decoder_sparse_step=2)),
}


def _rewrite_rope_keys_as_released(config_path: Path) -> None:
    """transformers 5 writes `rope_parameters`; released Qwen3 config.json files use the older keys."""
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session")
def build_hf_model(tmp_path_factory):
    """Build (once per session) the named case: (checkpoint directory, HF model in eval mode)."""
    built = {}

    def build(name: str):
        if name not in built:
            case = CASES[name]
            torch.manual_seed(sum(map(ord, name)))
            config = getattr(transformers, case.config_class)(**BASE | case.settings)
            model = getattr(transformers, case.model_class)(config).eval()
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path, **({"max_shard_size": case.max_shard_size} if case.max_shard_size else {}))
            if case.legacy_rope_keys:
                _rewrite_rope_keys_as_released(path / "config.json")
            built[name] = (path, model)
        return built[name]

    return build


@pytest.fixture(params=list(CASES))
def hf_case(request, build_hf_model):
    """Every case in turn: (checkpoint directory, HF model)."""
    return build_hf_model(request.param)


class CachedRun:
    """Drives our Transformer over several sequences sharing one paged KV cache, step by step, as the engine does."""

    def __init__(self, model, block_tables: list[list[int]], block_size: int = 4):
        config = model.config
        self.model, self.block_tables, self.block_size = model, block_tables, block_size
        self.num_cached = [0] * len(block_tables)
        num_blocks = max(b for table in block_tables for b in table) + 1
        self.cache = KVCache(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)

    def step(self, new_tokens: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """One forward over {sequence: new token ids [n]}; returns {sequence: logits [n, vocab]}."""
        seqs = list(new_tokens)
        slices = [SequenceSlice(self.num_cached[s], len(new_tokens[s]), self.block_tables[s]) for s in seqs]
        batch = AttentionBatch.build(slices, self.block_size, all_logits=True)
        with torch.inference_mode():
            logits = self.model(torch.cat([new_tokens[s] for s in seqs]), batch, self.cache)
        for s in seqs:
            self.num_cached[s] += len(new_tokens[s])
        return dict(zip(seqs, logits.split([len(new_tokens[s]) for s in seqs])))


@pytest.fixture
def cached_run():
    """The `CachedRun` class, for tests that drive the model through the KV cache."""
    return CachedRun
