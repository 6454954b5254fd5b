"""A GGUF file written the way llama.cpp's converter writes it loads into a model that reproduces transformers.

Tiny random Llama, Qwen2 (q/k/v bias), Qwen3 (decoupled head_dim, YaRN) and
Qwen3-MoE models are written with `gguf.GGUFWriter` under llama.cpp's tensor
names (`gguf.get_tensor_name_map`, an independent copy of the mapping) and
metadata keys, with the Llama Q/K rows permuted as the converter does. For F16
and quantized files the reference is the same HF model with every weight
replaced by gguf's own dequantisation of the stored data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tunelab.errors import ModelFormatError, UnsupportedArchitecture, UnsupportedQuantization
from tunelab.model.attention_batch import AttentionBatch, SequenceSlice
from tunelab.model.config import ModelConfig
from tunelab.model.kv_cache import KVCache
from tunelab.weights.gguf_file import GGUFFile
from tunelab.weights.loader import load_weights
from real_models import real_model_path

transformers = pytest.importorskip("transformers")

SMOLLM2 = real_model_path("smollm2:135m")
TOLERANCE = dict(atol=1e-4, rtol=0)
PROMPT, DECODE = 32, 16

# Every matrix row is a multiple of 32 values, so every 2-D and 3-D tensor can be block-quantized.
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
            initializer_range=0.15, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Case:
    arch: gguf.MODEL_ARCH
    config_class: str
    model_class: str
    settings: dict


CASES = {
    "llama_tied": Case(gguf.MODEL_ARCH.LLAMA, "LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2_bias_untied": Case(gguf.MODEL_ARCH.QWEN2, "Qwen2Config", "Qwen2ForCausalLM", dict(
        tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3_yarn_untied": Case(gguf.MODEL_ARCH.QWEN3, "Qwen3Config", "Qwen3ForCausalLM", dict(
        tie_word_embeddings=False, head_dim=32, rope_theta=1e6,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen3_moe_untied": Case(gguf.MODEL_ARCH.QWEN3MOE, "Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        tie_word_embeddings=False, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True)),
}
TYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q5_1]


def build_hf_model(case: Case, seed: int):
    """A tiny random HF model whose norms and biases are random too, so misplacing one shows."""
    torch.manual_seed(seed)
    config = getattr(transformers, case.config_class)(**BASE | case.settings)
    model = getattr(transformers, case.model_class)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.5)
    return model


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The row permutation llama.cpp's converter applies to Llama q/k projections."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def expert_tensor_name(kind: gguf.MODEL_TENSOR, bid: int) -> str:
    """llama.cpp's name for block `bid`'s stacked expert tensor of `kind`."""
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"


def gguf_tensors(hf_model, arch: gguf.MODEL_ARCH) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(HF key, llama.cpp name, tensor as the converter stores it, same in HF layout); fused experts are split."""
    config = hf_model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    out = []
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if ".mlp.experts." in hf_name:
            bid = int(hf_name.split(".")[2])
            if hf_name.endswith("gate_up_proj"):
                gate, up = tensor.chunk(2, dim=1)  # [E, ff, H] each
                out.append((hf_name + ":gate", expert_tensor_name(gguf.MODEL_TENSOR.FFN_GATE_EXP, bid), gate, gate))
                out.append((hf_name + ":up", expert_tensor_name(gguf.MODEL_TENSOR.FFN_UP_EXP, bid), up, up))
            else:
                out.append((hf_name, expert_tensor_name(gguf.MODEL_TENSOR.FFN_DOWN_EXP, bid), tensor, tensor))
            continue
        stored = tensor
        if arch == gguf.MODEL_ARCH.LLAMA and ("q_proj" in hf_name or "k_proj" in hf_name):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            stored = llama_cpp_permute(tensor, heads)
        out.append((hf_name, names.get_name(hf_name, try_suffixes=(".weight", ".bias")), stored, tensor))
    return out


def write_gguf(path: Path, hf_model, case: Case, qtype: Q) -> dict[str, torch.Tensor]:
    """Write `hf_model` as llama.cpp would; return HF key -> the values a reader must recover, in HF layout."""
    c, arch, settings = hf_model.config, case.arch, BASE | case.settings
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(settings["rope_theta"])
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(head_dim)
    if arch in (gguf.MODEL_ARCH.QWEN3, gguf.MODEL_ARCH.QWEN3MOE):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == gguf.MODEL_ARCH.QWEN3MOE:
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if "rope_scaling" in settings:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(settings["rope_scaling"]["factor"])
        writer.add_rope_scaling_orig_ctx_len(settings["rope_scaling"]["original_max_position_embeddings"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(c.vocab_size)])
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    recover = {}
    for hf_key, gguf_name, stored, hf_layout in gguf_tensors(hf_model, arch):
        tensor_type = Q.F32 if stored.ndim == 1 else qtype  # llama.cpp keeps norms and biases in F32
        data = gguf.quants.quantize(stored.detach().float().numpy(), tensor_type)
        writer.add_tensor(gguf_name, data, raw_dtype=tensor_type)
        # Blocks lie within rows, so quantizing commutes with the Q/K row permutation.
        round_trip = gguf.quants.dequantize(gguf.quants.quantize(hf_layout.detach().float().numpy(), tensor_type), tensor_type)
        recover[hf_key] = torch.from_numpy(round_trip.reshape(hf_layout.shape).copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return recover


def reference_model(hf_model, recover: dict[str, torch.Tensor]):
    """The HF model with each weight replaced by the values the file holds (MoE experts re-fused)."""
    state = {}
    for hf_key, values in recover.items():
        if hf_key.endswith(":gate"):
            fused = hf_key.removesuffix(":gate")
            state[fused] = torch.cat([values, recover[fused + ":up"]], dim=1)  # [E, 2 * ff, H]
        elif not hf_key.endswith(":up"):
            state[hf_key] = values
    reference = type(hf_model)(hf_model.config).eval()
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all(name == "lm_head.weight" for name in missing)
    return reference


@pytest.fixture(scope="module")
def hf_models():
    """Build each case's HF model once per module."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_hf_model(CASES[name], seed=sum(map(ord, name)))
        return built[name]

    return get


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()  # [T, vocab]


def our_logits(model, config, ids: torch.Tensor) -> torch.Tensor:
    """Prefill PROMPT tokens (logits for each), then decode the rest one cached step at a time."""
    kv = KVCache.for_tokens(config, len(ids))
    table = list(range(kv.num_blocks))
    with torch.no_grad():
        steps = [model(ids[:PROMPT], AttentionBatch.build([SequenceSlice(0, PROMPT, table)], kv.block_size, all_logits=True), kv)]
        for t in range(PROMPT, len(ids)):
            steps.append(model(ids[t:t + 1], AttentionBatch.build([SequenceSlice(t, 1, table)], kv.block_size), kv))
    return torch.cat(steps)  # [T, vocab]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("name", list(CASES))
def test_gguf_model_matches_transformers_through_prefill_and_decode(name, qtype, hf_models, tmp_path):
    hf_model = hf_models(name)
    path = tmp_path / f"{name}.{qtype.name}.gguf"
    recover = write_gguf(path, hf_model, CASES[name], qtype)
    reference = hf_model if qtype == Q.F32 else reference_model(hf_model, recover)
    config, model = load_weights(path)
    ids = torch.randint(0, config.vocab_size, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(0))
    expected = hf_logits(reference, ids)
    assert expected.std() > 0.5  # logits spread over units, so 1e-4 agreement is meaningful
    torch.testing.assert_close(our_logits(model, config, ids), expected, **TOLERANCE)


@pytest.mark.parametrize("name", list(CASES))
def test_gguf_metadata_gives_the_config_transformers_has(name, hf_models, tmp_path):
    hf_model = hf_models(name)
    write_gguf(tmp_path / "m.gguf", hf_model, CASES[name], Q.F32)
    expected = ModelConfig.from_hf_config(json.loads(hf_model.config.to_json_string()))
    assert GGUFFile(tmp_path / "m.gguf").config() == expected


def test_metadata_values_come_back_as_plain_python(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "meta.gguf", "qwen3")
    writer.add_string("general.name", "tiny ✓")
    writer.add_uint32("qwen3.block_count", 28)
    writer.add_uint64("test.big", 2**40)
    writer.add_int32("test.negative", -7)
    writer.add_float32("qwen3.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float64("test.double", 0.1)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_token_list(["<|im_start|>", "Ġhello", "日本"])
    writer.add_token_merges(["Ġ h", "e llo"])
    writer.add_token_types([3, 1, 1])
    writer.add_chat_template("{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    gguf_file = GGUFFile(tmp_path / "meta.gguf")
    meta = gguf_file.metadata
    assert meta["general.name"] == "tiny ✓"
    assert (meta["qwen3.block_count"], meta["test.big"], meta["test.negative"]) == (28, 2**40, -7)
    assert meta["qwen3.attention.layer_norm_rms_epsilon"] == 1e-6  # the float32 is read back as written
    assert meta["test.double"] == 0.1
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.tokens"] == ["<|im_start|>", "Ġhello", "日本"]
    assert meta["tokenizer.ggml.merges"] == ["Ġ h", "e llo"]
    assert meta["tokenizer.ggml.token_type"] == [3, 1, 1]
    assert all(type(v) is int for v in meta["tokenizer.ggml.token_type"])
    assert (gguf_file.architecture, gguf_file.chat_template) == ("qwen3", "{{ messages }}")


def test_truncated_real_gguf_is_a_format_error_naming_the_file(tmp_path):
    truncated = tmp_path / "smollm2-truncated.gguf"
    with SMOLLM2.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(SMOLLM2.stat().st_size // 2))
    with pytest.raises(ModelFormatError, match=r"smollm2-truncated\.gguf.*truncated or corrupt.*re-download"):
        GGUFFile(truncated)


@pytest.mark.parametrize("damage", ["bad_magic", "cut_in_metadata"])
def test_corrupt_header_is_a_format_error(damage, hf_models, tmp_path):
    good = tmp_path / "good.gguf"
    write_gguf(good, hf_models("qwen2_bias_untied"), CASES["qwen2_bias_untied"], Q.F32)
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + data[4:] if damage == "bad_magic" else data[:200])
    with pytest.raises(ModelFormatError, match=r"bad\.gguf.*truncated or corrupt"):
        GGUFFile(bad)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        GGUFFile(tmp_path / "absent.gguf")


def _tiny_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    for key, value in dict(block_count=1, context_length=64, embedding_length=32, feed_forward_length=32).items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_uint32(f"{arch}.attention.head_count", 2)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    for name, (data, tensor_type) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_is_named(tmp_path):
    path = _tiny_gguf(tmp_path / "gemma.gguf", "gemma3", {"token_embd.weight": (np.zeros((8, 32), np.float32), Q.F32)})
    with pytest.raises(UnsupportedArchitecture, match="gemma3"):
        GGUFFile(path).config()
    with pytest.raises(UnsupportedArchitecture, match="gemma3"):
        load_weights(path)


def test_unsupported_quantization_names_type_and_tensor(tmp_path):
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    iq4 = np.zeros((8, 32 // block_size * type_size), np.uint8)
    path = _tiny_gguf(tmp_path / "iq4.gguf", "qwen2", {
        "token_embd.weight": (np.zeros((8, 32), np.float32), Q.F32),
        "blk.0.attn_q.weight": (iq4, Q.IQ4_NL),
    })
    with pytest.raises(UnsupportedQuantization, match=r"blk\.0\.attn_q\.weight is IQ4_NL"):
        list(GGUFFile(path).iter_tensors())


def test_tensor_without_a_counterpart_is_named(tmp_path):
    path = _tiny_gguf(tmp_path / "extra.gguf", "qwen2", {"blk.0.ssm_conv1d.weight": (np.zeros((4, 32), np.float32), Q.F32)})
    with pytest.raises(ModelFormatError, match=r"blk\.0\.ssm_conv1d\.weight"):
        list(GGUFFile(path).iter_tensors())


def test_llama3_rope_frequency_tensor_is_refused_not_ignored(tmp_path):
    path = _tiny_gguf(tmp_path / "llama3.gguf", "llama", {
        "token_embd.weight": (np.zeros((8, 32), np.float32), Q.F32),
        "rope_freqs.weight": (np.ones(8, np.float32), Q.F32),
    })
    with pytest.raises(UnsupportedArchitecture, match="rope_freqs"):
        GGUFFile(path).config()


def test_big_endian_file_is_refused_with_the_conversion_tool_named(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "big.gguf", "qwen2", endianess=gguf.GGUFEndian.BIG)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match="big-endian.*gguf-convert-endian"):
        GGUFFile(tmp_path / "big.gguf")
