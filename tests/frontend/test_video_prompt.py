"""Videos in prompts, through the embedded model's real tokenizer and engine (``pipeline()``): the
``(text, video)`` form and ``video_url`` / ``video`` parts become ``Frame{i}: <image>\\n`` per
frame before the text, each frame an ordinary image block of one tile, exactly the token layout
the model card's ``model.chat`` builds; bad video requests are InvalidRequestErrors."""

from __future__ import annotations

import pytest

pytest.importorskip("av")

from video_samples import data_url, make_video  # noqa: E402

from vlmdeploy import GenerationConfig, pipeline  # noqa: E402
from vlmdeploy.errors import ContextLengthExceeded, InvalidRequestError, VideoError  # noqa: E402
from vlmdeploy.frontend.prompt import build_conversation, has_images, to_messages  # noqa: E402
from vlmdeploy.vl import load_video  # noqa: E402
from vlmdeploy.vl.constants import IMAGE_TOKEN  # noqa: E402
from vlmdeploy.vl.media_policy import MediaPolicy, VideoLimits  # noqa: E402

GEN = GenerationConfig(max_new_tokens=4)
QUESTION = "What is in the video?"


@pytest.fixture(scope="module")
def pipe():
    with pipeline() as p:  # the embedded tiny InternVL3.5-architecture model
        yield p


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_video(40, fps=10)


def card_ids(pipe, num_frames: int, tiles: int = 1) -> list[int]:
    """The model card's prompt: ``Frame{i}: <image>\\n`` per frame, then the question, each
    ``<image>`` replaced by ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) +
    ``</img>``, in the checkpoint's template, tokenised as one string."""
    block = "<img>" + "<IMG_CONTEXT>" * (pipe.preparer.tokens_per_tile * tiles) + "</img>"
    prefix = "".join(f"Frame{i}: {block}\n" for i in range(1, num_frames + 1))
    text = pipe.preparer.prompts.template.render([{"role": "user",
                                                   "content": prefix + QUESTION}])
    return pipe.tokenizer.encode(text)


def tiles(pipe, req) -> list[int]:
    return [im.num_tokens // pipe.preparer.tokens_per_tile for im in req.images]


def video_part(url: str, **options) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **options}}


def test_tuple_form_gives_the_card_token_layout(pipe, clip):
    video = load_video(clip, num_frames=4)
    req = pipe.prepare_sync((QUESTION, video))
    assert req.prompt.count("Frame") == 4
    assert "Frame1: " + IMAGE_TOKEN + "\nFrame2: " in req.prompt
    assert req.token_ids == card_ids(pipe, 4)
    assert tiles(pipe, req) == [1] * 4


def test_video_url_part_gives_the_same_prompt_as_the_loaded_video(pipe, clip):
    loaded = pipe.prepare_sync((QUESTION, load_video(clip, num_frames=5)))
    messages = [{"role": "user", "content": [video_part(data_url(clip), num_frames=5),
                                             {"type": "text", "text": QUESTION}]}]
    from_url = pipe.prepare_sync(messages)
    assert from_url.token_ids == loaded.token_ids == card_ids(pipe, 5)
    assert [im.content_hash for im in from_url.images] == [
        im.content_hash for im in loaded.images]


def test_default_frames_and_tiles_per_frame(pipe, clip):
    req = pipe.prepare_sync([{"role": "user", "content": [
        {"type": "video", "video": clip}, {"type": "text", "text": QUESTION}]}])
    assert len(req.images) == 8  # the policy's default_frames
    two_tiles = make_video(20, size=(128, 48))  # wide frames: 2 tiles + thumbnail when allowed
    req = pipe.prepare_sync([{"role": "user", "content": [
        video_part(data_url(two_tiles), num_frames=2, max_dynamic_patch=2),
        {"type": "text", "text": QUESTION}]}])
    assert tiles(pipe, req) == [3, 3]


def test_video_answer_end_to_end(pipe, clip):
    video = load_video(clip, num_frames=4)
    by_tuple = pipe((QUESTION, video), gen_config=GEN)
    by_url = pipe([{"role": "user", "content": [video_part(data_url(clip), num_frames=4),
                                                {"type": "text", "text": QUESTION}]}],
                  gen_config=GEN)
    assert by_tuple.text and by_tuple.token_ids == by_url.token_ids
    assert by_tuple.input_token_len == len(card_ids(pipe, 4))


def test_follow_up_question_neither_decodes_nor_encodes_again(pipe, clip, monkeypatch):
    import pickle

    import vlmdeploy.vl.video as video_module
    from vlmdeploy.frontend.images import InlineVideoFrameTiles

    messages = [{"role": "user", "content": [video_part(data_url(clip), num_frames=3),
                                             {"type": "text", "text": QUESTION}]}]
    first = pipe(messages, gen_config=GEN)
    decodes = []
    real_decode = video_module.decode_sampled
    monkeypatch.setattr(video_module, "decode_sampled",
                        lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    again = pipe.prepare_sync([*messages, {"role": "assistant", "content": first.text},
                               {"role": "user", "content": "And then?"}])
    assert decodes == []  # an inline video seen before: recognised by its digest
    assert all(pipe.preparer.engine.has_cached_image(im.content_hash) for im in again.images)
    assert all(im.pixel_values is None for im in again.images)  # embeddings held: no tiles
    deferred = again.images[1].deferred
    assert isinstance(deferred, InlineVideoFrameTiles) and deferred.index == 1
    fresh = pipe.prepare_sync(messages).images  # the first prompt again: the same hashes
    tiles_again = pickle.loads(pickle.dumps(deferred)).make_tiles()  # if evicted: made anew
    assert tiles_again.shape == (1, 448, 448, 3) and decodes == [1]
    assert [im.content_hash for im in fresh] == [im.content_hash for im in again.images]
    assert pipe(messages, gen_config=GEN).token_ids == first.token_ids


def test_images_and_videos_mix(pipe, clip, images):
    req = pipe.prepare_sync([{"role": "user", "content": [
        {"type": "image", "image": images[0]}, video_part(data_url(clip), num_frames=2),
        {"type": "text", "text": QUESTION}]}])
    assert req.prompt.count(IMAGE_TOKEN) == 3
    assert req.prompt.index(IMAGE_TOKEN) < req.prompt.index("Frame1: ")


def test_images_keep_their_forms():
    assert to_messages(("hi", "http://x/a.png"))[0]["content"][0]["type"] == "image"
    assert not has_images("plain text")
    assert has_images([{"role": "user", "content": [video_part("data:video/mp4;base64,AA")]}])


def test_explicit_image_placeholders_with_videos_are_refused(clip):
    with pytest.raises(InvalidRequestError) as err:
        build_conversation([{"role": "user", "content": [
            video_part(data_url(clip)), {"type": "text", "text": f"{IMAGE_TOKEN} and this"}]}])
    assert err.value.code == "invalid_prompt"


@pytest.mark.parametrize("options,code", [
    ({"num_frames": 65}, "invalid_video_params"), ({"num_frames": 0}, "invalid_video_params"),
    ({"start": 5, "end": 1}, "invalid_video_params"),
    ({"max_dynamic_patch": 100}, "invalid_max_dynamic_patch"),
])
def test_bad_video_options_are_invalid_requests(pipe, clip, options, code):
    with pytest.raises(InvalidRequestError) as err:
        pipe.prepare_sync([{"role": "user", "content": [video_part(data_url(clip), **options)]}])
    assert err.value.code == code
    assert err.value.param.startswith("messages[0].content[0].video_url")


def test_broken_video_names_its_part(pipe):
    with pytest.raises(VideoError) as err:
        pipe.prepare_sync([{"role": "user", "content": [
            {"type": "text", "text": "look"}, video_part(data_url(b"\x00" * 64))]}])
    assert err.value.param == "messages[0].content[1].video_url.url"
    assert err.value.code == "unsupported_video_type"


def test_too_many_frames_for_the_session_is_refused_before_decoding(pipe):
    policy = MediaPolicy(video=VideoLimits(max_frames=4096))
    never_decoded = data_url(b"\x00" * 64)  # would be unsupported_video_type if decoded
    with pytest.raises(ContextLengthExceeded):
        pipe.prepare_sync([{"role": "user", "content": [video_part(never_decoded,
                                                                    num_frames=4000)]}],
                          media_policy=policy)
