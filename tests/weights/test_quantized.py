"""GGML dequantisation in torch agrees bit for bit with `gguf.quants.dequantize` (llama.cpp's reference in numpy)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from tunelab.errors import UnsupportedQuantization
from tunelab.weights.gguf_file import GGUFFile
from tunelab.weights.quantized import SUPPORTED_TYPES, QuantizedTensor
from real_models import real_model_path

SMOLLM2 = real_model_path("smollm2:135m")
QWEN_CODER = real_model_path("qwen2.5-coder:0.5b")
# One real tensor of each type the two on-disk models use.
REAL_TENSORS = [
    (SMOLLM2, "blk.0.attn_q.weight", Q.Q4_1),
    (SMOLLM2, "blk.0.attn_norm.weight", Q.F32),
    (QWEN_CODER, "blk.0.attn_q.weight", Q.Q5_0),
    (QWEN_CODER, "blk.0.ffn_down.weight", Q.Q6_K),
    (QWEN_CODER, "blk.11.ffn_down.weight", Q.Q4_K),
    (QWEN_CODER, "blk.0.attn_v.weight", Q.Q8_0),
]
# The types `gguf.quants.quantize` can produce from floats.
QUANTIZABLE = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


@cache
def real_tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in GGUFFile(path).reader.tensors}


def reference(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """llama.cpp's values for `raw` block bytes, via gguf-py."""
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(shape)
    with np.errstate(all="ignore"):  # random scales may be inf or NaN; both sides must agree on those too
        return gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype).reshape(shape)


def ours(raw: np.ndarray, qtype: Q, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    return QuantizedTensor(torch.from_numpy(raw.copy()), qtype, shape).dequantize(dtype)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=lambda t: t.name), ids=lambda t: t.name)
def test_random_block_bytes_decode_exactly_like_gguf(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 6, 4 if block_size > 1 else 256
    raw = np.random.default_rng(int(qtype)).integers(0, 256, rows * blocks_per_row * type_size, dtype=np.uint8)
    shape = (rows, blocks_per_row * block_size)
    expected = reference(raw, qtype, shape)
    assert np.isfinite(expected).mean() > 0.8  # mostly real numbers, so equality below says something
    np.testing.assert_array_equal(ours(raw, qtype, shape).numpy(), expected)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_normal_weights_decode_exactly_like_gguf(qtype):
    weights = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weights, qtype).view(np.uint8).reshape(-1)
    decoded = ours(raw, qtype, weights.shape)
    np.testing.assert_array_equal(decoded.numpy(), reference(raw, qtype, weights.shape))
    # And the round trip is close to the original, as each format's precision allows.
    assert (decoded - torch.from_numpy(weights)).abs().max() < {Q.Q4_0: 0.5, Q.Q4_1: 0.5}.get(qtype, 0.25)


@pytest.mark.parametrize("path,name,qtype", REAL_TENSORS, ids=lambda v: getattr(v, "name", str(v)))
def test_real_model_tensor_decodes_exactly_like_gguf(path, name, qtype):
    tensor = real_tensors(path)[name]
    assert tensor.tensor_type == qtype
    shape = tuple(reversed(tensor.shape.tolist()))
    raw = np.asarray(tensor.data).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(ours(raw, qtype, shape).numpy(), reference(raw, qtype, shape))


def test_dequantize_to_bfloat16_rounds_the_float32_values():
    weights = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    raw = gguf.quants.quantize(weights, Q.Q8_0).reshape(-1)
    as_bf16 = ours(raw, Q.Q8_0, weights.shape, torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16, ours(raw, Q.Q8_0, weights.shape).to(torch.bfloat16))


def test_unsupported_type_names_the_type():
    _, type_size = GGML_QUANT_SIZES[Q.IQ2_XXS]
    with pytest.raises(UnsupportedQuantization, match="IQ2_XXS"):
        QuantizedTensor(torch.zeros(type_size, dtype=torch.uint8), Q.IQ2_XXS, (256,))


def test_byte_count_must_match_the_shape():
    with pytest.raises(ValueError, match="34 bytes"):
        QuantizedTensor(torch.zeros(34, dtype=torch.uint8), Q.Q8_0, (64,))
