"""Rows of a table mapped from a file, read with `pread` instead of through the mapping.

A token table is mostly rows that no prompt uses. Read through the mapping, a lookup maps the row's
page into the process, and the kernel's fault-around maps up to 15 neighbours with it; they stay
for the process's life: after a few requests ~30 MiB of Qwen2.5 0.5B's untied 89 MiB table is
resident, and a long-running server would end up holding all of it. Read with `pread`, the rows
come from the same page cache and the process holds none of them.

A prepared model's tensors are mapped from its `weights.pt` (`torch.load(mmap=True)`), a GGUF
load's from the GGUF file. The file is found in /proc/self/maps and checked to be the very file
mapped (same device and inode), so a model file replaced since is never read in its place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class MappedRows:
    """Reads rows of a 2-D uint8 table from the file it is mapped from."""

    def __init__(self, fd: int, offset: int, num_rows: int, row_bytes: int):
        self.fd, self.offset, self.num_rows, self.row_bytes = fd, offset, num_rows, row_bytes

    def __del__(self):
        os.close(self.fd)

    @classmethod
    def of(cls, table: torch.Tensor) -> MappedRows | None:
        """A reader for `table` [rows, row_bytes] uint8 if it lies in one file mapping, else None."""
        if table.dim() != 2 or table.dtype != torch.uint8 or not table.is_contiguous() or table.numel() == 0:
            return None
        start, end = table.data_ptr(), table.data_ptr() + table.numel()
        try:
            with open("/proc/self/maps") as maps:
                lines = maps.readlines()
        except OSError:  # not Linux
            return None
        for line in lines:
            fields = line.split(maxsplit=5)
            low, high = (int(v, 16) for v in fields[0].split("-"))
            if not low <= start < high:
                continue
            if end > high or len(fields) < 6 or not fields[5].startswith("/"):
                return None  # anonymous memory, or spread over several mappings
            major, minor = (int(v, 16) for v in fields[3].split(":"))
            try:
                fd = os.open(Path(fields[5].rstrip("\n")), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:  # deleted or unreadable since it was mapped
                return None
            stat = os.fstat(fd)
            if (os.major(stat.st_dev), os.minor(stat.st_dev), stat.st_ino) != (major, minor, int(fields[4])):
                os.close(fd)
                return None
            return cls(fd, int(fields[2], 16) + start - low, table.shape[0], table.shape[1])
        return None

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] -> [T, row_bytes] uint8."""
        wanted = ids.tolist()
        bad = [i for i in wanted if not 0 <= i < self.num_rows]
        if bad:
            raise IndexError(f"row {bad[0]} is out of range for a table of {self.num_rows} rows")
        data = b"".join(os.pread(self.fd, self.row_bytes, self.offset + i * self.row_bytes) for i in wanted)
        if len(data) != len(wanted) * self.row_bytes:
            raise OSError("the model file is shorter than the table mapped from it; it changed on disk")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(len(wanted), self.row_bytes)
