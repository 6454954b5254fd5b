"""The compiled int4 kernel: Q4_1 groups held exactly, products to within bfloat16's rounding of the
float64 ones, and a row's result the same bits whatever the batch."""

import shutil

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from tunelab.kernels import build, int4_linear
from tunelab.weights.quantized import Int4Linear, QuantizedTensor, quantize_int4

CAN_BUILD = {"avx512f", "avx512bw", "avx512_vnni"} <= build.cpu_flags() and shutil.which("cc") is not None
pytestmark = pytest.mark.skipif(not CAN_BUILD, reason="needs AVX-512 VNNI and a C compiler")


def random_layer(n: int, k: int, seed: int) -> tuple[Int4Linear, torch.Tensor]:
    """An int4 layer and its weight's exact values [N, K] float64."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    layer = Int4Linear.from_rows([weight], n, k)
    codes, scales, minimums = int4_linear.unpack(layer.weight)
    values = codes.double().view(n, -1, 32) * scales.double()[..., None] + minimums.double()[..., None]
    return layer, values.view(n, k)


def test_layer_uses_the_kernel():
    assert int4_linear.available() and Int4Linear(16, 32).native


def test_pack_and_unpack_are_inverse():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 96), generator=generator, dtype=torch.uint8)
    scales, minimums = torch.rand(48, 3, generator=generator).half().float(), torch.randn(48, 3, generator=generator).half().float()
    packed = int4_linear.pack(codes, scales, minimums)
    assert packed.shape == (3, 3, int4_linear.BLOCK_BYTES)
    again = int4_linear.unpack(packed)
    assert torch.equal(again[0], codes) and torch.equal(again[1], scales) and torch.equal(again[2], minimums)


def test_q4_1_blocks_are_held_exactly():
    values = (np.random.default_rng(1).standard_normal((32, 128)) * 0.05).astype(np.float32)
    blocks = QuantizedTensor(torch.from_numpy(gguf.quants.quantize(values, Q.Q4_1)).flatten(), Q.Q4_1, (32, 128))
    layer = Int4Linear.from_rows([blocks.dequantize()], 32, 128)
    codes, scales, minimums = int4_linear.unpack(layer.weight)
    raw = blocks.raw.view(32, 4, 20)  # per block: fp16 d, fp16 m, 16 bytes of nibbles (low: 0..15, high: 16..31)
    assert torch.equal(scales, raw[..., 0:2].contiguous().view(torch.float16).float().view(32, 4))
    assert torch.equal(minimums, raw[..., 2:4].contiguous().view(torch.float16).float().view(32, 4))
    nibbles = torch.cat([raw[..., 4:] & 0x0F, raw[..., 4:] >> 4], dim=-1).view(32, 128)
    assert torch.equal(codes, nibbles)


@pytest.mark.parametrize("n, k", [(960, 576), (576, 1536), (16, 32)])
@pytest.mark.parametrize("rows", [1, 4, 7, 33])
def test_products_within_bfloat16_rounding_of_float64(n, k, rows):
    layer, values = random_layer(n, k, seed=n + k + rows)
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3).bfloat16()
    x[0, :40] = 0  # a group of zeros, and an outlier in another
    x[-1, k - 3] = 40
    expected = x.double() @ values.T
    got = layer(x).double()
    # Output rounded to bfloat16 (half a step: 2^-9 relative), activations to within max|x| / 4064 per group.
    assert ((got - expected).abs() <= expected.abs() * 2 ** -8 + 1e-3 * expected.abs().max()).all()


def test_a_row_alone_equals_the_same_row_in_any_batch():
    layer, _ = random_layer(128, 256, seed=3)
    batch = torch.randn(70, 256).bfloat16()
    together = layer(batch)
    for size in (1, 2, 3, 5, 9, 33):
        for i in (0, size - 1):
            assert torch.equal(layer(batch[i:i + size])[0], together[i])


def test_all_zero_rows_give_zeros():
    layer, _ = random_layer(64, 128, seed=4)
    assert torch.equal(layer(torch.zeros(5, 128, dtype=torch.bfloat16)), torch.zeros(5, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 6])
def test_bias_is_added_as_pytorch_adds_it(rows):
    layer, _ = random_layer(96, 64, seed=5)
    x = torch.randn(rows, 64).bfloat16()
    plain = layer(x)
    layer.bias = torch.nn.Parameter(torch.randn(96).bfloat16(), requires_grad=False)
    assert torch.equal(layer(x), plain + layer.bias)


@pytest.mark.parametrize("rows", [1, 6, 40])
def test_swiglu_input_is_silu_of_gate_times_up(rows):
    layer, _ = random_layer(64, 160, seed=6)
    gate_up = (torch.randn(rows, 320) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    fused, expected = layer.swiglu(gate_up), layer(F.silu(gate) * up)
    # glibc's expf and PyTorch's may differ in a float's last bit, moving a rounded product one step now and then.
    assert (fused != expected).float().mean() < 0.02
    torch.testing.assert_close(fused, expected, atol=0.05 * expected.abs().max().item(), rtol=0)


def test_rejects_what_it_cannot_run():
    layer, _ = random_layer(32, 64, seed=7)
    with pytest.raises(ValueError, match="rows of 64 columns"):
        int4_linear.int4_linear(torch.zeros(2, 32, dtype=torch.bfloat16), layer.weight)
    with pytest.raises(ValueError, match="bfloat16"):
        int4_linear.int4_linear(torch.zeros(2, 64), layer.weight)
    with pytest.raises(ValueError, match="does not fit the int4 layout"):
        int4_linear.pack(*quantize_int4(torch.randn(24, 64)))
