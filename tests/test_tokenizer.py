"""Tokenizer: ids equal transformers' on both real GGUF models, round-trips, HF directories, errors."""

import json
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.errors import ModelFormatError, ModelNotFound
from tunelab.tokenizer import GGUF_PRE_TOKENIZERS, Tokenizer
from tunelab.weights.gguf_file import GGUFFile
from real_models import real_model_path

SMOLLM = "smollm2:135m"
QWEN = "qwen2.5-coder:0.5b"

MIXED_TEXT = (
    "def mean(xs: list[float]) -> float:\n"
    "\t\"\"\"Média aritmética.\"\"\"\n"
    "        return sum(xs) / len(xs)  # 12345 + 0.5e-3\r\n"
    "\n\n\n"
    "Ação, coração, pão — naïve café ÇÃO\n"
    "你好，世界！我们今天写代码。\n"
    "emoji 👍🏽 👨‍👩‍👧‍👦 🇧🇷🇵🇹 ❤️   \t  trailing   \n"
    "<|im_start|>user\nWrite hello world in C.<|im_end|>\n<|im_start|>assistant\n"
    "I'll do it; it's 100% done.\u00a0done"
)


@pytest.fixture(scope="module", params=[SMOLLM, QWEN])
def pair(request):
    """(our tokenizer from GGUF metadata, transformers' tokenizer from the same GGUF, file name)."""
    from transformers import AutoTokenizer

    ours = Tokenizer.from_gguf_metadata(GGUFFile(real_model_path(request.param)).metadata)
    theirs = AutoTokenizer.from_pretrained(str(real_model_path(request.param).parent), gguf_file=real_model_path(request.param).name)
    return ours, theirs, request.param


@pytest.fixture(scope="module")
def smollm_metadata():
    return GGUFFile(real_model_path(SMOLLM)).metadata


def test_ids_equal_transformers_on_mixed_text(pair):
    ours, theirs, _ = pair
    assert ours.encode(MIXED_TEXT) == theirs.encode(MIXED_TEXT, add_special_tokens=False)


def test_decode_of_encode_is_the_text_exactly(pair):
    ours, theirs, _ = pair
    ids = ours.encode(MIXED_TEXT)
    assert ours.decode(ids) == MIXED_TEXT
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_token_bytes_concatenate_to_the_utf8_of_the_text(pair):
    ours, _, _ = pair
    ids = ours.encode(MIXED_TEXT)
    assert b"".join(ours.token_bytes(i) for i in ids) == MIXED_TEXT.encode("utf-8")


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60))
def test_ids_equal_transformers_on_random_text(pair, text):
    ours, theirs, _ = pair
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    if set(text.encode("utf-8")) <= _spellable_bytes(ours):  # SmolLM2 has no token for byte 0xF1, for one
        assert ours.decode(ids) == text


@cache
def _spellable_bytes(tokenizer):
    """The bytes that some single token stands for; text made of others cannot round-trip."""
    single = (tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size))
    return {spelling[0] for spelling in single if len(spelling) == 1}


def test_chat_tokens_in_text_are_single_special_ids(pair):
    ours, _, name = pair
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == ours.token_to_id("<|im_start|>") and ids[-1] == ours.token_to_id("<|im_end|>")
    assert {ids[0], ids[-1]} <= ours.special_token_ids
    assert ours.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert ours.token_bytes(ids[-1]) == b"<|im_end|>"


def test_qwen_tool_call_tokens_are_whole_but_survive_skip_special_tokens(pair):
    ours, _, name = pair
    if name != QWEN:
        pytest.skip("Qwen vocabulary only")
    ids = ours.encode('<tool_call>\n{"name": "f"}\n</tool_call><|im_end|>')
    assert ids[0] == 151657 and ids[-2:] == [151658, 151645]
    assert ours.decode(ids, skip_special_tokens=True) == '<tool_call>\n{"name": "f"}\n</tool_call>'


def test_special_token_facts_match_the_model_cards(pair):
    ours, _, name = pair
    expected = {
        SMOLLM: dict(bos_token_id=1, bos_token="<|im_start|>", eos_token_id=2, eos_token="<|im_end|>",
                     stop_token_ids={0, 2}, vocab_size=49152),
        QWEN: dict(bos_token_id=151643, bos_token="<|endoftext|>", eos_token_id=151645, eos_token="<|im_end|>",
                   stop_token_ids={151643, 151645}, vocab_size=151936),
    }[name]
    assert {key: getattr(ours, key) for key in expected} == expected
    assert ours.chat_template is not None and "<|im_start|>" in ours.chat_template


def test_no_bos_by_default_and_never_twice(smollm_metadata):
    tokenizer = Tokenizer.from_gguf_metadata(smollm_metadata)
    hello = tokenizer.encode("hello")
    assert tokenizer.encode("hello", add_bos=True) == [1, *hello]
    assert tokenizer.encode("<|im_start|>hello", add_bos=True) == [1, *hello]
    with_bos_default = Tokenizer.from_gguf_metadata({**smollm_metadata, "tokenizer.ggml.add_bos_token": True})
    assert with_bos_default.encode("hello") == [1, *hello]
    assert with_bos_default.encode("hello", add_bos=False) == hello


@pytest.mark.parametrize("pre_name", sorted(GGUF_PRE_TOKENIZERS))
def test_every_pre_tokenizer_round_trips_mixed_text(smollm_metadata, pre_name):
    tokenizer = Tokenizer.from_gguf_metadata({**smollm_metadata, "tokenizer.ggml.pre": pre_name})
    assert tokenizer.decode(tokenizer.encode(MIXED_TEXT)) == MIXED_TEXT


@pytest.mark.parametrize("pre_name, pieces", [
    ("qwen2", ["1", "2", "3", "4", "5", "Ġapples"]),
    ("smollm", ["1", "2", "3", "4", "5", "Ġapples"]),
    ("llama-bpe", ["123", "45", "Ġapples"]),
    ("gpt-2", ["12345", "Ġapples"]),
])
def test_pre_tokenizer_splits_numbers_like_the_model_was_trained(smollm_metadata, pre_name, pieces):
    tokenizer = Tokenizer.from_gguf_metadata({**smollm_metadata, "tokenizer.ggml.pre": pre_name})
    assert [piece for piece, _ in tokenizer.backend.pre_tokenizer.pre_tokenize_str("12345 apples")] == pieces


def test_hf_directory_gives_the_same_ids_as_the_gguf(pair, tmp_path):
    ours, theirs, _ = pair
    theirs.save_pretrained(tmp_path)
    from_dir = Tokenizer.from_hf_dir(tmp_path)
    assert from_dir.encode(MIXED_TEXT) == ours.encode(MIXED_TEXT)
    assert from_dir.decode(from_dir.encode(MIXED_TEXT)) == MIXED_TEXT
    assert (from_dir.eos_token_id, from_dir.bos_token_id) == (ours.eos_token_id, ours.bos_token_id)
    assert from_dir.stop_token_ids == ours.stop_token_ids
    assert from_dir.chat_template == ours.chat_template
    assert Tokenizer.load(tmp_path).encode(MIXED_TEXT) == ours.encode(MIXED_TEXT)


def test_hf_directory_post_processor_bos_is_the_default(smollm_metadata, tmp_path):
    # A Llama 3 style directory: no add_bos_token flag, the tokenizer.json template adds BOS.
    from tokenizers import processors

    tokenizer = Tokenizer.from_gguf_metadata(smollm_metadata)
    tokenizer.backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>",
         "chat_template": [{"name": "default", "template": "{{ bos_token }}"}]}))
    from_dir = Tokenizer.from_hf_dir(tmp_path)
    assert from_dir.encode("hi") == [1, *tokenizer.encode("hi")]
    assert from_dir.chat_template == "{{ bos_token }}"


def test_load_reads_a_gguf_file():
    tokenizer = Tokenizer.load(real_model_path(SMOLLM))
    assert tokenizer.decode(tokenizer.encode(MIXED_TEXT)) == MIXED_TEXT


def test_sentencepiece_gguf_is_refused_by_name(smollm_metadata):
    with pytest.raises(ModelFormatError, match="'llama'"):
        Tokenizer.from_gguf_metadata({**smollm_metadata, "tokenizer.ggml.model": "llama"})


def test_unknown_pre_tokenizer_is_refused_by_name(smollm_metadata):
    with pytest.raises(ModelFormatError, match="'mystery-bpe'.*qwen2"):
        Tokenizer.from_gguf_metadata({**smollm_metadata, "tokenizer.ggml.pre": "mystery-bpe"})


def test_bad_paths_raise_typed_errors(tmp_path):
    with pytest.raises(ModelNotFound, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelFormatError, match="notes.txt is not a GGUF"):
        Tokenizer.load(tmp_path / "notes.txt")
    with pytest.raises(ModelFormatError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_non_byte_level_tokenizer_json_is_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models

    wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ModelFormatError, match="not a byte-level BPE tokenizer"):
        Tokenizer.from_hf_dir(tmp_path)
