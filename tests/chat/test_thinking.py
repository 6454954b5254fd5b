"""Thinking: soft-switch resolution and the thinking budget driven by a scripted token source."""

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from tunelab.chat.output_parser import parse_output
from tunelab.chat.thinking import EARLY_STOP_TEXT, ThinkingBudget, resolve_thinking, soft_switch
from tunelab.errors import InvalidOption
from tunelab.tokenizer import Tokenizer


def user(text):
    return {"role": "user", "content": text}


@pytest.mark.parametrize("messages, expected", [
    ([user("Hi")], None),
    ([user("Why? /no_think")], False),
    ([user("Why? /no_think"), {"role": "assistant", "content": "A"}, user("Really? /think")], True),
    ([user("/think first"), {"role": "assistant", "content": "A"}, user("no switch here")], True),
    ([user("/think then /no_think in one message")], False),
    ([{"role": "system", "content": "Never think. /no_think"}, user("Hi")], False),
    ([user("Q /no_think"), {"role": "assistant", "content": "/think"}, {"role": "tool", "content": "/think"}], False),
    ([user("read src/think/x.py and /thinking or a//no_think")], None),
    ([user([{"type": "text", "text": "Explain."}, {"type": "text", "text": "/no_think"}])], False),
])
def test_latest_soft_switch_in_user_or_system_messages_wins(messages, expected):
    assert soft_switch(messages) is expected


@pytest.mark.parametrize("think, text, expected", [
    (None, "Hi", True),  # Qwen3 thinks by default
    (None, "Hi /no_think", False),
    (True, "Hi", True),
    (True, "Hi /no_think", False),  # with thinking allowed, the latest soft switch decides, as in Qwen3
    (False, "Hi /think", False),  # enable_thinking=False is the hard switch
])
def test_explicit_think_and_soft_switches_resolve_to_one_decision(think, text, expected):
    assert resolve_thinking(think, [user(text)]) is expected


def test_template_without_thinking_switch():
    assert resolve_thinking(None, [user("Hi /think")], supports_thinking=False) is None
    assert resolve_thinking(False, [user("Hi")], supports_thinking=False) is None
    with pytest.raises(InvalidOption, match="no thinking switch"):
        resolve_thinking(True, [user("Hi")], supports_thinking=False)


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """A real byte-level tokenizer (one token per byte) with Qwen3's thinking and turn tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return Tokenizer(backend, bos_token=None, eos_token="<|im_end|>", add_bos=False, chat_template=None)


class NeverEndingThinker:
    """Scripted model: opens a thought and never closes it; once `</think>` is in its context
    (put there by someone else), it writes "\n\n", its answer and the end of the turn."""

    def __init__(self, tok: Tokenizer, starts_in_thinking: bool):
        self.close = tok.token_to_id("</think>")
        self.opener = [] if starts_in_thinking else [tok.token_to_id("<think>")]
        self.thought = tok.encode("I should check this once more. ")
        self.after_close = tok.encode("\n\nThe answer is 4.") + [tok.token_to_id("<|im_end|>")]

    def next_token(self, generated: list[int]) -> int:
        if self.close in generated:
            return self.after_close[len(generated) - generated.index(self.close) - 1]
        if len(generated) < len(self.opener):
            return self.opener[len(generated)]
        return self.thought[(len(generated) - len(self.opener)) % len(self.thought)]


def generate(tok: Tokenizer, budget: ThinkingBudget | None, starts_in_thinking: bool, max_tokens: int = 400):
    """The engine's sampling step for one sequence: forced ids replace sampled ones, one per step."""
    model = NeverEndingThinker(tok, starts_in_thinking)
    generated, forced = [], []
    end = tok.token_to_id("<|im_end|>")
    while len(generated) < max_tokens and (not generated or generated[-1] != end):
        token = model.next_token(generated)
        if forced:
            token = forced.pop(0)
        elif budget is not None:
            forced = budget.step(token)
            if forced:
                token = forced.pop(0)
        generated.append(token)
    return generated


@pytest.mark.parametrize("starts_in_thinking", [False, True])
def test_budget_of_50_closes_a_never_ending_thought_and_the_answer_arrives(byte_tokenizer, starts_in_thinking):
    tok = byte_tokenizer
    closing = tok.encode(EARLY_STOP_TEXT)
    generated = generate(tok, ThinkingBudget(tok, 50, starts_in_thinking), starts_in_thinking)
    start = 0 if starts_in_thinking else 1
    if not starts_in_thinking:
        assert generated[0] == tok.token_to_id("<think>")
    thinking_tokens = generated[start:start + 50]
    assert tok.decode(thinking_tokens) == ("I should check this once more. " * 2)[:50]
    assert generated[start + 50:start + 50 + len(closing)] == closing
    answer = generated[start + 50 + len(closing):]
    assert tok.decode(answer, skip_special_tokens=True) == "The answer is 4."
    assert answer[-1] == tok.token_to_id("<|im_end|>")

    reply = parse_output(tok.decode(generated[:-1]), starts_in_thinking)
    assert not reply.thinking_unclosed
    assert reply.content == "The answer is 4."
    assert reply.thinking.endswith("based on the thinking directly now.")


def test_without_a_budget_the_thought_never_ends(byte_tokenizer):
    generated = generate(byte_tokenizer, None, False, max_tokens=200)
    assert byte_tokenizer.token_to_id("</think>") not in generated
    assert parse_output(byte_tokenizer.decode(generated)).thinking_unclosed


def test_budget_counts_only_thinking_tokens_and_goes_inert(byte_tokenizer):
    tok = byte_tokenizer
    think, close = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    budget = ThinkingBudget(tok, 2, starts_in_thinking=False)
    assert [budget.step(t) for t in tok.encode("pre")] == [[], [], []]  # before the thought: not counted
    assert budget.step(think) == [] and budget.step(7) == [] and budget.step(8) == []
    assert budget.num_thinking_tokens == 2 and not budget.is_done
    assert budget.step(9) == tok.encode(EARLY_STOP_TEXT)
    assert budget.is_done and budget.step(9) == [] and budget.step(think) == []

    natural = ThinkingBudget(tok, 2, starts_in_thinking=True)
    assert natural.step(7) == [] and natural.step(close) == []  # the model closed it itself
    assert natural.is_done and natural.step(8) == [] and natural.step(9) == []


def test_budget_zero_replaces_the_first_thinking_token(byte_tokenizer):
    budget = ThinkingBudget(byte_tokenizer, 0, starts_in_thinking=True)
    assert budget.step(7) == byte_tokenizer.encode(EARLY_STOP_TEXT)


def test_budget_needs_think_tokens(byte_tokenizer):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    plain = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    no_think = Tokenizer(plain, bos_token=None, eos_token=None, add_bos=False, chat_template=None)
    with pytest.raises(InvalidOption, match="no <think> and </think> tokens"):
        ThinkingBudget(no_think, 10, starts_in_thinking=False)
    with pytest.raises(InvalidOption, match="negative"):
        ThinkingBudget(byte_tokenizer, -1, starts_in_thinking=False)
