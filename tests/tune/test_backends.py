"""Backends: the local engine (real SmolLM2), `tunelab serve` through the OpenAI endpoint, and the scripted model.

SmolLM2 runs in float32 on one thread on both sides, so a row's tokens do not
depend on what else is in its batch and the endpoint must answer exactly what
the local engine answers for the same seed.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tunelab.errors import InvalidOption
from tunelab.registry.store import Store
from tunelab.runtime import open_model
from tunelab.tune.backends import (Cancelled, GenerationJob, LocalEngineBackend, OpenAIEndpointBackend,
                                   ScriptedBackend, parse_scripted_spec)
from tunelab.tune.evaluation import Evaluator
from tunelab.tune.generation_cache import GenerationCache, GenerationKey
from tunelab.tune.search_space import Config
from tunelab.tune.study import PROBE_NEUTRAL, StudySettings, TuningStudy
from tunelab.tune.suites import build_prompt, load_suite

EXACT = {"num_thread": 1, "dtype": "float32"}


def job(task_id="builtin/slugify", seed=7, num_predict=24, **knobs) -> GenerationJob:
    task = next(t for t in load_suite("builtin") if t.id == task_id)
    options = {**PROBE_NEUTRAL, **knobs, "seed": seed, "num_predict": num_predict, "stop": []}
    return GenerationJob(GenerationKey("h", task_id, 0, seed), build_prompt(task).messages, "You write Python.",
                         options, None)


@pytest.fixture(scope="module")
def smollm2_store(smollm2_path, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    Store(home).register_gguf("smollm2:135m", smollm2_path, EXACT)
    return home


@pytest.fixture(scope="module")
def local(smollm2_store):
    runtime = open_model("smollm2:135m", Store(smollm2_store), start_engine=True, max_num_seqs=4)
    yield LocalEngineBackend(runtime)
    runtime.close()


def test_local_engine_answers_are_fixed_by_the_seed(local):
    first, again, other = local.generate(job(seed=7)), local.generate(job(seed=7)), local.generate(job(seed=8))
    assert first.generation.text == again.generation.text != other.generation.text
    assert first.generation.tokens == 24 and first.finish_reason == "length" and first.generation.hit_token_limit
    assert local.identity.endswith(":torch.float32")  # float32 and int8 weights give different tokens
    assert local.effective_knobs({})["temperature"] == 0.8  # the option catalog's default
    assert local.effective_knobs({"top_k": 5})["top_k"] == 5


def test_a_configuration_runs_its_samples_as_rows_of_one_batch(local, tmp_path):
    evaluator = Evaluator(local, GenerationCache(tmp_path / "g.db"), seed=0, num_predict=24)
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], local.runtime.engine.stats()["running"])
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    tasks = load_suite("builtin")[:2]
    arm = evaluator.evaluate(Config("c", {"temperature": 0.7}), tasks, samples=2)
    done.set()
    watcher.join()
    evaluator.close()
    assert peak[0] == 4  # both tasks' two samples decoded together (the engine holds four rows)
    assert [len(scores) for scores in arm.scores.values()] == [2, 2]


def test_local_engine_cancel_stops_generations_in_flight(local):
    backend, result = LocalEngineBackend(local.runtime), {}  # a second backend over the same engine

    def long_generation():
        try:
            result["value"] = backend.generate(job(num_predict=2000))
        except Cancelled:
            result["value"] = "cancelled"

    thread = threading.Thread(target=long_generation)
    thread.start()
    time.sleep(1.0)
    backend.cancel_all()
    thread.join(timeout=60)
    assert result["value"] == "cancelled"
    with pytest.raises(Cancelled):
        backend.generate(job())


def test_knob_probe_finds_every_knob_honoured_by_the_engine(local, tmp_path):
    settings = StudySettings(model="smollm2:135m", suite="builtin", tuning_tasks=2, held_out_tasks=2)
    warnings = []
    study = TuningStudy(settings, local, GenerationCache(tmp_path / "g.db"), f"sqlite:///{tmp_path / 's.db'}", "s",
                        on_warning=warnings.append)
    assert study.probe() == [] and warnings == []
    assert study.space.searched == settings.space.searched


@pytest.fixture(scope="module")
def served(smollm2_store, tmp_path_factory):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "ab")
    env = os.environ | {"TUNELAB_HOME": str(smollm2_store), "TUNELAB_HOST": f"127.0.0.1:{port}"}
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert process.poll() is None, "tunelab serve exited; see its log"
            try:
                httpx.get(url + "/v1/models", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def test_endpoint_answers_what_the_local_engine_answers(local, served):
    endpoint = OpenAIEndpointBackend(served, "smollm2:135m", max_in_flight=2)
    for knobs in ({}, {"temperature": 0.0}, {"top_k": 3, "repeat_penalty": 1.3, "min_p": 0.05}):
        remote, here = endpoint.generate(job(**knobs)), local.generate(job(**knobs))
        assert remote.generation.text == here.generation.text
        assert (remote.generation.tokens, remote.finish_reason) == (here.generation.tokens, here.finish_reason)


def test_endpoint_errors_name_the_fix():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(InvalidOption, match="start the server or fix --endpoint"):
        OpenAIEndpointBackend(f"http://127.0.0.1:{port}", "m").generate(job())


def test_scripted_model_ignores_only_the_knobs_it_is_told_to():
    scripted = parse_scripted_spec("scripted:ignore=top_k/min_p", load_suite("builtin"))
    assert scripted.ignored == {"top_k", "min_p"}
    base = scripted.generate(job(top_k=40)).generation.text
    assert scripted.generate(job(top_k=1, min_p=0.5)).generation.text == base
    assert scripted.generate(job(repeat_penalty=1.5)).generation.text != base
    with pytest.raises(InvalidOption, match="use scripted:delay=SECONDS,ignore=KNOB/KNOB"):
        parse_scripted_spec("scripted:speed=2", [])


def test_scripted_model_answers_with_the_reference_or_a_failure():
    suite = load_suite("builtin")
    scripted = ScriptedBackend(suite)
    task = suite[0]
    for seed in range(20):
        answer = scripted.generate(job(task.id, seed=seed, temperature=0.3))
        passed = scripted.passes(GenerationKey("h", task.id, 0, seed), {**PROBE_NEUTRAL, "temperature": 0.3})
        assert (task.reference.strip() in answer.generation.text) == passed
