"""How far the quantized formats move the real models' next-token distributions.

Over 256 positions of real prose (192 through prefill, then 64 decoded one token a step, so both
kernel paths are measured), each format's distribution is compared with the float32 model built
from the same GGUF file: mean KL(float32 || format) and top-1 agreement.

Measured on the project machine with tunelab's kernels (int8 / int4), and the model in bfloat16:
  SmolLM2 Q4_1:     KL 0.0002 / 0.0002, top-1 98.8% / 98.8%;  bfloat16 KL 0.0005, top-1 96.9%
  Qwen2.5 0.5B mix: KL 0.0017 / 0.067,  top-1 97.3% / 82.4%;  bfloat16 KL 0.0004, top-1 98.0%
Q4_1 blocks and Q8_0 LM heads are held exactly, and the head writes float32 logits: bfloat16
logits (steps of 0.125 near 20) alone cost SmolLM2 1.9 points of agreement, on positions whose
float32 top-2 gap is below that step. Qwen's Q5_0/Q6_K layers are int8 rows, and its agreement
moves by a position or two with any last-bit change (many near-ties in this text). int8 is held
to KL < 0.01 and top-1 >= 97%; int4 must stay a usable model (KL < 0.1). The q8_0 KV cache's own
cost is measured here too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.kernels import int8_linear as native_int8
from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.kv_cache import KVCache
from tunelab.tokenizer import Tokenizer
from tunelab.weights.loader import load_weights

TEXT = (
    "The lighthouse stood at the end of a long stone pier, and for more than a hundred years its keepers had "
    "climbed the narrow stairs each evening to light the lamp. The last keeper, an old man named Thomas, had lived "
    "there alone since his wife died. Every morning he walked along the pier to the village to buy bread and milk, "
    "and every afternoon he sat by the window and watched the ships pass on their way to the harbour. The villagers "
    "liked him, although he rarely spoke, and the children sometimes followed him home to hear the stories he told "
    "about storms and shipwrecks. One winter a great storm came in from the sea. The wind howled for three days, the "
    "waves broke over the pier, and the rain fell so hard that nobody could see the water from the shore. On the "
    "second night the power failed across the whole coast, and the electric lamp in the lighthouse went dark. Thomas "
    "knew that a fishing boat had not returned to the harbour that evening. He found the old oil lamp that had been "
    "stored in the cellar for decades, carried it up the stairs, cleaned the glass, and lit the wick. All night he "
    "kept the flame burning, turning the lens by hand so that the light would sweep across the waves. Just before "
    "dawn the fishing boat appeared out of the darkness and came safely into the harbour. The fishermen said later "
    "that they had been lost until they saw the light."
)
NUM_PREFILL, NUM_DECODE = 192, 64


def next_token_logits(model, ids: torch.Tensor, kv_cache_type: str = "auto") -> torch.Tensor:
    """Logits [256, vocab] after each of the first 256 tokens: a prefill, then one decode step per token."""
    num_tokens = NUM_PREFILL + NUM_DECODE
    dtype = next(model.parameters()).dtype
    cache = KVCache.for_tokens(model.config, num_tokens, dtype=dtype, kv_cache_type=kv_cache_type)
    table = list(range(cache.num_blocks))
    with torch.inference_mode():
        prefill = AttentionBatch.build([SequenceSlice(0, NUM_PREFILL, table)], cache.block_size, all_logits=True)
        steps = [model(ids[:NUM_PREFILL], prefill, cache)]
        for t in range(NUM_PREFILL, num_tokens):
            batch = AttentionBatch.build([SequenceSlice(t, 1, table)], cache.block_size)
            steps.append(model(ids[t:t + 1], batch, cache))
    return torch.cat(steps).float()


@pytest.fixture(scope="module", params=["smollm2_path", "qwen_coder_path"], ids=["smollm2", "qwen2.5-coder"])
def reference(request):
    """(path, token ids, float32 logits) for one real model."""
    path = request.getfixturevalue(request.param)
    ids = torch.tensor(Tokenizer.load(path).encode(TEXT, add_bos=False))
    assert len(ids) >= NUM_PREFILL + NUM_DECODE
    _, model = load_weights(path, torch.float32)
    return path, ids, next_token_logits(model, ids)


def divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(mean KL(reference || logits), share of positions whose argmax agrees)."""
    log_p, log_q = F.log_softmax(reference_logits, dim=-1), F.log_softmax(logits, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return kl, (reference_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()


def test_int8_stays_close_to_float32(reference):
    path, ids, expected = reference
    kl, top1 = divergence(expected, next_token_logits(load_weights(path, "int8")[1], ids))
    print(f"\n{path.name[:16]} int8: mean KL {kl:.4f}, top-1 agreement {top1:.1%}")
    assert kl < 0.01
    # Measured: SmolLM2 98.8% (KL 0.0002), Qwen2.5 0.5B 97.3% (KL 0.0017). PyTorch's kernels alone,
    # where tunelab's do not run, take activations in fewer levels and round the logits to bfloat16:
    # they are held to 95%.
    assert top1 >= (0.97 if native_int8.max_rows() is not None else 0.95)


def test_a_q8_0_kv_cache_costs_what_it_is_measured_to_cost(reference):
    """int8 weights with the 8-bit KV cache. Measured: SmolLM2 KL 0.0006, top-1 98.4%; Qwen2.5 0.5B KL
    0.021, top-1 90.6%. Qwen2's keys are large (RMS ~10, up to ~217 here, from its k biases), so the
    ~0.9% RMS error of 8-bit codes moves its sharp attention scores; SmolLM2's keys (RMS ~2) barely."""
    path, ids, expected = reference
    kl, top1 = divergence(expected, next_token_logits(load_weights(path, "int8")[1], ids, "q8_0"))
    print(f"\n{path.name[:16]} int8, q8_0 KV cache: mean KL {kl:.4f}, top-1 agreement {top1:.1%}")
    assert kl < 0.05
    assert top1 >= 0.85


def test_int4_stays_a_usable_model(reference):
    path, ids, expected = reference
    kl, top1 = divergence(expected, next_token_logits(load_weights(path, "int4")[1], ids))
    print(f"\n{path.name[:16]} int4: mean KL {kl:.4f}, top-1 agreement {top1:.1%}")
    assert kl < 0.1
