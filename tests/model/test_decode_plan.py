"""A captured decode step (compiled) computes what the eager model computes: the same logits, bit for bit,
and the same keys and values written to the cache.

Tiny random Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms) checkpoints in int8 and int4, and the
real SmolLM2 (int4 layers, 8-bit grouped LM head): three sequences on scattered blocks, prefilled eagerly, then
decoded together step by step, once eagerly and once through the plan, on two copies of the cache.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tunelab.kernels import build
from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.decode_plan import DecodePlan
from tunelab.model.kv_cache import KVCache
from tunelab.weights.loader import load_weights
from tiny_models import save_tiny_qwen

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512_vnni"} <= build.cpu_flags(),
                                reason="needs the native kernels")

BLOCK = 4
TABLES = {0: [7, 2, 9, 4, 11], 1: [0, 13, 5], 2: [1, 3, 6, 8, 10, 12, 14, 15, 16]}
PROMPTS = {0: [5, 9, 2, 77, 31, 8, 100, 3, 64], 1: [11, 12], 2: list(range(20, 43))}
DECODE = [[40, 41, 42], [50, 51, 52], [60, 61, 62], [70, 71, 72]]


def tiny_checkpoint(family: str, path) -> None:
    save_tiny_qwen(family, path, seed=2)


def prefilled(model, kv_cache_type: str = "auto") -> KVCache:
    config = model.config
    cache = KVCache(config.num_layers, 17, BLOCK, config.num_kv_heads, config.head_dim, torch.bfloat16, kv_cache_type)
    with torch.inference_mode():
        for s, prompt in PROMPTS.items():
            model(torch.tensor(prompt), AttentionBatch.build([SequenceSlice(0, len(prompt), TABLES[s])], BLOCK), cache)
    return cache


def decode_both_ways(model, kv_cache_type: str = "auto"):
    """Logits of each decode step, eager and planned, and the two caches afterwards."""
    eager_cache, planned_cache = prefilled(model, kv_cache_type), prefilled(model, kv_cache_type)
    plan = DecodePlan.capture(model, planned_cache, len(PROMPTS))
    assert plan is not None
    cached = {s: len(p) for s, p in PROMPTS.items()}
    eager, planned = [], []
    with torch.inference_mode():
        for tokens in DECODE:
            batch = AttentionBatch.build([SequenceSlice(cached[s], 1, TABLES[s]) for s in PROMPTS], BLOCK)
            ids = torch.tensor(tokens)
            eager.append(model(ids, batch, eager_cache))
            planned.append(plan.run(ids, batch))
            cached = {s: n + 1 for s, n in cached.items()}
    return torch.stack(eager), torch.stack(planned), eager_cache, planned_cache


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_planned_decode_equals_eager_decode(family, weight_format, tmp_path):
    tiny_checkpoint(family, tmp_path)
    model = load_weights(tmp_path, weight_format)[1]
    eager, planned, eager_cache, planned_cache = decode_both_ways(model)
    assert torch.equal(planned, eager)
    assert torch.equal(planned_cache.k, eager_cache.k) and torch.equal(planned_cache.v, eager_cache.v)


def test_planned_decode_equals_eager_decode_with_a_q8_0_cache(tmp_path):
    tiny_checkpoint("qwen3", tmp_path)
    model = load_weights(tmp_path, "int8")[1]
    eager, planned, eager_cache, planned_cache = decode_both_ways(model, "q8_0")
    assert torch.equal(planned, eager)
    for name in ("k", "v", "k_scales", "v_scales"):
        assert torch.equal(getattr(planned_cache, name), getattr(eager_cache, name))


def test_planned_decode_equals_eager_decode_on_a_real_model(smollm2_path):
    model = load_weights(smollm2_path, "int8")[1]  # Q4_1 layers stay int4; the Q8_0 LM head is int8
    eager, planned, _, _ = decode_both_ways(model)
    assert torch.equal(planned, eager)


def test_no_plan_where_a_piece_has_no_kernel(tmp_path):
    tiny_checkpoint("qwen2", tmp_path)
    model = load_weights(tmp_path, "int8")[1]
    float_cache = KVCache(model.config.num_layers, 17, BLOCK, model.config.num_kv_heads, model.config.head_dim,
                          torch.float32)
    assert DecodePlan.capture(model, float_cache, 3) is None  # the native attention reads bfloat16 caches
    assert DecodePlan.capture(load_weights(tmp_path, torch.bfloat16)[1], prefilled(model), 3) is None  # no int layers


def test_no_plan_for_a_mixture_of_experts(build_hf_model):
    path, _ = build_hf_model("qwen3_moe_topk_renormalised")
    model = load_weights(path, "int8")[1]  # experts route tokens in PyTorch
    config = model.config
    cache = KVCache(config.num_layers, 17, BLOCK, config.num_kv_heads, config.head_dim, torch.bfloat16)
    assert DecodePlan.capture(model, cache, 2) is None


def test_a_plan_refuses_another_batch_size_and_a_bad_slot(tmp_path):
    tiny_checkpoint("qwen2", tmp_path)
    model = load_weights(tmp_path, "int8")[1]
    cache = prefilled(model)
    plan = DecodePlan.capture(model, cache, 2)
    batch = AttentionBatch.build([SequenceSlice(len(PROMPTS[s]), 1, TABLES[s]) for s in PROMPTS], BLOCK)
    with pytest.raises(ValueError, match="decode steps of 2 sequences"):
        plan.run(torch.tensor([1, 2, 3]), batch)
    two = AttentionBatch.build([SequenceSlice(len(PROMPTS[s]), 1, TABLES[s]) for s in (0, 1)], BLOCK)
    bad = dataclasses.replace(two, slot_mapping=torch.tensor([0, 10_000]))
    before = cache.k.clone()
    with pytest.raises(RuntimeError, match="refused by its kernel"):
        plan.run(torch.tensor([1, 2]), bad)
    assert torch.equal(cache.k, before)  # the kernel checks slots before it writes anything


def test_the_engine_replays_plans_and_samples_the_same_tokens(smollm2_path):
    from tunelab.engine.request import Request
    from tunelab.runtime import open_model
    from tunelab.sampling.params import SamplingParams

    runtime = open_model(str(smollm2_path), options={"dtype": "int8"}, max_num_seqs=3, quiet=True)
    engine = runtime.engine
    prompts = [runtime.tokenizer.encode(text) for text in ("def fib(n):", "The lighthouse keeper", "Once upon a")]

    def generate() -> list[list[int]]:
        requests = [Request(prompt_ids=p, params=SamplingParams(temperature=0.8, top_k=40).with_seed(i),
                            max_new_tokens=12) for i, p in enumerate(prompts)]
        for request in requests:
            engine.submit(request)
        tokens = {r.request_id: [] for r in requests}
        while engine.scheduler.has_work():
            for event in engine.step():
                if event.token_id is not None:
                    tokens[event.request_id].append(event.token_id)
        return [tokens[r.request_id] for r in requests]

    planned = generate()
    assert engine.runner._plans and all(plan is not None for plan in engine.runner._plans.values())
    engine.runner.capture_decode = False
    assert generate() == planned
