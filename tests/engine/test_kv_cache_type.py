"""The 8-bit KV cache as a load option: the engine on SmolLM2 with `kv_cache_type q8_0`. (What it costs in
accuracy is measured in tests/weights/test_quantized_accuracy.py.)"""

from __future__ import annotations

import pytest

from tunelab.engine.request import Request
from tunelab.errors import InvalidOption
from tunelab.options import validate_options
from tunelab.runtime import open_model
from tunelab.sampling.params import SamplingParams

PROMPTS = ["The lighthouse keeper climbed the stairs", "Name three colours:", "def reverse(s):"]


def greedy(prompt_ids: list[int]) -> Request:
    return Request(prompt_ids=prompt_ids, params=SamplingParams(temperature=0).with_seed(0), max_new_tokens=12)


def test_a_q8_0_cache_halves_the_pool_and_batched_rows_get_what_they_get_alone(smollm2_path):
    options = {"dtype": "int8", "num_ctx": 1024}
    q8 = open_model(str(smollm2_path), options=dict(options, kv_cache_type="q8_0"), max_num_seqs=3, quiet=True)
    plain = open_model(str(smollm2_path), options=options, max_num_seqs=3, quiet=True)
    assert q8.load_options["kv_cache_type"] == "q8_0" and q8.engine.kv_cache.quantized
    assert q8.engine.kv_cache.nbytes * 32 == plain.engine.kv_cache.nbytes * 17  # 34 bytes per 32 values

    engine = q8.engine
    requests = [greedy(q8.tokenizer.encode(p)) for p in PROMPTS]
    for request in requests:
        engine.submit(request)
    together: dict[int, list[int]] = {r.request_id: [] for r in requests}
    while engine.scheduler.has_work():
        for event in engine.step():
            if event.token_id is not None:
                together[event.request_id].append(event.token_id)
    for request in requests:
        alone = [e.token_id for e in engine.generate(greedy(request.prompt_ids)) if e.token_id is not None]
        assert together[request.request_id] == alone


def test_an_unknown_kv_cache_type_names_the_valid_ones():
    with pytest.raises(InvalidOption, match="auto or q8_0"):
        validate_options({"kv_cache_type": "q4_0"})
