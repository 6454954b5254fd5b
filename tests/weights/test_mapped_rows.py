"""A token table mapped from a model file is read with pread: the same rows, and none of its pages held."""

from __future__ import annotations

import mmap
import os
import struct

import pytest
import torch

from tunelab.weights.gguf_file import GGUFFile
from tunelab.weights.mapped_rows import MappedRows
from tunelab.weights.quantized import QuantizedEmbedding, QuantizedTensor


def pages_in_process(tensor: torch.Tensor) -> int:
    """How many of the tensor's pages are mapped into this process (the present bits of /proc/self/pagemap)."""
    first = tensor.data_ptr() // mmap.PAGESIZE
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size() - 1) // mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = pagemap.read((last - first + 1) * 8)
    return sum(entry >> 63 for (entry,) in struct.iter_unpack("<Q", entries))


def test_a_gguf_table_is_read_from_the_file_and_none_of_it_stays_in_the_process(smollm2_path):
    table = dict(GGUFFile(smollm2_path).quantized_tensors())["model.embed_tokens.weight"]
    embedding = QuantizedEmbedding(table)
    ids = torch.tensor([0, 1, 17, 4095, 4096, 49151, 17])
    before = pages_in_process(embedding.blocks)  # the first few, mapped with the file's header as it was read
    rows = embedding(ids)
    assert pages_in_process(embedding.blocks) == before < 20
    in_memory = QuantizedEmbedding(QuantizedTensor(table.raw.clone(), table.qtype, table.shape))
    assert torch.equal(rows, in_memory(ids))  # the rows the mapping holds
    with pytest.raises(IndexError, match="row 49152 is out of range"):
        embedding(torch.tensor([3, 49152]))


def test_a_table_loaded_with_mmap_reads_its_own_rows(tmp_path):
    table = torch.randint(0, 256, (300, 40), dtype=torch.uint8)
    torch.save({"table": table}, tmp_path / "weights.pt")
    mapped = torch.load(tmp_path / "weights.pt", mmap=True, weights_only=True)["table"]
    reader = MappedRows.of(mapped)
    assert reader is not None
    ids = torch.tensor([299, 0, 150, 150])
    assert torch.equal(reader.read(ids), table[ids])


def test_a_file_replaced_since_it_was_mapped_is_not_read(tmp_path):
    torch.save({"table": torch.zeros(8, 64, dtype=torch.uint8)}, tmp_path / "weights.pt")
    mapped = torch.load(tmp_path / "weights.pt", mmap=True, weights_only=True)["table"]
    torch.save({"table": torch.ones(8, 64, dtype=torch.uint8)}, tmp_path / "new.pt")
    os.replace(tmp_path / "new.pt", tmp_path / "weights.pt")  # as a prepared model written anew
    assert MappedRows.of(mapped) is None


def test_memory_of_the_process_is_read_as_it_is():
    assert MappedRows.of(torch.zeros(4, 8, dtype=torch.uint8)) is None
