"""Two `tunelab tune` processes share one study through a real PostgreSQL server started for the test.

The server is a throwaway cluster (initdb + pg_ctl from Debian's `postgresql`
package, see scripts/install-test-services.sh) in a temporary directory, on a
Unix socket and a free port, run as the `postgres` user when the tests run as root.
"""

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from tunelab.tune.generation_cache import GenerationCache

TRIALS = 12
STUDY = "scripted builtin seed 0"


def postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture(scope="module")
def postgres_url():
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (initdb not found); run scripts/install-test-services.sh")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed; run scripts/install-test-services.sh")
    user = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    directory = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))
    if user is not None:
        os.chown(directory, user.pw_uid, user.pw_gid)
    data, port = directory / "data", _free_port()

    def pg(*args):
        subprocess.run([str(bindir / args[0]), *args[1:]], check=True, capture_output=True,
                       user=user.pw_uid if user else None, group=user.pw_gid if user else None)

    pg("initdb", "-D", str(data), "-U", "tunelab", "--auth=trust")
    pg("pg_ctl", "-D", str(data), "-l", str(directory / "server.log"), "-w", "-o",
       f"-p {port} -k {directory} -c listen_addresses=''", "start")
    try:
        yield f"postgresql+psycopg2://tunelab@/postgres?host={directory}&port={port}"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(directory, ignore_errors=True)


def start(out: Path, storage: str, *extra: str) -> subprocess.Popen:
    args = ["tune", "scripted", "--suite", "builtin", "--backend", "scripted:delay=1.0", "--trials", str(TRIALS),
            "--samples", "2", "--tuning-tasks", "4", "--held-out-tasks", "4", "--confirm-top", "2",
            "--confirm-samples", "3", "--held-out-samples", "2", "--parallel-trials", "1", "--storage", storage,
            "--out", str(out), *extra]
    return subprocess.Popen([sys.executable, "-m", "tunelab", *args], cwd=out.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_workers_split_one_study(tmp_path, postgres_url):
    out = tmp_path / "study"
    out.mkdir()
    main = start(out, postgres_url)
    deadline = time.monotonic() + 120
    while "dropped_knobs" not in _study_attrs(postgres_url):  # the study exists and its knobs are probed
        assert main.poll() is None and time.monotonic() < deadline, main.communicate()[0]
        time.sleep(0.2)
    worker = start(out, postgres_url, "--worker")
    worker_output, _ = worker.communicate(timeout=300)
    main_output, _ = main.communicate(timeout=300)
    assert worker.returncode == 0, worker_output
    assert main.returncode == 0, main_output
    assert "worker done" in worker_output

    study = optuna.load_study(study_name=STUDY, storage=postgres_url)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(finished) == TRIALS
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
    by_worker = {}
    for trial in finished:
        by_worker[trial.user_attrs["worker"]] = by_worker.get(trial.user_attrs["worker"], 0) + 1
    assert len(by_worker) == 2 and min(by_worker.values()) >= 1, by_worker
    assert GenerationCache(out / "generations.db").generated_more_than_once() == []
    results = json.loads((out / "results.json").read_text())
    assert len(results["trials"]) == TRIALS and len(results["held_out"]) == 5


def _study_attrs(url: str) -> dict:
    try:
        return optuna.load_study(study_name=STUDY, storage=url).user_attrs
    except KeyError:
        return {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
