"""On CUDA the sampler queues its kernels and waits for nothing: a batch holding every kind of row
(greedy, sampled with top-k / top-p / min-p and its own seed, penalised, banned tokens, a
min_new_tokens stop mask, logprobs, a grammar's mask) is sampled under torch's sync debug mode
set to raise, and each row's token is what its settings allow."""

from __future__ import annotations

import pytest
import torch

from vlmdeploy.engine.sampling import SamplingParams, sample_async
from vlmdeploy.testing.guides import AllowOnly

pytestmark = pytest.mark.gpu

VOCAB = 151936


def test_sampling_never_waits_for_the_device():
    dev = torch.device("cuda")
    gen = torch.Generator(dev).manual_seed(0)
    logits = torch.randn(7, VOCAB, device=dev, generator=gen).to(torch.bfloat16)

    def seeded(seed: int) -> torch.Generator:
        return torch.Generator(dev).manual_seed(seed)

    params = [
        SamplingParams(),
        SamplingParams(greedy=False, temperature=0.7, top_k=50, top_p=0.9, generator=seeded(1)),
        SamplingParams(greedy=False, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.2,
                       presence_penalty=0.1, generator=seeded(2)),
        SamplingParams(bad_token_ids=(5, 6, 7), logprobs=3),
        SamplingParams(min_new_tokens=4, stop_token_ids=frozenset({11})),
        SamplingParams(greedy=False, top_k=1, guide=AllowOnly({3, 4000, 150000})),
        SamplingParams(greedy=False, repetition_penalty=0.9, generator=seeded(3)),
    ]
    histories = [[], [], [1, 2, 2, 9] * 50, [], [], [], [int(logits[6].argmax())]]
    num_outputs = [0, 0, 200, 0, 1, 0, 1]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = sample_async(logits, params, histories, num_outputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens, logprobs = result.resolve()
    host = logits.float().cpu()
    assert tokens[0] == int(host[0].argmax())
    assert tokens[3] not in (5, 6, 7) and set(logprobs[3]) >= {tokens[3]}
    assert tokens[4] != 11 and tokens[5] in {3, 4000, 150000}
    assert all(0 <= t < VOCAB for t in tokens)
