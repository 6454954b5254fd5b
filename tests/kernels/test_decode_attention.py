"""The compiled decode attention computes what the PyTorch path of `Attention.forward` does.

Tiny random Qwen2 (q/k/v biases, GQA) and Qwen3 (per-head q/k RMSNorm) checkpoints in int8, with
bfloat16 activations and cache as the engine runs them: three sequences of different lengths on
scattered blocks, prefilled, then decoded together, once through the kernel and once through PyTorch.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.kernels import build, decode_attention as native_attention
from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.kv_cache import KVCache
from tunelab.weights.loader import load_weights
from tiny_models import save_tiny_qwen

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif("avx512f" not in build.cpu_flags(), reason="needs AVX-512")

BLOCK = 4
PROMPTS = {0: [5, 9, 2, 77, 31, 8, 100, 3, 64], 1: [11, 12], 2: list(range(20, 43))}
TABLES = {0: [7, 2, 9, 4, 11], 1: [0, 13, 5], 2: [1, 3, 6, 8, 10, 12, 14, 15, 16]}
DECODE = [[40, 41, 42], [50, 51, 52], [60, 61, 62], [70, 71, 72]]


def tiny_checkpoint(family: str, path, head_dim: int | None = None):
    save_tiny_qwen(family, path, head_dim=head_dim)
    return load_weights(path, "int8")[1]


def decode_run(model, kv_cache_type="auto"):
    """Prefill each prompt alone, then decode all three together; the logits of each decode step and the cache."""
    config = model.config
    cache = KVCache(config.num_layers, 17, BLOCK, config.num_kv_heads, config.head_dim, torch.bfloat16, kv_cache_type)
    cached, logits = {s: 0 for s in PROMPTS}, []
    with torch.inference_mode():
        for s, prompt in PROMPTS.items():
            model(torch.tensor(prompt), AttentionBatch.build([SequenceSlice(0, len(prompt), TABLES[s])], BLOCK), cache)
            cached[s] = len(prompt)
        for tokens in DECODE:
            batch = AttentionBatch.build([SequenceSlice(cached[s], 1, TABLES[s]) for s in PROMPTS], BLOCK)
            assert batch.is_decode
            logits.append(model(torch.tensor(tokens), batch, cache))
            cached = {s: n + 1 for s, n in cached.items()}
    return torch.stack(logits), cache


@pytest.mark.parametrize("family, kv_cache_type, head_dim", [  # q8_0: heads of 2 and 4 blocks of 32
    ("qwen2", "auto", None), ("qwen3", "auto", None), ("qwen3", "auto", 128),
    ("qwen2", "q8_0", 64), ("qwen3", "q8_0", 64), ("qwen3", "q8_0", 128)])
def test_kernel_matches_the_pytorch_path(family, kv_cache_type, head_dim, tmp_path, monkeypatch):
    model = tiny_checkpoint(family, tmp_path, head_dim)
    cache_dtype = torch.int8 if kv_cache_type == "q8_0" else torch.bfloat16
    assert native_attention.supports(model.config.head_dim, torch.bfloat16, cache_dtype)
    native_logits, native_cache = decode_run(model, kv_cache_type)
    monkeypatch.setattr(native_attention, "supports", lambda *args: False)
    torch_logits, torch_cache = decode_run(model, kv_cache_type)
    # The new keys and values land in the same slots with the same values (bfloat16 RoPE, rounded
    # as PyTorch rounds it). Where PyTorch's addcmul and the kernel's multiply-then-add round
    # differently, an operand's last bit moves: one bfloat16 step at the operands' scale, which a
    # near-cancelling sum shows as a large relative difference (seen with heads of 128), and which
    # q8_0 may turn into a code one apart.
    layers = range(model.config.num_layers)
    for native, reference in zip(*[[c.gather(i, torch.arange(17 * BLOCK)[None]) for i in layers]
                                   for c in (native_cache, torch_cache)]):
        for n, r in zip(native, reference):
            step = 2 ** -8 * r.abs().max().item()
            torch.testing.assert_close(n.float(), r.float(), atol=step if kv_cache_type == "auto" else 2 * step,
                                       rtol=2 ** -7 if kv_cache_type == "auto" else 0.02)
    # Only the float32 summation order differs, then one bfloat16 rounding of the attention output.
    scale = torch_logits.abs().max().item()
    torch.testing.assert_close(native_logits, torch_logits, atol=0.01 * scale, rtol=0)
    assert torch.equal(native_logits.argmax(-1), torch_logits.argmax(-1))


@pytest.mark.parametrize("kv_cache_type", ["auto", "q8_0"])
def test_a_sequence_decoded_in_a_batch_gets_what_it_gets_alone(kv_cache_type, tmp_path):
    """Each (sequence, kv head) is computed on its own: the batch around it changes no bit."""
    model = tiny_checkpoint("qwen3", tmp_path, head_dim=64)
    together, _ = decode_run(model, kv_cache_type)
    config = model.config
    cache = KVCache(config.num_layers, 17, BLOCK, config.num_kv_heads, config.head_dim, torch.bfloat16, kv_cache_type)
    with torch.inference_mode():
        prompt = PROMPTS[2]
        model(torch.tensor(prompt), AttentionBatch.build([SequenceSlice(0, len(prompt), TABLES[2])], BLOCK), cache)
        for i, tokens in enumerate(DECODE):
            batch = AttentionBatch.build([SequenceSlice(len(prompt) + i, 1, TABLES[2])], BLOCK)
            assert torch.equal(model(torch.tensor([tokens[2]]), batch, cache)[0], together[i, 2])


def test_bad_input_is_refused_and_nothing_written():
    cache, codes = torch.zeros(8, 1, 32, dtype=torch.bfloat16), torch.zeros(8, 1, 32, dtype=torch.int8)
    qkv = torch.randn(1, 3 * 32).bfloat16()
    cos, sin = torch.ones(1, 32).bfloat16(), torch.zeros(1, 32).bfloat16()

    def attend(k_cache, slot, key_index, position):
        return native_attention.decode_attention(qkv, 1, 1, 32, cos, sin, None, None, 0.0, k_cache, k_cache.clone(),
                                                 torch.tensor([slot]), torch.tensor([key_index]),
                                                 torch.tensor([position]))

    with pytest.raises(RuntimeError, match="refused its input"):  # a new slot outside the cache
        attend(cache, 8, list(range(9)), 8)
    with pytest.raises(RuntimeError, match="refused its input"):  # a key slot past the end
        attend(cache, 2, [0, 1, 2, 99], 3)
    with pytest.raises(ValueError, match="with its scales"):  # int8 codes without their scales
        attend(codes, 2, [0, 1, 2], 2)
    assert not cache.any() and not codes.any()
