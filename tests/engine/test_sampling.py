"""The batched sampler (``vlmdeploy.engine.sampling``) on crafted distributions with fixed seeds."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from vlmdeploy.engine.sampling import SamplingParams, _apply_penalties, sample

# A crafted 10-token distribution, most likely first.
PROBS = [0.40, 0.25, 0.15, 0.10, 0.05, 0.02, 0.01, 0.01, 0.005, 0.005]
LOGITS = torch.tensor(PROBS).log()
DRAWS = 2000


def draw(n: int = DRAWS, logits: torch.Tensor = LOGITS, seed: int = 0, **kw) -> Counter:
    """Token counts of ``n`` sampled rows of ``logits`` (one step each, one shared generator)."""
    gen = torch.Generator().manual_seed(seed)
    params = [SamplingParams(greedy=False, generator=gen, **kw) for _ in range(n)]
    tokens, _ = sample(logits.expand(n, -1).clone(), params, [[] for _ in range(n)], [0] * n)
    return Counter(tokens)


def freq(counts: Counter, token: int) -> float:
    return counts[token] / sum(counts.values())


def test_plain_sampling_follows_the_distribution():
    counts = draw()
    for token, p in enumerate(PROBS[:4]):
        # 2000 draws: the standard error is below 0.011, so 0.05 is > 4 sigma
        assert abs(freq(counts, token) - p) < 0.05, (token, counts)
    assert len(counts) >= 6


def test_greedy_is_argmax():
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(greedy=True) for _ in range(6)]
    tokens, _ = sample(logits, params, [[]] * 6, [0] * 6)
    assert tokens == logits.argmax(-1).tolist()


def test_greedy_ignores_sampling_fields_and_keeps_its_penalties():
    """Temperature and top-p do not change a greedy row's argmax; penalties do, as in LMDeploy's
    and vLLM's servers (the Python API's do_sample=False drops the repetition penalty before the
    engine, as LMDeploy's pipeline does: test_pipeline_api)."""
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    p = SamplingParams(greedy=True, temperature=2.0, top_p=0.1)
    assert sample(logits, [p], [[1, 1, 1]], [3])[0] == [1]
    for kw in ({"repetition_penalty": 10.0}, {"frequency_penalty": 0.5}):
        penalised = SamplingParams(greedy=True, **kw)
        assert sample(logits.repeat(2, 1), [p, penalised], [[1, 1, 1]] * 2, [3, 3])[0] == [
            1, 2], kw


def test_top_k_1_is_greedy():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    params = [SamplingParams(greedy=False, top_k=1, generator=gen) for _ in range(64)]
    tokens, _ = sample(logits, params, [[]] * 64, [0] * 64)
    assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "kw,allowed",
    [
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_p": 0.6}, {0, 1}),  # 0.40 < 0.6, 0.40 + 0.25 reaches it
        ({"top_p": 0.3}, {0}),
        ({"top_p": 0.0}, {0}),  # the top token always stays
        ({"min_p": 0.3}, {0, 1, 2}),  # threshold 0.3 * 0.40 = 0.12
        ({"top_k": 4, "top_p": 0.8, "min_p": 0.5}, {0, 1}),  # min_p 0.2 drops 0.15 and 0.10
    ],
)
def test_filters_never_emit_a_filtered_token(kw, allowed):
    counts = draw(**kw)
    assert set(counts) == allowed, counts
    # the survivors keep their relative odds (renormalised)
    total = sum(PROBS[t] for t in allowed)
    for t in allowed:
        assert abs(freq(counts, t) - PROBS[t] / total) < 0.05


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_reshapes_the_distribution(temperature):
    counts = draw(temperature=temperature)
    scaled = [p ** (1 / temperature) for p in PROBS]
    expected = scaled[0] / sum(scaled)
    assert abs(freq(counts, 0) - expected) < 0.05
    plain = freq(draw(), 0)
    assert (freq(counts, 0) > plain) == (temperature < 1)


def test_repetition_penalty_ctrl_style():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    p = SamplingParams(greedy=False, repetition_penalty=2.0)
    _apply_penalties(logits, [p], [[0, 1, 1]], [0])
    # seen tokens: positive logits are divided, negative ones multiplied; others untouched
    assert logits.tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 5)
    p = SamplingParams(greedy=False, presence_penalty=0.5, frequency_penalty=0.25)
    _apply_penalties(logits, [p], [[1, 1, 1, 3]], [0])
    # presence once per seen token, frequency per occurrence
    assert logits[0].tolist() == pytest.approx([0.0, -0.5 - 0.75, 0.0, -0.5 - 0.25, 0.0])


def one_row_penalties(row: torch.Tensor, p: SamplingParams, history: list[int]) -> torch.Tensor:
    """The penalties of one row, written out token by token."""
    row = row.clone()
    counts = {t: history.count(t) for t in set(history)}
    for t, n in counts.items():
        v = row[t]
        row[t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        row[t] -= p.frequency_penalty * n + p.presence_penalty
    return row


def test_penalties_of_a_batch_equal_each_row_alone():
    """Rows of assorted settings and history lengths (an empty one too) in one call; rows not
    named are left as they are."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen) * 3
    params = [
        SamplingParams(greedy=False, repetition_penalty=1.3),
        SamplingParams(greedy=False, presence_penalty=0.4, frequency_penalty=0.1),
        SamplingParams(greedy=False),  # not penalised, not named
        SamplingParams(greedy=False, repetition_penalty=0.8, frequency_penalty=-0.2),
        SamplingParams(greedy=False, repetition_penalty=1.1),
        SamplingParams(greedy=False, presence_penalty=1.0),
    ]
    histories = [[3, 3, 7], [0, 49, 49, 49, 12], [1, 2], [5] * 40 + [6], [], [7]]
    rows = [0, 1, 3, 4, 5]
    want = logits.clone()
    for i in rows:
        want[i] = one_row_penalties(logits[i], params[i], histories[i])
    got = logits.clone()
    _apply_penalties(got, params, histories, rows)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    assert torch.equal(got[2], logits[2]) and torch.equal(got[4], logits[4])


def test_penalties_change_the_sampled_token():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    top1 = dict(greedy=False, top_k=1, generator=torch.Generator().manual_seed(0))
    assert sample(logits, [SamplingParams(**top1)], [[0]], [1])[0] == [0]
    for kw in ({"repetition_penalty": 2.0}, {"presence_penalty": 1.0}, {"frequency_penalty": 0.3}):
        # 0 was generated three times: its logit falls below token 1's
        assert sample(logits, [SamplingParams(**top1, **kw)], [[0, 0, 0]], [3])[0] == [1], kw


def seeded_run(seed: int, steps: int, others: int) -> list[int]:
    """Tokens of one seeded row over ``steps`` steps, batched with ``others`` unrelated rows."""
    mine_logits = torch.randn(steps, 1, 50, generator=torch.Generator().manual_seed(9))
    other_logits = torch.randn(steps, others, 50, generator=torch.Generator().manual_seed(10)) * 3
    mine = SamplingParams(
        greedy=False, temperature=1.3, generator=torch.Generator().manual_seed(seed)
    )
    noise = [
        SamplingParams(greedy=False, generator=torch.Generator().manual_seed(100 + i))
        for i in range(others)
    ]
    out = []
    for step in range(steps):
        rows = torch.cat([mine_logits[step], other_logits[step]])  # (1 + others, 50)
        tokens, _ = sample(rows, [mine, *noise], [[]] * (1 + others), [step] * (1 + others))
        out.append(tokens[0])
    return out


def test_seeded_generator_is_independent_of_the_batch():
    alone = seeded_run(7, steps=20, others=0)
    assert seeded_run(7, steps=20, others=5) == alone
    assert seeded_run(7, steps=20, others=2) == alone
    assert seeded_run(8, steps=20, others=0) != alone


def test_bad_token_ids_are_never_sampled():
    counts = draw(bad_token_ids=(0, 1))
    assert 0 not in counts and 1 not in counts and counts
    greedy = SamplingParams(greedy=True, bad_token_ids=(0, 1))
    assert sample(LOGITS[None].clone(), [greedy], [[]], [0])[0] == [2]


def test_out_of_vocabulary_ids_are_ignored():
    # must not raise inside the engine step
    p = SamplingParams(
        greedy=True, bad_token_ids=(10**9, -1, 0), stop_token_ids=frozenset({99}), min_new_tokens=5
    )
    assert sample(LOGITS[None].clone(), [p], [[]], [0])[0] == [1]


@pytest.mark.parametrize("greedy", [True, False])
def test_min_new_tokens_masks_stop_ids(greedy):
    stop = frozenset({0, 1})
    gen = torch.Generator().manual_seed(5)
    p = SamplingParams(greedy=greedy, min_new_tokens=3, stop_token_ids=stop, generator=gen)
    for num_output in range(3):  # outputs 1..3 may not stop
        for _ in range(50 if not greedy else 1):
            token = sample(LOGITS[None].clone(), [p], [[]], [num_output])[0][0]
            assert token not in stop
    greedy_p = SamplingParams(greedy=True, min_new_tokens=3, stop_token_ids=stop)
    assert sample(LOGITS[None].clone(), [greedy_p], [[]], [3])[0] == [0]  # the 4th may


def test_logprobs_hold_top_n_and_the_sampled_token():
    logits = LOGITS[None].expand(3, -1).clone()
    params = [
        SamplingParams(greedy=True, logprobs=3),
        SamplingParams(
            greedy=False,
            logprobs=2,
            bad_token_ids=(0, 1, 2, 3),
            generator=torch.Generator().manual_seed(0),
        ),
        SamplingParams(greedy=True),
    ]
    tokens, logprobs = sample(logits, params, [[]] * 3, [0] * 3)
    assert tokens[0] == 0 and tokens[1] >= 4
    assert set(logprobs[0]) == {0, 1, 2}
    assert set(logprobs[1]) == {0, 1, tokens[1]}  # top-2 plus the sampled token
    assert logprobs[2] is None
    for entry in logprobs[:2]:  # log-softmax of the raw logits
        for token, value in entry.items():
            assert value == pytest.approx(math.log(PROBS[token]), abs=1e-5)


def test_logprobs_zero_gives_only_the_sampled_token():
    _, logprobs = sample(LOGITS[None].clone(), [SamplingParams(logprobs=0)], [[]], [0])
    assert logprobs == [{0: pytest.approx(math.log(0.4), abs=1e-5)}]


def test_logprobs_beyond_the_vocabulary_are_capped():
    _, logprobs = sample(LOGITS[None].clone(), [SamplingParams(logprobs=50)], [[]], [0])
    assert len(logprobs[0]) == len(PROBS)


def test_sample_does_not_modify_the_callers_logits():
    logits = LOGITS[None].expand(2, -1).clone()
    before = logits.clone()
    params = [
        SamplingParams(greedy=True, bad_token_ids=(0,)),
        SamplingParams(
            greedy=False,
            repetition_penalty=1.5,
            presence_penalty=1.0,
            min_new_tokens=2,
            stop_token_ids=frozenset({1}),
            generator=torch.Generator().manual_seed(0),
        ),
    ]
    sample(logits, params, [[2, 3], [2, 3]], [0, 0])
    assert torch.equal(logits, before)


def test_half_precision_logits_are_accepted():
    logits = LOGITS[None].to(torch.bfloat16)
    assert sample(logits, [SamplingParams(greedy=True, logprobs=1)], [[]], [0])[0] == [0]


def test_all_greedy_batch_in_bf16_picks_what_fp32_picks():
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(6, 300, generator=gen) * 3).to(torch.bfloat16)
    logits[2, 7] = logits[2, 11] = logits[2].max() + 1  # an exact tie: the first index wins
    greedy = [SamplingParams(greedy=True) for _ in range(6)]
    fast, _ = sample(logits, greedy, [[]] * 6, [0] * 6)
    assert fast == logits.float().argmax(-1).tolist() and fast[2] == 7
    # one row asking for logprobs takes the general path: the same tokens
    mixed = greedy[:5] + [SamplingParams(greedy=True, logprobs=2)]
    general, logprobs = sample(logits, mixed, [[]] * 6, [0] * 6)
    assert general == fast and logprobs[5] is not None and logprobs[0] is None
