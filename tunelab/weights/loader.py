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
from tunelab.weights.quantized import (NEAREST_KERNEL, QUANTIZED_LINEAR, QuantizedEmbedding, QuantizedTensor,
                                       kernel_fits)

# How weights may be held: a float dtype for everything, or linear layers quantized
# ("int8", "int4", or "nearest": per GGUF tensor, the kernel layout closest to its type).
WeightFormat = torch.dtype | str
QUANTIZED_FORMATS = ("int8", "int4", "nearest")
QUANTIZED_COMPUTE_DTYPE = torch.bfloat16  # the int8/int4 CPU kernels run fastest on bfloat16 activations
QUANTIZABLE_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
CHUNK_ROWS = 4096  # rows converted at a time: bounds the float copy of a large weight (the LM head)
_PRECISION = {"int4": 0, "int8": 1, None: 2}  # None: kept in float
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
    elif path.suffix == ".gguf":
        source = GGUFFile(path)
    else:
        raise ModelFormatError(f"{path} is neither an HF model directory nor a .gguf file; point at one of those")
    if isinstance(dtype, str) and dtype not in QUANTIZED_FORMATS:
        raise ValueError(f"weight format {dtype!r} is not one of {QUANTIZED_FORMATS}")
    config = source.config()
    with torch.device("meta"):
        model = Transformer(config)
    placer = _Placer(model, config, dtype, path)
    for name, value in _stream(source, placer.dtype):
        placer.place(name, value)
    placer.check_complete()
    model.setup_buffers()
    return config, model.eval()


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
    for name, packed in source.quantized_tensors():
        projection = name.split(".")[-2]
        if projection in heads:
            yield name, unpermute_llama_qk(packed.dequantize(), heads[projection])
            _release_file_pages(packed.raw)
        else:
            yield name, packed


class _Placer:
    """Puts each streamed tensor where it belongs in a model built on `meta`, converting as the format asks."""

    def __init__(self, model: Transformer, config: ModelConfig, weight_format: WeightFormat, path: Path):
        self.model, self.config, self.path = model, config, path
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
            value = torch.cat([_to_float(p, torch.float32) for p in parts])
        self._check_shape(name, value)
        if name == "model.embed_tokens.weight":
            self._place_embedding(value)
        elif leaf == "weight" and module_name.rpartition(".")[2] in QUANTIZABLE_LINEARS:
            self._place_linear(module_name, value, self._kind(parts))
        else:
            self._place_float(name, value)
        self.loaded.add(name)
        for part in parts:
            if isinstance(part, QuantizedTensor):
                _release_file_pages(part.raw)

    def _kind(self, parts: list[Value]) -> str | None:
        """The kernel layout for a linear weight made of `parts`: the most precise any part needs."""
        if self.quantize in ("int8", "int4"):
            return self.quantize
        if self.quantize is None:
            return None
        kinds = [NEAREST_KERNEL.get(p.qtype) if isinstance(p, QuantizedTensor) else None for p in parts]
        return max(kinds, key=_PRECISION.__getitem__)

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
        """A GGUF table stays in its blocks when quantizing; int8/int4 store a float table as Q8_0."""
        if isinstance(value, QuantizedTensor) and self.quantize:
            table = QuantizedTensor(value.raw.clone(), value.qtype, value.shape)  # own memory: the file is let go
            self.model.model.embed_tokens = QuantizedEmbedding(table, self.dtype)
        elif self.quantize in ("int8", "int4"):
            self.model.model.embed_tokens = QuantizedEmbedding.from_float(value, self.dtype)
        else:
            self._place_float("model.embed_tokens.weight", value)  # a tied lm_head follows the Parameter
            return
        if self.config.tie_word_embeddings:
            self._place_linear("lm_head", value, self._kind([value]))

    def _place_linear(self, module_name: str, value: Value, kind: str | None) -> None:
        """Swap the nn.Linear at `module_name` for a `kind` quantized one; its bias Parameter moves along."""
        old = self.model.get_submodule(module_name)
        if kind is None or not kernel_fits(kind, old.out_features, old.in_features):
            # A quantized tied lm_head no longer shares the embedding's Parameter: give it its own.
            old.weight = nn.Parameter(_to_float(value, self.dtype), requires_grad=False)
            return
        layer = QUANTIZED_LINEAR[kind].from_rows(_row_chunks(value), old.out_features, old.in_features, self.dtype)
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


def _row_chunks(value: Value) -> Iterator[torch.Tensor]:
    """The weight's rows as float32 chunks of CHUNK_ROWS."""
    for start in range(0, value.shape[0], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, value.shape[0])
        yield value.rows(start, stop).dequantize() if isinstance(value, QuantizedTensor) else value[start:stop].float()


_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)


def _release_file_pages(raw: torch.Tensor) -> None:
    """Let the OS drop the (clean, private) file pages under `raw`, a view of the GGUF map.

    Read pages of a mapped file count in the process's resident memory until
    unmapped; the map lives until loading ends, so without this the peak would be
    the whole file plus the converted model. A later read would fault them back in.
    """
    start = raw.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = raw.data_ptr() + raw.numel()
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
