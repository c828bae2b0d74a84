"""Video input: load an untrusted video and sample its frames as InternVL3.5's model card does.

``load_video(source, num_frames=8)`` accepts what ``load_image`` accepts (bytes, a local path or
``file://`` URL under the same allow-list, a ``data:video/...;base64,`` URL, an http(s) URL under
the same SSRF guards) and returns a :class:`Video`: the sampled frames as RGB PIL images, their
indices and the stream's frame rate. A prompt then shows each frame as ``Frame{i}: <image>\\n``
(i from 1) before the text, each frame one 448 tile unless asked otherwise
(:mod:`vlmdeploy.frontend.prompt`), so the engine sees ordinary images.

Sampling is the card's ``get_index``: the clip ``[start, end]`` seconds (default: the whole
video) is cut into ``num_frames`` equal segments and the frame at each segment's midpoint is taken
(:func:`frame_indices`, tested against the rule). Frame ``i`` is the ``i``-th frame in
presentation order, counted from the container's packet index, as decord (the card's reader)
counts them; the pixels are FFmpeg's RGB conversion, identical to decord's on the videos measured
(docs/video.md).

Decoding uses PyAV (FFmpeg), imported on first use (``pip install vlmdeploy[video]``). It never
decodes the whole video: the packet index (read without decoding) gives every frame's timestamp
and the keyframes, and the decoder seeks to the keyframe before each sampled frame, decoding
forward only when the next sampled frame lies before the next keyframe.

Every failure is a :class:`~vlmdeploy.errors.VideoError` (an ``ImageError``: a 400) with a fixed
message. What the :class:`~vlmdeploy.vl.media_policy.VideoLimits` of the policy bound: the file's
bytes (before base64 decoding for data URLs, capped reads for HTTP and files), the container
(magic bytes: MP4/MOV, Matroska/WebM or AVI; FFmpeg never probes), the codec (an allow-list), the
stated duration and frame count, each frame's pixels (from the stream header, and again for each
decoded frame), and demuxing plus decoding together (a deadline checked between packets and
frames). Corrupt, empty and audio-only files are refused, never a 500 or a hang.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vlmdeploy.errors import ImageError, VideoError
from vlmdeploy.vl.b64 import b64decode_strict
from vlmdeploy.vl.fetch import fetch_http
from vlmdeploy.vl.media_policy import MediaPolicy, VideoLimits

__all__ = ["Video", "VideoClip", "VideoFrame", "frame_indices", "load_video", "sniff_video"]

MSG_URL = "The video URL is invalid or not allowed."
MSG_FORMAT = "The video data could not be decoded."
MSG_TYPE = "The video type is not supported."
MSG_TOO_LARGE = "The video exceeds the size limit."
MSG_TOO_LONG = "The video is longer than allowed."
MSG_NO_VIDEO = "The file holds no video stream."
MSG_EMPTY = "The video has no frames."
MSG_TIMEOUT = "Decoding the video took too long."
MSG_NO_DECODER = "Video decoding needs PyAV on the server: pip install 'vlmdeploy[video]'."


def _fail(code: str, message: str) -> VideoError:
    return VideoError(message, code=code)


# ---------------------------------------------------------------------------------- the sampling


def frame_indices(
    num_stream_frames: int,
    fps: float,
    num_frames: int,
    start: float | None = None,
    end: float | None = None,
) -> list[int]:
    """The model card's ``get_index``: ``num_frames`` frame indices at the midpoints of equal
    segments of the clip ``[start, end]`` seconds (the whole video when both are None; one bound
    alone leaves the other open). Indices repeat when the clip has fewer frames than segments."""
    last = num_stream_frames - 1
    first_idx = 0
    # Python's round and numpy's round both round halves to even, exactly as the card computes.
    start_idx = max(first_idx, round((-100000 if start is None else start) * fps))
    end_idx = min(round((100000 if end is None else end) * fps), last)
    seg = float(end_idx - start_idx) / num_frames
    return [int(start_idx + seg / 2 + np.round(seg * i)) for i in range(num_frames)]


# ------------------------------------------------------------------------------------- the result


@dataclass(frozen=True, eq=False)
class Video:
    """Sampled frames of a video, ready to go into a prompt as ``(text, video)`` or as a
    ``{"type": "video", "video": video}`` part. ``max_dynamic_patch`` is the tiles per frame
    (the card uses 1)."""

    frames: tuple[Image.Image, ...]
    indices: tuple[int, ...]
    fps: float
    num_stream_frames: int
    max_dynamic_patch: int = 1

    @property
    def timestamps(self) -> tuple[float, ...]:
        """Each frame's time in seconds from the start."""
        return tuple(i / self.fps for i in self.indices)

    def __len__(self) -> int:
        return len(self.frames)


# ------------------------------------------------------------------------------------ public API


def load_video(
    source: str | os.PathLike | bytes,
    num_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    max_dynamic_patch: int = 1,
    policy: MediaPolicy | None = None,
    cancel: threading.Event | None = None,
) -> Video:
    """Load ``source`` and sample ``num_frames`` frames (default ``policy.video.default_frames``)
    over ``[start, end]`` seconds. Raises :class:`~vlmdeploy.errors.VideoError`."""
    policy = policy or MediaPolicy()
    limits = policy.video
    n = check_sampling(num_frames, start, end, limits)
    data = read_video_bytes(source, policy, cancel)
    frames, indices, fps, total = decode_sampled(data, n, start, end, limits, cancel)
    return Video(tuple(frames), tuple(indices), fps, total, max_dynamic_patch)


def check_sampling(
    num_frames: Any, start: Any, end: Any, limits: VideoLimits, param: str | None = None
) -> int:
    """The number of frames to sample (the default when None); refuses a bad count or clip."""
    n = limits.default_frames if num_frames is None else num_frames
    if type(n) is not int or not 1 <= n <= limits.max_frames:
        raise VideoError(f"num_frames must be an integer from 1 to {limits.max_frames}",
                         code="invalid_video_params", param=param)
    for name, value in (("start", start), ("end", end)):
        ok = value is None or (type(value) in (int, float) and math.isfinite(value) and value >= 0)
        if not ok:
            raise VideoError(f"{name} must be a number of seconds >= 0",
                             code="invalid_video_params", param=param)
    if start is not None and end is not None and end <= start:
        raise VideoError("end must be after start", code="invalid_video_params", param=param)
    return n


# ---------------------------------------------------------------------------------- the bytes in


def read_video_bytes(
    source: Any, policy: MediaPolicy, cancel: threading.Event | None = None
) -> bytes:
    """The encoded video from ``source``, under ``policy``'s permissions and the video byte cap.
    Refusals are worded for videos (``invalid_video_url``, ``video_too_large``, ...)."""
    from vlmdeploy.vl import media  # its local-file and URL routing, shared with images

    sized = dataclasses.replace(policy, max_bytes=policy.video.max_bytes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > sized.max_bytes:
            raise _fail("video_too_large", MSG_TOO_LARGE)
        return bytes(source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise _fail("invalid_video_url", MSG_URL)
    try:
        head = source[:8].lower()
        if head.startswith("data:"):
            return _read_data_url(source, sized.max_bytes)
        if head.startswith(("http:", "https:")):
            return fetch_http(source, sized, cancel, media="video")
        if head.startswith("file:"):
            return media._read_local(media._file_url_path(source), sized)
        if media._SCHEME.match(source):
            raise _fail("invalid_video_url", MSG_URL)
        return media._read_local(source, sized)
    except VideoError:
        raise
    except ImageError as exc:
        raise _as_video(exc) from None


_FETCH_CODES = {"invalid_image_url": "invalid_video_url", "image_too_large": "video_too_large",
                "image_fetch_timeout": "video_fetch_timeout"}


def _as_video(exc: ImageError) -> VideoError:
    """An image loader's refusal (fixed messages) in a video's words and codes."""
    message = exc.message.replace("image", "video").replace("an video", "a video")
    return VideoError(message, code=_FETCH_CODES.get(exc.code, exc.code), param=exc.param)


_VIDEO_MIMES = ("video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "video/avi",
                "video/x-msvideo", "video/msvideo", "video/mpeg", "application/octet-stream")


def _read_data_url(text: str, max_bytes: int) -> bytes:
    header, comma, payload = text[5:].partition(",")
    params = header.lower().split(";")
    if not comma or len(params) < 2 or params[-1].strip() != "base64":
        raise _fail("invalid_video_url", MSG_URL)
    if params[0].strip() not in _VIDEO_MIMES:  # the magic bytes decide the container after this
        raise _fail("unsupported_video_type", MSG_TYPE)
    if len(payload) > 4 * -(-max_bytes // 3):  # before decoding: 4 characters carry 3 bytes
        raise _fail("video_too_large", MSG_TOO_LARGE)
    try:
        return b64decode_strict(payload)
    except ValueError:  # binascii.Error is a ValueError
        raise _fail("invalid_video_format", MSG_FORMAT) from None


# ---------------------------------------------------------------------------------- the container


def sniff_video(data: bytes) -> str | None:
    """The FFmpeg demuxer for the container named by the leading bytes, or None. Only these run:
    FFmpeg's probing (and its playlist or concat demuxers, which open other files) never does."""
    if data[4:8] == b"ftyp" or data[4:8] in (b"moov", b"mdat", b"free", b"wide"):
        return "mov"  # MP4, MOV, M4V, 3GP
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # MKV, WebM
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def _import_av() -> Any:
    try:
        import av
    except ImportError:  # an optional extra: a server without it refuses videos, nothing else
        raise _fail("unsupported_video_type", MSG_NO_DECODER) from None
    return av


class _Deadline:
    """Demuxing and decoding share one deadline; a set ``cancel`` stops them too."""

    def __init__(self, seconds: float, cancel: threading.Event | None):
        self.end, self.cancel = time.monotonic() + seconds, cancel

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise _fail("video_decode_timeout", MSG_TIMEOUT)
        if self.cancel is not None and self.cancel.is_set():
            raise VideoError("The request was cancelled.", code="cancelled")


def decode_sampled(
    data: bytes,
    num_frames: int,
    start: float | None,
    end: float | None,
    limits: VideoLimits,
    cancel: threading.Event | None = None,
) -> tuple[list[Image.Image], list[int], float, int]:
    """(frames, their indices, fps, frames in the stream): the card's sampling of ``data``."""
    if len(data) > limits.max_bytes:
        raise _fail("video_too_large", MSG_TOO_LARGE)
    fmt = sniff_video(data)
    if fmt is None:
        raise _fail("invalid_video_format" if len(data) < 12 else "unsupported_video_type",
                    MSG_FORMAT if len(data) < 12 else MSG_TYPE)
    av = _import_av()
    deadline = _Deadline(limits.decode_timeout_s, cancel)
    try:
        with av.open(io.BytesIO(data), mode="r", format=fmt) as container:
            stream = _video_stream(container, limits)
            index = _StreamIndex.read(container, stream, limits, deadline)
            fps = index.fps(stream)
            if index.num_frames / fps > limits.max_duration_s:
                raise _fail("video_too_large", MSG_TOO_LONG)
            indices = frame_indices(index.num_frames, fps, num_frames, start, end)
            _check_total_pixels(stream, len(set(indices)), limits)
            frames = _decode_at(container, stream, index, indices, limits, deadline)
            return frames, indices, fps, index.num_frames
    except VideoError:
        raise
    except MemoryError:
        raise _fail("video_too_large", MSG_TOO_LARGE) from None
    except Exception:  # FFmpeg's errors, and anything a hostile file makes PyAV raise
        raise _fail("invalid_video_format", MSG_FORMAT) from None


def _video_stream(container: Any, limits: VideoLimits) -> Any:
    if not container.streams.video:
        raise _fail("invalid_video_format", MSG_NO_VIDEO)
    stream = container.streams.video[0]
    if stream.codec_context.name not in limits.allowed_codecs:
        raise _fail("unsupported_video_type", MSG_TYPE)
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_pixels:
        raise _fail("video_too_large", MSG_TOO_LARGE)
    duration = container.duration  # microseconds, as the container states it (may be absent)
    if duration is not None and duration / 1e6 > limits.max_duration_s:
        raise _fail("video_too_large", MSG_TOO_LONG)
    stream.thread_type = "AUTO"
    return stream


def _check_total_pixels(stream: Any, distinct_frames: int, limits: VideoLimits) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height * distinct_frames > limits.max_total_pixels:
        raise _fail("video_too_large", MSG_TOO_LARGE)


@dataclass
class _StreamIndex:
    """Every frame's timestamp in presentation order, and the keyframes', from the packets alone
    (nothing decoded): frame ``i`` is ``pts[i]``, as decord counts frames."""

    pts: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @classmethod
    def read(cls, container: Any, stream: Any, limits: VideoLimits,
             deadline: _Deadline) -> _StreamIndex:
        out = cls()
        for n, packet in enumerate(container.demux(stream)):
            if n % 256 == 0:
                deadline.check()
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None or packet.size == 0:  # the demuxer's closing empty packet
                continue
            out.pts.append(ts)
            if packet.is_keyframe:
                out.keys.append(ts)
            if len(out.pts) > limits.max_stream_frames:
                raise _fail("video_too_large", MSG_TOO_LONG)
        if not out.pts:
            raise _fail("invalid_video_format", MSG_EMPTY)
        out.pts.sort()
        out.keys.sort()
        return out

    def fps(self, stream: Any) -> float:
        """The stream's average frame rate (decord's ``get_avg_fps``), else one from the
        timestamps."""
        rate = stream.average_rate or stream.guessed_rate
        if rate and float(rate) > 0:
            return float(rate)
        span = (self.pts[-1] - self.pts[0]) * float(stream.time_base or 0)
        return (self.num_frames - 1) / span if span > 0 and self.num_frames > 1 else 1.0

    def key_before(self, ts: int) -> int:
        at = bisect.bisect_right(self.keys, ts) - 1
        return self.keys[at] if at >= 0 else self.pts[0]


def _decode_at(
    container: Any,
    stream: Any,
    index: _StreamIndex,
    indices: Sequence[int],
    limits: VideoLimits,
    deadline: _Deadline,
) -> list[Image.Image]:
    """The frames at ``indices`` (non-decreasing), seeking to the keyframe before each one unless
    decoding forward from where the decoder stands gets there without passing a keyframe."""
    frames: dict[int, Image.Image] = {}
    decoded = None  # the decoder's frames from the last seek on
    last_ts: int | None = None  # the last frame taken from it
    for i in sorted(set(indices)):
        target = index.pts[i]
        key = index.key_before(target)
        if decoded is None or last_ts is None or target < last_ts or key > last_ts:
            container.seek(key, stream=stream, backward=True, any_frame=False)
            decoded = container.decode(stream)
        frame = _first_at_or_after(decoded, target, limits, deadline)
        if frame is None:  # the stream ended early: the last frame decoded stands in
            if not frames:
                raise _fail("invalid_video_format", MSG_FORMAT)
            frames[i] = frames[max(frames)]
            decoded = None
            continue
        last_ts = frame.pts
        frames[i] = frame.to_image()  # RGB24, FFmpeg's conversion (decord's too)
    return [frames[i] for i in indices]


def _first_at_or_after(decoded: Any, target: int, limits: VideoLimits,
                       deadline: _Deadline) -> Any:
    for frame in decoded:
        deadline.check()
        # a stream may change size midway (the total is checked at the header's size)
        if frame.width * frame.height > limits.max_pixels:
            raise _fail("video_too_large", MSG_TOO_LARGE)
        if frame.pts is not None and frame.pts >= target:
            return frame
    return None


# ------------------------------------------------------------------- a video part of a prompt


@dataclass(eq=False)
class VideoClip:
    """A video part of a prompt, not loaded yet: its source and how to sample it. Its frames
    are decoded once, when the first of them is needed (on a preparation thread)."""

    source: Any
    num_frames: int
    start: float | None = None
    end: float | None = None
    param: str = "messages"
    _video: Video | None = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def source_digest(self) -> str | None:
        """A digest of an inline source (a ``data:`` URL or bytes), else None: what a path or a
        URL names may change, so those are never recognised by name."""
        with self._lock:
            if self._digest is None:
                source = self.source
                if isinstance(source, str) and source[:5].lower() == "data:":
                    data = source.encode("utf-8", "surrogatepass")
                elif isinstance(source, (bytes, bytearray, memoryview)):
                    data = bytes(source)
                else:
                    return None
                self._digest = hashlib.sha256(data).hexdigest()
            return self._digest

    def load(self, policy: MediaPolicy, cancel: threading.Event | None = None) -> Video:
        with self._lock:
            if self._video is None:
                self._video = load_video(self.source, self.num_frames, self.start, self.end,
                                         policy=policy, cancel=cancel)
            return self._video


@dataclass(frozen=True, eq=False)
class VideoFrame:
    """Frame ``index`` (from 0) of a :class:`VideoClip`: what an image of the prompt loads."""

    clip: VideoClip
    index: int

    def image(self, policy: MediaPolicy, cancel: threading.Event | None = None) -> Image.Image:
        return self.clip.load(policy, cancel).frames[self.index]
