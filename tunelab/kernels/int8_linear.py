"""int8 weights times bfloat16 activation rows, through `int8_linear.c`.

For a handful of rows (decode) an int8 linear layer costs one read of its weights: PyTorch's
`_weight_int8pack_mm` reaches about half of this machine's memory bandwidth there, and its cost
grows with every row; the kernel reads the weights once for all rows with AVX-512 VNNI and
prefetching, at about full bandwidth. From 8 rows on (batches, prompts) it runs AMX tiles, where
the CPU has them. Either way it computes exactly what `int8_gemm_two_level` computes, so a row's
result is the same bits whatever batch it is in (`bench/linear_kernels.py`: the "native" column).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tunelab.kernels import build

GEMV_MAX_ROWS = 7  # up to this many activation rows the kernel runs anywhere it builds; beyond, only with AMX
_NEEDS = frozenset({"avx512f", "avx512bw", "avx512_vnni"})


def _library():
    return build.load("int8_linear", _NEEDS, libraries=("mvec",))


@functools.cache
def _function():
    function = _library().tunelab_int8_linear
    function.restype = ctypes.c_int
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, size, size, pointer, size, pointer, pointer, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                         pointer]
    return function


@functools.cache
def max_rows() -> int | None:
    """How many activation rows the kernel takes here: 0 where it does not run, None for any number."""
    library = _library()
    if library is None:
        return 0
    return None if library.tunelab_int8_linear_any_rows() else GEMV_MAX_ROWS


def takes(rows: int) -> bool:
    """Whether the kernel runs `rows` activation rows here (it is built on the first call)."""
    limit = max_rows()
    return limit is None or 1 <= rows <= limit


def can_pack(out_features: int, in_features: int) -> bool:
    """Whether weights of this shape can be kept in the kernel's packed layout here (AMX, whole tiles)."""
    return max_rows() is None and out_features % 16 == 0 and in_features % 64 == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A plain int8 weight [N, K] rearranged into the kernel's tile layout (same shape and bytes, other order):
    the kernel then reads it as stored instead of rearranging it at every call."""
    n, k = weight.shape
    if weight.dtype != torch.int8 or not can_pack(n, k):
        raise ValueError(f"a {n}x{k} {weight.dtype} weight cannot be packed here")
    weight = weight.contiguous()
    packed = torch.empty_like(weight)
    _library().tunelab_int8_pack(ctypes.c_void_p(weight.data_ptr()), ctypes.c_int64(n), ctypes.c_int64(k),
                                 ctypes.c_void_p(packed.data_ptr()))
    return packed


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                swiglu: bool = False, packed: bool = False, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, K] bfloat16 @ (int8 weight [N, K] * scales [N] bfloat16).T (+ bias [N] bfloat16) -> [M, N] `out_dtype`,
    bfloat16 or float32 (the values the bfloat16 output rounds: an LM head's logits keep their precision),
    where `takes(M)`. With `swiglu`, x is [M, 2K], the gate and up projections side by side, and the
    input is silu(gate) * up, computed as PyTorch's bfloat16 ops compute it. `packed`: the weight is
    in the layout `pack` makes."""
    rows, n = x.shape[0], weight.shape[0]
    dtypes = {x.dtype, scales.dtype} | ({bias.dtype} if bias is not None else set())
    if not (rows >= 1 and takes(rows) and dtypes == {torch.bfloat16} and weight.dtype == torch.int8):
        limit = max_rows()
        takes_rows = "any number of" if limit is None else f"1..{limit}" if limit else "no"
        raise ValueError(f"the int8 kernel takes {takes_rows} bfloat16 rows and int8 weights here, "
                         f"got {rows} {x.dtype} rows and {weight.dtype} weights")
    k = weight.shape[1]
    if x.shape[1] != (2 * k if swiglu else k):
        raise ValueError(f"the int8 kernel needs {'2 x ' if swiglu else ''}{k} input columns, got {x.shape[1]}")
    x, weight, scales = x.contiguous(), weight.contiguous(), scales.contiguous()
    bias = None if bias is None else bias.contiguous()
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"the int8 kernel writes bfloat16 or float32, not {out_dtype}")
    out = torch.empty(rows, n, dtype=out_dtype)
    status = _function()(x.data_ptr(), rows, k, weight.data_ptr(), n, scales.data_ptr(),
                         None if bias is None else bias.data_ptr(), int(swiglu), int(packed),
                         int(out_dtype == torch.float32), out.data_ptr())
    if status != 0:
        raise MemoryError("the int8 kernel could not allocate its buffers")
    return out


def address() -> int:
    """The kernel's entry point, for `call_list` (where the kernel runs)."""
    return build.address(_function())
