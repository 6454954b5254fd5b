"""The two real GGUF files on disk read as their model cards say, and load into models that know Paris.

Facts come from specs/models.md. Skipped when a file is absent.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.kv_cache import KVCache
from tunelab.model.layers import FUSED_PROJECTIONS
from tunelab.weights.gguf_file import GGUFFile
from tunelab.weights.loader import load_weights
from real_models import real_model_path

SMOLLM2 = real_model_path("smollm2:135m")
QWEN_CODER = real_model_path("qwen2.5-coder:0.5b")

FACTS = {
    SMOLLM2: dict(
        architecture="llama", num_tensors=272, types={"Q4_1": 210, "F32": 61, "Q8_0": 1}, num_merges=48_900,
        pre_tokenizer="smollm",
        config=dict(family="llama", num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9,
                    num_kv_heads=3, head_dim=64, rope_theta=100_000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=8192, vocab_size=49152, tie_word_embeddings=True,
                    attention_bias=False, qk_norm=False, rope_scaling=None, bos_token_id=1, eos_token_ids=(2,))),
    QWEN_CODER: dict(
        architecture="qwen2", num_tensors=291, types={"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12},
        num_merges=151_387, pre_tokenizer="qwen2",
        config=dict(family="qwen2", num_layers=24, hidden_size=896, intermediate_size=4864, num_heads=14,
                    num_kv_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
                    max_position_embeddings=32768, vocab_size=151936, tie_word_embeddings=False,
                    attention_bias=True, qk_norm=False, rope_scaling=None, bos_token_id=151643,
                    eos_token_ids=(151645,))),
}
PATHS = list(FACTS)


@pytest.fixture(scope="module")
def opened():
    files = {}

    def get(path: Path) -> GGUFFile:
        if path not in files:
            files[path] = GGUFFile(path)
        return files[path]

    return get


@pytest.fixture(scope="module")
def loaded():
    models = {}

    def get(path: Path):
        if path not in models:
            models[path] = load_weights(path)
        return models[path]

    return get


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_metadata_and_tensor_table_match_the_model_card(path, opened):
    f, facts = opened(path), FACTS[path]
    assert f.architecture == facts["architecture"]
    assert Counter(t.tensor_type.name for t in f.reader.tensors) == facts["types"]
    assert len(f.reader.tensors) == facts["num_tensors"]
    meta = f.metadata
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", facts["pre_tokenizer"])
    assert len(meta["tokenizer.ggml.merges"]) == facts["num_merges"]
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) == facts["config"]["vocab_size"]
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in f.chat_template


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_config_matches_the_model_card(path, opened):
    config = opened(path).config()
    for field, value in FACTS[path]["config"].items():
        assert getattr(config, field) == value, field


def checkpoint_rows(model, name: str) -> torch.Tensor:
    """The rows of a checkpoint tensor inside our model, where q/k/v and gate/up are fused along the rows."""
    module_name, _, leaf = name.rpartition(".")
    parent, _, projection = module_name.rpartition(".")
    if projection not in FUSED_PROJECTIONS:
        return dict(model.named_parameters())[name]
    fused, shard = FUSED_PROJECTIONS[projection]
    config = model.config
    sizes = {"qkv_proj": [config.num_heads * config.head_dim] + [config.num_kv_heads * config.head_dim] * 2,
             "gate_up_proj": [config.intermediate_size] * 2}[fused]
    return dict(model.named_parameters())[f"{parent}.{fused}.{leaf}"].split(sizes)[shard]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_every_tensor_loads_finite_into_its_parameter(path, loaded):
    config, model = loaded(path)
    params = dict(model.named_parameters())
    # Per layer, q/k/v (and their biases) become one fused parameter, gate/up another.
    merged = config.num_layers * (2 + (2 if config.attention_bias else 0) + 1)
    assert len(params) == FACTS[path]["num_tensors"] - merged
    for name, param in params.items():
        assert param.dtype == torch.float32 and torch.isfinite(param).all(), name
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("gguf_name,our_name", [
    ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),  # Q6_K
    ("blk.11.ffn_down.weight", "model.layers.11.mlp.down_proj.weight"),  # Q4_K
    ("blk.5.attn_v.weight", "model.layers.5.self_attn.v_proj.weight"),  # Q8_0
    ("blk.5.attn_q.weight", "model.layers.5.self_attn.q_proj.weight"),  # Q5_0, not permuted for qwen2
    ("blk.5.attn_q.bias", "model.layers.5.self_attn.q_proj.bias"),  # F32
])
def test_qwen_tensors_equal_gguf_dequantisation(gguf_name, our_name, opened, loaded):
    tensor = next(t for t in opened(QWEN_CODER).reader.tensors if t.name == gguf_name)
    expected = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    _, model = loaded(QWEN_CODER)
    np.testing.assert_array_equal(checkpoint_rows(model, our_name).detach().numpy(), expected)


@pytest.mark.parametrize("gguf_name,projection,num_heads", [
    ("blk.0.attn_q.weight", "q_proj", 9), ("blk.0.attn_k.weight", "k_proj", 3)])
def test_llama_qk_rows_are_the_file_rows_unpermuted(gguf_name, projection, num_heads, opened, loaded):
    tensor = next(t for t in opened(SMOLLM2).reader.tensors if t.name == gguf_name)
    in_file = torch.from_numpy(gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type))
    _, model = loaded(SMOLLM2)
    ours = checkpoint_rows(model, f"model.layers.0.self_attn.{projection}.weight").detach()
    # llama.cpp's converter permutation, applied to our rows, gives back the file's rows.
    permuted = ours.reshape(num_heads, 2, ours.shape[0] // num_heads // 2, -1).swapaxes(1, 2).reshape(ours.shape)
    assert torch.equal(permuted, in_file)


def test_float32_tensors_are_views_of_the_file_not_copies(opened):
    f = opened(SMOLLM2)
    mapped = f.reader.data.ctypes.data, f.reader.data.ctypes.data + f.reader.data.nbytes
    norm = next(t for name, t in f.iter_tensors() if name == "model.layers.0.input_layernorm.weight")
    assert mapped[0] <= norm.data_ptr() < mapped[1]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_loaded_model_continues_the_capital_of_france_with_paris(path, opened, loaded):
    vocab = {token: i for i, token in enumerate(opened(path).metadata["tokenizer.ggml.tokens"])}
    ids = torch.tensor([vocab[t] for t in ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]])
    config, model = loaded(path)
    kv = KVCache.for_tokens(config, len(ids))
    with torch.no_grad():
        logits = model(ids, AttentionBatch.build([SequenceSlice(0, len(ids), [0])], kv.block_size), kv)
    assert logits[-1].argmax().item() == vocab["ĠParis"]
