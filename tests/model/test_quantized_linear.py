"""Quantized linear layers and embeddings compute what their stored codes say, whatever the batch.

Each expectation is written out by hand from the layout: int8 rows are codes * row scale, int4
groups are code * scale + minimum, and a GGML embedding row is its blocks decoded.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from tunelab.weights.quantized import (EXACT_GROUP_TYPES, GEMM_ROWS, GROUP_SIZE, INT_GEMM_ROWS, Int4Linear,
                                       Int8Linear, QuantizedEmbedding, QuantizedTensor, block_groups, group_bits,
                                       int8_gemm_two_level, kernel_fits, quantize_groups, quantize_int8)


def random_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def int8_dequantized(layer: Int8Linear) -> torch.Tensor:
    return layer.weight.float() * layer.scales.float()[:, None]  # [N, K]


def test_int8_codes_reconstruct_the_weight_within_half_a_step_per_row():
    weight = random_weight(48, 64)
    codes, scales = quantize_int8(weight)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    error = (codes.float() * scales[:, None] - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 5, INT_GEMM_ROWS, 16, GEMM_ROWS, 100], ids=lambda m: f"M{m}")
def test_int8_linear_equals_a_float_matmul_with_its_dequantized_weight(rows):
    layer = Int8Linear.from_rows([random_weight(96, 64)], 96, 64)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    expected = x.float() @ int8_dequantized(layer).T
    # bfloat16 activations and outputs: agreement to bfloat16's precision, relative to the output scale.
    torch.testing.assert_close(layer(x).float(), expected, atol=2e-2 * expected.abs().max().item(), rtol=2e-2)


def group_values(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    n = codes.shape[0]
    return (codes.view(n, -1, GROUP_SIZE).float() * scales[..., None] + minimums[..., None]).view(n, -1)


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_groups_reconstruct_each_group_within_half_a_step(bits):
    weight = random_weight(32, 128)
    codes, scales, minimums = quantize_groups(weight, bits)  # [N, K], [N, G], [N, G]
    top = 2 ** bits - 1
    assert codes.min() == 0 and codes.max() == top
    assert torch.equal(scales, scales.half().float()) and torch.equal(minimums, minimums.half().float())
    # half a step, plus the fp16 rounding of the minimum and of the scale (times up to `top` steps)
    bound = (scales * (0.5 + top * 2 ** -11) + minimums.abs() * 2 ** -11 + 1e-6).repeat_interleave(GROUP_SIZE, 1)
    assert ((group_values(codes, scales, minimums) - weight).abs() <= bound).all()


@pytest.mark.parametrize("qtype", sorted(EXACT_GROUP_TYPES, key=lambda t: t.name))
def test_ggml_blocks_give_their_own_codes_and_the_same_values(qtype):
    values = random_weight(16, 96, seed=7).numpy()
    values[3, :32] = 0  # an all-zero block: d = 0
    blocks = QuantizedTensor(torch.from_numpy(gguf.quants.quantize(values, qtype)).flatten(), qtype, (16, 96))
    codes, scales, minimums = block_groups(blocks)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2 ** group_bits(qtype)
    # code * scale + minimum is what GGML decodes, bit for bit
    assert torch.equal(group_values(codes, scales, minimums), blocks.dequantize())


def test_int4_holds_q4_1_blocks_exactly():
    values = random_weight(16, 64).numpy()
    q4_1 = QuantizedTensor(torch.from_numpy(gguf.quants.quantize(values, Q.Q4_1)).flatten(), Q.Q4_1, (16, 64))
    stored = q4_1.dequantize()
    assert torch.equal(group_values(*quantize_groups(stored)), stored)


def test_int4_refuses_weights_fp16_cannot_hold():
    with pytest.raises(ValueError, match="load this model as int8 or bfloat16"):
        quantize_groups(torch.full((16, 32), 1e6))


@pytest.mark.parametrize("rows", [1, 7, 64], ids=lambda m: f"M{m}")
def test_int4_linear_equals_a_float_matmul_with_its_groups(rows):
    weight = random_weight(64, 96)
    layer = Int4Linear.from_rows([weight], 64, 96)
    dequantized = group_values(*quantize_groups(weight))  # PyTorch's kernel, where tunelab's does not run, rounds
    # scales and zeros to bfloat16: within the tolerance below
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(2)).bfloat16()
    expected = x.float() @ dequantized.T
    torch.testing.assert_close(layer(x).float(), expected, atol=2e-2 * expected.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("layer_class", [Int8Linear, Int4Linear])
def test_weight_stored_in_row_chunks_packs_as_the_whole_weight(layer_class):
    weight = random_weight(256, 64)
    whole = layer_class.from_rows([weight], 256, 64)
    chunked = layer_class.from_rows(weight.split(128), 256, 64)
    for (name, a), (_, b) in zip(whole.named_buffers(), chunked.named_buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("layer_class,row_kernel_rows", [(Int8Linear, INT_GEMM_ROWS - 1), (Int4Linear, GEMM_ROWS - 1)])
def test_a_row_gets_the_same_bits_alone_or_in_any_batch_of_the_row_kernel(layer_class, row_kernel_rows):
    layer = layer_class.from_rows([random_weight(128, 256)], 128, 256)
    x = torch.randn(row_kernel_rows, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    together = layer(x)
    assert torch.equal(together, torch.cat([layer(row[None]) for row in x]))
    assert torch.equal(together, torch.cat([layer(part) for part in x.split([2, 1, row_kernel_rows - 3])]))


def test_int8_rows_get_the_same_bits_in_any_batch_of_the_integer_gemm():
    layer = Int8Linear.from_rows([random_weight(128, 256)], 128, 256)
    x = torch.randn(GEMM_ROWS - 1, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    together = layer(x)
    assert torch.equal(together, torch.cat([layer(part) for part in x.split([INT_GEMM_ROWS, 12, 11])]))
    assert torch.equal(together[:INT_GEMM_ROWS], layer(x[:INT_GEMM_ROWS]))


def test_two_level_activations_are_finer_than_bfloat16():
    # x = s * (hi + lo / 254): the error is within max|x| / 64516 per row, where bfloat16 keeps 8 bits.
    layer = Int8Linear.from_rows([random_weight(96, 64)], 96, 64)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    x[3, 5] = 40.0  # an outlier sets its row's scale
    dequantized = int8_dequantized(layer).double()
    expected = x.double() @ dequantized.T
    got = int8_gemm_two_level(x, layer.weight, layer.scales.float()).double()
    bfloat16_error = ((x.bfloat16().double() @ dequantized.T) - expected).abs().max()
    assert (got - expected).abs().max() < 2e-4 * expected.abs().max() < bfloat16_error


def test_bias_is_added_after_the_quantized_matmul():
    layer = Int8Linear.from_rows([random_weight(32, 64)], 32, 64)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6)).bfloat16()
    plain = layer(x)
    layer.bias = torch.nn.Parameter(torch.arange(32.0).bfloat16(), requires_grad=False)
    assert torch.equal(layer(x), plain + layer.bias)


def test_shapes_the_kernels_cannot_take_are_refused_before_they_crash():
    assert kernel_fits("int8", 5, 64) and not kernel_fits("int8", 5, 40)
    assert kernel_fits("int4", 64, 64) and not kernel_fits("int4", 40, 64) and not kernel_fits("int4", 64, 48)
    with pytest.raises(ValueError, match="int8 kernels cannot run a 16x40 weight"):
        Int8Linear(16, 40)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_1])
def test_embedding_rows_decode_exactly_as_the_whole_table(qtype):
    values = random_weight(40, 64, seed=4).numpy()
    table = QuantizedTensor(torch.from_numpy(gguf.quants.quantize(values, qtype)).flatten(), qtype, (40, 64))
    embedding = QuantizedEmbedding(table, torch.float32)
    ids = torch.tensor([3, 0, 39, 3])
    assert torch.equal(embedding(ids), table.dequantize()[ids])


def test_float_embedding_is_stored_as_q8_0_by_gguf():
    weight = random_weight(20, 64, seed=5)
    embedding = QuantizedEmbedding.from_float(weight, torch.float32, chunk_rows=8)
    expected = gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), Q.Q8_0), Q.Q8_0)
    np.testing.assert_array_equal(embedding(torch.arange(20)).numpy(), expected)


def test_rows_of_a_gguf_tensor_are_its_byte_slices():
    values = random_weight(12, 64, seed=6).numpy()
    tensor = QuantizedTensor(torch.from_numpy(gguf.quants.quantize(values, Q.Q5_0)).flatten(), Q.Q5_0, (12, 64))
    assert torch.equal(tensor.rows(4, 9).dequantize(), tensor.dequantize()[4:9])
    assert torch.equal(F.embedding(torch.tensor([7]), tensor.dequantize()), tensor.rows(7, 8).dequantize())
