"""HFCheckpoint: an HF model directory (config.json + *.safetensors, sharded or not).

Tensors stream out one at a time, shard by shard, under the names
`Transformer` uses. Per-expert MoE tensors (`mlp.experts.7.up_proj.weight`)
are copied into their stacked [E, ...] tensor as they arrive, so no weight is
ever held twice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from tunelab.errors import ModelFormatError
from tunelab.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


class HFCheckpoint:
    """A directory with `config.json` and safetensors weights (an index names the shards when sharded)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ModelFormatError(f"{self.path} has no config.json; point at an HF model directory")
        self.shards = self._find_shards()
        self._config = self._read_config()

    def _find_shards(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = [self.path / name for name in dict.fromkeys(weight_map.values())]
            absent = [s.name for s in shards if not s.is_file()]
            if absent:
                raise ModelFormatError(f"{self.path} lacks shard {absent[0]} named by {INDEX_FILE}; download it again")
            return shards
        if (self.path / "model.safetensors").is_file():
            return [self.path / "model.safetensors"]
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise ModelFormatError(f"{self.path} has no *.safetensors weights; convert the model to safetensors")
        return shards

    def tensor_names(self) -> list[str]:
        """Every tensor name in the checkpoint, read from the index or the shard headers."""
        index = self.path / INDEX_FILE
        if index.is_file():
            return list(json.loads(index.read_text())["weight_map"])
        names = []
        for shard in self.shards:
            with _open(shard) as f:
                names.extend(f.keys())
        return names

    def _read_config(self) -> ModelConfig:
        raw = json.loads((self.path / "config.json").read_text())
        if "tie_word_embeddings" not in raw:
            # Older config.json files may omit it; the weights themselves say whether lm_head exists.
            raw["tie_word_embeddings"] = "lm_head.weight" not in self.tensor_names()
        return ModelConfig.from_hf_config(raw)

    def config(self) -> ModelConfig:
        """The model's `ModelConfig`, from config.json."""
        return self._config

    def iter_tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in `dtype`, one tensor in memory at a time; MoE experts come out stacked."""
        num_experts = self._config.num_experts
        stacks: dict[str, tuple[torch.Tensor, set[int]]] = {}  # stacked name -> (tensor, experts filled)
        for shard in self.shards:
            with _open(shard) as f:
                for name in f.keys():
                    match = _EXPERT.fullmatch(name)
                    if match is None:
                        yield name, f.get_tensor(name).to(dtype)
                        continue
                    prefix, expert, projection = match.group(1), int(match.group(2)), match.group(3)
                    if expert >= num_experts:
                        raise ModelFormatError(
                            f"{shard} has {name} but config.json says num_experts={num_experts}; "
                            "the weights do not match the config")
                    stacked_name = f"{prefix}.{projection}"
                    tensor = f.get_tensor(name)
                    if stacked_name not in stacks:
                        stacks[stacked_name] = (torch.empty(num_experts, *tensor.shape, dtype=dtype), set())
                    stacked, filled = stacks[stacked_name]
                    stacked[expert].copy_(tensor)
                    filled.add(expert)
                    if len(filled) == num_experts:
                        yield stacked_name, stacks.pop(stacked_name)[0]
        for stacked_name, (_, filled) in stacks.items():
            missing = min(set(range(num_experts)) - filled)
            raise ModelFormatError(
                f"{self.path} lacks expert tensor {stacked_name.replace('.experts.', f'.experts.{missing}.')}.weight; "
                "download the model again")


def _open(shard: Path):
    try:
        return safe_open(shard, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelFormatError(f"{shard} is not a readable safetensors file ({e}); download it again") from None
