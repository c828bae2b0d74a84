"""Video input (vlmdeploy.vl.video): the model card's frame sampling, the frames decoded at those
indices from every accepted container, the same source rules and guards as images, and a corpus of
broken and hostile files each refused with a VideoError (a 400), never a crash or a hang."""

from __future__ import annotations

import http.server
import os
import threading
import time

import numpy as np
import pytest

pytest.importorskip("av")

from video_samples import STEP, data_url, frame_grey, make_audio_only, make_video  # noqa: E402

from vlmdeploy.errors import ImageError, InvalidRequestError, VideoError  # noqa: E402
from vlmdeploy.vl import Video, load_video  # noqa: E402
from vlmdeploy.vl.media_policy import MediaPolicy, VideoLimits  # noqa: E402
from vlmdeploy.vl.video import frame_indices, sniff_video  # noqa: E402


def card_get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    """The InternVL3.5 model card's rule, written out as the card states it."""
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx))
            for idx in range(num_segments)]


@pytest.mark.parametrize("total", [1, 2, 7, 8, 9, 31, 32, 33, 100, 241, 1800, 10_007])
@pytest.mark.parametrize("fps", [1.0, 23.976, 25.0, 29.97, 30.0, 60.0])
@pytest.mark.parametrize("segments", [1, 4, 8, 16, 32])
def test_frame_indices_equal_the_card_rule_over_whole_videos(total, fps, segments):
    assert frame_indices(total, fps, segments) == card_get_index(None, fps, total - 1, 0,
                                                                  segments)


@pytest.mark.parametrize("bound", [(0.0, 1.0), (0.5, 2.25), (1.0, 3.0), (2.0, 100.0), (0, 0.4),
                                   (3.3, 3.4), (7.25, 9.0)])
@pytest.mark.parametrize("fps", [10.0, 29.97, 30.0])
@pytest.mark.parametrize("segments", [1, 3, 8, 32])
def test_frame_indices_equal_the_card_rule_over_clips(bound, fps, segments):
    total = 120
    assert frame_indices(total, fps, segments, *bound) == card_get_index(
        bound, fps, total - 1, 0, segments)


def test_frame_indices_known_values():
    assert frame_indices(40, 10.0, 8) == [2, 7, 12, 17, 22, 26, 31, 36]  # midpoints of 8 parts
    assert frame_indices(3, 30.0, 8) == [0, 0, 0, 1, 1, 1, 2, 2]  # short video: repeats
    assert frame_indices(300, 30.0, 4, 2.0, 4.0) == [67, 82, 97, 112]  # frames 60..120


def test_one_bound_leaves_the_other_open():
    assert frame_indices(100, 10.0, 4, start=5.0) == card_get_index((5.0, 100000), 10.0, 99, 0, 4)
    assert frame_indices(100, 10.0, 4, end=5.0) == card_get_index((-100000, 5.0), 10.0, 99, 0, 4)


# --------------------------------------------------------------------------- decoding and seeking

CONTAINERS = [("mp4", "libx264"), ("webm", "libvpx-vp9"), ("matroska", "libx264"),
              ("avi", "mpeg4"), ("mov", "mpeg4")]


def greys(video: Video) -> list[int]:
    return [frame_grey(f) for f in video.frames]


def assert_frames_are(video: Video, indices: list[int]) -> None:
    assert list(video.indices) == indices
    expected = [(i * STEP) % 256 for i in indices]
    assert all(abs(g - e) <= 2 for g, e in zip(greys(video), expected, strict=True)), (
        greys(video), expected)


@pytest.mark.parametrize("fmt,codec", CONTAINERS)
def test_sampled_frames_are_decoded_from_every_container(fmt, codec):
    data = make_video(40, fps=10, fmt=fmt, codec=codec)
    video = load_video(data, num_frames=8)
    assert_frames_are(video, frame_indices(40, 10.0, 8))
    assert (video.fps, video.num_stream_frames, len(video)) == (10.0, 40, 8)
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in video.frames)
    assert video.timestamps[0] == pytest.approx(0.2)


@pytest.mark.parametrize("gop", [1, 5, 250])
@pytest.mark.parametrize("num_frames", [1, 7, 32, 64])
def test_seeking_gives_the_frames_decoding_all_would(gop, num_frames):
    data = make_video(90, fps=30, gop=gop)
    assert_frames_are(load_video(data, num_frames=num_frames),
                      frame_indices(90, 30.0, num_frames))


def test_clip_bounds_and_repeated_frames():
    data = make_video(60, fps=10)
    assert_frames_are(load_video(data, num_frames=4, start=1.0, end=3.0),
                      frame_indices(60, 10.0, 4, 1.0, 3.0))
    short = make_video(3, fps=10)
    assert_frames_are(load_video(short, num_frames=8), [0, 0, 0, 1, 1, 1, 2, 2])


def test_default_frame_count_comes_from_the_policy():
    data = make_video(40)
    assert len(load_video(data)) == 8
    policy = MediaPolicy(video=VideoLimits(default_frames=3, max_frames=5))
    assert len(load_video(data, policy=policy)) == 3
    with pytest.raises(VideoError) as err:
        load_video(data, num_frames=6, policy=policy)
    assert err.value.code == "invalid_video_params"


@pytest.mark.parametrize("kwargs", [dict(num_frames=0), dict(num_frames=2.0),
                                    dict(num_frames=True), dict(start=-1.0),
                                    dict(start=float("nan")), dict(start=3.0, end=2.0),
                                    dict(end="5")])
def test_bad_sampling_options_are_refused(kwargs):
    with pytest.raises(VideoError) as err:
        load_video(make_video(10), **kwargs)
    assert err.value.code == "invalid_video_params" and err.value.status == 400


# ------------------------------------------------------------------------------------ the sources


def test_sources_data_url_path_and_file_url(tmp_path):
    data = make_video(20)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    expected = greys(load_video(data, num_frames=4))
    for source in (data_url(data), str(path), path, f"file://{path}",
                   data_url(data, "application/octet-stream")):
        assert greys(load_video(source, num_frames=4)) == expected


def test_server_policy_refuses_local_files_and_confines_them(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(make_video(10))
    with pytest.raises(VideoError) as err:
        load_video(str(path), policy=MediaPolicy.server_default())
    assert err.value.code == "invalid_video_url" and str(tmp_path) not in err.value.message
    inside = MediaPolicy.server_default(allow_local_files=True, local_root=str(tmp_path))
    assert len(load_video("clip.mp4", num_frames=2, policy=inside)) == 2
    with pytest.raises(VideoError) as err:
        load_video("../etc/passwd", policy=inside)
    assert err.value.code == "invalid_video_url"


@pytest.mark.parametrize("url", ["gopher://x/y", "ftp://host/v.mp4", "data:video/mp4,abc",
                                 "data:image/png;base64,AAAA", "data:video/mp4;base64,@@@@"])
def test_bad_urls_are_refused(url):
    with pytest.raises(VideoError) as err:
        load_video(url)
    assert err.value.code in ("invalid_video_url", "unsupported_video_type",
                              "invalid_video_format")


def test_loopback_urls_are_refused_like_images():
    with pytest.raises(VideoError) as err:
        load_video("http://127.0.0.1:9/v.mp4", policy=MediaPolicy.server_default())
    assert err.value.code == "invalid_video_url"
    assert "127.0.0.1" not in err.value.message and "image" not in err.value.message


class _VideoHost(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[str, bytes]] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        ctype, body = self.routes.get(self.path, ("text/plain", b"missing"))
        self.send_response(200 if self.path in self.routes else 404)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def video_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _VideoHost)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_fetch_with_video_content_types(video_host):
    data = make_video(20)
    _VideoHost.routes = {"/v.mp4": ("video/mp4", data), "/o": ("application/octet-stream", data),
                         "/page": ("text/html", b"<html>"), "/big": ("video/mp4", data)}
    policy = MediaPolicy(allow_private_networks=True, timeout_s=5)
    assert len(load_video(f"{video_host}/v.mp4", num_frames=3, policy=policy)) == 3
    assert len(load_video(f"{video_host}/o", num_frames=3, policy=policy)) == 3
    for path, code in (("/page", "invalid_video_url"), ("/nope", "invalid_video_url")):
        with pytest.raises(VideoError) as err:
            load_video(f"{video_host}{path}", policy=policy)
        assert err.value.code == code
    small = MediaPolicy(allow_private_networks=True, video=VideoLimits(max_bytes=1000))
    with pytest.raises(VideoError) as err:
        load_video(f"{video_host}/big", policy=small)
    assert err.value.code == "video_too_large"


# -------------------------------------------------------------------------- broken and hostile

GOOD = None


def good() -> bytes:
    global GOOD
    GOOD = GOOD or make_video(40)
    return GOOD


def hostile_corpus() -> list[tuple[str, bytes, MediaPolicy | None, str]]:
    """(name, file, policy, expected code)."""
    data = good()
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    cut = data[: len(data) // 2]
    flipped = bytearray(data)
    flipped[64: len(flipped) - 64] = bytes(len(flipped) - 128)  # moov intact, frames zeroed
    return [
        ("empty", b"", None, "invalid_video_format"),
        ("ftyp then noise", data[:32] + noise, None, "invalid_video_format"),
        ("noise", noise, None, "unsupported_video_type"),
        ("png", b"\x89PNG\r\n\x1a\n" + noise, None, "unsupported_video_type"),
        ("truncated", cut, None, "invalid_video_format"),
        ("zeroed payload", bytes(flipped), None, "invalid_video_format"),
        ("audio only", make_audio_only(), None, "invalid_video_format"),
        ("webm header then noise", b"\x1a\x45\xdf\xa3" + noise, None, "invalid_video_format"),
        ("too long", data, MediaPolicy(video=VideoLimits(max_duration_s=1.0)), "video_too_large"),
        ("too many frames", data, MediaPolicy(video=VideoLimits(max_stream_frames=10)),
         "video_too_large"),
        ("too many pixels", data, MediaPolicy(video=VideoLimits(max_pixels=64 * 47)),
         "video_too_large"),
        ("too many pixels in all", data,
         MediaPolicy(video=VideoLimits(max_total_pixels=64 * 48 * 7)), "video_too_large"),
        ("too many bytes", data, MediaPolicy(video=VideoLimits(max_bytes=1000)),
         "video_too_large"),
        ("decode timeout", data, MediaPolicy(video=VideoLimits(decode_timeout_s=1e-9)),
         "video_decode_timeout"),
        ("codec not allowed", data, MediaPolicy(video=VideoLimits(allowed_codecs=("vp9",))),
         "unsupported_video_type"),
    ]


@pytest.mark.parametrize("case", hostile_corpus(), ids=lambda c: c[0])
def test_hostile_and_broken_videos_are_refused(case, tmp_path):
    name, data, policy, code = case
    start = time.monotonic()
    for source in (data, data_url(data)):
        with pytest.raises(VideoError) as err:
            load_video(source, num_frames=8, policy=policy)
        exc = err.value
        assert isinstance(exc, ImageError) and isinstance(exc, InvalidRequestError)
        # a zeroed payload may still demux; whatever decodes must then be refused or be frames
        assert exc.code == code or (name == "zeroed payload"), (exc.code, code)
        assert exc.status == 400
        assert "Error" not in exc.message and str(tmp_path) not in exc.message
    assert time.monotonic() - start < 10


def test_zeroed_payload_never_crashes():
    """Frames of zeros may decode (as grey) or be refused: either way no other exception."""
    data = bytearray(good())
    data[200:-200] = bytes(len(data) - 400)
    try:
        load_video(bytes(data), num_frames=4)
    except VideoError as exc:
        assert exc.status == 400


def test_cancel_stops_decoding():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(VideoError) as err:
        load_video(good(), cancel=cancel)
    assert err.value.code == "cancelled"


def test_sniffing():
    assert sniff_video(make_video(2)) == "mov"
    assert sniff_video(make_video(2, fmt="webm", codec="libvpx-vp9")) == "matroska"
    assert sniff_video(make_video(2, fmt="avi", codec="mpeg4")) == "avi"
    assert sniff_video(b"#EXTM3U\n#EXT-X-VERSION:3\n") is None  # playlists never reach FFmpeg
    assert sniff_video(b"ffconcat version 1.0\nfile /etc/passwd") is None


def test_random_files_never_escape_as_other_errors():
    rng = np.random.default_rng(7)
    data = good()
    for _ in range(40):
        mutated = bytearray(data)
        for pos in rng.integers(32, len(data), 24):
            mutated[pos] = int(rng.integers(0, 256))
        try:
            load_video(bytes(mutated), num_frames=4)
        except VideoError as exc:
            assert exc.status == 400


def test_huge_declared_data_url_refused_before_decoding():
    policy = MediaPolicy(video=VideoLimits(max_bytes=1024))
    with pytest.raises(VideoError) as err:
        load_video("data:video/mp4;base64," + "A" * 4096, policy=policy)
    assert err.value.code == "video_too_large"


def test_missing_pyav_is_a_clear_refusal(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("no av")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(VideoError) as err:
        load_video(good())
    assert err.value.code == "unsupported_video_type" and "vlmdeploy[video]" in err.value.message


def test_does_not_touch_the_path_text(tmp_path):
    secret = tmp_path / "secret-name.mp4"
    secret.write_bytes(b"not a video at all, just text")
    with pytest.raises(VideoError) as err:
        load_video(str(secret))
    assert "secret-name" not in err.value.message and os.fspath(tmp_path) not in str(err.value)
