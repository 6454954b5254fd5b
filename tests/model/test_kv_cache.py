"""The paged KV cache and the batch description that addresses it.

Where a sequence's blocks sit in the pool must not matter: a scattered block
table gives exactly the keys, and the logits, of a contiguous one.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import InvalidOption
from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.kv_cache import KVCache, dequantize_q8_0, quantize_q8_0
from tunelab.weights.loader import load_weights


def test_gather_returns_written_tokens_in_order_across_scattered_blocks():
    cache = KVCache(num_layers=2, num_blocks=6, block_size=2, num_kv_heads=1, head_dim=1)
    batch = AttentionBatch.build([SequenceSlice(num_cached=0, num_new=5, block_table=[4, 1, 3])], block_size=2)
    assert batch.slot_mapping.tolist() == [8, 9, 2, 3, 6]  # block * 2 + offset
    positions = torch.arange(5.0).view(5, 1, 1)  # [T, KV, D]
    cache.write(1, batch.slot_mapping, positions, -positions)
    keys, values = cache.gather(1, batch.key_index)  # [S, K, KV, D]
    assert keys.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert values.flatten().tolist() == [0.0, -1.0, -2.0, -3.0, -4.0]
    assert cache.k[0].abs().sum() == 0  # other layers untouched


def test_new_tokens_see_their_cache_and_earlier_new_tokens_only():
    batch = AttentionBatch.build([SequenceSlice(3, 2, [0, 1]), SequenceSlice(0, 1, [2])], block_size=4)
    assert batch.positions.tolist() == [3, 4, 0]
    assert batch.query_slots.tolist() == [0, 1, 2]  # sequence 1's token sits in the second padded row
    assert batch.attn_mask[0, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch.attn_mask[1, 0, 0].int().tolist() == [1, 0, 0, 0, 0]
    assert batch.logits_indices.tolist() == [1, 2]  # the last new token of each sequence


def test_scattered_block_table_gives_the_same_logits_as_a_contiguous_one(build_hf_model, cached_run):
    config, model = load_weights(build_hf_model("qwen3_untied_yarn_sharded")[0])
    ids = torch.randint(0, config.vocab_size, (19,), generator=torch.Generator().manual_seed(2))
    contiguous = cached_run(model, [[0, 1, 2, 3, 4]])
    scattered = cached_run(model, [[9, 2, 7, 0, 11]])
    chunks = [(0, 13)] + [(t, t + 1) for t in range(13, 19)]  # prefill across block borders, then decode
    for a, b in chunks:
        assert torch.equal(contiguous.step({0: ids[a:b]})[0], scattered.step({0: ids[a:b]})[0])


def test_q8_0_holds_each_value_within_half_its_blocks_step():
    x = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(0)) * 4
    x[0, 0, 5] = 300.0  # an outlier sets its block's step, not its neighbour block's
    x[1, 2, 32:] = 0.0  # an all-zero block
    codes, scales = quantize_q8_0(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.dtype == torch.float16 and scales.shape == (7, 3, 2)
    steps = scales.float().repeat_interleave(32, dim=-1)
    assert ((dequantize_q8_0(codes, scales) - x).abs() <= steps / 2 * 1.01).all()
    assert codes.abs().max() == 127 and codes[0, 0, 5] == 127  # each block's largest value is the full code
    assert scales[0, 0, 0] > 20 * scales[0, 0, 1]
    assert scales[1, 2, 1] == 0 and not codes[1, 2, 32:].any()


def test_q8_0_cache_gives_back_what_was_written_in_a_third_less_memory():
    cache = KVCache(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=32,
                    dtype=torch.bfloat16, kv_cache_type="q8_0")
    plain = KVCache(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=32, dtype=torch.bfloat16)
    k, v = torch.randn(3, 2, 32), torch.randn(3, 2, 32) * 10
    slots = torch.tensor([9, 2, 14])
    cache.write(1, slots, k, v)
    keys, values = cache.gather(1, slots[None])  # [1, 3, KV, D]
    assert torch.equal(keys[0], dequantize_q8_0(*quantize_q8_0(k)))
    assert torch.equal(values[0], dequantize_q8_0(*quantize_q8_0(v)))
    assert not cache.k[0].any()  # other layers untouched

    assert cache.nbytes * 32 == plain.nbytes * 17  # 34 bytes per 32 values instead of 64


def test_q8_0_needs_heads_of_whole_blocks():
    with pytest.raises(InvalidOption, match="divisible by 32"):
        KVCache(num_layers=1, num_blocks=1, block_size=4, num_kv_heads=1, head_dim=16, kv_cache_type="q8_0")
    with pytest.raises(ValueError, match="auto, q8_0"):
        KVCache(num_layers=1, num_blocks=1, block_size=4, num_kv_heads=1, head_dim=32, kv_cache_type="q4_0")


def test_an_integer_compute_type_is_refused_for_what_it_is():
    with pytest.raises(ValueError, match="use kv_cache_type q8_0"):
        KVCache(num_layers=1, num_blocks=1, block_size=4, num_kv_heads=1, head_dim=32, dtype=torch.int8)
