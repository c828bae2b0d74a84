"""`vlmdeploy chat`'s `/video PATH [FRAMES]`: a video part in the next message, attached in order
with images, under the same source rules as `/image` and a frame count checked when typed; and a
chat about a short generated video on the embedded model, whose prompts hold the video's frames
labelled as the model card labels them, in the turn that attached it and in the history after."""

from __future__ import annotations

import io

import pytest
from fake_pipeline import FakePipeline
from PIL import Image

from vlmdeploy.cli.chat import ChatSession, chat_loop
from vlmdeploy.messages import GenerationConfig

av = pytest.importorskip("av")

from video_samples import make_video  # noqa: E402


def run_chat(lines: list[str], pipe=None) -> tuple[object, str, str]:
    pipe = pipe or FakePipeline()
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(pipe, GenerationConfig(max_new_tokens=4), out, err)
    assert chat_loop(session, lines) == 0
    return pipe, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("video") / "my clip.mp4"  # a space in the name
    path.write_bytes(make_video(20, fps=10))
    return str(path)


def video(url: str, frames: int | None = None) -> dict:
    spec = {"url": url} if frames is None else {"url": url, "num_frames": frames}
    return {"type": "video_url", "video_url": spec}


def test_videos_and_images_go_in_the_order_attached_and_once(clip, tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    url = "https://example.com/v.mp4"
    pipe, out, err = run_chat([f"/video {clip} 4", f"/image {image}", f"/video {url} 16",
                               f"/video {clip}", "what happens?", "and then?"])
    first, second = (p.prompt for p in pipe.prepared)
    assert first[0]["content"] == [video(clip, 4), {"type": "image_url",
                                                    "image_url": {"url": str(image)}},
                                   video(url, 16), video(clip), {"type": "text",
                                                                 "text": "what happens?"}]
    assert second[0] == first[0] and second[2] == {"role": "user", "content": "and then?"}
    assert err.count("video attached") == 3 and "(video attached: 4 pending)" in err


def test_a_terminal_block_attaches_its_video_lines(clip):
    pipe, _, _ = run_chat([f"/video {clip} 2\nwhat happens?\n/image /no/such.png"])
    assert pipe.prepared[0].prompt[0]["content"] == [video(clip, 2),
                                                     {"type": "text", "text": "what happens?"}]


@pytest.mark.parametrize("command, said", [
    ("/video /no/such/clip.mp4", "no such file"),
    ("/video /no/such/clip.mp4 8", "no such file"),
    ("/video {clip} 0", "frames must be from 1 to 64"),
    ("/video {clip} 65", "frames must be from 1 to 64"),
    ("/video", "/video PATH [FRAMES]"),
])
def test_refused_videos_are_said_and_not_sent(clip, command, said):
    pipe, out, err = run_chat([command.format(clip=clip), "hi"])
    assert said in err and "video attached" not in err
    assert pipe.prepared[0].prompt == [{"role": "user", "content": "hi"}] and out


def test_chat_about_a_video_on_the_embedded_model(clip):
    """The real pipeline: the first question's prompt holds the video's 4 frames, one tile each,
    labelled Frame1..Frame4 before the text; the follow-up keeps them in its history."""
    from vlmdeploy import pipeline

    with pipeline() as pipe:
        prepared = []
        prepare = pipe.prepare

        async def recording(*args, **kwargs):
            prepared.append(await prepare(*args, **kwargs))
            return prepared[-1]

        pipe.prepare = recording
        _, out, err = run_chat([f"/video {clip} 4", "What is in the video?", "And then?"], pipe)
    assert "Traceback" not in err and len(out.splitlines()) == 2  # two answers
    labels = "".join(f"Frame{i}: <IMAGE_TOKEN>\n" for i in range(1, 5))
    for req in prepared:
        assert len(req.images) == 4 and req.prompt.count(labels) == 1
        assert [im.num_tokens for im in req.images] == [pipe.preparer.tokens_per_tile] * 4
    assert prepared[1].prompt.endswith("And then?<|im_end|>\n<|im_start|>assistant\n")
    assert [im.content_hash for im in prepared[1].images] == [
        im.content_hash for im in prepared[0].images]
