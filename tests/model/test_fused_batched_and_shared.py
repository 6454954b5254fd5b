"""The fast paths compute what the plain ones do.

- fused = unfused: q/k/v and gate/up load into one matmul each, shard by shard in checkpoint order;
- batched = sequential: a sequence decoded in a ragged batch gets the logits it gets alone;
- prefix-shared = unshared: a prompt whose first blocks come from another sequence's KV gets
  the logits of one computed from scratch, and the engine computes a shared prompt once.

Tiny random Qwen2 checkpoints (biases, GQA) in float32 and in the int8/int4 formats; the engine
test uses the real SmolLM2.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.engine.request import Request
from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.kv_cache import KVCache
from tunelab.runtime import open_model
from tunelab.sampling.params import SamplingParams
from tunelab.weights.loader import load_weights
from tunelab.weights.quantized import Int4Linear, Int8Linear

transformers = pytest.importorskip("transformers")

FORMATS = [torch.float32, "int8", "int4"]
BLOCK = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Qwen2 whose every projection fits the int8 and int4 kernels (widths multiples of 32)."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      initializer_range=0.2, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module", params=FORMATS, ids=str)
def loaded(request, checkpoint):
    return load_weights(checkpoint[0], request.param)[1]


def run(model, steps: list[dict[int, list[int]]], tables: dict[int, list[int]], num_cached: dict[int, int] | None = None):
    """Drive the model through one shared KV cache; returns each step's {sequence: logits of its last token}."""
    config = model.config
    cache = KVCache(config.num_layers, max(b for t in tables.values() for b in t) + 1, BLOCK,
                    config.num_kv_heads, config.head_dim, torch.float32)
    cached = dict(num_cached or {s: 0 for s in tables})
    out = []
    for step in steps:
        seqs = list(step)
        batch = AttentionBatch.build([SequenceSlice(cached[s], len(step[s]), tables[s]) for s in seqs], BLOCK)
        with torch.inference_mode():
            logits = model(torch.tensor([t for s in seqs for t in step[s]]), batch, cache)
        for s in seqs:
            cached[s] += len(step[s])
        out.append(dict(zip(seqs, logits)))
    return out


def test_fused_projections_hold_the_checkpoint_shards_in_order(checkpoint):
    _, hf = checkpoint
    _, model = load_weights(checkpoint[0])
    ours, theirs = model.model.layers[1], hf.model.layers[1]
    attn = theirs.self_attn
    assert torch.equal(ours.self_attn.qkv_proj.weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(ours.self_attn.qkv_proj.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    assert torch.equal(ours.mlp.gate_up_proj.weight, torch.cat([theirs.mlp.gate_proj.weight, theirs.mlp.up_proj.weight]))


@pytest.mark.parametrize("weight_format,layer_class", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_formats_swap_every_projection_for_a_kernel_layer(checkpoint, weight_format, layer_class):
    _, model = load_weights(checkpoint[0], weight_format)
    layer = model.model.layers[0]
    for projection in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(projection, layer_class)
    assert isinstance(model.lm_head, Int8Linear)  # int4 keeps the LM head at 8 bits
    assert layer.self_attn.qkv_proj.bias.dtype == torch.bfloat16


PROMPTS = {0: list(range(3, 14)), 1: list(range(40, 45)), 2: list(range(90, 107))}
TABLES = {0: [0, 1, 2, 3, 4], 1: [5, 6, 7], 2: [8, 9, 10, 11, 12, 13]}
DECODE = {0: [7, 8, 9], 1: [20, 21, 22], 2: [60, 61, 62]}


def test_batched_decode_gives_each_sequence_its_logits_alone(loaded):
    prefills = [{s: PROMPTS[s]} for s in PROMPTS]  # one at a time, so only decoding is batched
    batched = run(loaded, prefills + [{s: [DECODE[s][i]] for s in PROMPTS} for i in range(3)], TABLES)[len(PROMPTS):]
    for s in PROMPTS:
        alone = run(loaded, [{s: PROMPTS[s]}] + [{s: [t]} for t in DECODE[s]], {s: TABLES[s]})[1:]
        for step_batched, step_alone in zip(batched, alone):
            torch.testing.assert_close(step_batched[s], step_alone[s], atol=1e-4, rtol=1e-4)


def test_batched_prefill_gives_each_sequence_its_logits_alone_to_compute_precision(loaded):
    # 33 prompt tokens in one step take the int8 GEMM path and a padded attention; alone, each prompt
    # takes the row kernel. Both round in bfloat16, so they agree to its precision, not bit for bit.
    batched = run(loaded, [PROMPTS] + [{s: [DECODE[s][0]] for s in PROMPTS}], TABLES)
    for s in PROMPTS:
        alone = run(loaded, [{s: PROMPTS[s]}, {s: [DECODE[s][0]]}], {s: TABLES[s]})
        for step_batched, step_alone in zip(batched, alone):
            scale = step_alone[s].abs().max().item()
            torch.testing.assert_close(step_batched[s], step_alone[s], atol=0.05 * scale, rtol=0)


def test_prompt_on_shared_prefix_blocks_gets_the_logits_of_an_unshared_one(loaded):
    # The prefix fills 4 whole blocks; the tail is long enough that the shared tail (8 rows) and the
    # unshared prompt (24 rows) take the same int8 kernel, whose rows are then bit-identical.
    prefix, tail = list(range(10, 26)), [99, 98, 97, 5, 6, 7, 8, 9]
    # Sequence 0 computes the prefix; sequence 1 starts on those 4 blocks and computes only its tail.
    shared = run(loaded, [{0: prefix + [1, 2]}, {1: tail}], {0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 5, 6]},
                 num_cached={0: 0, 1: len(prefix)})
    unshared = run(loaded, [{1: prefix + tail}], {1: [7, 8, 9, 10, 11, 12]})
    torch.testing.assert_close(shared[1][1], unshared[0][1], atol=1e-4, rtol=1e-4)


def test_engine_computes_a_shared_prompt_once_and_every_sample_matches_a_lone_request(smollm2_path):
    runtime = open_model(str(smollm2_path), options={"dtype": "int8", "num_thread": 1}, max_num_seqs=4, quiet=True)
    engine = runtime.engine
    prompt = runtime.tokenizer.encode("The lighthouse keeper climbed the narrow stairs each evening to light the "
                                      "lamp, and from the window of the lamp room he watched the fishing boats and "
                                      "the ships pass on their way to the harbour")
    assert len(prompt) > 2 * engine.config.block_size

    def greedy() -> Request:
        return Request(prompt_ids=prompt, params=SamplingParams(temperature=0).with_seed(0), max_new_tokens=8)

    requests = [greedy() for _ in range(4)]
    for request in requests:
        engine.submit(request)
    tokens: dict[int, list[int]] = {r.request_id: [] for r in requests}
    while engine.scheduler.has_work():
        for event in engine.step():
            if event.token_id is not None:
                tokens[event.request_id].append(event.token_id)
    computed = engine.stats()["num_prefill_tokens_computed"]
    reusable = (len(prompt) - 1) // engine.config.block_size * engine.config.block_size
    assert computed == len(prompt) + 3 * (len(prompt) - reusable)

    lone = open_model(str(smollm2_path), options={"dtype": "int8", "num_thread": 1}, max_num_seqs=1, quiet=True)
    alone = [e.token_id for e in lone.engine.generate(greedy()) if e.token_id is not None]
    assert len(alone) == 8 and all(t == alone for t in tokens.values())
