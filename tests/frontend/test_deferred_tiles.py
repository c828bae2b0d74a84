"""An image whose embedding the engine already holds is not tiled again when a request is
prepared (a chat's next turn re-sends its image); the engine makes the tiles only if the cached
embedding is gone by the time it needs them. Either way the answer is the same."""

from __future__ import annotations

import pytest

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

GEN = GenerationConfig(max_new_tokens=12)


@pytest.fixture()
def pipe(tiny_ckpts):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=4096)) as p:
        yield p


def test_a_cached_image_is_not_tiled_again_and_answers_the_same(pipe, images):
    image = images[1]  # 2x1 grid + thumbnail
    first = pipe.prepare_sync(("describe", image), GEN)
    assert first.images[0].pixel_values is not None  # never seen: tiled while preparing
    expected = pipe(("describe", image), gen_config=GEN)

    again = pipe.prepare_sync(("describe", image), GEN)
    deferred = again.images[0]
    assert deferred.pixel_values is None and deferred.deferred is not None
    assert deferred.content_hash == first.images[0].content_hash
    assert deferred.num_tokens == first.images[0].num_tokens
    assert again.token_ids == first.token_ids
    assert pipe(("describe", image), gen_config=GEN).text == expected.text

    other = pipe.prepare_sync(("describe", images[2]), GEN)
    assert other.images[0].pixel_values is not None


def test_an_embedding_dropped_after_preparing_is_tiled_by_the_engine(pipe, images):
    image = images[2]
    expected = pipe(("what is this", image), gen_config=GEN).text
    req = pipe.prepare_sync(("what is this", image), GEN)
    assert req.images[0].pixel_values is None
    pipe.engine.core.vision.cache.clear()  # as if other images had pushed it out in the meantime

    async def run():
        return [o async for o in pipe.generate_prepared(req, session_id=77)]

    import asyncio

    outs = asyncio.run(run())
    assert "".join(o.text for o in outs) == expected
    assert req.images[0].pixel_values is not None  # made on demand, same pixels as eager tiling
    assert req.images[0].pixel_values.shape[0] * 256 == req.images[0].num_tokens


def test_a_chat_follow_up_reuses_the_first_turn_image(pipe, images):
    messages = [{"role": "user", "content": [
        {"type": "image", "image": images[0]}, {"type": "text", "text": "describe"}]}]
    first = pipe(messages, gen_config=GEN)
    follow = messages + [{"role": "assistant", "content": first.text},
                         {"role": "user", "content": "and the colour?"}]
    req = pipe.prepare_sync(follow, GEN)
    assert [im.pixel_values for im in req.images] == [None]
    out = pipe(follow, gen_config=GEN)
    assert out.generate_token_len == 12 and out.cached_tokens == 0  # prefix caching is off here


def test_a_request_with_deferred_tiles_pickles_whole(pipe, images):
    """What crosses the engine boundary is plain data: a process could receive it."""
    import pickle

    import torch

    from vlmdeploy.engine.io import EngineRequest

    first = pipe.prepare_sync(("describe", images[0]), GEN)
    pipe(("describe", images[0]), gen_config=GEN)  # the engine now holds the embedding
    req = pipe.prepare_sync(("describe", images[0]), GEN)
    sent = EngineRequest(pipe.new_session_id(), req.token_ids, req.sampling, req.images)
    got = pickle.loads(pickle.dumps(sent))
    assert got.token_ids == req.token_ids and got.sampling == req.sampling
    (image,) = got.images
    assert image.pixel_values is None and image.content_hash == first.images[0].content_hash
    assert torch.equal(image.pixels(), first.images[0].pixel_values)
