"""OutputParser / parse_output: hand-checked splits of recorded Qwen3 replies, and the same
result however the reply is cut into stream deltas."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.chat.output_parser import ContentDelta, OutputParser, ParsedOutput, ThinkingDelta, parse_output
from tunelab.chat.tool_calls import ToolCall, parse_tool_call

WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

# name -> (reply text, starts_in_thinking, expected split). Replies are shaped like Qwen3's.
RECORDED = {
    "thinking_then_answer": (
        "<think>\nThe user asks 2+2.\n\nThat is 4.\n</think>\n\nThe answer is **4**.", False,
        ParsedOutput("The user asks 2+2.\n\nThat is 4.", "The answer is **4**.")),
    "soft_no_think_empty_thought": (
        "<think>\n\n</think>\n\nHello! How can I help?", False,
        ParsedOutput("", "Hello! How can I help?")),
    "no_tags_at_all": (
        "Sure:\n```python\nprint('<b>' if x < 3 else '</t>')\n```", False,
        ParsedOutput("", "Sure:\n```python\nprint('<b>' if x < 3 else '</t>')\n```")),
    "one_tool_call_after_thought": (
        "<think>\nI need the weather.\n</think>\n\n" + WEATHER_CALL, False,
        ParsedOutput("I need the weather.", "", [ToolCall("get_weather", {"city": "Paris"})])),
    "text_and_three_tool_calls": (
        "<think>\nThree lookups.\n</think>\n\nLet me check.\n" + WEATHER_CALL + "\n"
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"q": "<think> tag", "n": [1, 2]}}\n</tool_call>', False,
        ParsedOutput("Three lookups.", "Let me check.", [
            ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_time", {"tz": "CET"}),
            ToolCall("search", {"q": "<think> tag", "n": [1, 2]})])),
    "truncated_inside_thought": (
        "<think>\nPrimes: 2, 3, 5, 7\n", False,
        ParsedOutput("Primes: 2, 3, 5, 7", "", thinking_unclosed=True)),
    "prompt_opened_thought_lone_close": (
        "okay, so\nthe answer is 4.\n</think>\n\n4", True,
        ParsedOutput("okay, so\nthe answer is 4.", "4")),
    "prompt_opened_thought_model_repeats_open": (
        "\n<think>\nhmm\n</think>\n\nDone. <think> stays text", True,
        ParsedOutput("hmm", "Done. <think> stays text")),
    "prompt_opened_thought_truncated": (
        "still thinking </thi", True,
        ParsedOutput("still thinking </thi", "", thinking_unclosed=True)),
    "text_before_think": (
        "Hmm.\n<think>\nreally think\n</think>\n\nAnswer.", False,
        ParsedOutput("really think", "Hmm.\n\nAnswer.")),
    "malformed_call_kept_as_text": (
        "<think>\nx\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {oops}}\n</tool_call>\n" + WEATHER_CALL,
        False,
        ParsedOutput("x", '<tool_call>\n{"name": "f", "arguments": {oops}}\n</tool_call>',
                     [ToolCall("get_weather", {"city": "Paris"})])),
    "truncated_inside_call_json": (
        "<think>\nx\n</think>\n\nOK.\n<tool_call>\n{\"name\": \"get_weather\", \"argu", False,
        ParsedOutput("x", 'OK.<tool_call>\n{"name": "get_weather", "argu')),
    "complete_call_missing_close_tag": (
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n', False,
        ParsedOutput("", "", [ToolCall("get_time", {})])),
    "text_after_calls_and_literal_tags": (
        WEATHER_CALL + "\nDone </tool_call> and </think> are text.", False,
        ParsedOutput("", "Done </tool_call> and </think> are text.", [ToolCall("get_weather", {"city": "Paris"})])),
    # What qwen2.5-coder 0.5B really answers when given a tool: the call without its tags.
    "bare_call_without_tags": (
        '{"name": "get_current_weather", "arguments": {"city": "Paris", "unit": "celsius"}}', False,
        ParsedOutput("", "", [ToolCall("get_current_weather", {"city": "Paris", "unit": "celsius"})])),
    "bare_call_in_json_fence_after_thought": (
        '<think>\nweather tool\n</think>\n\n```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        False, ParsedOutput("weather tool", "", [ToolCall("get_weather", {"city": "Paris"})])),
    "json_answer_that_is_not_a_call": (
        '{"name": "Ada", "born": 1815}', False, ParsedOutput("", '{"name": "Ada", "born": 1815}')),
    "code_fence_answer_is_not_held": (
        "```python\nprint({'name': 1})\n```", False, ParsedOutput("", "```python\nprint({'name': 1})\n```")),
}


def stream(text: str, cuts: list[int], starts_in_thinking: bool, parse_tools: bool = True):
    """Feed `text` cut at `cuts`; return the events and the parser."""
    parser = OutputParser(starts_in_thinking=starts_in_thinking, parse_tools=parse_tools)
    bounds = [0, *sorted(set(cuts)), len(text)]
    events = [e for a, b in zip(bounds, bounds[1:]) for e in parser.feed(text[a:b])]
    return events + parser.finish(), parser


def collect(events, parser) -> ParsedOutput:
    return ParsedOutput(
        thinking="".join(e.text for e in events if isinstance(e, ThinkingDelta)),
        content="".join(e.text for e in events if isinstance(e, ContentDelta)),
        tool_calls=[e for e in events if isinstance(e, ToolCall)],
        thinking_unclosed=parser.thinking_unclosed)


@pytest.mark.parametrize("name", RECORDED)
def test_recorded_reply_splits_as_expected(name):
    text, starts_in_thinking, expected = RECORDED[name]
    assert parse_output(text, starts_in_thinking) == expected
    assert collect(*stream(text, [], starts_in_thinking)) == expected


@pytest.mark.parametrize("name", RECORDED)
def test_one_character_deltas_give_the_whole_text_result(name):
    text, starts_in_thinking, expected = RECORDED[name]
    assert collect(*stream(text, list(range(len(text))), starts_in_thinking)) == expected


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(RECORDED)), data=st.data(), parse_tools=st.booleans())
def test_any_split_of_a_recorded_reply_streams_to_the_non_streamed_result(name, data, parse_tools):
    text, starts_in_thinking, _ = RECORDED[name]
    truncate_at = data.draw(st.integers(0, len(text)), label="truncate_at")  # replies get cut off anywhere
    text = text[:truncate_at]
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12), label="cuts")
    events, parser = stream(text, cuts, starts_in_thinking, parse_tools)
    assert collect(events, parser) == parse_output(text, starts_in_thinking, parse_tools)


def test_events_keep_order_thinking_then_text_then_calls():
    text, _, _ = RECORDED["text_and_three_tool_calls"]
    events, _ = stream(text, [], False)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ThinkingDelta", "ContentDelta", "ToolCall", "ToolCall", "ToolCall"]


def test_only_a_possible_tag_start_is_held_back():
    parser = OutputParser()
    assert parser.feed("a < b <") == [ContentDelta("a < b ")]
    assert parser.feed("b>") == [ContentDelta("<b>")]
    assert parser.feed("x <tool_") == [ContentDelta("x ")]
    assert parser.feed("cal") == []
    assert parser.feed("l>{\"name\": \"f\"}</tool_call>") == [ToolCall("f", {})]
    thinking = OutputParser(starts_in_thinking=True)
    assert thinking.feed("step 1</th") == [ThinkingDelta("step 1")]
    assert thinking.feed("ink>\n\nok") == [ContentDelta("ok")]


def test_thinking_newlines_are_held_until_more_thought_follows():
    parser = OutputParser()
    assert parser.feed("<think>\nline one\n") == [ThinkingDelta("line one")]
    assert parser.feed("\nline two\n") == [ThinkingDelta("\n\nline two")]
    assert parser.feed("</think>\n\n") == []
    assert parser.finish() == []
    assert not parser.thinking_unclosed


def test_finish_reports_unclosed_thought():
    parser = OutputParser()
    parser.feed("<think>\nnever closed")
    assert parser.finish() == []
    assert parser.thinking_unclosed


def test_an_answer_that_may_be_a_bare_call_is_held_until_it_is_decided():
    parser = OutputParser(parse_tools=True)
    assert parser.feed('{"name": "f", "argu') == []
    assert parser.finish() == [ContentDelta('{"name": "f", "argu')]  # cut off: not a call after all
    parser = OutputParser(parse_tools=True)
    assert parser.feed("```py") == [ContentDelta("```py")]  # cannot become ```json: shown at once
    assert OutputParser(parse_tools=False).feed('{"name": "f", "arguments": {}}') != []


def test_parse_tools_off_keeps_calls_as_text():
    text = "<think>\nx\n</think>\n\n" + WEATHER_CALL
    assert parse_output(text, parse_tools=False) == ParsedOutput("x", WEATHER_CALL)


def test_malformed_call_is_logged_with_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="tunelab.chat.tool_calls"):
        result = parse_output('<tool_call>\n{"arguments": {}}\n</tool_call>')
    assert result.content == '<tool_call>\n{"arguments": {}}\n</tool_call>' and not result.tool_calls
    assert 'no "name" string' in caplog.text


@pytest.mark.parametrize("body, reason", [
    ("{not json}", "not valid JSON"),
    ('["get_time"]', "a JSON list"),
    ('{"name": ""}', 'no "name" string'),
    ('{"name": "f", "arguments": "{bad"}', "string that is not valid JSON"),
    ('{"name": "f", "arguments": [1]}', "a JSON list, not an object"),
])
def test_malformed_tool_call_bodies_are_rejected(body, reason, caplog):
    with caplog.at_level(logging.WARNING, logger="tunelab.chat.tool_calls"):
        assert parse_tool_call(body) is None
    assert reason in caplog.text


def test_tool_call_arguments_forms_and_ids():
    a = parse_tool_call('{"name": "f", "arguments": {"x": 1}}')
    b = parse_tool_call('{"name": "f", "arguments": "{\\"x\\": 1}"}')
    assert a == b == ToolCall("f", {"x": 1})
    assert parse_tool_call('{"name": "f", "parameters": {"y": 2}}').arguments == {"y": 2}
    assert parse_tool_call('{"name": "f", "arguments": null}').arguments == {}
    assert a.id.startswith("call_") and len(a.id) == len("call_") + 24 and a.id != b.id
