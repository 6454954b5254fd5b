"""How fast a model answers and how much memory it takes: tunelab next to llama.cpp and transformers.

`run_benchmark` measures tunelab, then each engine named in `compare`, one after another. Every
measurement runs in a fresh subprocess, so each engine's peak RSS (VmHWM) is its own and no two
engines ever share the cores (two OpenMP thread pools on a few cores starve each other). All
engines get the same prompt token ids, tokenized once by tunelab; run `r` takes the window
starting at token `r`, so no engine can answer a run from a cache filled by the one before.

What is measured, per engine (one warm-up run first, then `runs` runs, greedy, EOS ignored):
  load time; TTFT (prompt submitted -> first token); prefill tok/s = prompt tokens / TTFT;
  decode tok/s = (tokens - 1) / (last token time - first token time); peak and after-load RSS.
tunelab also reports, from a second process (so the batch runs do not inflate the RSS above):
aggregate decode tok/s with 1, 4 and 16 requests in flight, and N samples of one prompt, where
prefix sharing should compute the prompt's KV once (`num_prefill_tokens_computed`).

This file doubles as the worker script (`python benchmark.py worker KIND`, job as JSON on stdin,
result as JSON on stdout). The llama.cpp worker runs in llama-cpp-python's own virtualenv, so
only the standard library is imported at module level.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The baselines' prompt (shared/baseline-bench/prompt.txt): plain English prose, repeated as needed.
PROMPT_TEXT = (
    "You are a careful assistant that explains how text generation works in small language models. "
    "A language model reads a sequence of tokens and produces a probability distribution over its "
    "vocabulary for the next token. The runtime then chooses one token using a sampling strategy. Greedy "
    "decoding always takes the most likely token, which is deterministic but can repeat itself. "
    "Temperature rescales the logits before the softmax: values below one sharpen the distribution, values "
    "above one flatten it. Top-k sampling keeps only the k most likely tokens, while top-p (nucleus) "
    "sampling keeps the smallest set of tokens whose cumulative probability exceeds p. Min-p sampling "
    "discards tokens whose probability is below a fraction of the most likely token. A repetition penalty "
    "lowers the score of tokens that have already appeared. Each of these settings changes both the quality "
    "and the diversity of the output, and they interact with each other in ways that are hard to predict "
    "without measuring. Write a short, clear explanation of these ideas for a new engineer, with one "
    "concrete example for each setting, and then summarise which settings you would try first when tuning "
    "a chat model for factual answers.\n"
)
ENGINES = ("tunelab", "llama.cpp", "transformers")
LLAMA_CPP_VENV = Path.home() / ".cache" / "tunelab-bench" / "venv"
WORKER_TIMEOUT_S = 3600


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark: what to load, the prompt token stream, and how much to run."""

    model: str  # a store name or a path, as `tunelab run` takes it
    weights_path: str  # the GGUF file (or HF directory) the other engines load
    token_ids: list[int]  # prompt token stream; runs and requests take windows of it
    prompt_tokens: int = 200
    gen_tokens: int = 128
    runs: int = 5
    dtype: str = "auto"
    num_thread: int = 0  # 0 = every core
    kv_cache_type: str = "auto"
    concurrency: tuple[int, ...] = (1, 4, 16)
    shared_prompt_tokens: int = 300
    shared_samples: int = 16
    shared_gen_tokens: int = 16

    @property
    def threads(self) -> int:
        return self.num_thread or os.cpu_count() or 1

    @property
    def num_ctx(self) -> int:
        """The context every engine is given: llama.cpp's baseline 1024, or more if the runs need it."""
        return max(1024, self.prompt_tokens + self.gen_tokens, self.shared_prompt_tokens + self.shared_gen_tokens)

    def window(self, index: int, length: int) -> list[int]:
        """`length` prompt tokens starting at token `index`."""
        return self.token_ids[index:index + length]

    @property
    def tokens_needed(self) -> int:
        first_free = max(self.runs, max(self.concurrency)) + 2
        return first_free + max(self.prompt_tokens, self.shared_prompt_tokens)


@dataclass
class EngineResult:
    """What one engine measured; lists hold one value per measured run."""

    engine: str
    load_s: float
    ttft_s: list[float]
    prefill_tps: list[float]
    decode_tps: list[float]
    peak_rss_mib: float
    rss_after_load_mib: float
    tokens: list[int]  # the first run's greedy tokens, to see whether engines agree
    detail: str = ""  # weight format, threads, version
    aggregate_decode_tps: dict[int, float] = field(default_factory=dict)  # requests in flight -> tok/s
    aggregate_e2e_tps: dict[int, float] = field(default_factory=dict)
    shared_prefix: dict[str, float] = field(default_factory=dict)


def summary(values: list[float]) -> dict[str, float]:
    """min / median / max of a list of measurements."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _memory_mib(field_name: str) -> float:
    """A field of /proc/self/status (VmHWM: peak resident set; VmRSS: current) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---- the parent: tokenize once, run the workers one after another ------------------------------

def make_spec(model: str, store=None, prompt_text: str = PROMPT_TEXT, **settings) -> BenchSpec:
    """A spec for `model` with the prompt tokenized by tunelab, long enough for every run and request."""
    from tunelab.registry.store import Store
    from tunelab.runtime import find_model
    from tunelab.tokenizer import Tokenizer

    _, path, _ = find_model(model, store or Store(), quiet=True)
    spec = BenchSpec(model=model, weights_path=str(path), token_ids=[], **settings)
    tokenizer = Tokenizer.load(path)
    while len(spec.token_ids) < spec.tokens_needed:
        spec.token_ids.extend(tokenizer.encode(prompt_text, add_bos=False))
    return spec


def run_benchmark(spec: BenchSpec, compare: tuple[str, ...] = (), on_start=None) -> dict[str, EngineResult]:
    """tunelab's results, then each compared engine's, keyed by engine name; workers run one at a time."""
    jobs = [("tunelab-single", "tunelab"), ("tunelab-batch", "tunelab")] + [(engine, engine) for engine in compare]
    results: dict[str, EngineResult] = {}
    for kind, engine in jobs:
        if on_start is not None:
            on_start(kind)
        measured = _run_worker(kind, spec)
        if engine in results:  # the batch worker adds to the single-stream result
            results[engine].aggregate_decode_tps = {int(k): v for k, v in measured["aggregate_decode_tps"].items()}
            results[engine].aggregate_e2e_tps = {int(k): v for k, v in measured["aggregate_e2e_tps"].items()}
            results[engine].shared_prefix = measured["shared_prefix"]
        else:
            results[engine] = EngineResult(**measured)
    return results


def llama_cpp_python() -> Path:
    """The Python that has llama-cpp-python: $TUNELAB_LLAMA_CPP_PYTHON, or bench/install_llama_cpp.sh's venv."""
    from tunelab.errors import InvalidOption

    python = Path(os.environ.get("TUNELAB_LLAMA_CPP_PYTHON", LLAMA_CPP_VENV / "bin" / "python"))
    if not python.exists():
        raise InvalidOption(
            f"--compare llama.cpp needs llama-cpp-python, but {python} does not exist; run "
            "bench/install_llama_cpp.sh (about 5 minutes) or set TUNELAB_LLAMA_CPP_PYTHON")
    return python


def _run_worker(kind: str, spec: BenchSpec) -> dict:
    python = llama_cpp_python() if kind == "llama.cpp" else Path(sys.executable)
    done = subprocess.run([str(python), __file__, "worker", kind], input=json.dumps(asdict(spec)),
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if done.returncode != 0:
        how = f"was killed by signal {-done.returncode}" if done.returncode < 0 else f"exited with {done.returncode}"
        raise RuntimeError(f"the {kind} benchmark worker {how}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- workers: each runs in its own process ----------------------------------------------------

def _tunelab_runtime(spec: BenchSpec, max_num_seqs: int):
    from tunelab.runtime import open_model

    options = {"dtype": spec.dtype, "num_thread": spec.num_thread, "num_ctx": spec.num_ctx,
               "kv_cache_type": spec.kv_cache_type}
    return open_model(spec.model, options=options, max_num_seqs=max_num_seqs, quiet=True)


def _request(prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0):
    """A request that never stops early; greedy is plain argmax (the filters are neutral), as llama.cpp's loop is."""
    from tunelab.engine.request import Request
    from tunelab.sampling.params import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0).with_seed(seed)
    return Request(prompt_ids=list(prompt_ids), params=params, max_new_tokens=max_new_tokens)  # no stop tokens


def tunelab_single(spec: BenchSpec) -> dict:
    """Load time, RSS and single-stream speed through the engine, as a user's one request sees it."""
    import torch

    from tunelab.runtime import resolve_dtype

    started = time.perf_counter()
    runtime = _tunelab_runtime(spec, max_num_seqs=1)
    load_s = time.perf_counter() - started
    rss_after_load = _memory_mib("VmRSS")
    engine = runtime.engine
    measured = []
    for run in range(spec.runs + 1):  # run 0 warms up
        request = _request(spec.window(run, spec.prompt_tokens), spec.gen_tokens)
        submitted = time.perf_counter()
        times, tokens = [], []
        for event in engine.generate(request):
            if event.token_id is not None:
                times.append(time.perf_counter())
                tokens.append(event.token_id)
        measured.append((times[0] - submitted, (len(times) - 1) / (times[-1] - times[0]), tokens))
    measured = measured[1:]
    return dict(
        engine="tunelab", load_s=load_s, rss_after_load_mib=rss_after_load, peak_rss_mib=_memory_mib("VmHWM"),
        ttft_s=[ttft for ttft, _, _ in measured], prefill_tps=[spec.prompt_tokens / ttft for ttft, _, _ in measured],
        decode_tps=[decode for _, decode, _ in measured], tokens=measured[0][2],
        detail=f"dtype {spec.dtype} ({resolve_dtype(spec.dtype)}), KV {spec.kv_cache_type}, "
               f"{torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")


def _run_to_completion(engine, requests) -> tuple[float, float, int]:
    """Step the engine until every request finishes: (decode tok/s, end-to-end tok/s, prefill tokens computed)."""
    prefill_before = engine.num_prefill_tokens_computed
    for request in requests:
        engine.submit(request)
    pending = {r.request_id for r in requests}
    decode_s, decode_tokens, total_tokens = 0.0, 0, 0
    started = time.perf_counter()
    while pending:
        prefill_mark = engine.num_prefill_tokens_computed
        step_started = time.perf_counter()
        events = engine.step()
        elapsed = time.perf_counter() - step_started
        new_tokens = sum(1 for e in events if e.token_id is not None)
        total_tokens += new_tokens
        if engine.num_prefill_tokens_computed == prefill_mark:  # a decode step: one token per running row
            decode_s += elapsed
            decode_tokens += new_tokens
        pending -= {e.request_id for e in events if e.finish_reason is not None}
    wall = time.perf_counter() - started
    return decode_tokens / decode_s, total_tokens / wall, engine.num_prefill_tokens_computed - prefill_before


def tunelab_batch(spec: BenchSpec) -> dict:
    """Aggregate decode speed with 1, 4 and 16 requests in flight, and prefix sharing across N samples."""
    runtime = _tunelab_runtime(spec, max_num_seqs=max(max(spec.concurrency), spec.shared_samples))
    engine = runtime.engine
    _run_to_completion(engine, [_request(spec.window(0, spec.prompt_tokens), 8)])  # warm-up
    decode, e2e = {}, {}
    for num in spec.concurrency:
        requests = [_request(spec.window(i + 1, spec.prompt_tokens), spec.gen_tokens) for i in range(num)]
        decode[num], e2e[num], _ = _run_to_completion(engine, requests)
    # The tuner's N samples of one task: one prompt, different seeds, sampled. Its window starts
    # where no earlier request's did, so nothing of it is in the prefix cache yet.
    prompt = spec.window(max(spec.runs, max(spec.concurrency)) + 2, spec.shared_prompt_tokens)
    samples = [_request(prompt, spec.shared_gen_tokens, temperature=0.7, seed=s) for s in range(spec.shared_samples)]
    started = time.perf_counter()
    _, _, computed = _run_to_completion(engine, samples)
    shared = dict(samples=spec.shared_samples, prompt_tokens=spec.shared_prompt_tokens,
                  prefill_tokens_computed=computed, unshared_prefill_tokens=spec.shared_samples * spec.shared_prompt_tokens,
                  seconds=time.perf_counter() - started)
    return dict(aggregate_decode_tps=decode, aggregate_e2e_tps=e2e, shared_prefix=shared)


def llama_cpp_single(spec: BenchSpec) -> dict:
    """llama-cpp-python on the same GGUF, as the baselines measure it: eval(prompt), then argmax + eval per token."""
    import llama_cpp
    import numpy as np

    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec.weights_path, n_ctx=spec.num_ctx, n_batch=512, n_ubatch=512,
                          n_threads=spec.threads, n_threads_batch=spec.threads, seed=0, verbose=False)
    load_s = time.perf_counter() - started
    rss_after_load = _memory_mib("VmRSS")
    vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).argmax())

    measured = []
    for run in range(spec.runs + 1):
        llm.reset()
        submitted = time.perf_counter()
        llm.eval(spec.window(run, spec.prompt_tokens))
        tokens, times = [next_token()], [time.perf_counter()]
        while len(tokens) < spec.gen_tokens:
            llm.eval([tokens[-1]])
            tokens.append(next_token())
            times.append(time.perf_counter())
        measured.append((times[0] - submitted, (len(times) - 1) / (times[-1] - times[0]), tokens))
    measured = measured[1:]
    return dict(
        engine="llama.cpp", load_s=load_s, rss_after_load_mib=rss_after_load, peak_rss_mib=_memory_mib("VmHWM"),
        ttft_s=[ttft for ttft, _, _ in measured], prefill_tps=[spec.prompt_tokens / ttft for ttft, _, _ in measured],
        decode_tps=[decode for _, decode, _ in measured], tokens=measured[0][2],
        detail=f"llama-cpp-python {llama_cpp.__version__}, {spec.threads} threads, n_ctx {spec.num_ctx}")


def transformers_single(spec: BenchSpec) -> dict:
    """HF transformers on the same file (GGUF dequantized to bfloat16 at load), greedy `generate`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec.threads)
    path = Path(spec.weights_path)
    started = time.perf_counter()
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    load_s = time.perf_counter() - started
    rss_after_load = _memory_mib("VmRSS")

    class Timestamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    measured = []
    for run in range(spec.runs + 1):
        ids = torch.tensor([spec.window(run, spec.prompt_tokens)])
        stamps = Timestamps()
        submitted = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, streamer=stamps,
                                 max_new_tokens=spec.gen_tokens, min_new_tokens=spec.gen_tokens, pad_token_id=0)
        times = stamps.times[1:]  # the first put() is the prompt
        measured.append((times[0] - submitted, (len(times) - 1) / (times[-1] - times[0]), out[0, ids.shape[1]:].tolist()))
    measured = measured[1:]
    return dict(
        engine="transformers", load_s=load_s, rss_after_load_mib=rss_after_load, peak_rss_mib=_memory_mib("VmHWM"),
        ttft_s=[ttft for ttft, _, _ in measured], prefill_tps=[spec.prompt_tokens / ttft for ttft, _, _ in measured],
        decode_tps=[decode for _, decode, _ in measured], tokens=measured[0][2],
        detail=f"transformers {transformers.__version__} bfloat16, {spec.threads} threads")


WORKERS = {"tunelab-single": tunelab_single, "tunelab-batch": tunelab_batch,
           "llama.cpp": llama_cpp_single, "transformers": transformers_single}

if __name__ == "__main__":
    # Run as a script, this file's folder heads sys.path, and tunelab's kernels/, model/, ... would shadow
    # top-level packages of those names (transformers imports Hugging Face's `kernels` where it finds one).
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 3 or sys.argv[2] not in WORKERS:
        sys.exit(f"usage: python benchmark.py worker {{{','.join(WORKERS)}}} < spec.json")
    job = json.loads(sys.stdin.read())
    job["concurrency"] = tuple(job["concurrency"])
    result = WORKERS[sys.argv[2]](BenchSpec(**job))
    print(json.dumps(result))
