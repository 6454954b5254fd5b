"""Prepared models: a quantized load's result saved once, so loading the same file again only reads it.

Converting GGML blocks to the int8/int4 kernel layouts and building a 151k-token
tokenizer from GGUF metadata take seconds, and the result depends only on the
file and the format. After such a load the model's tensors, its config, its
module layout and its tokenizer (as an HF `tokenizer.json` directory) are
written to `<cache_dir>/prepared-<key>/`, where the key names the file (path,
size, modification time), the format and this layout's version. The directory
is written under a temp name and renamed into place, so a reader never sees
half of it; it holds a symlink to the source file, so the store's prune
removes it once that file is gone.

The tensors are saved with `torch.save` and read back memory-mapped: its archive
aligns every tensor to 64 bytes, which the int8/int4 CPU kernels' aligned
AVX-512 loads need (safetensors' buffers are only 8-byte aligned, and copying
them would hold the weights twice), and a warm load then copies nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from gguf import GGMLQuantizationType
from torch import nn

from tunelab.kernels import grouped_linear as native_grouped
from tunelab.kernels import int8_linear as native_int8
from tunelab.model.config import ModelConfig
from tunelab.model.transformer import Transformer
from tunelab.tokenizer import Tokenizer
from tunelab.weights.loader import QUANTIZED_COMPUTE_DTYPE
from tunelab.weights.quantized import (QUANTIZED_LINEAR, GroupedEmbedding, QuantizedEmbedding, QuantizedLinear,
                                       QuantizedTensor)

log = logging.getLogger(__name__)

LAYOUT_VERSION = 4  # bump when a quantized module's buffers change meaning, or the loader picks other layouts


def prepared_dir(cache_dir: Path, source: Path, weight_format: str) -> Path:
    """Where the prepared form of `source` in `weight_format` lives (whether or not it exists yet)."""
    stat = source.resolve().stat()
    # Quantized weights are kept in tunelab's kernel layouts where those kernels run.
    kernels = f"int8-rows-{native_int8.max_rows()}|grouped-native-{native_grouped.available()}"
    identity = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{weight_format}|{kernels}|{LAYOUT_VERSION}"
    return cache_dir / f"prepared-{hashlib.sha256(identity.encode()).hexdigest()[:32]}"


def load_prepared(directory: Path) -> tuple[ModelConfig, Transformer, Tokenizer] | None:
    """The model saved in `directory`, or None when there is none or it cannot be read (it is then removed)."""
    if not (directory / "model.json").is_file():
        return None
    try:
        spec = json.loads((directory / "model.json").read_text())
        config = ModelConfig(**{key: tuple(value) if isinstance(value, list) else value
                                for key, value in spec["config"].items()})
        tensors = torch.load(directory / "weights.pt", mmap=True, weights_only=True)
        with torch.device("meta"):
            model = Transformer(config)
            for name, module in spec["modules"].items():
                _swap(model, name, _empty_module(module, tensors, name))
        model.load_state_dict(tensors, strict=True, assign=True)
        model.requires_grad_(False)
        model.setup_buffers()
        return config, model.eval(), Tokenizer.from_hf_dir(directory / "tokenizer")
    except Exception as exc:  # a stale or damaged entry is only a cache miss
        log.warning("ignoring the prepared model in %s (%s); converting the weights again", directory, exc)
        shutil.rmtree(directory, ignore_errors=True)
        return None


def save_prepared(directory: Path, source: Path, config: ModelConfig, model: Transformer, tokenizer: Tokenizer) -> None:
    """Write the loaded model to `directory` atomically; a failure (a full disk, say) only logs a warning."""
    if directory.exists():
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        modules = {name: _describe(module) for name, module in model.named_modules()
                   if isinstance(module, (QuantizedLinear, QuantizedEmbedding, GroupedEmbedding))}
        torch.save(model.state_dict(), temp / "weights.pt")
        tokenizer.save_hf_dir(temp / "tokenizer")
        (temp / "source").symlink_to(source.resolve())
        (temp / "model.json").write_text(json.dumps({"config": dataclasses.asdict(config), "modules": modules}))
        os.rename(temp, directory)
    except OSError as exc:
        if directory.is_dir():
            return  # another process prepared the same model first
        log.warning("could not save the prepared model to %s (%s); the next load converts again", directory, exc)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # already renamed, or a partial write


def _describe(module: nn.Module) -> dict:
    if isinstance(module, GroupedEmbedding):  # its weight is the LM head's: saved once, shared again on load
        return {"kind": "grouped-embedding", "shape": [module.num_embeddings, module.embedding_dim]}
    if isinstance(module, QuantizedEmbedding):
        return {"kind": "embedding", "qtype": module.qtype.name, "shape": [module.num_embeddings, module.embedding_dim]}
    return {"kind": module.kind, "shape": [module.out_features, module.in_features],
            "packed": getattr(module, "packed", False), "float_output": module.out_dtype == torch.float32}


def _empty_module(spec: dict, tensors: dict[str, torch.Tensor], name: str) -> nn.Module:
    """A quantized module of the recorded kind and shape, on `meta`, for `load_state_dict(assign=True)`."""
    if spec["kind"] == "grouped-embedding":
        return GroupedEmbedding(tensors[f"{name}.weight"], QUANTIZED_COMPUTE_DTYPE)
    if spec["kind"] == "embedding":
        qtype = GGMLQuantizationType[spec["qtype"]]
        return QuantizedEmbedding(QuantizedTensor(tensors[f"{name}.blocks"].flatten(), qtype, tuple(spec["shape"])),
                                  QUANTIZED_COMPUTE_DTYPE)
    out_features, in_features = spec["shape"]
    layer = QUANTIZED_LINEAR[spec["kind"]](out_features, in_features, QUANTIZED_COMPUTE_DTYPE)
    if f"{name}.bias" in tensors:
        layer.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
    if spec.get("packed"):
        layer.packed = True
    if spec.get("float_output"):
        layer.out_dtype = torch.float32
    return layer


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
