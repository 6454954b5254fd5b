"""Residual add + RMSNorm in one call, through `rms_norm.c`: bfloat16 layer outputs, float32 residual stream."""

from __future__ import annotations

import ctypes
import functools

import torch

from tunelab.kernels import build

_NEEDS = frozenset({"avx512f"})


@functools.cache
def _function():
    library = build.load("rms_norm", _NEEDS)
    if library is None:
        return None
    function = library.tunelab_add_rms_norm
    function.restype = None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, pointer, pointer, size, size, pointer, ctypes.c_float, pointer]
    return function


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernel runs here for rows of `dtype` (bfloat16 only)."""
    return dtype == torch.bfloat16 and _function() is not None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x) * weight, residual + x) for x [T, D] and weight [D] bfloat16 and residual
    [T, D] float32; the sum stays float32, the normed rows are bfloat16."""
    if not (x.dtype == weight.dtype == torch.bfloat16 and residual.dtype == torch.float32 and x.shape == residual.shape):
        raise ValueError(f"add_rms_norm takes bfloat16 rows and weight on a float32 residual of the same shape, "
                         f"got {x.dtype} {tuple(x.shape)} rows and a {residual.dtype} {tuple(residual.shape)} residual")
    x, residual, weight = x.contiguous(), residual.contiguous(), weight.contiguous()
    total, out = torch.empty_like(residual), torch.empty_like(x)
    _function()(x.data_ptr(), residual.data_ptr(), total.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                weight.data_ptr(), eps, out.data_ptr())
    return out, total


def address() -> int:
    """The kernel's entry point, for `call_list` (where the kernel runs)."""
    return build.address(_function())
