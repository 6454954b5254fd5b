"""Scoring: pass@k, code extraction, the degeneration detectors, and end-to-end verdicts."""

import math

import pytest

from tunelab.errors import InvalidOption
from tunelab.tune.scoring import (Generation, extract_code, has_repetition_loop, off_script_characters, pass_at_k,
                                  score_generation, split_thinking, time_limit)
from tunelab.tune.suites import load_suite


@pytest.mark.parametrize("n, c, k, expected", [
    (10, 3, 1, 0.3),
    (10, 3, 10, 1.0),
    (10, 0, 5, 0.0),
    (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 0.7
    (5, 5, 1, 1.0),
    (200, 17, 100, 1 - math.comb(183, 100) / math.comb(200, 100)),
])
def test_pass_at_k_matches_the_closed_form(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 4), (3, 1, 0)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(InvalidOption):
        pass_at_k(n, c, k)


def test_split_thinking():
    assert split_thinking("<think>hmm</think>\nanswer") == ("\nanswer", False)
    assert split_thinking("plain answer") == ("plain answer", False)
    assert split_thinking("reasoning the template opened</think>answer") == ("answer", False)
    assert split_thinking("intro <think>and it never ends") == ("intro ", True)
    assert split_thinking("<think>a</think>b<think>again") == ("b", True)


def test_extract_code_picks_the_block_defining_the_entry_point():
    answer = ("Here is the fix:\n```python\ndef add(a, b):\n    return a + b\n```\n"
              "Use it like this:\n```python\nprint(add(1, 2))\n```\n")
    assert extract_code(answer, "add") == "def add(a, b):\n    return a + b\n"
    two = "```python\ndef f():\n    return 1\n```\nBetter:\n```py\ndef f():\n    return 2\n```"
    assert extract_code(two, "f") == "def f():\n    return 2\n"
    assert extract_code("```python\nclass Tally:\n    pass\n```", "Tally") == "class Tally:\n    pass\n"


def test_extract_code_handles_cut_off_bare_and_missing_code():
    assert extract_code("```python\ndef f():\n    return 1\n", "f") == "def f():\n    return 1\n"  # num_predict hit
    assert extract_code("def f():\n    return 1\n", "f") == "def f():\n    return 1\n"
    assert extract_code("I would write a loop that sums the items.", "f") is None
    assert extract_code("def f(:\nthat is my idea", "f") is None
    assert extract_code("```bash\npip install f\n```", "f") is None
    assert extract_code("```\nx = 1\n```", "f") == "x = 1\n"  # an untagged block counts as Python


def test_repetition_loop_detector_positive_cases():
    assert has_repetition_loop("Wait, " * 30)
    assert has_repetition_loop("def f():\n" + "    print('again')\n" * 15)
    paragraph = "The answer is 5 because the sum of two and three is five, as computed above. "
    assert has_repetition_loop("Let me check. " + paragraph * 4)
    assert has_repetition_loop("x" + " 0" * 60)


def test_repetition_loop_detector_negative_cases():
    for task in load_suite("builtin"):
        assert not has_repetition_loop(task.reference), task.id
        assert not has_repetition_loop(task.prompt), task.id
    assert not has_repetition_loop("print('a')\nprint('a')\nprint('b')\n")
    assert not has_repetition_loop("# " + "-" * 70 + "\nx = [0, 0, 0, 0]\n")
    assert not has_repetition_loop("")


def test_off_script_detector_positive_cases():
    assert off_script_characters("total = 0  # 计算总和\n") == "计算总和"
    assert off_script_characters("print(a，b)") == "，"  # fullwidth comma
    assert off_script_characters("def sum_аll(xs): pass") == "а"  # Cyrillic a in an identifier
    assert off_script_characters("x = 'こんにちは'") == "こんにちは"


def test_off_script_detector_negative_cases():
    assert off_script_characters("def f(x):\n    return x + 1\n") == ""
    assert off_script_characters("name = 'café'  # déjà vu, 5 µs — fine → ok") == ""
    assert off_script_characters("greeting = '你好'", allowed="Translate '你好' to English") == ""


@pytest.fixture(scope="module")
def task():
    return next(t for t in load_suite("builtin") if t.id == "builtin/dedupe")


def _answer(code: str) -> Generation:
    return Generation(f"Sure:\n```python\n{code}```\nThis keeps the first of each.", tokens=42,
                      hit_token_limit=False, latency_s=1.5)


@pytest.mark.parametrize("code, outcome", [
    ("def dedupe(items):\n    return list(dict.fromkeys(items))\n", "passed"),
    ("def dedupe(items):\n    return sorted(set(items))\n", "assertion_failure"),
    ("def dedupe(items):\n    return items.unique()\n", "exception"),
    ("def dedupe(items)\n    return items\n", "syntax_error"),
    ("def dedupe(items):\n    while True:\n        pass\n", "timeout"),
    ("def dedupe(items):\n    return list(bytearray(1 << 40))\n", "memory"),
    ("import os\ndef dedupe(items):\n    while True:\n        os.fork()\n", "killed"),
])
def test_each_failure_is_recorded_as_its_type(task, code, outcome):
    score = score_generation(task, _answer(code))
    assert score.outcome == outcome, score.detail
    assert score.passed == (outcome == "passed")
    assert (score.tokens, score.latency_s) == (42, 1.5)
    assert not (score.runaway or score.repetition_loop or score.unclosed_think or score.off_script)


def test_prose_without_code_is_no_code_block(task):
    score = score_generation(task, Generation("Use a dict to remember what you saw.", 9, False, 0.2))
    assert score.outcome == "no_code_block"


def test_degenerations_are_flagged_alongside_the_outcome(task):
    looping = Generation("```python\ndef dedupe(items):\n    return list(dict.fromkeys(items))\n```\n"
                         + "I hope this helps! " * 40, tokens=400, hit_token_limit=True, latency_s=9.0)
    score = score_generation(task, looping)
    assert score.passed and score.runaway and score.repetition_loop

    endless_thought = Generation("<think>First, dedupe means... " + "hmm " * 5, 512, True, 20.0)
    score = score_generation(task, endless_thought)
    assert score.outcome == "no_code_block" and score.unclosed_think and score.runaway

    chinese = _answer("def dedupe(items):\n    # 保持顺序\n    return list(dict.fromkeys(items))\n")
    assert score_generation(task, chinese).off_script == "保持顺序"


def test_thinking_is_stripped_before_extraction(task):
    text = ("<think>Maybe:\n```python\ndef dedupe(items):\n    return []\n```\nNo, keep order.</think>\n"
            "```python\ndef dedupe(items):\n    return list(dict.fromkeys(items))\n```")
    score = score_generation(task, Generation(text, 120, False, 3.0))
    assert score.passed and not score.unclosed_think


def test_humaneval_answer_is_judged_with_its_prompt_helpers():
    humaneval = {t.id: t for t in load_suite("humaneval")}
    task = humaneval["HumanEval/10"]
    code = task.reference[task.reference.index("def make_palindrome"):]
    assert score_generation(task, _answer(code)).passed
    future = "from __future__ import annotations\n\n" + code
    assert score_generation(task, _answer(future)).passed


def test_time_limit_grows_with_the_reference_runtime(task):
    assert time_limit(task) == pytest.approx(3.0 + 4 * task.reference_runtime_s)
