"""IncrementalDetokenizer: streamed deltas equal the full decode byte for byte and never split a character."""


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.detokenizer import IncrementalDetokenizer
from tunelab.tokenizer import Tokenizer
from tunelab.weights.gguf_file import GGUFFile
from real_models import real_model_path

SMOLLM = "smollm2:135m"
QWEN = "qwen2.5-coder:0.5b"

MIXED_TEXT = (
    "def mean(xs):\n\treturn sum(xs) / len(xs)  # 12345\r\n\n\n"
    "Ação, coração, pão — naïve\n"
    "你好，世界！我们今天写代码。\n"
    "emoji 👍🏽 👨‍👩‍👧‍👦 🇧🇷🇵🇹 ❤️   \t  \n"
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module", params=[SMOLLM, QWEN])
def tokenizer(request):
    return Tokenizer.from_gguf_metadata(GGUFFile(real_model_path(request.param)).metadata)


def _stream(tokenizer, ids, skip_special_tokens=False):
    """Deltas from feeding `ids` one at a time, then the flush, and the detokenizer itself."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detokenizer.add(i) for i in ids]
    return [*deltas, detokenizer.flush()], detokenizer


def test_streamed_mixed_text_equals_full_decode_byte_exact(tokenizer):
    ids = tokenizer.encode(MIXED_TEXT)
    deltas, detokenizer = _stream(tokenizer, ids)
    assert "".join(deltas).encode("utf-8") == tokenizer.decode(ids).encode("utf-8") == MIXED_TEXT.encode("utf-8")
    assert detokenizer.text == MIXED_TEXT
    assert not any("\ufffd" in delta for delta in deltas)


def test_multi_token_characters_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("🇧🇷👨‍👩‍👧‍👦")
    deltas, _ = _stream(tokenizer, ids)
    assert "" in deltas[:-1]  # some token ended mid-character and emitted nothing
    assert all(delta.encode("utf-8") == b"".join(tokenizer.token_bytes(i) for i in group)
               for delta, group in _groups_by_delta(ids, deltas) if delta)


def _groups_by_delta(ids, deltas):
    """Pair each non-empty delta with the ids fed since the previous non-empty one."""
    pending = []
    for token_id, delta in zip(ids, deltas):
        pending.append(token_id)
        if delta:
            yield delta, pending
            pending = []


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_characters="\ufffd", exclude_categories=["Cs"]), max_size=50))
def test_streamed_random_text_is_the_text(tokenizer, text):
    ids = tokenizer.encode(text)
    deltas, _ = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    if "\ufffd" not in tokenizer.decode(ids):  # bytes the vocabulary cannot spell are dropped by BPE
        assert not any("\ufffd" in delta for delta in deltas)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_streamed_arbitrary_ids_equal_full_decode(tokenizer, data):
    # Sampled ids split characters anywhere and in any order: invalid bytes must turn into
    # U+FFFD exactly where the whole-sequence decode puts them.
    single_bytes = [i for i in range(512) if len(tokenizer.token_bytes(i)) == 1]
    some_id = st.one_of(st.sampled_from(single_bytes), st.sampled_from(sorted(tokenizer.special_token_ids)),
                        st.integers(0, tokenizer.vocab_size - 1))
    ids = data.draw(st.lists(some_id, max_size=24))
    for skip in (False, True):
        deltas, _ = _stream(tokenizer, ids, skip_special_tokens=skip)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_sequence_ending_mid_character_flushes_replacement(tokenizer):
    first_two_bytes = [_byte_token(tokenizer, b) for b in "中".encode("utf-8")[:2]]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.add(i) for i in first_two_bytes] == ["", ""]
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.text == tokenizer.decode(first_two_bytes) == "\ufffd"


def test_broken_character_followed_by_text_is_replaced_at_once(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.add(_byte_token(tokenizer, 0xE4)) == ""
    assert detokenizer.add(_byte_token(tokenizer, ord("a"))) == "\ufffda"
    assert detokenizer.flush() == ""


def test_skip_special_tokens_drops_control_tokens_only(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\n<tool_call>hi<|im_end|>")
    _, detokenizer = _stream(tokenizer, ids, skip_special_tokens=True)
    assert detokenizer.text == "user\n<tool_call>hi" == tokenizer.decode(ids, skip_special_tokens=True)


def _byte_token(tokenizer, byte):
    """The id of the token that stands for exactly one byte."""
    return next(i for i in range(512) if tokenizer.token_bytes(i) == bytes([byte]))
