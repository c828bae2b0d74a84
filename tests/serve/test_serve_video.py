"""`video_url` content parts through the HTTP server: validated with exact params, decoded and
sampled by the real pipeline (tiny checkpoint, CPU), answered; broken and hostile videos are 400s
in OpenAI's envelope, streaming ones before the first byte."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from serve_helpers import assert_error, chat

pytest.importorskip("av")

from video_samples import data_url, make_audio_only, make_video  # noqa: E402

from vlmdeploy.serve import ServerConfig, create_app  # noqa: E402

URL = "/v1/chat/completions"


def video_chat(url: str, text: str = "What happens?", **options) -> dict:
    return chat([{"type": "video_url", "video_url": {"url": url, **options}},
                 {"type": "text", "text": text}], max_tokens=3)


@pytest.fixture(scope="module")
def clip() -> str:
    return data_url(make_video(30, fps=10))


@pytest.fixture(scope="module")
def real(real_pipe) -> TestClient:
    return TestClient(create_app(real_pipe, ServerConfig(video_num_frames=2,
                                                         max_video_frames=6)))


def test_video_request_end_to_end(real, real_pipe, clip):
    response = real.post(URL, json=video_chat(clip, num_frames=3))
    assert response.status_code == 200, response.text
    body = response.json()
    per_frame = real_pipe.preparer.tokens_per_tile + 2
    text_only = real.post(URL, json=chat("What happens?", max_tokens=3)).json()
    frame_text = len(real_pipe.tokenizer.encode("Frame1: \nFrame2: \nFrame3: \n"))
    assert body["usage"]["prompt_tokens"] == (
        text_only["usage"]["prompt_tokens"] + 3 * per_frame + frame_text)


def test_server_default_frame_count(real, clip):
    two = real.post(URL, json=video_chat(clip)).json()["usage"]["prompt_tokens"]
    three = real.post(URL, json=video_chat(clip, num_frames=3)).json()["usage"]["prompt_tokens"]
    assert three > two


def test_streaming_video_request(real, clip):
    body = {**video_chat(clip, num_frames=2), "stream": True}
    with real.stream("POST", URL, json=body) as response:
        assert response.status_code == 200
        assert "[DONE]" in "".join(response.iter_text())


def test_frames_over_the_server_cap_are_refused(real, clip):
    assert_error(real.post(URL, json=video_chat(clip, num_frames=7)), 400,
                 "invalid_video_params", "messages[0].content[0].video_url")


@pytest.mark.parametrize("name,url,code", [
    ("corrupt", data_url(b"\x00\x00\x00\x18ftypmp42" + bytes(500)), "invalid_video_format"),
    ("empty", "data:video/mp4;base64,", "invalid_video_format"),
    ("audio only", data_url(make_audio_only()), "invalid_video_format"),
    ("not a video", data_url(b"GIF89a" + bytes(100)), "unsupported_video_type"),
    ("image mime", "data:image/png;base64,AAAA", "unsupported_video_type"),
    ("bad base64", "data:video/mp4;base64,@@@", "invalid_video_format"),
    ("loopback", "http://127.0.0.1:9/v.mp4", "invalid_video_url"),
    ("local file", "/etc/passwd", "invalid_video_url"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_broken_and_hostile_videos_are_400(real, name, url, code, stream):
    body = {**video_chat(url), "stream": stream}
    error = assert_error(real.post(URL, json=body), 400, code,
                         "messages[0].content[0].video_url.url")
    assert "127.0.0.1" not in error["message"] and "/etc" not in error["message"]


def test_too_long_and_too_large_videos_are_400(real_pipe):
    from vlmdeploy.vl.media_policy import MediaPolicy, VideoLimits

    tight = MediaPolicy.server_default(video=VideoLimits(
        default_frames=2, max_duration_s=1.0, max_pixels=10_000_000))
    client = TestClient(create_app(real_pipe, ServerConfig(), media_policy=tight))
    long_clip = data_url(make_video(30, fps=10))  # 3 s
    assert_error(client.post(URL, json=video_chat(long_clip)), 400, "video_too_large")
    few_pixels = MediaPolicy.server_default(video=VideoLimits(default_frames=2, max_pixels=100))
    client = TestClient(create_app(real_pipe, ServerConfig(), media_policy=few_pixels))
    assert_error(client.post(URL, json=video_chat(long_clip)), 400, "video_too_large")
    slow = MediaPolicy.server_default(video=VideoLimits(default_frames=2,
                                                        decode_timeout_s=1e-9))
    client = TestClient(create_app(real_pipe, ServerConfig(), media_policy=slow))
    assert_error(client.post(URL, json=video_chat(long_clip)), 400, "video_decode_timeout")


@pytest.mark.parametrize("spec,param", [
    ({"url": ""}, "messages[0].content[0].video_url.url"),
    ({"url": 5}, "messages[0].content[0].video_url.url"),
    ({"url": "x", "num_frames": "8"}, "messages[0].content[0].video_url.num_frames"),
    ({"url": "x", "num_frames": 0}, "messages[0].content[0].video_url.num_frames"),
    ({"url": "x", "start": -1}, "messages[0].content[0].video_url.start"),
    ({"url": "x", "end": "2"}, "messages[0].content[0].video_url.end"),
    ({"url": "x", "max_dynamic_patch": 1.5},
     "messages[0].content[0].video_url.max_dynamic_patch"),
    ("x", "messages[0].content[0].video_url"),
])
def test_malformed_video_parts_name_their_param(client, fake, spec, param):
    body = chat([{"type": "video_url", "video_url": spec}])
    assert_error(client.post(URL, json=body), 400, None, param)
    assert fake.prepared == []


def test_videos_only_in_user_messages_and_bounded_in_number(client, fake):
    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    body = {"messages": [{"role": "system", "content": [part]}, {"role": "user", "content": "x"}]}
    assert_error(client.post(URL, json=body), 400, "unsupported_content_type",
                 "messages[0].content[0]")
    assert_error(client.post(URL, json=chat([part] * 5)), 400, "too_many_videos", "messages")
    assert fake.prepared == []


def test_valid_video_part_reaches_the_pipeline_normalized(client, fake):
    spec = {"url": "data:video/mp4;base64,AAAA", "num_frames": 4, "start": 1, "end": 2.5,
            "max_dynamic_patch": 1, "extra": "dropped"}
    response = client.post(URL, json=chat([{"type": "video_url", "video_url": spec}]))
    assert response.status_code == 200, response.text
    assert fake.prepared[-1].prompt[0]["content"][0] == {
        "type": "video_url", "video_url": {k: v for k, v in spec.items() if k != "extra"}}
