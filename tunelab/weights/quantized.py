"""GGML block formats: raw GGUF tensor bytes -> float tensors, vectorised in torch.

A GGML tensor is a run of fixed-size blocks; each block packs `block_size`
values into `type_size` bytes (small integers plus fp16 scales). Each format
below is one function from blocks `[N, type_size]` uint8 to values
`[N, block_size]` float32, written after `gguf.quants` (which mirrors
ggml-quants.c) with the same arithmetic order, so results agree bit for bit.

`QuantizedTensor` holds the raw blocks, so a quantized linear layer can later
keep weights packed and dequantise on the fly; at load time we dequantise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType as Q

from tunelab.errors import UnsupportedQuantization


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
