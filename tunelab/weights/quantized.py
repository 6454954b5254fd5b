"""GGML block formats: raw GGUF tensor bytes -> float tensors, vectorised in torch.

A GGML tensor is a run of fixed-size blocks; each block packs `block_size`
values into `type_size` bytes (small integers plus fp16 scales). Each format
below is one function from blocks `[N, type_size]` uint8 to values
`[N, block_size]` float32, written after `gguf.quants` (which mirrors
ggml-quants.c) with the same arithmetic order, so results agree bit for bit.

`QuantizedTensor` holds the raw blocks. GGML's block formats have no PyTorch
kernel, so at load time each linear weight is converted once to a layout that has
one: `Int8Linear` (one scale per output row; tunelab's kernel in
`kernels/int8_linear.c` where it builds, else PyTorch's int8 paths) or a
`GroupedLinear` (groups of 32 with 4-, 5- or 8-bit codes and a scale and minimum
each: tunelab's kernel in `kernels/grouped_linear.c`, which holds GGML's 32-value
blocks exactly; 4 bits also run through `torch._weight_int4pack_mm_for_cpu` where
that kernel does not build).
All want bfloat16 activations. `QuantizedEmbedding` keeps the token table in its
GGML blocks and decodes only the looked-up rows; a table tied to a grouped LM head
is read from the head's weight instead (`GroupedEmbedding`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable

import gguf
import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType as Q
import torch.nn.functional as F
from torch import nn

from tunelab.errors import UnsupportedQuantization
from tunelab.kernels import grouped_linear as native_grouped
from tunelab.kernels import int8_linear as native_int8
from tunelab.weights.mapped_rows import MappedRows


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[N, 2] uint8 little-endian fp16 bytes -> [N, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _unpack(x: torch.Tensor, bits: int, dim: int = -2) -> torch.Tensor:
    """Split each byte of x into 8 // bits fields of `bits` bits, lowest first, stacked on a new `dim`."""
    # Stacked scalar shifts run 2-3x faster on CPU than one broadcast shift by a tensor of amounts.
    mask = (1 << bits) - 1
    return torch.stack([(x >> shift) & mask for shift in range(0, 8, bits)], dim=dim)


def _float32(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float32)  # [N, 1]


def _float16(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float16).float()  # [N, 1]


def _bfloat16(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.bfloat16).float()  # [N, 1]


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d, qs = b.split([2, 32], dim=1)
    return qs.view(torch.int8).float().mul_(_f16(d))  # [N, 32]


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d, qs = b.split([2, 16], dim=1)
    q = _unpack(qs, 4).flatten(1).view(torch.int8) - 8  # [N, 32]
    return q.float().mul_(_f16(d))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m, qs = b.split([2, 2, 16], dim=1)
    q = _unpack(qs, 4).flatten(1)  # [N, 32]
    return q.float().mul_(_f16(d)).add_(_f16(m))


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d, qh, qs = b.split([2, 4, 16], dim=1)
    q = (_unpack(qs, 4).flatten(1) | (_unpack(qh, 1, dim=-1).flatten(1) << 4)).view(torch.int8) - 16  # [N, 32]
    return q.float().mul_(_f16(d))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m, qh, qs = b.split([2, 2, 4, 16], dim=1)
    q = _unpack(qs, 4).flatten(1) | (_unpack(qh, 1, dim=-1).flatten(1) << 4)  # [N, 32]
    return q.float().mul_(_f16(d)).add_(_f16(m))


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    scales, qs, d, dmin = b.split([QK_K // 16, QK_K // 4, 2, 2], dim=1)
    n = b.shape[0]
    dl = (_f16(d) * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(dmin) * (scales >> 4).float()).view(n, 16, 1)
    q = _unpack(qs.reshape(n, 2, 32), 2)  # [N, 2, 4, 32]
    return q.reshape(n, 16, 16).float().mul_(dl).sub_(ml).view(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    hmask, qs, scales, d = b.split([QK_K // 8, QK_K // 4, 12, 2], dim=1)
    n = b.shape[0]
    # 16 six-bit scales: low 4 bits from bytes 0..7 (both nibbles), high 2 bits from bytes 8..11.
    low = _unpack(scales[:, :8], 4).reshape(n, 16)
    high = _unpack(scales[:, 8:], 2).reshape(n, 16)
    sc = (low | (high << 4)).float() - 32
    dl = (_f16(d) * sc).view(n, 16, 1)
    ql = _unpack(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16)
    # A clear hmask bit means "subtract 4"; a set bit means no offset.
    qh = _unpack(hmask, 1).reshape(n, 16, 16)
    q = ql.view(torch.int8) - ((qh ^ 1) << 2).view(torch.int8)
    return q.float().mul_(dl).view(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block."""
    d, m, m_d = scales.view(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)  # [N, 8]
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)  # [N, 8]
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, qs = b.split([2, 2, 12, QK_K // 2], dim=1)
    n = b.shape[0]
    sc, mn = _k_scale_min(scales)
    dl = (_f16(d) * sc.float()).view(n, 8, 1)
    ml = (_f16(dmin) * mn.float()).view(n, 8, 1)
    q = _unpack(qs.reshape(n, 4, 32), 4).reshape(n, 8, 32)
    return q.float().mul_(dl).sub_(ml).view(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, qh, qs = b.split([2, 2, 12, QK_K // 8, QK_K // 2], dim=1)
    n = b.shape[0]
    sc, mn = _k_scale_min(scales)
    dl = (_f16(d) * sc.float()).view(n, 8, 1)
    ml = (_f16(dmin) * mn.float()).view(n, 8, 1)
    ql = _unpack(qs.reshape(n, 4, 32), 4).reshape(n, 8, 32)
    high = _unpack(qh, 1)  # [N, 8, 32]: bit j serves sub-block j
    q = ql | (high << 4)
    return q.float().mul_(dl).sub_(ml).view(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql, qh, scales, d = b.split([QK_K // 2, QK_K // 4, QK_K // 16, 2], dim=1)
    n = b.shape[0]
    dl = (_f16(d) * scales.contiguous().view(torch.int8).float()).view(n, 16, 1)
    low = _unpack(ql.reshape(n, 2, 64), 4).reshape(n, 8, 32)
    high = _unpack(qh.reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = (low | (high << 4)).view(torch.int8) - 32
    return q.view(n, 16, 16).float().mul_(dl).view(n, QK_K)


DEQUANTIZE_BLOCKS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: _float32,
    Q.F16: _float16,
    Q.BF16: _bfloat16,
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
SUPPORTED_TYPES = frozenset(DEQUANTIZE_BLOCKS)


@dataclass(frozen=True)
class QuantizedTensor:
    """A GGML tensor kept as its raw blocks until `dequantize()`."""

    raw: torch.Tensor  # [num_bytes] uint8, blocks exactly as stored in the file
    qtype: Q
    shape: tuple[int, ...]  # torch order: the reverse of GGUF's `ne`

    def __post_init__(self):
        if self.qtype not in SUPPORTED_TYPES:
            names = ", ".join(t.name for t in DEQUANTIZE_BLOCKS)
            raise UnsupportedQuantization(
                f"GGML type {self.qtype.name} cannot be decoded (supported: {names}); "
                "use a file quantized with one of those")
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        numel = torch.Size(self.shape).numel()
        if numel % block_size or self.raw.numel() != numel // block_size * type_size:
            raise ValueError(f"{self.raw.numel()} bytes do not hold a {self.qtype.name} tensor of shape {self.shape}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor's values in `dtype`, shaped `self.shape` (computed in float32)."""
        type_size = GGML_QUANT_SIZES[self.qtype][1]
        values = DEQUANTIZE_BLOCKS[self.qtype](self.raw.view(-1, type_size))  # [N, block_size]
        return values.view(self.shape).to(dtype)

    def rows(self, start: int, stop: int) -> "QuantizedTensor":
        """Rows start..stop-1 along the first dim (GGML rows are whole blocks, so this is a byte slice)."""
        row_bytes = self.raw.numel() // self.shape[0]
        return QuantizedTensor(self.raw[start * row_bytes:stop * row_bytes], self.qtype, (stop - start, *self.shape[1:]))


GROUP_SIZE = 32  # the grouped layers' group of inputs, as GGML's 32-value blocks
INT_GEMM_ROWS = 8  # from this many activation rows (batched decode), int8 weights run through an integer GEMM
GEMM_ROWS = 32  # from this many activation rows (prefill), int8 weights run through a bfloat16 GEMM


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: weight [N, K] -> codes [N, K] int8 and scales [N] float32."""
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127  # [N]
    return (weight / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8), scales


def quantize_groups(weight: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric `bits`-bit codes per group of 32 along K, as GGML's Q4_1: weight [N, K] -> codes [N, K]
    int32 in 0 .. 2^bits - 1, and scales and minimums [N, K / 32] (float32 values that fp16 holds
    exactly), with weight ~ code * scale + minimum. A Q4_1 block's codes span 0..15, so its decoded
    values give back its codes, scale and minimum exactly."""
    n, k = weight.shape
    top = (1 << bits) - 1
    groups = weight.float().view(n, k // GROUP_SIZE, GROUP_SIZE)  # [N, G, 32]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, G]
    _check_fp16_range(low, high)
    scales, minimums = ((high - low) / top).half().float(), low.half().float()
    steps = torch.where(scales > 0, scales, 1.0)
    codes = ((groups - minimums[..., None]) / steps[..., None]).round_().clamp_(0, top)
    return codes.to(torch.int32).view(n, k), scales, minimums


def _check_fp16_range(*values: torch.Tensor) -> None:
    if not all(v.isfinite().all() and v.abs().max() < 65504 for v in values):
        raise ValueError("grouped weights keep their scale and minimum in fp16: weights must be finite and within "
                         "+-65504; load this model as int8 or bfloat16 instead")


# GGML's 32-value blocks as groups: code bits, and (offset of the fp16 scale d, of the fp16 minimum m or
# None, of the 4 bytes of fifth bits or None, of the codes). Blocks without m store w = d * (q - offset),
# that is, minimum = -offset * d.
_GROUP_BLOCKS = {
    Q.Q4_0: (4, 0, None, None, 2, 8),
    Q.Q4_1: (4, 0, 2, None, 4, 0),
    Q.Q5_0: (5, 0, None, 2, 6, 16),
    Q.Q5_1: (5, 0, 2, 4, 8, 0),
    Q.Q8_0: (8, 0, None, None, 2, 128),
}
EXACT_GROUP_TYPES = frozenset(_GROUP_BLOCKS)


def group_bits(qtype: Q) -> int:
    """The code width of one of EXACT_GROUP_TYPES."""
    return _GROUP_BLOCKS[qtype][0]


def block_groups(tensor: "QuantizedTensor") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 tensor [N, K] -> its exact codes [N, K] uint8 (0 .. 2^group_bits - 1),
    scales and minimums [N, K / 32] float32 (fp16 values): code * scale + minimum is the value GGML
    decodes, bit for bit."""
    bits, d_at, m_at, fifth_at, codes_at, offset = _GROUP_BLOCKS[tensor.qtype]
    n, k = tensor.shape
    b = tensor.raw.view(-1, GGML_QUANT_SIZES[tensor.qtype][1])  # [blocks, type_size]
    d = _f16(b[:, d_at:d_at + 2])
    if bits == 8:
        codes = (b[:, codes_at:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    else:
        codes = _unpack(b[:, codes_at:codes_at + 16], 4).flatten(1)  # [blocks, 32]: low nibbles, then high
        if fifth_at is not None:
            codes = codes | (_unpack(b[:, fifth_at:fifth_at + 4], 1, dim=-1).flatten(1) << 4)
    minimums = _f16(b[:, m_at:m_at + 2]) if m_at is not None else -offset * d
    _check_fp16_range(minimums)
    return codes.reshape(n, k), d.view(n, k // GROUP_SIZE), minimums.view(n, k // GROUP_SIZE)


def kernel_fits(kind: str, out_features: int, in_features: int) -> bool:
    """Whether a CPU kernel for `kind` runs this weight shape here (others crash inside the kernel)."""
    if kind == "int8":
        return in_features % 32 == 0
    needs_native = QUANTIZED_LINEAR[kind].bits != 4  # 4-bit groups also have PyTorch's kernel
    return native_grouped.fits(out_features, in_features) and (native_grouped.available() or not needs_native)


class QuantizedLinear(nn.Module, ABC):
    """A linear layer whose weights stay packed for a CPU kernel; `bias`, if any, stays a float Parameter."""

    kind: str  # the key of QUANTIZED_LINEAR and of `kernel_fits`
    # What tunelab's kernels write: bfloat16, or float32 for an LM head (set by the loader), whose logits
    # would otherwise be rounded to bfloat16 (steps of 0.125 near 20). PyTorch's paths give bfloat16.
    out_dtype = torch.bfloat16

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if not kernel_fits(self.kind, out_features, in_features):
            raise ValueError(f"{self.kind} kernels cannot run a {out_features}x{in_features} weight")
        self.out_features, self.in_features = out_features, in_features
        self.register_parameter("bias", None)

    @classmethod
    def from_rows(cls, chunks: Iterable["torch.Tensor | QuantizedTensor"], out_features: int, in_features: int,
                  dtype: torch.dtype = torch.bfloat16) -> "QuantizedLinear":
        """Quantize a weight arriving as row chunks (float, or GGML blocks), so the whole weight is never
        held in float."""
        layer = cls(out_features, in_features, dtype)
        start = 0
        for chunk in chunks:
            layer.store_rows(start, chunk)
            start += chunk.shape[0]
        if start != out_features:
            raise ValueError(f"got {start} rows for a weight of {out_features}")
        return layer

    @abstractmethod
    def store_rows(self, start: int, rows: "torch.Tensor | QuantizedTensor") -> None:
        """Quantize rows [n, K] (float, or GGML blocks) into rows start..start+n-1."""

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] without the bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] bfloat16 -> [..., out_features]."""
        out = self.matmul(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class Int8Linear(QuantizedLinear):
    """int8 weights [N, K] with one scale per output row: tunelab's kernel (two-level activations, the same
    bits for any row count), or where it does not run, PyTorch's int8 paths chosen by row count."""

    kind = "int8"
    packed = False  # the weight is in tunelab's kernel layout (`pack`): only that kernel can read it

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__(out_features, in_features, dtype)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))  # [N, K]
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype))  # [N]

    def store_rows(self, start: int, rows: torch.Tensor) -> None:
        if self.packed:
            raise RuntimeError("rows cannot be stored into a packed int8 weight; store them before pack()")
        codes, scales = quantize_int8(rows.dequantize() if isinstance(rows, QuantizedTensor) else rows)
        self.weight[start:start + len(codes)] = codes
        self.scales[start:start + len(codes)] = scales

    def pack(self) -> None:
        """Keep the weight in tunelab's kernel layout where the kernel takes every row count (the
        loader does this): the kernel then reads tiles as stored instead of rearranging them per call."""
        if not self.packed and native_int8.can_pack(self.out_features, self.in_features):
            self.weight = native_int8.pack(self.weight)
            self.packed = True

    def runs_native(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether tunelab's kernel takes `rows` activation rows of `dtype` (with this layer's bias) here."""
        native = (dtype == self.scales.dtype == torch.bfloat16 and (self.bias is None or self.bias.dtype == dtype)
                  and native_int8.takes(rows))
        if self.packed and not native:
            raise RuntimeError(f"a packed int8 layer takes bfloat16 rows only, got {dtype}")
        return native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if not self.runs_native(len(flat), x.dtype):
            return super().forward(x)
        out = native_int8.int8_linear(flat, self.weight, self.scales, self.bias, packed=self.packed,
                                      out_dtype=self.out_dtype)  # bias included
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """This layer applied to silu(gate) * up, from gate_up [..., 2 * in_features], in one kernel call;
        None where the kernel does not run (the caller computes the product itself)."""
        flat = gate_up.reshape(-1, 2 * self.in_features)
        if not self.runs_native(len(flat), gate_up.dtype):
            return None
        out = native_int8.int8_linear(flat, self.weight, self.scales, self.bias, swiglu=True, packed=self.packed)
        return out.view(*gate_up.shape[:-1], self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.runs_native(rows, x.dtype):
            # tunelab's kernel: the arithmetic of int8_gemm_two_level, so every row gets the same bits
            # whatever the number of rows, and 2-8x faster than the PyTorch kernels below.
            return native_int8.int8_linear(x, self.weight, self.scales, packed=self.packed)
        if rows >= GEMM_ROWS:
            # One exact int8 -> bfloat16 conversion, then oneDNN's GEMM, with the row scales applied
            # to the output: 2x faster than the kernels below at 200 rows.
            return F.linear(x, self.weight.to(x.dtype)) * self.scales  # [M, N]
        if rows >= INT_GEMM_ROWS:
            return int8_gemm_two_level(x, self.weight, self.scales)
        # PyTorch's weight-only kernel: its cost grows with every row, but below INT_GEMM_ROWS it is the fastest.
        return torch._weight_int8pack_mm(x, self.weight, self.scales)  # [M, N]


def int8_gemm_two_level(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (int8 weight [N, K] * row scales [N]).T through one integer GEMM (`torch._int_mm`).

    Each activation row is written as two int8 rows: `hi` = x / s rounded (s = max|x| / 127), and `lo`
    = the remainder in steps of s / 254, so x = s * (hi + lo / 254) to within max|x| / 64516, finer
    than bfloat16 itself. The int32 sums are exact, so a row's result is the same bits in any batch;
    and the integer GEMM's cost barely grows with rows where `_weight_int8pack_mm`'s grows linearly
    (Qwen2.5 0.5B, 16 rows, one thread: 2x faster on the MLP, 2.8x on the LM head).
    """
    rows = x.shape[0]
    values = x.float()
    s = (values.abs().amax(-1, keepdim=True) / 127).clamp_(min=1e-30)  # [M, 1]
    hi = (values / s).round_()
    lo = (values - hi * s).mul_(254 / s).round_().clamp_(-127, 127)  # the remainder is within s / 2
    sums = torch._int_mm(torch.cat([hi, lo]).to(torch.int8), weight.t()).float()  # [2M, N]
    return ((sums[:rows] + sums[rows:] / 254) * s * scales.float()).to(x.dtype)


class GroupedLinear(QuantizedLinear):
    """Weights in groups of 32 along K with `bits`-bit codes, code * scale + minimum (fp16 scale and minimum):
    tunelab's kernel layout ([N / 16, K / 32, block bytes] uint8), which holds GGML's 32-value blocks
    (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) exactly. 4-bit groups, where that kernel does not run, are kept in the
    layout of PyTorch's `_weight_int4pack_mm_for_cpu` ([N, K / 2] uint8, with bfloat16 scales and zeros
    [K / 32, N, 2]); the other widths need the kernel (`kernel_fits`)."""

    bits: int
    PACK_ROWS = 64  # PyTorch's packer tiles rows by 64: chunks of whole tiles pack as the full weight does

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__(out_features, in_features, dtype)
        num_groups = in_features // GROUP_SIZE
        self.native = native_grouped.available()
        if self.native:
            self.register_buffer("weight", torch.empty(out_features // 16, num_groups,
                                                       native_grouped.BLOCK_BYTES[self.bits], dtype=torch.uint8))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))  # [N, K/2]
            self.register_buffer("scales_and_zeros", torch.empty(num_groups, out_features, 2, dtype=dtype))  # [G, N, 2]

    def store_rows(self, start: int, rows: "torch.Tensor | QuantizedTensor") -> None:
        if start % (16 if self.native else self.PACK_ROWS):
            raise ValueError(f"{self.kind} rows must be stored in tiles of {16 if self.native else self.PACK_ROWS}")
        if isinstance(rows, QuantizedTensor) and rows.qtype in EXACT_GROUP_TYPES \
                and group_bits(rows.qtype) <= self.bits:
            codes, scales, minimums = block_groups(rows)  # the file's own codes, not a rounding of its values
        else:
            codes, scales, minimums = quantize_groups(rows.dequantize() if isinstance(rows, QuantizedTensor) else rows,
                                                      self.bits)
        if self.native:
            self.weight[start // 16:(start + len(codes)) // 16] = native_grouped.pack(codes, scales, minimums, self.bits)
            return
        self.weight[start:start + len(codes)] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
        # PyTorch's kernel computes (code - 8) * scale + zero
        self.scales_and_zeros[:, start:start + len(codes)] = torch.stack([scales, minimums + 8 * scales], -1).transpose(0, 1)

    def runs_native(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether tunelab's kernel takes `rows` activation rows of `dtype` (with this layer's bias) here:
        bfloat16 rows, any number of them, where the kernel runs."""
        return self.native and dtype == torch.bfloat16 and (self.bias is None or self.bias.dtype == dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_native(x.shape[0], x.dtype):
            return super().forward(x)
        if x.dim() == 2:  # the model's rows: no reshapes (a view costs as much as the kernel on a small layer)
            return native_grouped.grouped_linear(x, self.weight, self.bias, out_dtype=self.out_dtype)  # bias included
        out = native_grouped.grouped_linear(x.reshape(-1, self.in_features), self.weight, self.bias,
                                            out_dtype=self.out_dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """This layer applied to silu(gate) * up, from gate_up [..., 2 * in_features], in one kernel call;
        None where the kernel does not run (the caller computes the product itself)."""
        if not self.runs_native(gate_up.shape[0], gate_up.dtype):
            return None
        out = native_grouped.grouped_linear(gate_up.reshape(-1, 2 * self.in_features), self.weight, self.bias,
                                            swiglu=True)
        return out if gate_up.dim() == 2 else out.view(*gate_up.shape[:-1], self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return native_grouped.grouped_linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, GROUP_SIZE, self.scales_and_zeros)


class Int4Linear(GroupedLinear):
    """4-bit groups: GGML's Q4_0 and Q4_1 exactly, and `--dtype int4` for any weight."""

    kind, bits = "int4", 4


class Int5Linear(GroupedLinear):
    """5-bit groups: GGML's Q5_0 and Q5_1 exactly (tunelab's kernel only)."""

    kind, bits = "int5", 5


class Int8GroupedLinear(GroupedLinear):
    """8-bit codes with a scale per group of 32: GGML's Q8_0 exactly, where int8 rows with one scale per
    output row would round each block's codes again (tunelab's kernel only)."""

    kind, bits = "int8-groups", 8


GROUPED_LINEAR: dict[int, type[GroupedLinear]] = {layer.bits: layer for layer in (Int4Linear, Int5Linear, Int8GroupedLinear)}
QUANTIZED_LINEAR: dict[str, type[QuantizedLinear]] = {
    layer.kind: layer for layer in (Int8Linear, *GROUPED_LINEAR.values())}


class QuantizedEmbedding(nn.Module):
    """A token table kept in GGML blocks; each lookup decodes only the rows it gathers. A table mapped
    from a model file is read from the file, so the rows a lookup touches do not stay resident
    (`MappedRows`)."""

    def __init__(self, table: QuantizedTensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.qtype, self.dtype = table.qtype, dtype
        self.num_embeddings, self.embedding_dim = table.shape
        self.register_buffer("blocks", table.raw.view(self.num_embeddings, -1))  # [vocab, row_bytes] uint8
        self._file_rows: MappedRows | None = None
        self._file_checked = False  # looked up at the first lookup: the loaders assign `blocks` after __init__

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   chunk_rows: int = 8192) -> "QuantizedEmbedding":
        """A float table [vocab, dim] stored as Q8_0 (8.5 bits a value), encoded by `gguf.quants`."""
        raw = torch.cat([torch.from_numpy(gguf.quants.quantize(weight[i:i + chunk_rows].float().numpy(), Q.Q8_0)).flatten()
                         for i in range(0, weight.shape[0], chunk_rows)])
        return cls(QuantizedTensor(raw, Q.Q8_0, tuple(weight.shape)), dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, dim] in `dtype`."""
        if not self._file_checked:
            self._file_rows, self._file_checked = MappedRows.of(self.blocks), True
        rows = self.blocks[ids] if self._file_rows is None else self._file_rows.read(ids)  # [T, row_bytes]
        return QuantizedTensor(rows.flatten(), self.qtype, (len(ids), self.embedding_dim)).dequantize(self.dtype)


class GroupedEmbedding(nn.Module):
    """A tied token table read from its LM head's grouped weight (tunelab's kernel layout): the head holds
    the file's blocks exactly, so each row decodes to the values the file's table gives, and the table is
    not held twice."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        strips, groups, _ = weight.shape
        self.num_embeddings, self.embedding_dim = 16 * strips, GROUP_SIZE * groups
        self.register_buffer("weight", weight)  # the LM head's own tensor

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, dim] in `dtype`."""
        return native_grouped.rows_of(self.weight, ids).to(self.dtype)
