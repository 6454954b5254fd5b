"""A decode step captured once as a list of native kernel calls and replayed every step.

Eager decode goes through each layer's modules: for one token of a small model the Python around
the kernels (module calls, argument checks, output allocation) costs as much as the kernels. A plan
is built once per batch size, as a CUDA graph is captured: a fixed buffer for every intermediate
and one row of arguments per kernel call of the whole model (`kernels/call_list.c`). A step then
embeds the tokens and normalises them for the first layer in PyTorch, points the attention calls at
this step's RoPE tables, cache slots and key index, and runs the list with one call.

It runs the same kernels on the same values in the same order as `Transformer.forward` does, so the
logits are the same bits (tests/model/test_decode_plan.py). A model is captured only where every
piece has a native kernel: bfloat16 rows, dense SwiGLU layers whose projections and LM head are
tunelab's int8 or grouped layers, native norms and decode attention; otherwise `capture` gives None and
the step runs eagerly. A plan holds its model's weight addresses: capture after loading.
"""

from __future__ import annotations

import torch

from tunelab.kernels import call_list
from tunelab.kernels import decode_attention as native_attention
from tunelab.kernels import grouped_linear as native_grouped
from tunelab.kernels import int8_linear as native_int8
from tunelab.kernels import rms_norm as native_norm
from tunelab.model.attention_batch import AttentionBatch
from tunelab.model.kv_cache import KVCache
from tunelab.model.layers import GatedMLP, RMSNorm
from tunelab.model.transformer import Transformer
from tunelab.weights.quantized import GroupedLinear, Int8Linear

# The decode attention arguments that change every step: cos, sin, slots, key index, its row length, positions.
_MOVING_ARGUMENTS = torch.tensor([5, 6, 12, 13, 14, 15]) + 2


def _capturable(model: Transformer, kv_cache: KVCache, rows: int) -> bool:
    config = model.config
    layers = list(model.model.layers)
    if not (call_list.available() and all(isinstance(layer.mlp, GatedMLP) for layer in layers)):
        return False  # MoE layers route tokens in PyTorch
    norms = [model.model.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    linears = [model.lm_head] + [p for layer in layers for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                                   layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    qk_norms = [n.weight for layer in layers for n in (layer.self_attn.q_norm, layer.self_attn.k_norm) if n is not None]
    return (native_norm.supports(torch.bfloat16)
            and native_attention.supports(config.head_dim, torch.bfloat16, kv_cache.k.dtype)
            and all(n.weight.dtype == torch.bfloat16 for n in norms)
            and all(w.dtype == torch.bfloat16 for w in qk_norms)
            and all(isinstance(linear, (Int8Linear, GroupedLinear)) and linear.runs_native(rows, torch.bfloat16)
                    for linear in linears))


class DecodePlan:
    """One decode step of `model` for exactly `rows` sequences."""

    def __init__(self, model: Transformer, kv_cache: KVCache, rows: int):
        self.model, self.rows = model, rows
        config = model.config
        hidden, heads, kv_heads, head_dim = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim

        self._buffers = []  # every buffer the calls point at: they must live as long as the plan

        def buffer(columns: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
            self._buffers.append(torch.empty(rows, columns, dtype=dtype))
            return self._buffers[-1]

        self.residual = buffer(hidden, torch.float32)  # the residual stream, updated in place by each norm
        self.hidden = buffer(hidden)  # a norm's output: the next projection's input
        qkv = buffer((heads + 2 * kv_heads) * head_dim)
        attention = buffer(heads * head_dim)
        attention_out, mlp_out = buffer(hidden), buffer(hidden)
        gate_up = buffer(2 * config.intermediate_size)
        self.logits = buffer(config.vocab_size, model.lm_head.out_dtype)

        calls, attention_rows = [], []
        layers = list(model.model.layers)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            if i > 0:  # layer 0's norm runs in PyTorch, as in `DecoderLayer.forward`
                calls.append(self._norm(mlp_out, layer.input_layernorm, self.hidden))
            calls.append(self._linear(attn.qkv_proj, self.hidden, qkv))
            attention_rows.append(len(calls))
            if attn.q_norm is not None:  # Qwen3's per-head norms
                norms, eps = (attn.q_norm.weight.data_ptr(), attn.k_norm.weight.data_ptr()), attn.q_norm.eps
            else:
                norms, eps = (None, None), 0.0
            k_cache, v_cache = kv_cache.k[attn.layer_index], kv_cache.v[attn.layer_index]
            scales = [None if s is None else s.data_ptr() for s in kv_cache.scales(attn.layer_index)]
            calls.append(call_list.row(  # cos, sin, slots, key index and positions: set by each step
                call_list.DECODE_ATTENTION, native_attention.address(), qkv.data_ptr(), rows, heads, kv_heads,
                head_dim, 0, 0, *norms, call_list.float_bits(eps), k_cache.data_ptr(), v_cache.data_ptr(), 0, 0, 0,
                0, k_cache.shape[0], attention.data_ptr(), *scales))
            calls.append(self._linear(attn.o_proj, attention, attention_out))
            calls.append(self._norm(attention_out, layer.post_attention_layernorm, self.hidden))
            calls.append(self._linear(layer.mlp.gate_up_proj, self.hidden, gate_up))
            calls.append(self._linear(layer.mlp.down_proj, gate_up, mlp_out, swiglu=True))
        calls.append(self._norm(mlp_out, model.model.norm, self.hidden))
        calls.append(self._linear(model.lm_head, self.hidden, self.logits))
        self.calls = torch.tensor(calls, dtype=torch.int64)
        self.attention_rows = torch.tensor(attention_rows)

    @classmethod
    def capture(cls, model: Transformer, kv_cache: KVCache, rows: int) -> "DecodePlan | None":
        """The plan for `rows` sequences, or None where some piece of the model has no native kernel here."""
        return cls(model, kv_cache, rows) if _capturable(model, kv_cache, rows) else None

    def _norm(self, x: torch.Tensor, norm: RMSNorm, out: torch.Tensor) -> list[int]:
        """residual += x; out = rms_norm(residual) * weight (the residual is updated in place: the kernel
        reads each element before it writes it)."""
        residual = self.residual
        return call_list.row(call_list.ADD_RMS_NORM, native_norm.address(), x.data_ptr(), residual.data_ptr(),
                             residual.data_ptr(), self.rows, x.shape[1], norm.weight.data_ptr(),
                             call_list.float_bits(norm.eps), out.data_ptr())

    def _linear(self, linear, x: torch.Tensor, out: torch.Tensor, swiglu: bool = False) -> list[int]:
        bias = None if linear.bias is None else linear.bias.data_ptr()
        m, k, n = self.rows, linear.in_features, linear.out_features
        if isinstance(linear, Int8Linear):
            return call_list.row(call_list.INT8_LINEAR, native_int8.address(), x.data_ptr(), m, k,
                                 linear.weight.data_ptr(), n, linear.scales.data_ptr(), bias, swiglu, linear.packed,
                                 out.dtype == torch.float32, out.data_ptr())
        return call_list.row(call_list.GROUPED_LINEAR, native_grouped.address(), x.data_ptr(), m, k,
                             linear.weight.data_ptr(), n, bias, swiglu, linear.bits, out.dtype == torch.float32,
                             out.data_ptr())

    def run(self, input_ids: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """input_ids [rows] of a decode batch of `rows` sequences -> float32 logits [rows, vocab]."""
        if not (batch.is_decode and batch.num_seqs == self.rows == len(input_ids)):
            raise ValueError(f"this plan runs decode steps of {self.rows} sequences, "
                             f"got {len(input_ids)} tokens of {batch.num_seqs} sequences")
        model = self.model
        x = model.model.embed_tokens(input_ids)  # [rows, hidden] bfloat16
        cos, sin = (t.contiguous() for t in model.rotary(batch.positions, x.dtype))
        slots, key_index, positions = (t.contiguous() for t in (batch.slot_mapping, batch.key_index, batch.positions))
        self.residual.copy_(x)  # `residual_stream`: the embeddings in float32
        self.hidden.copy_(model.model.layers[0].input_layernorm(x))
        moving = torch.tensor([cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), key_index.data_ptr(),
                               key_index.shape[1], positions.data_ptr()])
        self.calls[self.attention_rows[:, None], _MOVING_ARGUMENTS[None, :]] = moving
        call_list.run(self.calls)  # the tensors above stay alive until it returns
        return self.logits.to(torch.float32, copy=True)  # the buffer is the next step's too
