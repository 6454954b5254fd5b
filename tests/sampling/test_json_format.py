"""JSON mode: the recogniser accepts exactly the prefixes of JSON objects, and the engine obeys it."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.sampling.json_format import JsonConstraint, JsonPrefix

RECOGNISER = JsonPrefix()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5), st.sampled_from([None, 2]))
def test_every_prefix_of_a_serialised_object_is_accepted_and_the_whole_completes(obj, indent):
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    state = JsonPrefix.START
    for i, ch in enumerate(text):
        state = RECOGNISER.feed(state, ch)
        assert state is not None, f"rejected at {i}: {text[:i + 1]!r}"
        assert JsonPrefix.is_complete(state) == (i == len(text) - 1)


@pytest.mark.parametrize("text", [
    "[1, 2]",  # the reply is an object
    '"x"', "1", '{"a" 1}', '{"a": 1,}', '{"a": 01}', '{"a": 1.}', '{"a": tru}', '{"a": "x\\q"}',
    '{"a": "line\nbreak"}', '{"a": [1 2]}', '{"a": 1}}', '{} {}', '{"a": -}', "{'a': 1}", '{"a": 1e}',
])
def test_texts_that_are_not_json_objects_are_rejected(text):
    state = RECOGNISER.feed(JsonPrefix.START, text)
    assert state is None or not JsonPrefix.is_complete(state) and RECOGNISER.feed(state, "}") is None


def test_whitespace_after_the_object_is_allowed_and_anything_else_is_not():
    done = RECOGNISER.feed(JsonPrefix.START, ' {"a": [true, null, -1.5e+3, "\\u00e9"]}')
    assert JsonPrefix.is_complete(done)
    assert RECOGNISER.feed(done, " \n") is not None and RECOGNISER.feed(done, "x") is None


def test_constraint_keeps_only_candidates_that_continue_the_json():
    texts = ["{", "}", '"', "hello", ' {"', "a", ":", "1", "<|im_end|>", ""]
    constraint = JsonConstraint(texts, max_candidates=4)
    logits = torch.tensor([0.0, 5.0, 1.0, 9.0, 2.0, 0.5, 0.1, 3.0, 8.0, 7.0])
    masked = constraint.mask(logits)
    # "hello", "}", '"', "1", "<|im_end|>" and "" cannot start a JSON object; "{" and ' {"' can.
    assert torch.isfinite(masked).nonzero().flatten().tolist() == [0, 4]
    constraint.advance(4)  # now inside a key: any text is fine; only the best 4 candidates are looked at
    masked = constraint.mask(logits)
    assert torch.isfinite(masked).nonzero().flatten().tolist() == [1, 3, 8]


def test_engine_json_mode_replies_with_one_parseable_object(smollm2_path, tmp_path):
    from tunelab.generation import collect, prepare_chat
    from tunelab.registry.store import Store
    from tunelab.runtime import open_model

    runtime = open_model(str(smollm2_path), Store(tmp_path / "home"))
    try:
        prepared = prepare_chat(runtime, [{"role": "user", "content": "Describe a cat as JSON with name and age."}],
                                options={"temperature": 0.7, "seed": 3, "num_predict": 200}, json_mode=True)
        reply = collect(prepared, runtime.engine.generate(prepared.request))
    finally:
        runtime.close()
    assert reply.finish_reason.value == "stop", reply.content
    assert isinstance(json.loads(reply.content), dict)
