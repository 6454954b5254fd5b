"""Run untrusted Python (model-written code and its hidden tests) in a separate, confined process.

Each run gets a fresh interpreter in its own session, with a scrubbed
environment, rlimits (address space, CPU time, processes, file size, open
files, no core dumps) and a wall-clock timeout after which its whole process
group and session are killed. The caller also counts the session's processes
while it waits and kills a run that starts too many: RLIMIT_NPROC never binds
a task whose host uid is root. The program runs as module `sandboxed`, so an
`if __name__ == "__main__":` demo in it does not run.

Where the OS allows it (probed once), the run starts under
`unshare --user --map-root-user --net --pid --mount --fork --kill-child`, and the program has:

- no network: a new network namespace holding only a downed loopback;
- a read-only filesystem except its working directory, a small fresh tmpfs
  that is also HOME and TMPDIR, so nothing it writes reaches the host;
- its own PID namespace: when the run ends, the kernel kills every process
  it started, including ones that double-forked and called `setsid`;
- no capabilities, so it cannot undo any of this.

Where user namespaces are not allowed (some hardened kernels, e.g. Ubuntu's
AppArmor userns restriction) or the mounts cannot be made read-only, the rest
still applies, but there is no network isolation, writes to files the user may
write elsewhere go through, and a descendant that left the session with
`setsid` survives the run. `SandboxResult.isolated` says which mode ran, and a
warning is logged once.

This file is also the program the sandboxed interpreter starts with (`_run_inside`),
so at module level it imports the standard library only.
"""

from __future__ import annotations

import ctypes
import functools
import json
import linecache
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import asdict, dataclass

STATUSES = ("passed", "failed", "timeout", "error", "killed", "memory")

_UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--mount", "--mount-proc",
            "--fork", "--kill-child", "--"]
# -P: no script directory on sys.path; -s/-S: no user or site packages; -B: no .pyc writes.
# Not -E/-I: the environment is already scrubbed, and PYTHONHASHSEED must take effect.
_PYTHON_FLAGS = ["-P", "-s", "-S", "-B"]
_POLL_S = 0.05


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed run."""

    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS)
    processes: int = 32  # RLIMIT_NPROC, and the most processes the caller lets its session hold
    file_bytes: int = 16 << 20  # largest file it may write (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    disk_bytes: int = 64 << 20  # size of the tmpfs working directory (namespaces only)
    output_chars: int = 4000  # tail of stdout and of stderr kept in the result


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one program: `status` is one of STATUSES."""

    status: str
    detail: str  # e.g. "AssertionError at line 12: assert f(3) == 4", "killed by SIGKILL"
    error_type: str | None  # the exception class the program raised, if any
    wall_s: float
    stdout: str  # tails, at most Limits.output_chars each
    stderr: str
    isolated: bool  # ran inside namespaces (see the module docstring)


def run_untrusted(program: str, timeout_s: float = 3.0, limits: Limits = Limits(),
                  isolate: bool | None = None) -> SandboxResult:
    """Run `program` in a confined child process; never raises for anything the program does.

    `isolate=None` uses namespaces when the OS allows them; False forces the rlimit-only mode.
    """
    isolated = namespaces_available() if isolate is None else isolate
    with (tempfile.TemporaryDirectory(prefix="tunelab-sandbox-") as workdir,
          tempfile.TemporaryFile() as source, tempfile.TemporaryFile() as status,
          tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr):
        source.write(program.encode("utf-8", "surrogatepass"))
        source.flush()
        source.seek(0)
        settings = {"workdir": workdir, "source_fd": source.fileno(), "status_fd": status.fileno(),
                    "isolated": isolated, "cpu_s": int(timeout_s) + 1, **asdict(limits)}
        command = (_UNSHARE if isolated else []) + [sys.executable, *_PYTHON_FLAGS, __file__, json.dumps(settings)]
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=workdir, env=_scrubbed_env(workdir), stdin=subprocess.DEVNULL,
                                   stdout=stdout, stderr=stderr, pass_fds=(source.fileno(), status.fileno()),
                                   start_new_session=True)
        try:
            stopped = _watch(process, start + timeout_s, limits.processes)
        finally:
            _kill_session(process.pid)
            process.wait()
        wall_s = time.monotonic() - start
        status.seek(0)
        reported = status.read().decode("utf-8", "replace")
        out, err = (_tail(f, limits.output_chars) for f in (stdout, stderr))
    if stopped == "timeout":
        return SandboxResult("timeout", f"no result after {timeout_s:g}s wall time", None, wall_s, out, err, isolated)
    if stopped == "processes":
        return SandboxResult("killed", f"started more than {limits.processes} processes", None, wall_s, out, err,
                             isolated)
    if reported:
        outcome = json.loads(reported)
        return SandboxResult(outcome["status"], outcome["detail"], outcome["error_type"], wall_s, out, err, isolated)
    code = process.returncode
    if code < 0:
        name = signal.Signals(-code).name
        why = " (CPU-time limit or out of memory)" if name in ("SIGKILL", "SIGXCPU") else ""
        return SandboxResult("killed", f"killed by {name}{why}", None, wall_s, out, err, isolated)
    return SandboxResult("error", f"exited with code {code} before the program finished", None, wall_s, out, err,
                         isolated)


@functools.cache
def namespaces_available() -> bool:
    """Whether this OS lets an unprivileged user start the namespaced sandbox (probed once)."""
    try:
        probe = run_untrusted("pass\n", timeout_s=30, isolate=True)
    except OSError as e:  # no `unshare` binary
        probe = SandboxResult("error", str(e), None, 0.0, "", "", True)
    if probe.status != "passed":
        logging.getLogger(__name__).warning(
            "tunelab's sandbox runs without namespaces here (%s): no network or filesystem isolation", probe.detail)
    return probe.status == "passed"


def _scrubbed_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}


def _watch(process: subprocess.Popen, deadline: float, max_processes: int) -> str | None:
    """Wait for the child; stop early on "timeout" or "processes" (too many in its session).

    The process count is watched from here because RLIMIT_NPROC never binds a task whose
    host uid is root, even inside a user namespace; polling sleeps between checks.
    """
    while True:
        try:
            process.wait(timeout=max(0.0, min(_POLL_S, deadline - time.monotonic())))
            return None
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() >= deadline:
            return "timeout"
        if len(_session_members(process.pid)) > max_processes:
            return "processes"


def _session_members(session_id: int) -> list[int]:
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(entry)) == session_id:
                members.append(int(entry))
        except OSError:  # the process ended while we looked
            pass
    return members


def _kill_session(session_id: int) -> None:
    """Kill the child's process group, then any process still in its session (the fallback's sweep)."""
    try:
        os.killpg(session_id, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in _session_members(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _tail(file, limit: int) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - 4 * limit))
    return file.read().decode("utf-8", "replace")[-limit:]


# --- Inside the sandbox -------------------------------------------------------------------------
# Everything below runs in the confined interpreter, before and around the untrusted program.

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_RELATIME, _MS_STRICTATIME = 1024, 2048, 4096, 1 << 21, 1 << 24
# Flags a remount must repeat, or the kernel refuses it inside a user namespace (they are locked).
_LOCKED_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "noatime": _MS_NOATIME,
                 "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME, "strictatime": _MS_STRICTATIME}
_PR_CAPBSET_DROP = 24
_LIBC = ctypes.CDLL(None, use_errno=True)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _run_inside(settings: dict) -> None:
    """Confine this process, run the program from `source_fd`, report on `status_fd`, and exit."""
    status = os.fdopen(settings["status_fd"], "w")
    with os.fdopen(settings["source_fd"], "rb") as source:
        program = source.read().decode("utf-8", "surrogatepass")
    try:
        if settings["isolated"]:
            _confine_filesystem(settings["workdir"], settings["disk_bytes"])
            _drop_capabilities()
        _set_limits(settings)
        os.chdir(settings["workdir"])
    except OSError as e:
        _report(status, "error", f"sandbox setup failed: {e}", None)
    main_pid = os.getpid()
    sys.argv = ["program.py"]
    linecache.cache["program.py"] = (len(program), None, program.splitlines(True), "program.py")
    # A real module, so that dataclasses, pickle and typing find it in sys.modules; not "__main__",
    # so that a solution's `if __name__ == "__main__":` demo does not run.
    module = types.ModuleType("sandboxed")
    sys.modules["sandboxed"] = module
    try:
        exec(compile(program, "program.py", "exec", dont_inherit=True), module.__dict__)
        outcome = ("passed", "", None)
    except AssertionError as e:
        outcome = ("failed", _describe(e), "AssertionError")
    except MemoryError as e:
        outcome = ("memory", _describe(e), "MemoryError")
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are program errors here
        outcome = ("error", _describe(e), type(e).__name__)
    if os.getpid() != main_pid:  # a forked child returning through here must not report
        os._exit(0)
    _report(status, *outcome)


def _describe(error: BaseException) -> str:
    """`Type: message` plus the program line that raised it, truncated."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == "program.py"]
    if isinstance(error, SyntaxError) and error.filename == "program.py":
        text += f" at line {error.lineno}"
    elif frames:
        text += f" at line {frames[-1].lineno}: {frames[-1].line}"
    return text[:500]


def _report(status, kind: str, detail: str, error_type: str | None) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    status.write(json.dumps({"status": kind, "detail": detail, "error_type": error_type}))
    status.flush()
    os._exit(0)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    source_b, target_b, fstype_b, data_b = (None if s is None else s.encode() for s in (source, target, fstype, data))
    if _LIBC.mount(source_b, target_b, fstype_b, flags, data_b) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")


def _confine_filesystem(workdir: str, disk_bytes: int) -> None:
    """Mount a fresh tmpfs on the working directory and make every other mount read-only."""
    _mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={disk_bytes},mode=700")
    with open("/proc/self/mountinfo") as table:
        mounts = {}
        for line in table:
            fields = line.split()
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])  # "\040" is a space
            mounts[target] = fields[5].split(",")
    for target, options in mounts.items():
        if target == os.path.realpath(workdir) or "ro" in options:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in options:
            flags |= _LOCKED_FLAGS.get(option, 0)
        _mount(None, target, None, flags)


def _drop_capabilities() -> None:
    """Give up root's powers inside the namespace, also for anything it executes later."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for capability in range(last + 1):
        _LIBC.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable for two 32-bit words: all zero
    if _LIBC.capset(header, data) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"capset: {os.strerror(errno)}")


def _set_limits(settings: dict) -> None:
    processes = settings["processes"]
    if not settings["isolated"]:
        # Outside a user namespace RLIMIT_NPROC counts every task of this user, not just ours.
        processes += _tasks_of_this_user()
    limits = {resource.RLIMIT_AS: settings["memory_bytes"], resource.RLIMIT_CPU: settings["cpu_s"],
              resource.RLIMIT_NPROC: processes, resource.RLIMIT_FSIZE: settings["file_bytes"],
              resource.RLIMIT_NOFILE: settings["open_files"], resource.RLIMIT_CORE: 0}
    for kind, value in limits.items():
        # soft == hard: the CPU limit then ends in SIGKILL, which even a namespace's PID 1 cannot ignore.
        resource.setrlimit(kind, (value, value))


def _tasks_of_this_user() -> int:
    uid, count = os.getuid(), 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


if __name__ == "__main__":
    _run_inside(json.loads(sys.argv[1]))
