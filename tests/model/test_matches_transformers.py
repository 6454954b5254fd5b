"""Our Transformer, loaded from a safetensors directory, reproduces transformers' logits.

Every case in conftest.CASES (Llama, Qwen2, Qwen3, Qwen3-MoE; tied and untied;
plain, linear, llama3 and YaRN RoPE; sharded and not) must match within 1e-4
in float32, through prefill and cached decode, alone and in a ragged batch.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import ModelFormatError, UnsupportedArchitecture
from tunelab.model.config import ModelConfig
from tunelab.weights.loader import load_weights

TOLERANCE = dict(atol=1e-4, rtol=0)


def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits [T, vocab] for one sequence, no cache."""
    with torch.no_grad():
        return hf_model(ids[None]).logits[0].float()


def test_prefill_and_cached_decode_match_transformers(hf_case, cached_run):
    path, hf_model = hf_case
    config, model = load_weights(path)
    ids = torch.randint(0, config.vocab_size, (48,), generator=torch.Generator().manual_seed(0))
    expected = hf_logits(hf_model, ids)
    run = cached_run(model, [list(range(12))])
    torch.testing.assert_close(run.step({0: ids[:32]})[0], expected[:32], **TOLERANCE)
    for t in range(32, 48):
        torch.testing.assert_close(run.step({0: ids[t:t + 1]})[0], expected[t:t + 1], **TOLERANCE)


def test_ragged_batch_of_two_sequences_matches_each_alone(hf_case, cached_run):
    path, hf_model = hf_case
    config, model = load_weights(path)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, config.vocab_size, (24,), generator=gen), torch.randint(0, config.vocab_size, (17,), generator=gen)]
    expected = [hf_logits(hf_model, s) for s in seqs]
    run = cached_run(model, [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]])
    # Both prefill; then one decodes while the other prefills a second chunk; then both decode.
    schedule = [{0: (0, 20), 1: (0, 9)}, {0: (20, 21), 1: (9, 14)}] + [{0: (t, t + 1), 1: (t - 7, t - 6)} for t in range(21, 24)]
    for step in schedule:
        logits = run.step({s: seqs[s][a:b] for s, (a, b) in step.items()})
        for s, (a, b) in step.items():
            torch.testing.assert_close(logits[s], expected[s][a:b], **TOLERANCE)


def test_tied_model_uses_the_embedding_as_lm_head(build_hf_model):
    _, model = load_weights(build_hf_model("qwen3_tied")[0])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "cpu"


def test_both_rope_spellings_of_config_json_read_alike(build_hf_model):
    path, _ = build_hf_model("qwen3_untied_yarn_sharded")
    released = json.loads((path / "config.json").read_text())
    assert "rope_scaling" in released and "rope_parameters" not in released
    current = {k: v for k, v in released.items() if k not in ("rope_theta", "rope_scaling")}
    current["rope_parameters"] = released["rope_scaling"] | {"rope_theta": released["rope_theta"]}
    config = ModelConfig.from_hf_config(released)
    assert config == ModelConfig.from_hf_config(current)
    assert config.rope_theta == 1e6
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def test_config_reads_moe_fields_and_eos_list(build_hf_model):
    raw = json.loads((build_hf_model("qwen3_moe_sparse_step_2")[0] / "config.json").read_text())
    config = ModelConfig.from_hf_config(raw)
    released = {k: v for k, v in raw.items() if k != "num_local_experts"} | {"num_experts": raw["num_local_experts"]}
    assert ModelConfig.from_hf_config(released) == config  # transformers 5 and released spellings
    assert (config.family, config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == ("qwen3_moe", 4, 2, False)
    assert [config.is_moe_layer(i) for i in range(3)] == [False, True, False]
    assert config.eos_token_ids == (2, 3) and config.bos_token_id == 1


@pytest.mark.parametrize("field", ["norm_topk_prob", "rms_norm_eps", "head_dim"])
def test_missing_config_field_is_named_not_defaulted(build_hf_model, field):
    raw = json.loads((build_hf_model("qwen3_moe_topk_renormalised")[0] / "config.json").read_text())
    del raw[field]
    with pytest.raises(ModelFormatError, match=field):
        ModelConfig.from_hf_config(raw)


def test_unknown_family_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture, match="llama, qwen2, qwen3, qwen3_moe"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})


def test_gguf_architecture_alias_resolves_to_our_family(build_hf_model):
    raw = json.loads((build_hf_model("qwen3_moe_topk_renormalised")[0] / "config.json").read_text())
    assert ModelConfig.from_hf_config(raw | {"model_type": "qwen3moe"}).family == "qwen3_moe"


def _copy_with_tensors(src, dst, edit) -> None:
    """Copy an unsharded checkpoint, passing its tensor dict through `edit`."""
    shutil.copytree(src, dst)
    save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors")


def test_missing_tensor_is_named(build_hf_model, tmp_path):
    src, _ = build_hf_model("qwen2_tied")
    _copy_with_tensors(src, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.k_proj.bias"})
    with pytest.raises(ModelFormatError, match=r"lacks tensor model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_weights(tmp_path / "m")


def test_misshaped_tensor_is_named(build_hf_model, tmp_path):
    src, _ = build_hf_model("qwen2_tied")
    _copy_with_tensors(src, tmp_path / "m", lambda t: t | {"model.norm.weight": torch.ones(31)})
    with pytest.raises(ModelFormatError, match=r"model\.norm\.weight of shape \(31,\).*needs \(32,\)"):
        load_weights(tmp_path / "m")


def test_unexpected_tensor_is_named(build_hf_model, tmp_path):
    src, _ = build_hf_model("qwen2_tied")
    _copy_with_tensors(src, tmp_path / "m", lambda t: t | {"model.layers.0.self_attn.o_proj.bias": torch.zeros(32)})
    with pytest.raises(ModelFormatError, match=r"o_proj\.bias, which a qwen2 model"):
        load_weights(tmp_path / "m")


def test_tied_checkpoint_may_store_lm_head_and_untied_one_must(build_hf_model, tmp_path):
    src, _ = build_hf_model("qwen2_tied")
    _copy_with_tensors(src, tmp_path / "tied", lambda t: t | {"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])})
    _, model = load_weights(tmp_path / "tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.abs().sum() > 0
    untied = tmp_path / "untied"
    shutil.copytree(src, untied)
    config = json.loads((untied / "config.json").read_text()) | {"tie_word_embeddings": False}
    (untied / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=r"lacks tensor lm_head\.weight"):
        load_weights(untied)


def test_config_without_tie_flag_is_tied_when_checkpoint_has_no_lm_head(build_hf_model, tmp_path):
    src, _ = build_hf_model("qwen2_tied")
    shutil.copytree(src, tmp_path / "m")
    config = json.loads((src / "config.json").read_text())
    del config["tie_word_embeddings"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert load_weights(tmp_path / "m")[0].tie_word_embeddings
