"""The engine on a real model (SmolLM2-135M): continuous batching, seeds, stops, cancel, prefix reuse."""

from __future__ import annotations

import pytest

from tunelab.engine.request import FinishReason
from tunelab.errors import PromptTooLong
from tunelab.generation import collect, prepare_chat, prepare_completion
from tunelab.registry.store import Store
from tunelab.runtime import open_model

PROMPTS = ["Name three colours.", "What is 2 + 2?", "Write a haiku about the sea.", "Say hello in French."]


@pytest.fixture(scope="module")
def runtime(smollm2_path, tmp_path_factory):
    # One thread: float sums are then identical whatever the batch size, so batched == alone exactly.
    rt = open_model(str(smollm2_path), Store(tmp_path_factory.mktemp("home")),
                    {"dtype": "float32", "num_thread": 1, "num_ctx": 1024})
    yield rt
    rt.close()


def run_alone(runtime, prepared):
    return collect(prepared, runtime.engine.generate(prepared.request))


def run_together(runtime, prepared_list, join_late=()):
    """Submit all, step until done; requests in `join_late` are submitted after a few decode steps."""
    engine = runtime.engine
    handles = {}
    late = [p for i, p in enumerate(prepared_list) if i in join_late]
    for i, p in enumerate(prepared_list):
        if i not in join_late:
            handles[i] = engine.submit(p.request)
    steps = 0
    while engine.scheduler.has_work() or late:
        engine.step()
        steps += 1
        if steps == 4:
            for i in join_late:
                handles[i] = engine.submit(prepared_list[i].request)
            late = []
    return {i: collect(prepared_list[i], _drain(h)) for i, h in handles.items()}


def _drain(handle):
    while not handle.events.empty():
        yield handle.events.get()


def chat(runtime, text, **options):
    return prepare_chat(runtime, [{"role": "user", "content": text}], options={"num_predict": 24, **options})


def test_greedy_rows_batched_equal_each_alone(runtime):
    alone = [run_alone(runtime, chat(runtime, p, temperature=0)) for p in PROMPTS]
    together = run_together(runtime, [chat(runtime, p, temperature=0) for p in PROMPTS], join_late={2})
    for i, reply in enumerate(alone):
        assert together[i].token_ids == reply.token_ids
        assert together[i].content == reply.content


def test_same_seed_same_text_alone_or_batched_with_other_options(runtime):
    seeded = dict(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    first = run_alone(runtime, chat(runtime, PROMPTS[2], **seeded))
    again = run_alone(runtime, chat(runtime, PROMPTS[2], **seeded))
    mixed = run_together(runtime, [
        chat(runtime, PROMPTS[0], temperature=0.5, seed=7, repeat_penalty=1.3),
        chat(runtime, PROMPTS[2], **seeded),
        chat(runtime, PROMPTS[1], temperature=0),
    ])
    assert first.token_ids == again.token_ids == mixed[1].token_ids
    other_seed = run_alone(runtime, chat(runtime, PROMPTS[2], **dict(seeded, seed=99)))
    assert other_seed.token_ids != first.token_ids


def test_num_predict_and_stop_strings_end_the_reply(runtime):
    limited = run_alone(runtime, chat(runtime, PROMPTS[2], temperature=0, num_predict=5))
    assert limited.finish_reason is FinishReason.LENGTH and len(limited.token_ids) == 5
    free = run_alone(runtime, chat(runtime, PROMPTS[0], temperature=0, num_predict=40))
    word = free.content.split()[1]
    stopped = run_alone(runtime, chat(runtime, PROMPTS[0], temperature=0, num_predict=40, stop=[word]))
    assert stopped.finish_reason is FinishReason.STOP
    assert word not in stopped.content and free.content.startswith(stopped.content)


def test_cancel_frees_the_sequence_and_its_blocks(runtime):
    engine = runtime.engine
    free_before = engine.stats()["free_blocks"]
    keep = engine.submit(chat(runtime, PROMPTS[0], temperature=0, num_predict=30).request)
    drop = engine.submit(chat(runtime, PROMPTS[1], temperature=0, num_predict=30).request)
    for _ in range(3):
        engine.step()
    engine.cancel(drop.request_id)
    while engine.scheduler.has_work():
        engine.step()
    events = list(_drain(drop))
    assert events[-1].finish_reason is FinishReason.CANCELLED
    assert list(_drain(keep))[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["free_blocks"] == free_before


def test_identical_prompts_compute_the_prefix_once_and_match_unshared(runtime):
    engine = runtime.engine
    text = "Explain recursion to a child. " * 12
    alone = run_alone(runtime, chat(runtime, text, temperature=0, num_predict=8))
    # Evict cached prefixes so the shared run starts cold.
    engine.allocator.block_hash.clear()
    engine.allocator.hash_to_block.clear()
    before = engine.num_prefill_tokens_computed
    replies = run_together(runtime, [chat(runtime, text, temperature=0, num_predict=8) for _ in range(4)])
    computed = engine.num_prefill_tokens_computed - before
    prompt_len = alone.num_prompt_tokens
    assert computed < prompt_len + 4 * engine.config.block_size
    assert all(r.token_ids == alone.token_ids for r in replies.values())


def test_a_prompt_longer_than_the_context_is_refused_with_the_fix(runtime):
    prepared = prepare_completion(runtime, "word " * 2000, raw=True)
    with pytest.raises(PromptTooLong, match="num_ctx"):
        runtime.engine.submit(prepared.request)
    assert runtime.engine.stats()["waiting"] == 0
