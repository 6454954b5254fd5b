"""Tensor names: llama.cpp's GGUF spelling -> ours (HF's), the only place that knows both.

GGUF names a block's tensors `blk.N.<part>`; we name them
`model.layers.N.<part>`, as HF checkpoints and our module tree do. MoE experts
are stored stacked in GGUF (`ffn_gate_exps`), and ours are stacked parameters
too, without a `.weight` suffix.
"""

from __future__ import annotations

import re

from tunelab.errors import ModelFormatError

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
}

_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name_for(gguf_name: str) -> str:
    """Our name for a llama.cpp tensor name, e.g. `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match and match[2] in BLOCK_NAMES:
        return f"model.layers.{match[1]}.{BLOCK_NAMES[match[2]]}"
    raise ModelFormatError(
        f"GGUF tensor {gguf_name!r} has no counterpart in tunelab's models; "
        "the file holds a variant tunelab does not run")
