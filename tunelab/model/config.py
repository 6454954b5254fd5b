"""ModelConfig: the architecture facts of one model, for every supported family.

Families differ only by behaviour flags (`FAMILY_FLAGS`), never by separate
model classes. A config is read from an HF `config.json` (`from_hf_config`) or
from GGUF metadata (`tunelab.weights.gguf_file`), and checked once, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.errors import ModelFormatError, UnsupportedArchitecture

FAMILY_FLAGS: dict[str, dict[str, bool]] = {
    "llama": {"attention_bias": False, "qk_norm": False, "is_moe": False},
    "qwen2": {"attention_bias": True, "qk_norm": False, "is_moe": False},
    "qwen3": {"attention_bias": False, "qk_norm": True, "is_moe": False},
    "qwen3_moe": {"attention_bias": False, "qk_norm": True, "is_moe": True},
}
FAMILY_ALIASES = {"qwen3moe": "qwen3_moe"}  # GGUF `general.architecture` spellings

# Keys each rope scaling type needs, beyond `rope_type`.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# Families whose config.json may leave `head_dim` out, meaning hidden_size // num_attention_heads.
# Qwen3 configs always carry it and it differs from that ratio, so it is never guessed there.
_HEAD_DIM_MAY_BE_IMPLICIT = {"llama", "qwen2"}


def resolve_family(name: str) -> str:
    """Our family id for an HF `model_type` or GGUF architecture; raises if tunelab cannot run it."""
    family = FAMILY_ALIASES.get(name, name)
    if family not in FAMILY_FLAGS:
        raise UnsupportedArchitecture(
            f"model family {name!r} is not supported; tunelab runs {', '.join(FAMILY_FLAGS)}")
    return family


@dataclass(frozen=True)
class ModelConfig:
    """Architecture facts of one model, shared by every family; read from files, never changed."""

    family: str  # a key of FAMILY_FLAGS (aliases are resolved on construction)
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (unused when every layer is MoE)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # {"rope_type": "yarn" | "linear" | "llama3", "factor": ..., ...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2); o_proj never has one
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k router weights to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "family", resolve_family(self.family))
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        object.__setattr__(self, "rope_scaling", _normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings))
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                f"{self.num_kv_heads}; the model config is corrupt")
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts and self.moe_intermediate_size > 0):
            raise ModelFormatError(
                f"MoE config needs 0 < num_experts_per_tok <= num_experts and moe_intermediate_size > 0, got "
                f"{self.num_experts_per_tok}, {self.num_experts}, {self.moe_intermediate_size}; the model config is corrupt")

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer `i` uses the sparse expert block (Qwen3-MoE's rule) rather than a dense MLP."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "ModelConfig":
        """Read an HF `config.json` dict, with rope settings spelled either as
        `rope_theta`/`rope_scaling` (released checkpoints) or `rope_parameters` (transformers 5)."""
        family = resolve_family(_require(d, "model_type"))
        _reject_unsupported_features(d, family)
        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta"))
        if rope_theta is None:
            raise ModelFormatError("config.json has no rope_theta (nor rope_parameters.rope_theta); add the model's value")
        scaling = d.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"} or None
        hidden, heads = _require(d, "hidden_size"), _require(d, "num_attention_heads")
        head_dim = d.get("head_dim")
        if head_dim is None and family in _HEAD_DIM_MAY_BE_IMPLICIT:
            head_dim = hidden // heads
        if head_dim is None:
            raise ModelFormatError(f"config.json of a {family} model has no head_dim; add the model's value (e.g. 128)")
        eos = d.get("eos_token_id")
        moe = {}
        if FAMILY_FLAGS[family]["is_moe"]:
            num_experts = d.get("num_experts", d.get("num_local_experts"))
            if num_experts is None:
                raise ModelFormatError("config.json of a qwen3_moe model has no num_experts; add the model's value")
            moe = dict(
                num_experts=num_experts,
                num_experts_per_tok=_require(d, "num_experts_per_tok"),
                moe_intermediate_size=_require(d, "moe_intermediate_size"),
                # transformers defaults this to False while released checkpoints set True: never guess.
                norm_topk_prob=_require(d, "norm_topk_prob"),
                # Absent means every layer is sparse, as in every released checkpoint.
                decoder_sparse_step=d.get("decoder_sparse_step", 1),
                mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            )
        return cls(
            family=family,
            vocab_size=_require(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_require(d, "intermediate_size"),
            num_layers=_require(d, "num_hidden_layers"),
            num_heads=heads,
            # An absent KV head count means plain multi-head attention (HF's rule for older configs).
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=_require(d, "rms_norm_eps"),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=_require(d, "max_position_embeddings"),
            tie_word_embeddings=_require(d, "tie_word_embeddings"),
            attention_bias=FAMILY_FLAGS[family]["attention_bias"],
            qk_norm=FAMILY_FLAGS[family]["qk_norm"],
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=() if eos is None else (eos,) if isinstance(eos, int) else tuple(eos),
            **moe,
        )


def _require(d: dict[str, Any], key: str) -> Any:
    if d.get(key) is None:
        raise ModelFormatError(f"config.json has no {key}; add the model's value (class defaults are not guessed)")
    return d[key]


def _reject_unsupported_features(d: dict[str, Any], family: str) -> None:
    """Raise for config settings that would change the math in ways tunelab does not implement."""
    problems = [
        (d.get("hidden_act", "silu") != "silu", f"hidden_act {d.get('hidden_act')!r} (only silu)"),
        (bool(d.get("mlp_bias")), "mlp_bias (MLP projections with bias)"),
        (bool(d.get("use_sliding_window")), "use_sliding_window (sliding-window attention)"),
        # Qwen2 always has q/k/v bias; elsewhere the flag would also put a bias on o_proj.
        (family != "qwen2" and bool(d.get("attention_bias")), f"attention_bias on a {family} model"),
        ((d.get("partial_rotary_factor") or 1.0) != 1.0, "partial_rotary_factor (RoPE on part of each head)"),
    ]
    for is_present, what in problems:
        if is_present:
            raise UnsupportedArchitecture(f"config.json uses {what}, which tunelab does not implement")


def _normalize_rope_scaling(scaling: dict[str, Any] | None, max_position_embeddings: int) -> dict[str, Any] | None:
    """None for plain RoPE, else a dict with `rope_type` and every key that type needs."""
    if not scaling:
        return None
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")} | {
        "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}
    kind = scaling["rope_type"]
    if kind == "default":
        return None
    if kind not in ROPE_SCALING_KEYS:
        raise UnsupportedArchitecture(
            f"rope_scaling type {kind!r} is not supported; tunelab supports {', '.join(ROPE_SCALING_KEYS)}")
    if kind in ("yarn", "llama3"):
        # HF's rule: the pretraining context defaults to max_position_embeddings.
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [k for k in ROPE_SCALING_KEYS[kind] if scaling.get(k) is None]
    if missing:
        raise ModelFormatError(f"rope_scaling of type {kind!r} lacks {', '.join(missing)}; add it to the model config")
    return scaling
