"""The sandbox contains what model-written code can do wrong, and the caller survives all of it."""

import os
import socket
import sys
import textwrap
import time
import uuid

import pytest

from tunelab.tune.sandbox import Limits, run_untrusted, namespaces_available

needs_namespaces = pytest.mark.skipif(not namespaces_available(),
                                      reason="user namespaces are not allowed here; the sandbox runs rlimit-only")


def _program(source: str) -> str:
    return textwrap.dedent(source).lstrip()


def _processes_with(marker: str) -> list[str]:
    """Host pids whose command line holds `marker` (zombies have an empty one and do not count)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(entry)
        except OSError:
            pass
    return found


def _wait_until_gone(marker: str) -> list[str]:
    # SIGKILL is delivered asynchronously; give the kernel a moment to tear the processes down.
    for _ in range(50):
        if not _processes_with(marker):
            return []
        time.sleep(0.1)
    return _processes_with(marker)


def test_passing_program_reports_passed_and_its_output():
    result = run_untrusted("print('hello from the sandbox')\nassert 1 + 1 == 2\n")
    assert result.status == "passed", result
    assert result.stdout == "hello from the sandbox\n"
    assert result.error_type is None


def test_assertion_failure_is_failed_and_names_the_line():
    result = run_untrusted("x = 3\nassert x == 4, 'x is off'\n")
    assert result.status == "failed"
    assert result.error_type == "AssertionError"
    assert "at line 2: assert x == 4" in result.detail and "x is off" in result.detail


def test_exceptions_and_syntax_errors_are_errors_with_their_type():
    raised = run_untrusted("def f():\n    return {}['missing']\nf()\n")
    assert (raised.status, raised.error_type) == ("error", "KeyError")
    broken = run_untrusted("def f(:\n    pass\n")
    assert (broken.status, broken.error_type) == ("error", "SyntaxError")


def test_leaving_early_is_not_passing():
    assert run_untrusted("import sys\nsys.exit(0)\nassert False\n").status == "error"
    exited = run_untrusted("import os\nos._exit(0)\n")
    assert exited.status == "error" and "before the program finished" in exited.detail


def test_main_guard_does_not_run():
    result = run_untrusted("if __name__ == '__main__':\n    input()\nprint('done')\n")
    assert result.status == "passed" and result.stdout == "done\n"


def test_infinite_loop_times_out():
    result = run_untrusted("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout"


def test_memory_bomb_is_contained():
    at_once = run_untrusted("x = bytearray(64 << 30)\n")
    assert (at_once.status, at_once.error_type) == ("memory", "MemoryError")
    growing = run_untrusted("chunks = []\nwhile True:\n    chunks.append(' ' * (1 << 24))\n", timeout_s=10.0,
                            limits=Limits(memory_bytes=256 << 20))
    assert growing.status == "memory"


def test_fork_bomb_is_contained():
    result = run_untrusted("import os\nwhile True:\n    os.fork()\n", timeout_s=10.0, limits=Limits(processes=16))
    assert result.status == "killed" and "more than 16 processes" in result.detail
    assert run_untrusted("assert True\n").status == "passed"  # and the caller carries on


def test_segfault_is_killed_by_signal():
    result = run_untrusted("import ctypes\nctypes.string_at(0)\n")
    assert result.status == "killed" and "SIGSEGV" in result.detail


def test_environment_is_scrubbed_and_home_is_a_fresh_workdir():
    result = run_untrusted(_program("""
        import os, sys
        assert os.environ["HOME"] == os.getcwd() == os.environ["TMPDIR"]
        assert os.listdir(".") == []
        assert sorted(os.environ) == ["HOME", "LANG", "OMP_NUM_THREADS", "PATH", "PYTHONHASHSEED",
                                      "PYTHONIOENCODING", "TMPDIR"]
        assert sys.flags.hash_randomization == 0
        open("scratch.txt", "w").write("mine")
        print(os.getcwd())
    """))
    assert result.status == "passed", result
    assert not os.path.exists(result.stdout.strip())  # removed afterwards


def test_output_is_kept_as_a_capped_tail():
    result = run_untrusted("for i in range(100000):\n    print(i)\n", limits=Limits(output_chars=100))
    assert result.status == "passed"
    assert len(result.stdout) == 100 and result.stdout.endswith("99999\n")


@needs_namespaces
def test_network_connection_fails():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        result = run_untrusted(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        assert result.status == "error"
        assert result.error_type in ("OSError", "ConnectionRefusedError", "TimeoutError"), result
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the host's loopback
    assert result.isolated


@needs_namespaces
def test_files_outside_the_workdir_are_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    result = run_untrusted(_program(f"""
        import os, shutil
        attempts = [
            lambda: open({str(victim)!r}, "w").write("changed"),
            lambda: os.remove({str(victim)!r}),
            lambda: open({str(tmp_path / "new.txt")!r}, "w").write("new"),
            lambda: shutil.rmtree({str(tmp_path)!r}),
        ]
        for attempt in attempts:
            try:
                attempt()
            except OSError:
                continue
            raise AssertionError("a write outside the workdir went through")
        open("allowed.txt", "w").write("fine")
    """))
    assert result.status == "passed", result
    assert victim.read_text() == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


_DETACH = """
    import os, sys
    ready_r, ready_w = os.pipe()
    os.set_inheritable(ready_w, True)
    if os.fork() == 0:
        {leave_session}
        if os.fork() == 0:
            code = "import os, time; os.write({{w}}, b'x'); time.sleep(60)".format(w=ready_w)
            os.execv(sys.executable, [sys.executable, "-c", code, "{marker}"])
        os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"  # the grandchild is running when the program ends
"""


@needs_namespaces
def test_child_that_detaches_with_setsid_is_still_killed():
    marker = f"tunelab-detached-{uuid.uuid4().hex}"
    result = run_untrusted(_program(_DETACH.format(leave_session="os.setsid()", marker=marker)))
    assert result.status == "passed", result
    assert _wait_until_gone(marker) == []


@pytest.mark.parametrize("isolate", [True, False])
def test_background_child_is_killed_when_the_program_ends(isolate):
    if isolate and not namespaces_available():
        pytest.skip("user namespaces are not allowed here")
    marker = f"tunelab-background-{uuid.uuid4().hex}"
    result = run_untrusted(_program(_DETACH.format(leave_session="pass", marker=marker)), isolate=isolate)
    assert result.status == "passed", result
    assert _wait_until_gone(marker) == []


def test_rlimit_only_mode_still_contains_loops_and_memory():
    assert run_untrusted("while True:\n    pass\n", timeout_s=1.0, isolate=False).status == "timeout"
    bomb = run_untrusted("x = bytearray(64 << 30)\n", isolate=False)
    assert bomb.status == "memory" and not bomb.isolated
    assert run_untrusted("print(sum(range(10)))\n", isolate=False).stdout == "45\n"


def test_runs_with_the_callers_python():
    result = run_untrusted("import sys\nprint(sys.version_info[:2])\n")
    assert result.stdout.strip() == str(sys.version_info[:2])
