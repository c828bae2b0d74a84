"""W4's mix: seeded, within its bounds, and with every kind of request it promises."""

from __future__ import annotations

import pytest

from benchmarks.w4 import SIZES, W4Spec, summary, tiles_of, w4_requests
from vlmdeploy.assets import resolve_model_path
from vlmdeploy.frontend.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(resolve_model_path(None))


@pytest.fixture(scope="module")
def mix(tok):
    return w4_requests(tok, seed=7, spec=W4Spec(requests=96))


def test_the_same_seed_gives_the_same_requests(tok, mix):
    assert w4_requests(tok, seed=7, spec=W4Spec(requests=96)) == mix
    assert w4_requests(tok, seed=8, spec=W4Spec(requests=96)) != mix


def test_sizes_cover_one_to_thirteen_tiles_and_extreme_aspects():
    counts = {tiles_of(*size) for size in SIZES}
    assert min(counts) == 1 and max(counts) == 13
    assert any(w / h >= 5 for w, h in SIZES) and any(h / w >= 5 for w, h in SIZES)


def test_every_kind_of_request_is_in_the_mix(mix):
    s = summary(mix)
    assert s["requests"] == 96
    assert 0 < s["distinct_images"] < s["images"]  # some images repeat
    assert s["follow_ups"] > 0 and 0 < s["sampled"] < 96
    per_request = [sum(isinstance(m["content"], list) and sum(p["type"] == "image_url"
                                                             for p in m["content"])
                       for m in msgs) for msgs, _ in mix]
    assert {0, 1, 2} <= set(per_request) and max(per_request) <= 4
    assert any(msgs[0]["role"] == "system" for msgs, _ in mix)
    outs = [g["max_new_tokens"] for _, g in mix]
    assert min(outs) >= 16 and max(outs) <= 1024 and max(outs) > 4 * min(outs)
    seeds = [g["random_seed"] for _, g in mix if g.get("do_sample")]
    assert len(set(seeds)) == len(seeds)


def test_a_smaller_session_scales_the_mix_down(tok):
    spec = W4Spec.for_session(2048, 8)
    assert spec.max_tiles == 4 and spec.output_tokens[1] == 256
    for _, gen in w4_requests(tok, seed=1, spec=spec):
        assert gen["max_new_tokens"] <= 256
