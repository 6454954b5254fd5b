"""The fused residual add + RMSNorm computes what the separate PyTorch ops compute."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.kernels import build, rms_norm as native_norm
from tunelab.model.layers import RMSNorm

pytestmark = pytest.mark.skipif("avx512f" not in build.cpu_flags(), reason="needs AVX-512")


@pytest.mark.parametrize("rows, dim", [(1, 896), (7, 576), (40, 100)])  # 100: a masked tail
def test_add_then_norm_matches_pytorch(rows, dim):
    torch.manual_seed(rows)
    x, residual = (torch.randn(rows, dim) * 3).bfloat16(), torch.randn(rows, dim) * 20
    weight = (torch.rand(dim) * 2).bfloat16()
    out, total = native_norm.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(total, residual + x.float())  # the stream stays float32: no rounding
    expected = F.rms_norm(total, (dim,), weight.float(), 1e-6).bfloat16()
    assert out.dtype == torch.bfloat16
    # float32 sums in another order: now and then one bfloat16 step apart
    assert (out != expected).float().mean() < 0.01
    torch.testing.assert_close(out.float(), expected.float(), atol=0, rtol=2 ** -7)


def test_the_module_takes_the_native_path_for_a_float32_stream():
    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    x, residual = torch.randn(3, 64).bfloat16(), torch.randn(3, 64)
    out, total = norm(x, residual)
    assert total.dtype == torch.float32 and torch.equal(total, residual + x.float())
    assert torch.equal(out, native_norm.add_rms_norm(x, residual, norm.weight, 1e-6)[0])


def test_rejects_a_bfloat16_stream():
    with pytest.raises(ValueError, match="bfloat16"):
        native_norm.add_rms_norm(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(2, 8, dtype=torch.bfloat16),
                                 torch.ones(8, dtype=torch.bfloat16), 1e-6)
