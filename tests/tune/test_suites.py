"""Task suites: every reference passes its hidden tests, wrong code fails them, splits are stable."""

import gzip
import json
import random
from collections import Counter

import pytest

from tunelab.errors import InvalidOption, InvalidRequest
from tunelab.tune.sandbox import Limits, run_untrusted
from tunelab.tune.scoring import extract_code
from tunelab.tune.suites import KINDS, Task, build_prompt, load_suite, split


def _failing_checks(checks: list[tuple[str, str]]) -> dict[str, str]:
    """Run many check programs in one sandbox (each in a fresh namespace) and return those that fail.

    One process for the whole batch keeps this fast; scoring itself runs one sandbox per answer.
    """
    runner = (
        "import json, signal, sys, types\n"
        "def too_slow(*_):\n"
        "    raise TimeoutError('over 2 s')\n"
        "signal.signal(signal.SIGALRM, too_slow)\n"
        f"checks = json.loads({json.dumps(checks)!r})\n"
        "failed = {}\n"
        "for task_id, program in checks:\n"
        "    module = sys.modules['check'] = types.ModuleType('check')\n"
        "    signal.setitimer(signal.ITIMER_REAL, 2)\n"
        "    try:\n"
        "        exec(compile(program, task_id, 'exec', dont_inherit=True), module.__dict__)\n"
        "    except BaseException as e:\n"
        "        failed[task_id] = repr(e)[:200]\n"
        "    signal.setitimer(signal.ITIMER_REAL, 0)\n"
        "print(json.dumps(failed))\n"
    )
    result = run_untrusted(runner, timeout_s=120, limits=Limits(output_chars=1 << 20))
    assert result.status == "passed", result
    return json.loads(result.stdout)


def _stub(task: Task) -> str:
    return f"def {task.entry_point}(*args, **kwargs):\n    pass\n"


@pytest.fixture(scope="module")
def builtin():
    return load_suite("builtin")


def test_builtin_suite_has_at_least_60_varied_tasks(builtin):
    assert len(builtin) >= 60
    assert len({t.id for t in builtin}) == len(builtin)
    kinds = Counter(t.kind for t in builtin)
    assert set(kinds) == {"implement", "fix", "refactor"} and min(kinds.values()) >= 10
    for task in builtin:
        assert task.tests.count("assert") + task.tests.count("raise AssertionError") >= 3, task.id
        assert task.entry_point in task.prompt, task.id
        assert "```python" in task.prompt, task.id


def test_every_builtin_reference_passes_its_tests(builtin):
    assert _failing_checks([(t.id, t.check_program(t.reference)) for t in builtin]) == {}


def test_a_pass_body_fails_every_builtin_task(builtin):
    failing = _failing_checks([(t.id, t.check_program(_stub(t))) for t in builtin])
    assert sorted(failing) == sorted(t.id for t in builtin)


def test_code_shown_in_fix_and_refactor_prompts_fails_the_tests(builtin):
    # The buggy or unrefactored code must not already pass: the tests check the requested change.
    shown = [t for t in builtin if t.kind in ("fix", "refactor")]
    checks = [(t.id, t.check_program(extract_code(t.prompt, t.entry_point) or "")) for t in shown]
    assert sorted(_failing_checks(checks)) == sorted(t.id for t in shown)


def test_humaneval_loads_164_tasks_from_the_installed_package():
    tasks = load_suite("humaneval")
    assert len(tasks) == 164
    assert tasks[0].id == "HumanEval/0" and tasks[0].entry_point == "has_close_elements"
    assert all(t.kind == "humaneval" and t.tests.endswith(f"check({t.entry_point})") for t in tasks)


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    tasks = load_suite("humaneval")
    assert _failing_checks([(t.id, t.check_program(t.reference)) for t in tasks]) == {}
    assert sorted(_failing_checks([(t.id, t.check_program(_stub(t))) for t in tasks])) == sorted(t.id for t in tasks)


def test_humaneval_helper_functions_stay_available_to_the_solution():
    task = next(t for t in load_suite("humaneval") if t.id == "HumanEval/10")  # make_palindrome uses is_palindrome
    answer = task.reference[task.reference.index(f"def {task.entry_point}"):]
    assert "def is_palindrome" not in answer
    assert _failing_checks([(task.id, task.check_program(answer))]) == {}


def test_all_is_builtin_then_humaneval(builtin):
    assert [t.id for t in load_suite("all")] == [t.id for t in builtin] + [t.id for t in load_suite("humaneval")]


@pytest.mark.parametrize("gzipped", [False, True])
def test_humaneval_format_jsonl_round_trips(tmp_path, gzipped):
    originals = load_suite("humaneval")[:3]
    rows = [{"task_id": t.id, "prompt": t.preamble + "\n", "entry_point": t.entry_point,
             "canonical_solution": t.reference[len(t.preamble) + 1:],
             "test": t.tests[:t.tests.rindex("check(")].rstrip()} for t in originals]
    text = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    path = tmp_path / ("mine.jsonl.gz" if gzipped else "mine.jsonl")
    path.write_bytes(gzip.compress(text.encode()) if gzipped else text.encode())
    assert load_suite(str(path)) == originals


def test_bad_suite_inputs_raise_typed_errors_naming_the_fix(tmp_path):
    with pytest.raises(InvalidOption, match="unknown task suite 'nope'.*builtin"):
        load_suite("nope")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"task_id": "a"\n')
    with pytest.raises(InvalidRequest, match="line 1 is not valid JSON"):
        load_suite(str(broken))
    partial = tmp_path / "partial.jsonl"
    partial.write_text('\n{"task_id": "x", "prompt": "def f(): pass"}\n')
    with pytest.raises(InvalidRequest, match="line 2 lacks HumanEval field.*entry_point, canonical_solution, test"):
        load_suite(str(partial))


def test_split_is_a_deterministic_partition():
    tasks = load_suite("all")
    tuning, held_out = split(tasks, 0.5, seed=7)
    assert split(tasks, 0.5, seed=7) == (tuning, held_out)
    assert sorted(t.id for t in tuning + held_out) == sorted(t.id for t in tasks)
    assert not {t.id for t in tuning} & {t.id for t in held_out}
    assert 0.4 < len(held_out) / len(tasks) < 0.6
    assert [t.id for t in held_out] == [t.id for t in tasks if t in held_out]  # input order kept
    assert split(tasks, 0.5, seed=8)[1] != held_out


def test_split_depends_only_on_task_ids_and_seed():
    tasks = load_suite("all")
    held_out_ids = {t.id for t in split(tasks, 0.3, seed=1)[1]}
    shuffled = random.Random(0).sample(tasks, len(tasks))
    assert {t.id for t in split(shuffled, 0.3, seed=1)[1]} == held_out_ids
    subset = tasks[::3]
    assert {t.id for t in split(subset, 0.3, seed=1)[1]} == held_out_ids & {t.id for t in subset}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_split_rejects_a_fraction_outside_zero_one(fraction):
    with pytest.raises(InvalidOption, match="outside \\(0, 1\\)"):
        split(load_suite("builtin"), fraction, seed=0)


def test_prompt_asks_for_one_python_block_and_hides_the_tests(builtin):
    task = next(t for t in builtin if t.kind == "fix")
    bare = build_prompt(task)
    assert [m["role"] for m in bare.messages] == ["user"] and bare.stop == ()
    user = bare.messages[0]["content"]
    assert user.startswith(task.prompt) and "```python code block" in user and task.entry_point in user
    assert task.tests not in user and task.reference not in user
    with_system = build_prompt(task, system="Be brief.", stop_after_code=True)
    assert with_system.messages[0] == {"role": "system", "content": "Be brief."}
    assert with_system.messages[1] == bare.messages[0] and with_system.stop == ("\n```\n",)


def test_kinds_are_the_documented_ones():
    assert {t.kind for t in load_suite("all")} == set(KINDS)
