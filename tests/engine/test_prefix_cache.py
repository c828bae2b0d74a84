"""Prefix caching over full KV blocks (hashes chained over token ids and image content) and the
image embedding cache: reuse must never change results, and must never alias different images."""

from __future__ import annotations

import pytest

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.engine.block_manager import BlockManager
from vlmdeploy.engine.io import ImageInput
from vlmdeploy.engine.sampling import SamplingParams
from vlmdeploy.engine.sequence import Sequence

BS = 4


def seq(i: int, tokens: list[int], images: list[ImageInput] | None = None) -> Sequence:
    return Sequence(i, list(tokens), SamplingParams(), images=images or [])


def compute_all(bm: BlockManager, s: Sequence) -> None:
    bm.allocate(s, s.num_uncomputed)
    s.num_computed = len(s)
    bm.commit(s)


def test_shared_prefix_blocks_are_reused_and_refcounted():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = seq(0, list(range(10)))
    compute_all(bm, a)
    b = seq(1, list(range(9)) + [99, 98])
    assert bm.match_prefix(b) == 8  # two full blocks shared, the third differs
    assert b.block_table == a.block_table[:2]
    assert all(bm.ref[blk] == 2 for blk in b.block_table)
    bm.free_seq(a)
    assert all(bm.ref[blk] == 1 for blk in b.block_table)
    bm.free_seq(b)
    assert bm.num_free == 16 and len(bm.evictable) == 2


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = seq(0, list(range(8)))
    compute_all(bm, a)
    b = seq(1, list(range(8)))
    assert bm.match_prefix(b) == 4  # (8 - 1) // 4 blocks: the last block is recomputed


def test_evicted_blocks_are_forgotten():
    bm = BlockManager(3, BS, enable_prefix_caching=True)
    a = seq(0, list(range(8)))
    compute_all(bm, a)
    bm.free_seq(a)
    c = seq(1, [50 + i for i in range(12)])
    compute_all(bm, c)  # needs all three blocks: both cached ones are evicted
    bm.free_seq(c)
    assert bm.match_prefix(seq(2, list(range(8)))) == 0


def test_same_tokens_different_image_do_not_share():
    bm = BlockManager(16, BS, enable_prefix_caching=True)

    def image(key: str) -> ImageInput:
        return ImageInput(pixel_values=None, offset=2, num_tokens=4, content_hash=key)

    tokens = [1, 2, 7, 7, 7, 7, 3, 4, 5]
    a = seq(0, tokens, [image("cat")])
    compute_all(bm, a)
    assert bm.match_prefix(seq(1, tokens, [image("dog")])) == 0  # block 0 holds image tokens
    assert bm.match_prefix(seq(2, tokens, [image("cat")])) == 8


GEN = GenerationConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def pipes(tiny_ckpts):
    cfg = dict(session_len=4096, block_size=16)
    with (
        pipeline(tiny_ckpts["original"], PytorchEngineConfig(**cfg)) as plain,
        pipeline(
            tiny_ckpts["original"], PytorchEngineConfig(enable_prefix_caching=True, **cfg)
        ) as cached,
    ):
        yield plain, cached


def test_cached_prefix_gives_identical_tokens(pipes, images):
    plain, cached = pipes
    prompt = ("describe this image in detail", images[1])
    expect = plain(prompt, gen_config=GEN)
    first = cached(prompt, gen_config=GEN)
    second = cached(prompt, gen_config=GEN)
    assert first.token_ids == second.token_ids == expect.token_ids
    assert first.cached_tokens == 0
    assert second.cached_tokens == (second.input_token_len - 1) // 16 * 16


def test_multi_turn_chat_reuses_the_first_turn(pipes, images):
    plain, cached = pipes
    sess = cached.chat(("describe this image", images[2]), gen_config=GEN)
    sess = cached.chat("and the colours?", session=sess, gen_config=GEN)
    assert sess.response.cached_tokens >= 3 * 256  # the image blocks of turn one are reused
    ref = plain.chat(("describe this image", images[2]), gen_config=GEN)
    ref = plain.chat("and the colours?", session=ref, gen_config=GEN)
    assert sess.response.token_ids == ref.response.token_ids


def test_different_image_same_size_is_not_reused(pipes, images):
    from tests.conftest import solid_image

    _, cached = pipes
    a = cached(("what is it?", solid_image(300, 300, 11)), gen_config=GEN)
    b = cached(("what is it?", solid_image(300, 300, 12)), gen_config=GEN)
    assert a.input_token_len == b.input_token_len
    image_start = cached.prepare_sync(("what is it?", images[0])).images[0].offset
    assert b.cached_tokens <= image_start


def test_repeated_image_skips_the_encoder(pipes, images):
    plain, _ = pipes
    calls = []
    encode = plain.engine.core.vision.encode
    plain.engine.core.vision.encode = lambda tiles: calls.append(len(tiles)) or encode(tiles)
    try:
        img = images[1]
        first = plain(("one", img), gen_config=GEN)
        second = plain(("two", img), gen_config=GEN)
        batch = plain([("three", img), ("four", images[0])], gen_config=GEN)
    finally:
        plain.engine.core.vision.encode = encode
    assert first.token_ids and second.token_ids and len(batch) == 2
    tiles_img, tiles_other = 3, 1
    assert sum(calls) in (tiles_img + tiles_other, tiles_other)  # images[1] encoded at most once
