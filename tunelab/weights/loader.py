"""load_weights: a model file or directory -> (ModelConfig, Transformer) with its weights in place.

The model is built on the `meta` device (no memory), then each tensor is
placed as it streams from the file, so weights are never materialised twice.
Checkpoint projections that the model fuses (q/k/v, gate/up) wait until all
their shards are in, then go in as one tensor. With a quantized format each
linear weight is converted once to its kernel layout (`weights.quantized`) and
a GGUF embedding stays in its GGML blocks; the file pages each tensor came
from are handed back to the OS as soon as it is placed, so peak memory is the
model plus one tensor. Every parameter must receive exactly one tensor of its shape.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from tunelab.errors import ModelFormatError
from tunelab.model.config import ModelConfig
from tunelab.model.layers import FUSED_PROJECTIONS
from tunelab.model.transformer import Transformer
from tunelab.weights.gguf_file import GGUFFile, unpermute_llama_qk
from tunelab.weights.hf_checkpoint import HFCheckpoint
from tunelab.kernels import grouped_linear as native_grouped
from tunelab.weights.quantized import (EXACT_GROUP_TYPES, GROUPED_LINEAR, QUANTIZED_LINEAR, GroupedEmbedding,
                                       GroupedLinear, Int8Linear, QuantizedEmbedding, QuantizedTensor, group_bits,
                                       kernel_fits)

# How weights are held: a float dtype for everything, or the linear layers quantized:
#   "int8": int8 rows, except Q4_0/Q4_1 blocks, which 4-bit groups hold as they are, and the LM head,
#           which keeps the file's codes wherever groups of 32 hold them exactly (Q4_0 to Q5_1, Q8_0);
#   "int4": int4 groups of 32, except the LM head, which is kept as "int8" keeps it (as llama.cpp's
#           Q4_K_M keeps its output layer at 6 bits: next-token ranking is most sensitive there).
# Why the head: per-row int8 re-rounds each 32-value block of the file, and in the head that alone
# moves Qwen2.5 0.5B's argmax on 1% of positions; the head also writes float32 logits, as bfloat16
# ones (steps of 0.125 near 20) move SmolLM2's on 2% (tests/weights/test_quantized_accuracy.py).
# Layers keep int8 rows, as exact 5- and 8-bit groups would hold them too: groups pay a float combine
# per 32 inputs, which at prompt lengths runs 2-3x slower than int8 rows (bench/linear_kernels.py).
WeightFormat = torch.dtype | str
QUANTIZED_FORMATS = ("int8", "int4")
QUANTIZED_COMPUTE_DTYPE = torch.bfloat16  # the int8/int4 CPU kernels run fastest on bfloat16 activations
QUANTIZABLE_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
CHUNK_ROWS = 4096  # rows converted at a time: bounds the float copy of a large weight (the LM head)
_NUM_SHARDS = {fused: sum(1 for f, _ in FUSED_PROJECTIONS.values() if f == fused)
               for fused, _ in FUSED_PROJECTIONS.values()}

Value = QuantizedTensor | torch.Tensor  # a tensor as the file gives it: GGML blocks (GGUF) or floats (HF)


def load_weights(path: str | Path, dtype: WeightFormat = torch.float32) -> tuple[ModelConfig, Transformer]:
    """Load an HF checkpoint directory or a `.gguf` file into a ready-to-run `Transformer`.

    `dtype` is a float dtype for every weight, or one of QUANTIZED_FORMATS (activations then run in bfloat16).
    """
    path = Path(path)
    if path.is_dir():
        source = HFCheckpoint(path)
    elif path.suffix == ".gguf" or _starts_with_gguf_magic(path):
        source = GGUFFile(path)
    else:
        raise ModelFormatError(f"{path} is neither an HF model directory nor a .gguf file; point at one of those")
    if isinstance(dtype, str) and dtype not in QUANTIZED_FORMATS:
        raise ValueError(f"weight format {dtype!r} is not one of {QUANTIZED_FORMATS}")
    config = source.config()
    with torch.device("meta"):
        model = Transformer(config)
    file_pages = _FilePages(source.reader.data) if isinstance(source, GGUFFile) else None
    placer = _Placer(model, config, dtype, path, file_pages)
    for name, value in _stream(source, placer.dtype):
        placer.place(name, value)
    placer.check_complete()
    model.setup_buffers()
    del source, placer
    return_freed_memory()
    return config, model.eval()


def _starts_with_gguf_magic(path: Path) -> bool:
    """True for a GGUF file under any name (store blobs are named by their sha256)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _stream(source: GGUFFile | HFCheckpoint, dtype: torch.dtype) -> Iterator[tuple[str, Value]]:
    """(name, value) in file order: HF tensors in `dtype`; GGUF raw blocks, Q/K rows restored where llama.cpp permuted them."""
    if isinstance(source, HFCheckpoint):
        yield from source.iter_tensors(dtype)
        return
    # llama.cpp's converter permutes Q/K rows only for its `llama` arch (see GGUFFile.iter_tensors).
    heads = {}
    if source.architecture == "llama":
        config = source.config()
        heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
    # The parsed metadata (a 151k-token vocabulary is ~250 MB of small objects) is not needed for
    # the weights; dropping it keeps it from stacking on top of them at the peak.
    source.reader.fields.clear()
    source.metadata.clear()
    gc.collect()
    for name, packed in source.quantized_tensors():
        projection = name.split(".")[-2]
        if projection in heads:
            # Rows are whole GGML blocks, so the rows of the raw bytes reorder exactly.
            rows = unpermute_llama_qk(packed.raw.view(packed.shape[0], -1), heads[projection])
            packed = QuantizedTensor(rows.flatten(), packed.qtype, packed.shape)
        yield name, packed


class _Placer:
    """Puts each streamed tensor where it belongs in a model built on `meta`, converting as the format asks."""

    def __init__(self, model: Transformer, config: ModelConfig, weight_format: WeightFormat, path: Path,
                 file_pages: _FilePages | None):
        self.model, self.config, self.path, self.file_pages = model, config, path, file_pages
        self.quantize = weight_format if isinstance(weight_format, str) else None
        self.dtype = QUANTIZED_COMPUTE_DTYPE if self.quantize else weight_format
        self.params = dict(model.named_parameters())  # a tied lm_head shares the embedding and is not listed
        self.loaded: set[str] = set()
        self.shards: dict[str, dict[int, Value]] = {}  # fused parameter -> the shards received so far

    def place(self, name: str, value: Value) -> None:
        """Place one checkpoint tensor (or hold it until its fused siblings arrive)."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return  # some tied checkpoints store a copy; the embedding is the one used
        module_name, _, leaf = name.rpartition(".")
        parent, _, projection = module_name.rpartition(".")
        parts = [value]
        if projection in FUSED_PROJECTIONS and leaf in ("weight", "bias"):
            fused, shard = FUSED_PROJECTIONS[projection]
            module_name, name = f"{parent}.{fused}", f"{parent}.{fused}.{leaf}"
            shards = self.shards.setdefault(name, {})
            shards[shard] = value
            if len(shards) < _NUM_SHARDS[fused]:
                return
            parts = [shards[i] for i in range(len(shards))]
            del self.shards[name]
            value = _concatenate(parts)
        self._check_shape(name, value)
        if name == "model.embed_tokens.weight":
            self._place_embedding(value)
        elif leaf == "weight" and module_name.rpartition(".")[2] in QUANTIZABLE_LINEARS:
            self._place_linear(module_name, value, self._kind(module_name, parts))
        else:
            self._place_float(name, value)
        self.loaded.add(name)
        for part in parts:
            if isinstance(part, QuantizedTensor) and self.file_pages is not None:
                self.file_pages.release(part.raw)

    def _kind(self, module_name: str, parts: list[Value]) -> str | None:
        """The kernel layout for the linear weight at `module_name`, made of `parts` (None: stays float)."""
        if self.quantize is None:
            return None
        exact = _exact_group_kind(parts)
        if module_name == "lm_head":
            return exact or "int8"
        if self.quantize == "int4":
            return "int4"
        return exact if exact == "int4" else "int8"

    def _check_shape(self, name: str, value: Value) -> None:
        param = self.params.get(name)
        if param is None:
            raise ModelFormatError(
                f"{self.path} has tensor {name}, which a {self.config.family} model with this config does not use; "
                "the weights do not match the config")
        if tuple(value.shape) != tuple(param.shape):
            raise ModelFormatError(
                f"{self.path} has tensor {name} of shape {tuple(value.shape)}, but the config needs "
                f"{tuple(param.shape)}; the weights do not match the config")

    def _place_float(self, name: str, value: Value) -> None:
        tensor = _to_float(value, self.dtype)
        torch.utils.swap_tensors(self.params[name], nn.Parameter(tensor, requires_grad=False))

    def _place_embedding(self, value: Value) -> None:
        """Quantizing, a GGUF table stays in its blocks and a float one is stored as Q8_0; a table tied to a
        head that holds its blocks exactly is read from the head instead of being held twice."""
        if not self.quantize:
            self._place_float("model.embed_tokens.weight", value)  # a tied lm_head follows the Parameter
            return
        if self.config.tie_word_embeddings:
            self._place_linear("lm_head", value, self._kind("lm_head", [value]))
            head = self.model.lm_head
            if (isinstance(head, GroupedLinear) and head.native and isinstance(value, QuantizedTensor)
                    and value.qtype in EXACT_GROUP_TYPES):
                self.model.model.embed_tokens = GroupedEmbedding(head.weight, self.dtype)
                return
        if isinstance(value, QuantizedTensor):
            table = QuantizedTensor(value.raw.clone(), value.qtype, value.shape)  # own memory: the file is let go
            self.model.model.embed_tokens = QuantizedEmbedding(table, self.dtype)
        else:
            self.model.model.embed_tokens = QuantizedEmbedding.from_float(value, self.dtype)

    def _place_linear(self, module_name: str, value: Value, kind: str | None) -> None:
        """Swap the nn.Linear at `module_name` for a `kind` quantized one; its bias Parameter moves along."""
        old = self.model.get_submodule(module_name)
        if kind is None or not kernel_fits(kind, old.out_features, old.in_features):
            # A quantized tied lm_head no longer shares the embedding's Parameter: give it its own.
            old.weight = nn.Parameter(_to_float(value, self.dtype), requires_grad=False)
            return
        layer = QUANTIZED_LINEAR[kind].from_rows(_row_chunks(value), old.out_features, old.in_features, self.dtype)
        if isinstance(layer, Int8Linear):
            layer.pack()  # tunelab's kernel layout, where that kernel runs every row count
        if module_name == "lm_head":
            layer.out_dtype = torch.float32  # logits straight from the kernel's float32 sums
        layer.bias = old.bias
        parent, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent), child, layer)

    def check_complete(self) -> None:
        """Raise, naming the first checkpoint tensor that never arrived, unless every parameter was placed."""
        missing = [name for name in self.params if name not in self.loaded]
        if missing:
            raise ModelFormatError(
                f"{self.path} lacks tensor {self._checkpoint_name(missing[0])} ({len(missing)} missing in all); "
                "the model files are incomplete")

    def _checkpoint_name(self, name: str) -> str:
        """The checkpoint's name for a parameter; for a fused one, its first shard that never arrived."""
        module_name, _, leaf = name.rpartition(".")
        parent, _, fused = module_name.rpartition(".")
        received = self.shards.get(name, {})
        for projection, (target, shard) in FUSED_PROJECTIONS.items():
            if target == fused and shard not in received:
                return f"{parent}.{projection}.{leaf}"
        return name


def _to_float(value: Value, dtype: torch.dtype) -> torch.Tensor:
    """`value` as a `dtype` tensor in memory of its own (never a view of the file)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    tensor = value.dequantize(dtype)
    return tensor.clone() if tensor.untyped_storage().data_ptr() == value.raw.untyped_storage().data_ptr() else tensor


def _concatenate(parts: list[Value]) -> Value:
    """Fused shards as one tensor: GGML blocks of one type stay blocks (rows are whole blocks), others float32."""
    if all(isinstance(p, QuantizedTensor) and p.qtype == parts[0].qtype for p in parts):
        return QuantizedTensor(torch.cat([p.raw for p in parts]), parts[0].qtype,
                               (sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
    return torch.cat([_to_float(p, torch.float32) for p in parts])


def _exact_group_kind(parts: list[Value]) -> str | None:
    """The grouped layer that holds these GGML blocks exactly with tunelab's kernel, or None."""
    if not all(isinstance(p, QuantizedTensor) and p.qtype in EXACT_GROUP_TYPES for p in parts):
        return None
    bits = max(group_bits(p.qtype) for p in parts)
    if bits != 4 and not native_grouped.available():
        return None  # only 4-bit groups have a PyTorch kernel
    return GROUPED_LINEAR[bits].kind


def _row_chunks(value: Value) -> Iterator[Value]:
    """The weight's rows in chunks of CHUNK_ROWS: GGML blocks stay blocks (the layer converts them), floats float32."""
    for start in range(0, value.shape[0], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, value.shape[0])
        yield value.rows(start, stop) if isinstance(value, QuantizedTensor) else value[start:stop].float()


_libc = ctypes.CDLL(None, use_errno=True)


class _FilePages:
    """The pages of a GGUF file map, handed back to the OS tensor by tensor once placed.

    Read pages of a mapped file count in the process's resident memory until unmapped,
    and the map lives until loading ends: without this the peak would be the whole file
    plus the converted model. The map is private and never written, so its pages are
    clean; a later read would fault them back in from the file.
    """

    MADV_DONTNEED = 4

    def __init__(self, data):
        self.start, self.end = data.ctypes.data, data.ctypes.data + data.nbytes

    def release(self, raw: torch.Tensor) -> None:
        """Drop the pages under `raw` if it is a view of the map (never memory of our own)."""
        address = raw.data_ptr()
        if self.start <= address and address + raw.numel() <= self.end:
            first_page = address // mmap.PAGESIZE * mmap.PAGESIZE
            _libc.madvise(ctypes.c_void_p(first_page), ctypes.c_size_t(address + raw.numel() - first_page),
                          self.MADV_DONTNEED)


def return_freed_memory() -> None:
    """Hand freed scratch memory (the loader's, a tokenizer parse's) back to the OS: glibc keeps freed heap
    pages otherwise."""
    gc.collect()
    if hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
