"""The thinking budget through the engine: the closing text is fed to the model, then it answers."""

from __future__ import annotations

import pytest
import torch

from tunelab.chat.output_parser import parse_output
from tunelab.chat.thinking import ThinkingBudget
from tunelab.engine.engine import Engine, EngineConfig
from tunelab.engine.request import Request
from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.config import ModelConfig
from tunelab.model.kv_cache import KVCache
from tunelab.model.transformer import Transformer
from tunelab.sampling.params import SamplingParams
from tunelab.tokenizer import Tokenizer
from tunelab.weights.gguf_file import GGUFFile

QWEN3_ADDED = {151665: "<tool_response>", 151666: "</tool_response>", 151667: "<think>", 151668: "</think>"}


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen_coder_path):
    """Qwen3's vocabulary: Qwen2.5's, with Qwen3's four added tokens in their padding slots."""
    metadata = dict(GGUFFile(qwen_coder_path).metadata)
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = list(metadata["tokenizer.ggml.token_type"])
    for token_id, text in QWEN3_ADDED.items():
        tokens[token_id], types[token_id] = text, 4  # USER_DEFINED, as llama.cpp writes them
    metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"] = tokens, types
    return Tokenizer.from_gguf_metadata(metadata)


@pytest.fixture(scope="module")
def tiny_qwen3():
    torch.manual_seed(0)
    config = ModelConfig(family="qwen3", vocab_size=151936, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6,
                         rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=True,
                         attention_bias=False, qk_norm=True, bos_token_id=None, eos_token_ids=(151645,))
    model = Transformer(config)
    with torch.no_grad():  # weights large enough that greedy output depends on the context
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.5)
    model.setup_buffers()
    return model.eval()


def greedy_next(model, ids: list[int]) -> int:
    cache = KVCache.for_tokens(model.config, len(ids))
    batch = AttentionBatch.build([SequenceSlice(0, len(ids), list(range(cache.num_blocks)))], cache.block_size)
    with torch.inference_mode():
        return int(model(torch.tensor(ids), batch, cache)[0].argmax())


def test_budget_closes_the_thought_and_the_model_answers_after_reading_the_closing_text(tiny_qwen3, qwen3_tokenizer):
    engine = Engine(tiny_qwen3, qwen3_tokenizer, EngineConfig(num_ctx=256, max_num_seqs=2, num_thread=1))
    prompt = qwen3_tokenizer.encode("<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    budget = ThinkingBudget(qwen3_tokenizer, 5, starts_in_thinking=True)
    request = Request(prompt_ids=prompt, params=SamplingParams(temperature=0), max_new_tokens=64,
                      stop_token_ids=frozenset(qwen3_tokenizer.stop_token_ids), think_budget=budget)
    events = list(engine.generate(request))
    generated = [e.token_id for e in events if e.token_id is not None]
    closing = budget.closing_ids
    # Five thinking tokens, then the closing text, then the answer.
    assert generated[5:5 + len(closing)] == closing
    assert len(generated) > 5 + len(closing)
    # The token after the closing text is what the model predicts having read it: it was fed in.
    assert generated[5 + len(closing)] == greedy_next(tiny_qwen3, prompt + generated[:5 + len(closing)])
    parsed = parse_output("".join(e.text for e in events), starts_in_thinking=True)
    assert not parsed.thinking_unclosed and parsed.content
