"""A quantized model loads from its prepared copy exactly as it was converted, and a bad copy costs only time."""

from __future__ import annotations

import logging
import subprocess
import sys

import torch

from tunelab.engine.request import Request
from tunelab.registry.store import Store
from tunelab.runtime import load_model_files, open_model
from tunelab.sampling.params import SamplingParams
from tunelab.weights.gguf_file import GGUFFile
from tunelab.weights.loader import load_weights
from tunelab.weights.prepared import load_prepared, prepared_dir
from tunelab.weights.quantized import GroupedEmbedding, QuantizedEmbedding


def greedy_tokens(runtime, prompt: str, count: int = 12) -> list[int]:
    request = Request(prompt_ids=runtime.tokenizer.encode(prompt), params=SamplingParams(temperature=0).with_seed(0),
                      max_new_tokens=count)
    return [event.token_id for event in runtime.engine.generate(request) if event.token_id is not None]


def test_the_second_load_reads_the_prepared_model_and_computes_the_same(tunelab_home, smollm2_path):
    store = Store(tunelab_home)
    store.register_gguf("smollm2:135m", store.add_blob_from_file(smollm2_path, link=True))
    options = {"dtype": "int8", "num_thread": 1}
    cold = open_model("smollm2:135m", store, options, max_num_seqs=1, quiet=True)
    directory = prepared_dir(store.cache_dir, cold.path, "int8")
    assert (directory / "weights.pt").is_file() and (directory / "source").resolve() == cold.path.resolve()

    warm = open_model("smollm2:135m", store, options, max_num_seqs=1, quiet=True)
    cold_state, warm_state = cold.model.state_dict(), warm.model.state_dict()
    assert cold_state.keys() == warm_state.keys()
    assert all(torch.equal(cold_state[name], warm_state[name]) for name in cold_state)
    assert all(tensor.data_ptr() % 64 == 0 for tensor in warm_state.values())  # the kernels' aligned loads
    assert [type(m).__name__ for m in cold.model.modules()] == [type(m).__name__ for m in warm.model.modules()]
    for runtime in (cold, warm):  # SmolLM2's tied table is read from its Q8_0 head: held once, saved once
        assert runtime.model.model.embed_tokens.weight.data_ptr() == runtime.model.lm_head.weight.data_ptr()
        assert runtime.model.lm_head.out_dtype == torch.float32  # float32 logits, also after a warm load
    assert warm.tokenizer.encode("def fib(n):\n    return") == cold.tokenizer.encode("def fib(n):\n    return")
    assert warm.tokenizer.stop_token_ids == cold.tokenizer.stop_token_ids
    assert warm.template.render([{"role": "user", "content": "hi"}]) == cold.template.render([{"role": "user", "content": "hi"}])
    prompt = "The lighthouse keeper climbed the stairs"
    assert greedy_tokens(warm, prompt) == greedy_tokens(cold, prompt)


def test_a_tied_table_read_from_its_head_gives_the_file_rows(smollm2_path):
    _, model = load_weights(smollm2_path, "int8")
    assert isinstance(model.model.embed_tokens, GroupedEmbedding)
    table = dict(GGUFFile(smollm2_path).quantized_tensors())["model.embed_tokens.weight"]
    ids = torch.tensor([0, 1, 17, 4095, 4096, 49151, 17])
    assert torch.equal(model.model.embed_tokens(ids), QuantizedEmbedding(table)(ids))


def test_a_damaged_prepared_model_is_converted_again(tunelab_home, smollm2_path, caplog):
    store = Store(tunelab_home)
    directory = prepared_dir(store.cache_dir, smollm2_path, "int8")
    expected = load_model_files(smollm2_path, "int8", store)[1].state_dict()
    weights = directory / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk or a crash elsewhere
    with caplog.at_level(logging.WARNING):
        assert load_prepared(directory) is None
    assert "converting the weights again" in caplog.text and not directory.exists()
    _, model, _ = load_model_files(smollm2_path, "int8", store)
    assert all(torch.equal(expected[name], tensor) for name, tensor in model.state_dict().items())
    assert directory.is_dir()  # written anew


def test_removing_the_model_removes_its_prepared_copy(tunelab_home, smollm2_path):
    store = Store(tunelab_home)
    store.register_gguf("smollm2:135m", store.add_blob_from_file(smollm2_path, link=True))
    path = store.resolve("smollm2:135m").weights_path
    load_model_files(path, "int8", store)
    assert prepared_dir(store.cache_dir, path, "int8").is_dir()
    store.remove("smollm2:135m")
    assert not list(store.cache_dir.glob("prepared-*"))


def test_loading_leaves_pytorchs_compiler_stack_unimported(tunelab_home, smollm2_path):
    """A random init on `meta` runs through PyTorch's Python reference kernels, whose first use imports
    torch._dynamo and ~800 other modules: ~65 MiB resident for the process's life. Loading needs none."""
    store = Store(tunelab_home)
    load_model_files(smollm2_path, "int8", store)  # prepared here; the child below loads the prepared copy
    script = ("import sys; from pathlib import Path; from tunelab.registry.store import Store; "
              "from tunelab.runtime import load_model_files; "
              f"load_model_files(Path({str(smollm2_path)!r}), 'int8', Store(Path({str(tunelab_home)!r}))); "
              "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
