"""The compiled int8 kernel computes exactly what the two-level integer GEMM computes, for any row count."""

import shutil

import pytest
import torch

from tunelab.kernels import build, int8_linear
from tunelab.weights.quantized import Int8Linear, int8_gemm_two_level

CAN_BUILD = {"avx512f", "avx512bw", "avx512_vnni"} <= build.cpu_flags() and shutil.which("cc") is not None
HAS_AMX = CAN_BUILD and "amx_int8" in build.cpu_flags()
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="needs AVX-512 VNNI and a C compiler")
# 1..7 rows: the VNNI path; beyond (with AMX): one or several 16-row tiles, partial tiles, 128-row passes.
ROWS = [*range(1, int8_linear.GEMV_MAX_ROWS + 1), *([8, 9, 16, 17, 31, 33, 64, 129, 200] if HAS_AMX else [])]


@needs_kernel
def test_kernel_builds_where_it_can():
    assert int8_linear.takes(1)
    assert int8_linear.max_rows() is (None if HAS_AMX else int8_linear.GEMV_MAX_ROWS)


@needs_kernel
@pytest.mark.parametrize("n, k", [(1152, 896), (896, 4864), (37, 96), (5, 32)])  # K % 64 == 32: a masked tail
@pytest.mark.parametrize("rows", ROWS)
def test_same_bits_as_two_level_gemm(n, k, rows):
    generator = torch.Generator().manual_seed(n * 31 + k + rows)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    scales = (torch.rand(n, generator=generator) * 0.02 + 1e-4).bfloat16()
    x = (torch.randn(rows, k, generator=generator) * 3).bfloat16()
    x[0, :7] = 0  # exact zeros and an outlier change the activation scale
    x[-1, 3] = 40
    assert torch.equal(int8_linear.int8_linear(x, weight, scales), int8_gemm_two_level(x, weight, scales))


@needs_kernel
def test_all_zero_row():
    weight = torch.randint(-127, 128, (64, 128), dtype=torch.int8)
    for rows in (1, 20) if HAS_AMX else (1,):
        out = int8_linear.int8_linear(torch.zeros(rows, 128, dtype=torch.bfloat16), weight,
                                      torch.ones(64, dtype=torch.bfloat16))
        assert torch.equal(out, torch.zeros(rows, 64, dtype=torch.bfloat16))


@needs_kernel
def test_a_row_alone_equals_the_same_row_in_any_batch():
    """Decode (one row), batched decode and prefill (many rows) give a row the same bits."""
    torch.manual_seed(0)
    layer = Int8Linear.from_rows([torch.randn(256, 192)], 256, 192)
    batch = torch.randn(40, 192).bfloat16()
    together = layer(batch)
    for size in (1, 5, 12, 33):
        for i in (0, size - 1):
            assert torch.equal(layer(batch[i:i + size])[0], together[i])


@needs_kernel
def test_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="bfloat16 rows and int8 weights"):
        int8_linear.int8_linear(torch.zeros(2, 64), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, *([12, 40] if HAS_AMX else [])])
def test_bias_is_added_as_pytorch_adds_it(rows):
    torch.manual_seed(rows)
    layer = Int8Linear.from_rows([torch.randn(96, 64)], 96, 64)
    layer.bias = torch.nn.Parameter(torch.randn(96).bfloat16(), requires_grad=False)
    x = torch.randn(rows, 64).bfloat16()
    assert torch.equal(layer(x), int8_gemm_two_level(x, layer.weight, layer.scales) + layer.bias)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 6, *([9, 130] if HAS_AMX else [])])
def test_swiglu_input_is_silu_of_gate_times_up(rows):
    torch.manual_seed(rows)
    layer = Int8Linear.from_rows([torch.randn(64, 160)], 64, 160)
    gate_up = (torch.randn(rows, 320) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    product = torch.nn.functional.silu(gate) * up
    fused = layer.swiglu(gate_up)
    # The same bfloat16 roundings; glibc's expf and PyTorch's may differ in the last bit of a float,
    # which can move a rounded product by one bfloat16 step, now and then.
    expected = layer(product)
    assert (fused != expected).float().mean() < 0.02
    torch.testing.assert_close(fused, expected, atol=0.05 * expected.abs().max().item(), rtol=0)


@pytest.mark.skipif(not HAS_AMX, reason="weights are packed only where AMX runs every row count")
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 16, 31, 130])
def test_packed_weights_give_the_same_bits(rows):
    torch.manual_seed(rows)
    layer = Int8Linear.from_rows([torch.randn(48, 192)], 48, 192)  # three strips: an odd last pair
    layer.bias = torch.nn.Parameter(torch.randn(48).bfloat16(), requires_grad=False)
    x = torch.randn(rows, 192).bfloat16()
    gate_up = torch.randn(rows, 384).bfloat16()
    plain, plain_swiglu = layer(x), layer.swiglu(gate_up)
    plain_weight = layer.weight.clone()
    layer.pack()
    assert layer.packed and not torch.equal(layer.weight, plain_weight)
    assert torch.equal(layer(x), plain)
    assert torch.equal(layer.swiglu(gate_up), plain_swiglu)
    with pytest.raises(RuntimeError, match="packed"):
        layer.store_rows(0, torch.randn(16, 192))


@pytest.mark.skipif(not HAS_AMX, reason="weights are packed only where AMX runs every row count")
def test_shapes_that_do_not_fill_tiles_stay_plain():
    layer = Int8Linear.from_rows([torch.randn(40, 96)], 40, 96)
    layer.pack()
    assert not layer.packed


@needs_kernel
@pytest.mark.parametrize("packed", [False, *([True] if HAS_AMX else [])])
@pytest.mark.parametrize("rows", [1, 5, *([16, 130] if HAS_AMX else [])])
def test_float32_output_is_what_the_bfloat16_output_rounds(packed, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randint(-127, 128, (96, 128), dtype=torch.int8, generator=generator)
    scales = (torch.rand(96, generator=generator) * 0.02 + 1e-4).bfloat16()
    x = torch.randn(rows, 128, generator=generator).bfloat16()
    if packed:
        weight = int8_linear.pack(weight)
    rounded = int8_linear.int8_linear(x, weight, scales, packed=packed)
    logits = int8_linear.int8_linear(x, weight, scales, packed=packed, out_dtype=torch.float32)  # an LM head's
    assert logits.dtype == torch.float32 and torch.equal(logits.bfloat16(), rounded)
    bias = torch.randn(96).bfloat16()
    with_bias = int8_linear.int8_linear(x, weight, scales, bias, packed=packed, out_dtype=torch.float32)
    assert torch.equal(with_bias, logits + bias.float())
