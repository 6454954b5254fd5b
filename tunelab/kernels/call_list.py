"""Run a list of native kernel calls with one call from Python, through `call_list.c`.

A list is an int64 tensor [calls, FIELDS]: per row the kind of call, the kernel's address (`address`
of the kernel modules' entry points) and its arguments, pointers and sizes as integers and floats as
`float_bits`. The kernels check their own arguments, as they do when called one by one.
"""

from __future__ import annotations

import ctypes
import functools
import struct

import torch

from tunelab.kernels import build

FIELDS = 24  # kind, address, up to 22 arguments
ADD_RMS_NORM, INT8_LINEAR, GROUPED_LINEAR, DECODE_ATTENTION = 1, 2, 3, 4


@functools.cache
def _function():
    library = build.load("call_list", frozenset({"avx512f"}))
    if library is None:
        return None
    function = library.tunelab_run_calls
    function.restype = ctypes.c_int64
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    return function


def available() -> bool:
    return _function() is not None


def float_bits(value: float) -> int:
    """A float32 argument as the int64 field the C side reads it from."""
    return struct.unpack("<I", struct.pack("<f", value))[0]


def row(kind: int, address: int, *arguments: int) -> list[int]:
    """One call's row: its kind, the kernel's address and its arguments (None for a null pointer)."""
    if len(arguments) > FIELDS - 2:
        raise ValueError(f"a call takes at most {FIELDS - 2} arguments, got {len(arguments)}")
    return [kind, address, *(0 if a is None else int(a) for a in arguments)] + [0] * (FIELDS - 2 - len(arguments))


def run(calls: torch.Tensor) -> None:
    """Run every call of `calls` [n, FIELDS] int64 in order; raise naming the first one a kernel refused."""
    failed = _function()(calls.data_ptr(), len(calls))
    if failed:
        kind = int(calls[failed - 1, 0])
        raise RuntimeError(f"call {failed - 1} of the list (kind {kind}) was refused by its kernel")
