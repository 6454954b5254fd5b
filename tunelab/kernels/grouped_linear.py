"""Weights in groups of 32 (4-, 5- or 8-bit codes, a scale and a minimum each) times bfloat16 activation
rows, through `grouped_linear.c`.

The weights keep GGML's arithmetic for 32-value blocks, w = code * scale + minimum with fp16 scale and
minimum, so Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks are held exactly; the kernel writes activations per
group of 32 as two int8 rows (x = a * (hi + lo / L), finer than bfloat16's rounding) and does the
products in exact integers, with AVX-512 VNNI for a few rows and AMX tiles from 16 (4 and 5 bits), the
same bits either way (2-4x PyTorch's int4 kernel: `bench/linear_kernels.py`).
`pack` builds the kernel's layout from codes, scales and minimums, and `unpack` gives them back (the
layout is described at the head of the C file); a packed weight's last dimension tells its code width.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tunelab.kernels import build

GROUP_SIZE = 32
BITS = (4, 5, 8)
# One group of one strip of 16 outputs: the codes, then 16 fp16 scales and 16 fp16 minimums.
BLOCK_BYTES = {4: 320, 5: 384, 8: 576}
_BITS_OF_BLOCK = {size: bits for bits, size in BLOCK_BYTES.items()}
_NEEDS = frozenset({"avx512f", "avx512bw", "avx512_vnni"})


@functools.cache
def _function():
    library = build.load("grouped_linear", _NEEDS, libraries=("mvec",))
    if library is None:
        return None
    function = library.tunelab_grouped_linear
    function.restype = ctypes.c_int
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, size, size, pointer, size, pointer, ctypes.c_int, ctypes.c_int, ctypes.c_int, pointer]
    return function


def available() -> bool:
    """Whether the kernel runs here (it is built on the first call)."""
    return _function() is not None


def fits(out_features: int, in_features: int) -> bool:
    return out_features % 16 == 0 and in_features % GROUP_SIZE == 0


def bits_of(packed: torch.Tensor) -> int:
    """The code width of a packed weight [N / 16, K / 32, block bytes]."""
    return _BITS_OF_BLOCK[packed.shape[-1]]


def pack(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] (0 .. 2^bits - 1), scales and minimums [N, K / 32] -> the kernel's layout
    [N / 16, K / 32, BLOCK_BYTES[bits]] uint8. Scales and minimums are stored as fp16."""
    n, k = codes.shape
    if bits not in BITS:
        raise ValueError(f"grouped weights take {BITS}-bit codes, not {bits}")
    if not fits(n, k):
        raise ValueError(f"a {n}x{k} weight does not fit the grouped layout (outputs % 16, inputs % {GROUP_SIZE})")
    groups, codes = k // GROUP_SIZE, codes.to(torch.uint8)
    if bits == 8:  # [strip, row c, group, vector i, byte j] -> [strip, group, i, c, j]
        code_bytes = codes.view(n // 16, 16, groups, 8, 4).permute(0, 2, 3, 1, 4).reshape(n // 16, groups, 512)
    else:  # [strip, row c, group, vector i, nibble half, byte j] -> [strip, group, i, half, c, j]
        fields = codes.view(n // 16, 16, groups, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
        low = fields & 0x0F
        code_bytes = (low[..., 0, :, :] | (low[..., 1, :, :] << 4)).reshape(n // 16, groups, 256)
        if bits == 5:  # per (i, half) one 64-bit mask of the fifth bits, bit 4c + j
            fifth = (fields >> 4).reshape(n // 16, groups, 8, 8, 8).to(torch.int32)  # [..., byte, bit]
            mask_bytes = (fifth << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)
            code_bytes = torch.cat([code_bytes, mask_bytes.view(n // 16, groups, 64)], dim=-1)

    def per_strip(values: torch.Tensor) -> torch.Tensor:  # [N, G] -> [N / 16, G, 32] bytes of fp16
        return values.to(torch.float16).view(n // 16, 16, groups).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([code_bytes, per_strip(scales), per_strip(minimums)], dim=-1)


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack`'s inverse: codes [N, K] uint8, scales and minimums [N, K / 32] float32."""
    strips, groups, size = packed.shape
    bits = bits_of(packed)
    if bits == 8:
        codes = packed[..., :512].reshape(strips, groups, 8, 16, 4).permute(0, 3, 1, 2, 4)
    else:
        code_bytes = packed[..., :256].reshape(strips, groups, 4, 16, 4)  # [strip, group, i, c, j]
        fields = torch.stack([code_bytes & 0x0F, code_bytes >> 4], dim=3)  # [strip, group, i, half, c, j]
        if bits == 5:
            masks = packed[..., 256:320].reshape(strips, groups, 4, 2, 8, 1)  # [..., i, half, byte, 1]
            fifth = (masks >> torch.arange(8, dtype=torch.uint8)) & 1  # [..., i, half, byte, bit]: bit 4c + j
            fields = fields | (fifth.reshape(strips, groups, 4, 2, 16, 4) << 4)
        codes = fields.permute(0, 4, 1, 2, 3, 5)  # [strip, c, group, i, half, j]
    codes = codes.reshape(strips * 16, groups * GROUP_SIZE)

    def per_row(raw: torch.Tensor) -> torch.Tensor:
        return raw.contiguous().view(torch.float16).float().transpose(1, 2).reshape(strips * 16, groups)

    return codes, per_row(packed[..., size - 64:size - 32]), per_row(packed[..., size - 32:])


@functools.cache
def _row_bytes(bits: int) -> torch.Tensor:
    """Per output row c of a strip [16, n]: the byte offsets, within a block, of that row's codes (in input
    order, as nibble bytes for 4 and 5 bits), its fifth-bit mask bytes (5 bits), then its fp16 scale and
    minimum."""
    size = BLOCK_BYTES[bits]
    vectors, width = (8, 4) if bits == 8 else (4, 4)
    offsets = []
    for c in range(16):
        row = [64 * i + 4 * c + j for i in range(vectors) for j in range(width)]
        if bits == 5:  # mask (i, half) holds bit 4c + j of this row: byte c // 2 of it
            row += [256 + 8 * mask + c // 2 for mask in range(8)]
        offsets.append(row + [size - 64 + 2 * c, size - 63 + 2 * c, size - 32 + 2 * c, size - 31 + 2 * c])
    return torch.tensor(offsets)


def rows_of(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The float32 values [len(rows), K] of output rows `rows` of a packed weight, read from their own bytes
    alone (a tied embedding's lookup): code * scale + minimum, as `unpack` gives them."""
    strips, groups, size = packed.shape
    bits, c = bits_of(packed), rows % 16
    blocks = (rows // 16 * groups)[:, None] + torch.arange(groups)  # [T, G]
    raw = packed.view(-1)[blocks[..., None] * size + _row_bytes(bits)[c][:, None, :]]  # [T, G, bytes]
    if bits == 8:
        codes = raw[..., :32]
    else:
        nibbles = raw[..., :16].view(-1, groups, 4, 1, 4)  # [T, G, i, 1, j]
        codes = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=3)  # [T, G, i, half, j]: input 8i + 4 half + j
        if bits == 5:
            shifts = (4 * (c % 2))[:, None, None, None, None] + torch.arange(4, dtype=torch.uint8)
            codes = codes | (((raw[..., 16:24].view(-1, groups, 4, 2, 1) >> shifts) & 1) << 4)
    scale_minimum = raw[..., -4:].contiguous().view(torch.float16).float()  # [T, G, 2]
    values = codes.reshape(len(rows), groups, GROUP_SIZE).float() * scale_minimum[..., :1] + scale_minimum[..., 1:]
    return values.view(len(rows), -1)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   swiglu: bool = False, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, K] bfloat16 @ the packed weight's [N, K] values .T (+ bias [N] bfloat16) -> [M, N] `out_dtype`:
    bfloat16, or float32 (the sums the bfloat16 output rounds: an LM head's logits keep their precision).
    With `swiglu`, x is [M, 2K], the gate and up projections side by side, and the input is
    silu(gate) * up, computed as PyTorch's bfloat16 ops compute it."""
    # Decode calls this ~120 times a step for a small model: the checks are kept to a few attribute reads.
    function = _function()
    if function is None:
        raise RuntimeError("the grouped kernel does not run here (it needs AVX-512 VNNI and a C compiler)")
    strips, groups, size = weight.shape
    n, k = 16 * strips, GROUP_SIZE * groups
    rows, columns = x.shape
    if x.dtype != torch.bfloat16 or weight.dtype != torch.uint8 or (bias is not None and bias.dtype != torch.bfloat16):
        raise ValueError(f"the grouped kernel takes bfloat16 rows and bias and a uint8 weight, got {x.dtype} rows")
    if rows < 1 or columns != (2 * k if swiglu else k):
        raise ValueError(f"the grouped kernel needs rows of {'2 x ' if swiglu else ''}{k} columns, got {tuple(x.shape)}")
    if not x.is_contiguous():
        x = x.contiguous()
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"the grouped kernel writes bfloat16 or float32, not {out_dtype}")
    out = torch.empty(rows, n, dtype=out_dtype)
    status = function(x.data_ptr(), rows, k, weight.data_ptr(), n, None if bias is None else bias.data_ptr(),
                      swiglu, _BITS_OF_BLOCK[size], out_dtype == torch.float32, out.data_ptr())
    if status != 0:
        raise MemoryError("the grouped kernel could not allocate its buffers")
    return out


def address() -> int:
    """The kernel's entry point, for `call_list`."""
    return build.address(_function())
