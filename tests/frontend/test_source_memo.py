"""A chat's follow-up turn re-sends its images as the same data URLs: once an inline image's
embedding is held, it is recognised by its source's digest and neither decoded nor tiled again. A
source checked under looser limits is checked again under stricter ones, and the answer is the same
whether or not the engine still holds the embedding when it needs it."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest

from vlmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
from vlmdeploy.errors import ImageError
from vlmdeploy.frontend import images as images_module
from vlmdeploy.vl.media import MediaPolicy
from vlmdeploy.vl.source_memo import SourceMemo, source_key
from vlmdeploy.vl.tiling import TilingParams

GEN = GenerationConfig(max_new_tokens=8)
PARAMS = TilingParams(12, 1, 448, True)


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_only_inline_sources_have_keys_and_the_limits_are_part_of_them(images, tmp_path):
    url = data_url(images[0])
    policy = MediaPolicy()
    key = source_key(url, policy, PARAMS)
    assert key is not None and key == source_key(url, MediaPolicy(), PARAMS)
    assert source_key(base64.b64decode(url.split(",")[1]), policy, PARAMS) not in (None, key)
    assert source_key(url, policy, TilingParams(6, 1, 448, True)) != key
    assert source_key(url, MediaPolicy(max_pixels=100), PARAMS) != key
    assert source_key(data_url(images[1]), policy, PARAMS) != key
    path = tmp_path / "a.png"
    images[0].save(path)
    for source in (str(path), "http://example.com/a.png", images[0]):
        assert source_key(source, policy, PARAMS) is None


def test_source_keys_keep_their_values():
    """The tiling parameters enter a source key as the ``repr`` of their plain tuple; these digests
    were taken with the parameters as that tuple."""
    key = source_key("data:image/png;base64,AAAA", MediaPolicy(), PARAMS)
    assert key == "a66f58b2938531ca9f27ea0de65293ef"
    key = source_key(b"\x89PNG not really", MediaPolicy(max_pixels=1000), TilingParams(24))
    assert key == "e4a7ebadc435e9d0828aa7ab383f7f51"


def test_the_memo_keeps_the_most_recently_used():
    memo = SourceMemo(max_entries=2)
    memo.put("a", "ha", 1)
    memo.put("b", "hb", 2)
    assert memo.get("a") == ("ha", 1)  # a is now the most recent
    memo.put("c", "hc", 3)
    assert memo.get("b") is None and memo.get("a") == ("ha", 1) and memo.get("c") == ("hc", 3)
    memo.put(None, "x", 1)
    assert memo.get(None) is None and len(memo) == 2


@pytest.fixture()
def pipe(tiny_ckpts):
    with pipeline(tiny_ckpts["original"], PytorchEngineConfig(session_len=4096)) as p:
        yield p


@pytest.fixture()
def decodes(monkeypatch):
    """Every image the pipeline decodes, by source."""
    seen: list = []
    real = images_module.load_image

    def counting(source, policy=None, cancel=None):
        seen.append(source)
        return real(source, policy, cancel)

    monkeypatch.setattr(images_module, "load_image", counting)
    return seen


def chat(url: str, text: str = "describe") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_a_resent_data_url_is_not_decoded_again(pipe, images, decodes):
    url = data_url(images[1])  # 2x1 grid + thumbnail: 3 tiles
    first = pipe(chat(url), gen_config=GEN)
    assert decodes == [url]
    follow = chat(url) + [{"role": "assistant", "content": first.text},
                          {"role": "user", "content": "and the colour?"}]
    req = pipe.prepare_sync(follow, GEN)
    assert decodes == [url]  # recognised by its digest
    assert [im.pixel_values for im in req.images] == [None]
    assert req.images[0].num_tokens == 3 * 256
    again = pipe.prepare_sync(chat(url), GEN)
    assert again.token_ids == pipe.prepare_sync(chat(url), GEN).token_ids
    assert pipe(chat(url), gen_config=GEN).text == first.text
    assert decodes == [url]


def test_a_stricter_policy_checks_the_source_again(pipe, images, decodes):
    url = data_url(images[1])
    pipe(chat(url), gen_config=GEN)
    with pytest.raises(ImageError):
        pipe.prepare_sync(chat(url), GEN, media_policy=MediaPolicy(max_pixels=1000))
    assert decodes == [url, url]


def test_an_image_not_seen_before_is_decoded_even_if_its_hash_is_held(pipe, images, decodes):
    """Only the digest of the very same source skips decoding: a PNG and a data URL of the same
    pixels are both decoded (the content hash then finds the held embedding)."""
    url = data_url(images[2])
    pipe(chat(url), gen_config=GEN)
    req = pipe.prepare_sync([{"role": "user", "content": [
        {"type": "image", "image": images[2]}, {"type": "text", "text": "describe"}]}], GEN)
    assert decodes[-1] is images[2]
    assert req.images[0].pixel_values is None  # the held embedding, found by content


def test_a_memoised_image_evicted_before_its_turn_is_decoded_by_the_engine(pipe, images, decodes):
    url = data_url(images[2])
    expected = pipe(chat(url, "what is this"), gen_config=GEN).text
    req = pipe.prepare_sync(chat(url, "what is this"), GEN)
    assert req.images[0].pixel_values is None and decodes == [url]
    pipe.engine.core.vision.cache.clear()  # as if other images had pushed it out in the meantime

    async def run():
        return [o async for o in pipe.generate_prepared(req, session_id=91)]

    outs = asyncio.run(run())
    assert "".join(o.text for o in outs) == expected
    assert decodes == [url, url]  # decoded again, from the source it came with
    assert req.images[0].pixel_values.shape[0] * 256 == req.images[0].num_tokens


def test_memoised_images_still_count_against_session_len(pipe, images, decodes):
    from vlmdeploy.errors import ContextLengthExceeded

    url = data_url(images[1])  # 3 tiles: 768 tokens
    pipe(chat(url), gen_config=GEN)
    six = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 6
            + [{"type": "text", "text": "compare"}]}]
    with pytest.raises(ContextLengthExceeded):  # 4,608 image tokens > session_len 4,096
        pipe.prepare_sync(six, GEN)
    assert decodes == [url]  # refused from the memo alone
