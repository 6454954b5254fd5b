"""A row's tokens depend only on its own logits, history, parameters and seed, never on its batch."""

import random

import torch

from tunelab.sampling import Sampler, SamplerState, SamplingParams

VOCAB = 3000
TOKEN_TEXTS = [f"t{i}" for i in range(VOCAB - 2)] + ["\n", ":"]

ROWS = [
    SamplingParams(seed=1),  # Ollama's defaults: top_k 40, top_p 0.9, temperature 0.8
    SamplingParams(temperature=0, seed=2),
    SamplingParams(top_k=0, top_p=0.7, seed=3),
    SamplingParams(top_k=0, top_p=1.0, min_p=0.05, temperature=1.5, seed=4),
    SamplingParams(top_k=100, typical_p=0.8, seed=5),
    SamplingParams(repeat_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3, repeat_last_n=-1, seed=6),
    SamplingParams(dry_multiplier=0.8, dry_allowed_length=1, top_k=0, seed=7),
    SamplingParams(xtc_probability=0.5, xtc_threshold=0.05, top_k=0, top_p=0.95, seed=8),
    SamplingParams(top_n_sigma=1.5, top_k=0, seed=9),
    SamplingParams(mirostat=1, seed=10),
    SamplingParams(mirostat=2, mirostat_tau=3.0, seed=11),
    SamplingParams(logit_bias={5: 3.0, 6: -100.0}, logprobs=True, top_logprobs=3, seed=12),
    SamplingParams(seed=1),  # row 0 again, with the same logits and history
]
DUPLICATE = len(ROWS) - 1


def source(row):
    """Which row's logits and history a row sees: the duplicate sees row 0's."""
    return 0 if row == DUPLICATE else row


def step_logits(row, step):
    """Peaked logits that differ per row and step, like a model's."""
    generator = torch.Generator().manual_seed(1000 * row + step)
    logits = torch.randn(VOCAB, generator=generator) * 2
    logits[torch.randint(0, VOCAB, (20,), generator=generator)] += 6
    return logits


def generate(order, num_steps=6):
    """Run the rows in `order` as one batch for num_steps; returns each row's tokens and logprobs."""
    sampler = Sampler(token_texts=TOKEN_TEXTS, encode=lambda text: [TOKEN_TEXTS.index(text)])
    params = [ROWS[r] for r in order]
    states = [SamplerState.new(p) for p in params]
    histories = [[source(r), 7, 8, 9, 7, 8, 9, 7, 8] for r in order]
    outputs = {r: [] for r in order}
    for step in range(num_steps):
        logits = torch.stack([step_logits(source(r), step) for r in order])
        result = sampler(logits, params, histories, states)
        for i, r in enumerate(order):
            token = result.token_ids[i].item()
            histories[i].append(token)
            logprob = None if result.logprobs is None else result.logprobs[i].item()
            top = None if result.top_logprobs is None else result.top_logprobs[i]
            outputs[r].append((token, logprob, top))
    return outputs


def test_each_row_in_a_mixed_batch_gets_exactly_what_it_gets_alone():
    batched = generate(list(range(len(ROWS))))
    for r in range(len(ROWS)):
        alone = generate([r])[r]
        # alone, a row only reports logprobs when it asked for them
        assert [t for t, _, _ in batched[r]] == [t for t, _, _ in alone], f"row {r}: {ROWS[r]}"
        if ROWS[r].logprobs:
            assert batched[r] == alone


def test_batch_order_does_not_matter():
    order = list(range(len(ROWS)))
    random.Random(0).shuffle(order)
    assert generate(order) == generate(list(range(len(ROWS))))


def test_the_same_seeded_request_twice_in_a_batch_draws_the_same_tokens():
    outputs = generate(list(range(len(ROWS))))
    assert outputs[0] == outputs[DUPLICATE]
    assert len({t for t, _, _ in outputs[0]}) > 1
