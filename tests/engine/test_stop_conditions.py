from tunelab.engine.stop_conditions import StopStringMatcher


def feed_all(matcher, pieces):
    shown, stopped = "", False
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        shown += text
        if stopped:
            return shown, True
    return shown + matcher.flush(), False


def test_stop_string_split_across_tokens_is_never_shown():
    shown, stopped = feed_all(StopStringMatcher(("</answer>",)), ["The result", " is 4</ans", "wer> trailing"])
    assert stopped and shown == "The result is 4"


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("abc ST") == ("abc ", False)
    assert matcher.feed("ART") == ("START", False)


def test_earliest_of_several_stop_strings_wins():
    shown, stopped = feed_all(StopStringMatcher(("\n\n", "###")), ["one ### two\n\nthree"])
    assert stopped and shown == "one "


def test_without_stop_strings_text_passes_through():
    matcher = StopStringMatcher(())
    assert matcher.feed("anything") == ("anything", False)


def test_held_back_prefix_is_flushed_at_the_end():
    shown, stopped = feed_all(StopStringMatcher(("<|end|>",)), ["done <|e"])
    assert not stopped and shown == "done <|e"
