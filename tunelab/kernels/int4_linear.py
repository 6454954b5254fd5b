"""4-bit weights (groups of 32, a scale and a minimum each) times bfloat16 activation rows, through `int4_linear.c`.

The weights keep GGML's Q4_1 arithmetic, w = code * scale + minimum with fp16 scale and minimum, so a
Q4_1 file's blocks are held exactly; the kernel writes activations per group of 32 as two int8 rows
(x = a * (hi + lo / 16), finer than bfloat16's rounding) and does the products in exact integers, with
AVX-512 VNNI for a few rows and AMX tiles from 16, the same bits either way (2-4x PyTorch's int4
kernel: `bench/linear_kernels.py`).
`pack` builds the kernel's layout from codes, scales and minimums, and `unpack` gives them back (the
layout is described at the head of the C file).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tunelab.kernels import build

GROUP_SIZE = 32
BLOCK_BYTES = 320  # one group of one strip of 16 outputs: 256 bytes of codes, 16 fp16 scales, 16 fp16 minimums
_NEEDS = frozenset({"avx512f", "avx512bw", "avx512_vnni"})


@functools.cache
def _function():
    library = build.load("int4_linear", _NEEDS, libraries=("mvec",))
    if library is None:
        return None
    function = library.tunelab_int4_linear
    function.restype = ctypes.c_int
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, size, size, pointer, size, pointer, ctypes.c_int, pointer]
    return function


def available() -> bool:
    """Whether the kernel runs here (it is built on the first call)."""
    return _function() is not None


def fits(out_features: int, in_features: int) -> bool:
    return out_features % 16 == 0 and in_features % GROUP_SIZE == 0


def pack(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (0..15), scales and minimums [N, K / 32] -> the kernel's layout [N / 16, K / 32, 320] uint8.
    Scales and minimums are stored as fp16."""
    n, k = codes.shape
    if not fits(n, k):
        raise ValueError(f"a {n}x{k} weight does not fit the int4 layout (outputs % 16, inputs % {GROUP_SIZE})")
    groups = k // GROUP_SIZE
    # [strip, row c, group, vector i, nibble half, byte j] -> [strip, group, i, c, j, half]
    nibbles = codes.to(torch.uint8).view(n // 16, 16, groups, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
    code_bytes = (nibbles[..., 0] | (nibbles[..., 1] << 4)).reshape(n // 16, groups, 256)

    def per_strip(values: torch.Tensor) -> torch.Tensor:  # [N, G] -> [N / 16, G, 32] bytes of fp16
        return values.to(torch.float16).view(n // 16, 16, groups).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([code_bytes, per_strip(scales), per_strip(minimums)], dim=-1)


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack`'s inverse: codes [N, K] uint8, scales and minimums [N, K / 32] float32."""
    strips, groups, _ = packed.shape
    code_bytes = packed[..., :256].reshape(strips, groups, 4, 16, 4)  # [strip, group, i, c, j]
    nibbles = torch.stack([code_bytes & 0x0F, code_bytes >> 4], dim=-1)  # [..., j, half]
    codes = nibbles.permute(0, 3, 1, 2, 5, 4).reshape(strips * 16, groups * GROUP_SIZE)

    def per_row(raw: torch.Tensor) -> torch.Tensor:
        return raw.contiguous().view(torch.float16).float().transpose(1, 2).reshape(strips * 16, groups)

    return codes, per_row(packed[..., 256:288]), per_row(packed[..., 288:])


def int4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                swiglu: bool = False) -> torch.Tensor:
    """x [M, K] bfloat16 @ the packed weight's [N, K] values .T (+ bias [N] bfloat16) -> [M, N] bfloat16.
    With `swiglu`, x is [M, 2K], the gate and up projections side by side, and the input is
    silu(gate) * up, computed as PyTorch's bfloat16 ops compute it."""
    # Decode calls this ~120 times a step for a small model: the checks are kept to a few attribute reads.
    function = _function()
    if function is None:
        raise RuntimeError("the int4 kernel does not run here (it needs AVX-512 VNNI and a C compiler)")
    strips, groups, _ = weight.shape
    n, k = 16 * strips, GROUP_SIZE * groups
    rows, columns = x.shape
    if x.dtype != torch.bfloat16 or weight.dtype != torch.uint8 or (bias is not None and bias.dtype != torch.bfloat16):
        raise ValueError(f"the int4 kernel takes bfloat16 rows and bias and a uint8 weight, got {x.dtype} rows")
    if rows < 1 or columns != (2 * k if swiglu else k):
        raise ValueError(f"the int4 kernel needs rows of {'2 x ' if swiglu else ''}{k} columns, got {tuple(x.shape)}")
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    status = function(x.data_ptr(), rows, k, weight.data_ptr(), n, None if bias is None else bias.data_ptr(),
                      swiglu, out.data_ptr())
    if status != 0:
        raise MemoryError("the int4 kernel could not allocate its buffers")
    return out


def address() -> int:
    """The kernel's entry point, for `call_list` (where the kernel runs)."""
    return build.address(_function())
