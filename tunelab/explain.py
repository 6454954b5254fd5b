"""Explain sampling: what each stage of the chain did to the next-token distribution.

The model runs the prompt once, then for each explained step the sampler's own
`explain` takes the real step (same stages, same draw, same seed stream as the
engine), so a run of N explained steps generates exactly what `tunelab run`
would with the same options and seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.generation import PreparedRequest
from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.kv_cache import KVCache
from tunelab.runtime import ModelRuntime
from tunelab.sampling.sampler import SamplerState, StageTrace


@dataclass
class ExplainedStep:
    trace: StageTrace
    token_texts: list[str]  # the text of each candidate in `trace.token_ids`


@torch.inference_mode()
def explain_steps(runtime: ModelRuntime, prepared: PreparedRequest, num_steps: int = 1,
                  num_candidates: int = 10) -> list[ExplainedStep]:
    """Trace `num_steps` sampling steps of `prepared`'s request, drawing as the engine would."""
    request = prepared.request
    params = request.params
    tokens = list(request.prompt_ids)
    like = runtime.engine.kv_cache  # the engine's arithmetic: its compute type and cache type
    cache = KVCache.for_tokens(runtime.config, len(tokens) + num_steps, dtype=like.dtype,
                               kv_cache_type=like.kv_cache_type)
    blocks = list(range(cache.num_blocks))
    state = SamplerState.new(params)
    sampler = runtime.engine.sampler
    steps: list[ExplainedStep] = []
    num_cached, new = 0, tokens
    for _ in range(num_steps):
        batch = AttentionBatch.build([SequenceSlice(num_cached, len(new), blocks)], cache.block_size)
        logits = runtime.model(torch.tensor(new), batch, cache)[0]  # [V]
        num_cached += len(new)
        trace = sampler.explain(logits, params, tokens, state, num_candidates)
        texts = [runtime.tokenizer.decode([t]) for t in trace.token_ids]
        steps.append(ExplainedStep(trace, texts))
        tokens.append(trace.drawn_id)
        new = [trace.drawn_id]
        if trace.drawn_id in request.stop_token_ids:
            break
    return steps
