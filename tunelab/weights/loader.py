"""load_weights: a model file or directory -> (ModelConfig, Transformer) with its weights in place.

The model is built on the `meta` device (no memory), then each tensor is
swapped in as it streams from the file, so weights are never materialised
twice. Every parameter must receive exactly one tensor of its shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunelab.errors import ModelFormatError
from tunelab.model.config import ModelConfig
from tunelab.model.transformer import Transformer
from tunelab.weights.gguf_file import GGUFFile, is_gguf_file
from tunelab.weights.hf_checkpoint import HFCheckpoint


def load_weights(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, Transformer]:
    """Load an HF checkpoint directory or a `.gguf` file into a ready-to-run `Transformer` in `dtype`."""
    path = Path(path)
    if path.is_dir():
        source = HFCheckpoint(path)
    elif path.suffix == ".gguf" or is_gguf_file(path):
        source = GGUFFile(path)
    else:
        raise ModelFormatError(f"{path} is neither an HF model directory nor a .gguf file; point at one of those")
    config = source.config()
    with torch.device("meta"):
        model = Transformer(config)
    params = dict(model.named_parameters())  # a tied lm_head shares the embedding and is not listed
    loaded: set[str] = set()
    for name, tensor in source.iter_tensors(dtype):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some tied checkpoints store a copy; the embedding is the one used
        param = params.get(name)
        if param is None:
            raise ModelFormatError(
                f"{path} has tensor {name}, which a {config.family} model with this config does not use; "
                "the weights do not match the config")
        if tensor.shape != param.shape:
            raise ModelFormatError(
                f"{path} has tensor {name} of shape {tuple(tensor.shape)}, but the config needs "
                f"{tuple(param.shape)}; the weights do not match the config")
        # Swapping keeps the Parameter object, so a tied lm_head follows the embedding.
        torch.utils.swap_tensors(param, nn.Parameter(tensor, requires_grad=False))
        loaded.add(name)
    missing = [name for name in params if name not in loaded]
    if missing:
        raise ModelFormatError(
            f"{path} lacks tensor {missing[0]} ({len(missing)} missing in all); the model files are incomplete")
    model.setup_buffers()
    return config, model.eval()
