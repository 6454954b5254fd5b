"""The compiled int8 decode kernel computes exactly what the two-level integer GEMM computes."""

import shutil

import pytest
import torch

from tunelab.kernels import build, int8_linear
from tunelab.weights.quantized import INT_GEMM_ROWS, Int8Linear, int8_gemm_two_level

CAN_BUILD = {"avx512f", "avx512bw", "avx512_vnni"} <= build.cpu_flags() and shutil.which("cc") is not None
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="needs AVX-512 VNNI and a C compiler")


@needs_kernel
def test_kernel_builds_where_it_can():
    assert int8_linear.available()


@needs_kernel
@pytest.mark.parametrize("n, k", [(1152, 896), (896, 4864), (37, 96), (5, 32)])  # K % 64 == 32: a masked tail
@pytest.mark.parametrize("rows", range(1, int8_linear.MAX_ROWS + 1))
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
    out = int8_linear.int8_linear(torch.zeros(1, 128, dtype=torch.bfloat16), weight, torch.ones(64, dtype=torch.bfloat16))
    assert torch.equal(out, torch.zeros(1, 64, dtype=torch.bfloat16))


@needs_kernel
def test_a_row_alone_equals_the_same_row_in_a_batch():
    """Decode rows 1..7 take the C kernel and 8..31 the integer GEMM: the same bits either way."""
    torch.manual_seed(0)
    layer = Int8Linear.from_rows([torch.randn(256, 192)], 256, 192)
    batch = torch.randn(INT_GEMM_ROWS + 3, 192).bfloat16()
    together = layer(batch)
    for i in (0, 5, INT_GEMM_ROWS + 2):
        assert torch.equal(layer(batch[i:i + 1]), together[i:i + 1])


def test_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="1..7 bfloat16 rows"):
        int8_linear.int8_linear(torch.zeros(8, 64, dtype=torch.bfloat16), torch.zeros(4, 64, dtype=torch.int8),
                                torch.ones(4, dtype=torch.bfloat16))
