"""GGUFFile: one llama.cpp GGUF file, read through `gguf.GGUFReader` (memory-mapped).

Metadata comes out as plain Python values; tensors come out one at a time under
our (HF) names, dequantised to the dtype asked for, so a model never holds a
weight twice while loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from tunelab.errors import ModelFormatError, UnsupportedArchitecture, UnsupportedQuantization
from tunelab.model.config import FAMILY_FLAGS, ModelConfig, resolve_family
from tunelab.weights.quantized import SUPPORTED_TYPES, QuantizedTensor
from tunelab.weights.tensor_names import hf_name_for

_STRING = gguf.GGUFValueType.STRING
_ARRAY = gguf.GGUFValueType.ARRAY


class _Reader(gguf.GGUFReader):
    """`gguf.GGUFReader` that parses through a plain ndarray view of its memory map.

    The reader slices its `np.memmap` once per metadata element, and numpy's memmap
    subclass bookkeeping then dominates: a 151k-token vocabulary took 6 s instead of 2 s.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        if type(self.data) is np.memmap:
            self.data = self.data.view(np.ndarray)  # the view's .base keeps the mapping open
        return super()._get(offset, dtype, count, override_order)


def _scalar(value: np.generic) -> Any:
    # A float32 key is read back as its shortest decimal, so eps 1e-5 stays 1e-5, not 9.99999975e-06.
    return float(str(value)) if value.dtype == np.float32 else value.item()


def _field_value(field: gguf.ReaderField) -> Any:
    """One metadata field as str, int, float, bool, or a list of those."""
    kind = field.types[0]
    if kind == _STRING:
        return field.parts[field.data[0]].tobytes().decode("utf-8")
    if kind == _ARRAY:
        if len(field.types) > 1 and field.types[1] == _STRING:
            return [field.parts[i].tobytes().decode("utf-8") for i in field.data]
        return [_scalar(part[0]) for part in (field.parts[i] for i in field.data)]
    return _scalar(field.parts[field.data[0]][0])


def _require(metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        raise ModelFormatError(f"GGUF metadata has no {key}; re-convert the model with a current llama.cpp")
    return metadata[key]


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """llama.cpp's `{arch}.rope.scaling.*` keys as an HF-style `rope_scaling` dict."""
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if kind == "none" and f"{arch}.rope.scale_linear" in metadata:  # the key older converters wrote
        kind, factor = "linear", metadata[f"{arch}.rope.scale_linear"]
    if kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": factor}
    optional = {"original_context_length": "original_max_position_embeddings",
                "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}
    for gguf_key, hf_key in optional.items():
        if f"{arch}.rope.scaling.{gguf_key}" in metadata:
            scaling[hf_key] = metadata[f"{arch}.rope.scaling.{gguf_key}"]
    return scaling


def config_from_gguf(metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """A ModelConfig from GGUF metadata and the file's tensor shapes (GGUF names, torch order).

    The tensors settle what the metadata leaves out: the vocabulary is the
    embedding's row count, and a file without `output.weight` ties the LM head.
    """
    arch = _require(metadata, "general.architecture")
    family = resolve_family(arch)
    if "rope_freqs.weight" in tensor_shapes:
        raise UnsupportedArchitecture(
            "the GGUF stores per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style), which tunelab "
            "does not read from GGUF; load the model's HF checkpoint instead")
    if "token_embd.weight" not in tensor_shapes:
        raise ModelFormatError("the GGUF has no token_embd.weight tensor; re-convert the model")
    hidden = _require(metadata, f"{arch}.embedding_length")
    heads = _require(metadata, f"{arch}.attention.head_count")
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts; tunelab's layers all share one
        if len(set(kv_heads)) != 1:
            raise UnsupportedArchitecture(f"the GGUF has per-layer KV head counts {kv_heads}; tunelab needs one count")
        kv_heads = kv_heads[0]
    head_dim = metadata.get(f"{arch}.attention.key_length", hidden // heads)
    rotary_dim = metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise UnsupportedArchitecture(
            f"the GGUF applies RoPE to {rotary_dim} of {head_dim} head dims; tunelab supports full-head RoPE only")
    eos_ids = [metadata[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id") if k in metadata]
    moe = {}
    if FAMILY_FLAGS[family]["is_moe"]:
        moe = dict(
            num_experts=_require(metadata, f"{arch}.expert_count"),
            num_experts_per_tok=_require(metadata, f"{arch}.expert_used_count"),
            moe_intermediate_size=_require(metadata, f"{arch}.expert_feed_forward_length"),
            # llama.cpp runs qwen3moe with renormalised top-k weights on every layer and does not
            # write these facts; we follow it so a GGUF behaves here as it does there.
            norm_topk_prob=metadata.get(f"{arch}.expert_weights_norm", True),
            decoder_sparse_step=1,
            mlp_only_layers=(),
        )
    return ModelConfig(
        family=family,
        vocab_size=tensor_shapes["token_embd.weight"][0],
        hidden_size=hidden,
        intermediate_size=metadata.get(f"{arch}.feed_forward_length", 0),
        num_layers=_require(metadata, f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_require(metadata, f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),  # llama.cpp's default
        rope_scaling=_rope_scaling(metadata, arch),
        max_position_embeddings=_require(metadata, f"{arch}.context_length"),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        attention_bias=FAMILY_FLAGS[family]["attention_bias"],
        qk_norm=FAMILY_FLAGS[family]["qk_norm"],
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        **moe,
    )


def unpermute_llama_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation, so HF's rotate_half RoPE applies again.

    llama.cpp's converter interleaves each head's two rotary halves (rows [h, 2, d/2] ->
    [h, d/2, 2]) for its GPT-J style RoPE; this is the inverse. Works on weights and biases.
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def is_gguf_file(path: Path) -> bool:
    """True when `path` is a file that starts with the GGUF magic (store blobs have no .gguf suffix)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


class GGUFFile:
    """A GGUF file: `.metadata`, `.architecture`, `.chat_template`, `.config()`, `.iter_tensors()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = _Reader(self.path, mode="c")
        except FileNotFoundError:
            raise ModelFormatError(f"GGUF file {self.path} does not exist; check the path") from None
        except (ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
            raise ModelFormatError(
                f"{self.path} is truncated or corrupt, not a readable GGUF file ({e}); "
                "re-download or re-convert the model") from None
        if self.reader.byte_order != "I":
            raise ModelFormatError(f"{self.path} is a big-endian GGUF; convert it to little-endian (gguf-convert-endian)")
        try:
            self.metadata: dict[str, Any] = {
                name: _field_value(field) for name, field in self.reader.fields.items()
                if not name.startswith("GGUF.")
            }
        except UnicodeDecodeError as e:
            raise ModelFormatError(
                f"{self.path} has metadata that is not UTF-8 ({e}); re-download or re-convert the model") from None

    @property
    def architecture(self) -> str:
        """`general.architecture`, e.g. "qwen3", "qwen3moe", "qwen2", "llama"."""
        try:
            return self.metadata["general.architecture"]
        except KeyError:
            raise ModelFormatError(
                f"{self.path} has no general.architecture key; re-convert it with llama.cpp's converter") from None

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template embedded in the file, if any."""
        return self.metadata.get("tokenizer.chat_template")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name -> torch shape (the reverse of GGUF's fastest-first `ne`)."""
        return {t.name: tuple(reversed(t.shape.tolist())) for t in self.reader.tensors}

    def config(self) -> ModelConfig:
        """The model's architecture, read from the metadata and tensor shapes."""
        try:
            return config_from_gguf(self.metadata, self.tensor_shapes())
        except ModelFormatError as e:
            raise type(e)(f"{self.path}: {e}") from None

    def quantized_tensors(self) -> Iterator[tuple[str, QuantizedTensor]]:
        """(our name, raw blocks) per tensor, in file order; every name and type is checked before the first."""
        packed = []
        for t in self.reader.tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                raise UnsupportedQuantization(
                    f"{self.path}: tensor {t.name} is {t.tensor_type.name}, which tunelab cannot decode; "
                    "use a file quantized as F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q5_0 or Q4_0")
            try:
                name = hf_name_for(t.name)
            except ModelFormatError as e:
                raise ModelFormatError(f"{self.path}: {e}") from None
            raw = torch.from_numpy(self.reader.data[t.data_offset:t.data_offset + t.n_bytes])  # a view of the map
            packed.append((name, QuantizedTensor(raw, t.tensor_type, tuple(reversed(t.shape.tolist())))))
        yield from packed

    def iter_tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """(our name, tensor in `dtype`) one at a time, so no weight is ever held twice."""
        permute_heads = {}
        # llama.cpp's converter permutes Q/K only for its `llama` arch; the Qwen archs run
        # rotate_half RoPE in llama.cpp too and are stored as HF has them.
        if self.architecture == "llama":
            config = self.config()
            permute_heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
        for name, packed in self.quantized_tensors():
            tensor = packed.dequantize(dtype)
            projection = name.split(".")[-2]
            if projection in permute_heads:
                tensor = unpermute_llama_qk(tensor, permute_heads[projection])
            yield name, tensor
