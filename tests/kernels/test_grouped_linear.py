"""The compiled grouped kernel (4-, 5- and 8-bit codes in groups of 32): GGML's blocks held exactly,
products to within bfloat16's rounding of the float64 ones, and a row's result the same bits whatever
the batch, on the VNNI path (1-15 rows) and the AMX one (16 and more)."""

import shutil

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from tunelab.kernels import build, grouped_linear
from tunelab.weights.quantized import (GROUPED_LINEAR as LAYERS, GroupedLinear, Int4Linear, QuantizedTensor,
                                       group_bits, quantize_groups)

CAN_BUILD = {"avx512f", "avx512bw", "avx512_vnni"} <= build.cpu_flags() and shutil.which("cc") is not None
pytestmark = pytest.mark.skipif(not CAN_BUILD, reason="needs AVX-512 VNNI and a C compiler")


def values_of(packed: torch.Tensor) -> torch.Tensor:
    """A packed weight's exact values [N, K] float64."""
    codes, scales, minimums = grouped_linear.unpack(packed)
    n = codes.shape[0]
    return (codes.double().view(n, -1, 32) * scales.double()[..., None] + minimums.double()[..., None]).view(n, -1)


def random_layer(n: int, k: int, seed: int, bits: int = 4) -> tuple[GroupedLinear, torch.Tensor]:
    """A `bits`-bit layer and its weight's exact values [N, K] float64."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    layer = LAYERS[bits].from_rows([weight], n, k)
    return layer, values_of(layer.weight)


def test_layers_use_the_kernel():
    assert grouped_linear.available() and sorted(LAYERS) == [4, 5, 8]
    assert all(layer(16, 32).native for layer in LAYERS.values())


def random_groups(n: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes [n, 96] of `bits` bits, and fp16-exact scales and minimums [n, 3]."""
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (n, 96), generator=generator, dtype=torch.uint8)
    scales = torch.rand(n, 3, generator=generator).half().float()
    return codes, scales, torch.randn(n, 3, generator=generator).half().float()


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_pack_and_unpack_are_inverse(bits):
    codes, scales, minimums = random_groups(48, bits)
    packed = grouped_linear.pack(codes, scales, minimums, bits)
    assert packed.shape == (3, 3, grouped_linear.BLOCK_BYTES[bits]) and grouped_linear.bits_of(packed) == bits
    again = grouped_linear.unpack(packed)
    assert torch.equal(again[0], codes) and torch.equal(again[1], scales) and torch.equal(again[2], minimums)


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_rows_read_alone_equal_the_unpacked_rows(bits):
    packed = grouped_linear.pack(*random_groups(64, bits), bits)
    rows = torch.tensor([0, 1, 14, 15, 16, 33, 33, 63])  # even and odd rows (5 bits: either half of a mask byte),
    # both ends of a strip, a repeat
    assert torch.equal(grouped_linear.rows_of(packed, rows), values_of(packed)[rows].float())


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_ggml_blocks_are_held_exactly(qtype):
    values = (np.random.default_rng(1).standard_normal((32, 128)) * 0.05).astype(np.float32)
    blocks = QuantizedTensor(torch.from_numpy(gguf.quants.quantize(values, qtype)).flatten(), qtype, (32, 128))
    bits = group_bits(qtype)
    layer = LAYERS[bits].from_rows([blocks], 32, 128)
    assert torch.equal(values_of(layer.weight), blocks.dequantize().double())
    if qtype == Q.Q4_1:  # Q4_1's codes span 0..15: its decoded values alone give them back
        assert torch.equal(values_of(Int4Linear.from_rows([blocks.dequantize()], 32, 128).weight),
                           blocks.dequantize().double())


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("n, k", [(960, 576), (576, 1536), (48, 96), (16, 32)])  # groups: even, odd, one
@pytest.mark.parametrize("rows", [1, 4, 7, 33])
def test_products_within_bfloat16_rounding_of_float64(bits, n, k, rows):
    layer, values = random_layer(n, k, seed=n + k + rows, bits=bits)
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3).bfloat16()
    x[0, :40] = 0  # a group of zeros, and an outlier in another
    x[-1, k - 3] = 40
    expected = x.double() @ values.T
    got = layer(x).double()
    # Output rounded to bfloat16 (half a step: 2^-9 relative), activations to within max|x| / 2032 per group.
    assert ((got - expected).abs() <= expected.abs() * 2 ** -8 + 2e-3 * expected.abs().max()).all()


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_a_row_alone_equals_the_same_row_in_any_batch(bits):
    layer, _ = random_layer(128, 224, seed=3, bits=bits)  # 7 groups: the AMX loop's pairs and a last one alone
    batch = torch.randn(70, 224).bfloat16()
    together = layer(batch)  # AMX from 16 rows, VNNI below: the same arithmetic
    for size in (1, 2, 3, 5, 9, 15, 16, 33):
        for start in (0, size - 1):
            assert torch.equal(layer(batch[start:start + size]), together[start:start + size])


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_all_zero_rows_give_zeros(bits):
    layer, _ = random_layer(64, 128, seed=4, bits=bits)
    for rows in (5, 20):
        zeros = torch.zeros(rows, 128, dtype=torch.bfloat16)
        assert torch.equal(layer(zeros), torch.zeros(rows, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 6])
def test_bias_is_added_as_pytorch_adds_it(rows):
    layer, _ = random_layer(96, 64, seed=5)
    x = torch.randn(rows, 64).bfloat16()
    plain = layer(x)
    layer.bias = torch.nn.Parameter(torch.randn(96).bfloat16(), requires_grad=False)
    assert torch.equal(layer(x), plain + layer.bias)


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("rows", [1, 6, 40])
def test_swiglu_input_is_silu_of_gate_times_up(bits, rows):
    layer, _ = random_layer(64, 160, seed=6, bits=bits)
    gate_up = (torch.randn(rows, 320) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    fused, expected = layer.swiglu(gate_up), layer(F.silu(gate) * up)
    # glibc's expf and PyTorch's may differ in a float's last bit, moving a rounded product one step now and then.
    assert (fused != expected).float().mean() < 0.02
    torch.testing.assert_close(fused, expected, atol=0.05 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("rows", [1, 6, 40])
def test_float32_output_is_what_the_bfloat16_output_rounds(bits, rows):
    layer, values = random_layer(96, 128, seed=8, bits=bits)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).bfloat16()
    rounded = layer(x)
    layer.out_dtype = torch.float32  # as for an LM head: logits keep the kernel's float32 sums
    logits = layer(x)
    assert logits.dtype == torch.float32 and torch.equal(logits.bfloat16(), rounded)
    expected = x.double() @ values.T  # within the activations' two-level rounding, far inside bfloat16's
    assert ((logits.double() - expected).abs() <= 2e-3 * expected.abs().max()).all()
    bias = torch.randn(96).bfloat16()
    with_bias = grouped_linear.grouped_linear(x, layer.weight, bias, out_dtype=torch.float32)
    assert torch.equal(with_bias, logits + bias.float())


def test_rejects_what_it_cannot_run():
    layer, _ = random_layer(32, 64, seed=7)
    with pytest.raises(ValueError, match="rows of 64 columns"):
        grouped_linear.grouped_linear(torch.zeros(2, 32, dtype=torch.bfloat16), layer.weight)
    with pytest.raises(ValueError, match="bfloat16"):
        grouped_linear.grouped_linear(torch.zeros(2, 64), layer.weight)
    with pytest.raises(ValueError, match="does not fit the grouped layout"):
        grouped_linear.pack(*quantize_groups(torch.randn(24, 64)), 4)
    with pytest.raises(ValueError, match="codes, not 6"):
        grouped_linear.pack(*quantize_groups(torch.randn(32, 64)), 6)
